"""Accuracy checks and latency profiles of artifacts on the runtime that will run them.

Used by ``compress check``, ``compress profile`` and the recipe pipeline, so every number the
toolchain prints comes from the same code (:mod:`runtimes.measure`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from compress.checkpoint import ModelBundle, load_checkpoint
from compress.data import Dataset
from compress.errors import CheckpointError
from export import Artifact, sha256_file
from runtimes import LatencyStats, evaluate, measure_latency, runtime_for
from runtimes.torch_runtime import TorchSession

log = logging.getLogger(__name__)


def reference_model(
    artifact: Artifact,
    *,
    checkpoint: str | Path | None = None,
    model_factory: str | None = None,
    allow_code: bool = False,
) -> ModelBundle | None:
    """The fp32 torch model an artifact was made from, when it can be found.

    ``checkpoint`` overrides the source recorded in the manifest. A recorded source whose
    sha256 changed since export is not used (it is no longer the same model).
    """
    extra = artifact.manifest.extra
    path = Path(checkpoint) if checkpoint else (Path(extra["source_checkpoint"]) if "source_checkpoint" in extra else None)
    if path is None:
        return None
    if checkpoint is None:
        if not path.is_file():
            log.warning("reference checkpoint %s recorded in the manifest is gone; no torch reference", path)
            return None
        if sha256_file(path) != extra.get("source_sha256"):
            log.warning("reference checkpoint %s changed since export; no torch reference", path)
            return None
    try:
        return load_checkpoint(path, model_factory=model_factory, allow_code=allow_code)
    except CheckpointError:
        if checkpoint is not None:
            raise
        log.warning("reference checkpoint %s cannot be loaded; no torch reference", path)
        return None


def check_artifact(
    artifact: Artifact,
    data: Dataset,
    *,
    target: Any = None,
    reference: ModelBundle | None = None,
    sessions: list[Any] | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Accuracy of the artifact on its runtime, next to the torch reference.

    Args:
        artifact: the artifact to check.
        data: a labelled split (usually ``test``).
        target: the device target (execution providers, threads).
        reference: the fp32 torch model for agreement/SQNR and the accuracy drop.
        sessions: more sessions of the same model to compare (e.g. TVM, remote devices).

    Returns:
        ``{"rows": [{"runtime", "accuracy", "top1_agreement", "sqnr_db", ...}], "accuracy_drop": ...}``
    """
    ref_session = TorchSession(reference.module) if reference is not None else None
    rows: list[dict[str, Any]] = []
    if ref_session is not None:
        rows.append({"runtime": "torch (reference)", "where": "local", **evaluate(ref_session, data)})
    runtime = runtime_for(artifact)
    local = [runtime.prepare(artifact, target, threads=threads)] if runtime.supports(artifact, target) else []
    all_sessions = [*local, *(sessions or [])]
    if not all_sessions:
        from runtimes import RuntimeUnavailableError

        raise RuntimeUnavailableError(
            f"artifact {artifact.path} ({artifact.manifest.format}) cannot run on this machine; "
            "check it on the device with --rpc HOST:PORT --key K"
        )
    for sess in all_sessions:
        r = evaluate(sess, data, reference=ref_session)
        r.pop("reference_accuracy", None)
        rows.append({"runtime": sess.runtime, "where": getattr(sess, "where", "local"), **r})
    main = rows[1] if ref_session is not None else rows[0]
    result: dict[str, Any] = {
        "artifact": str(artifact.path),
        "format": artifact.manifest.format,
        "data": data.name,
        "samples": len(data),
        "rows": rows,
        "accuracy": main["accuracy"],
    }
    if ref_session is not None:
        result["reference_accuracy"] = rows[0]["accuracy"]
        result["accuracy_drop"] = float(rows[0]["accuracy"]) - float(main["accuracy"])
    # Pairwise agreement across artifact runtimes (e.g. onnxruntime vs TVM), without a torch model too.
    if len(all_sessions) > 1:
        from export.verify import compare_outputs
        from runtimes import run_batched

        base = run_batched(all_sessions[0], data.x)
        result["cross_runtime"] = [
            {"a": all_sessions[0].runtime, "b": s.runtime, **compare_outputs(base, run_batched(s, data.x))}
            for s in all_sessions[1:]
        ]
    return result


def profile_artifact(
    artifact: Artifact,
    *,
    target: Any = None,
    batch: int = 1,
    threads: int | None = None,
    min_runs: int = 30,
    min_seconds: float = 2.0,
    session: Any = None,
) -> LatencyStats:
    """Latency of the artifact on its runtime on this machine (remote profiling: runtimes.tvm_rpc)."""
    shape = artifact.manifest.inputs[0].shape[1:] if artifact.manifest.inputs else None
    if not shape or not all(isinstance(s, int) and s > 0 for s in shape):
        raise CheckpointError(f"artifact {artifact.path} does not record a static input shape; re-export it")
    x = np.random.default_rng(0).standard_normal((batch, *[int(s) for s in shape])).astype(np.float32)
    sess = session or runtime_for(artifact).prepare(artifact, target, threads=threads)
    return measure_latency(sess, x, min_runs=min_runs, min_seconds=min_seconds)
