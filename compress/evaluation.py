"""Accuracy checks and latency profiles of artifacts on the runtime that will run them.

Used by ``compress check``, ``compress profile`` and the recipe pipeline, so every number the
toolchain prints comes from the same code (:mod:`edgecompress.runtimes.measure`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from edgecompress.compress.checkpoint import ModelBundle, load_checkpoint
from edgecompress.compress.data import Dataset
from edgecompress.compress.errors import CheckpointError
from edgecompress.export import Artifact, sha256_file
from edgecompress.runtimes import LatencyStats, measure_latency, run_all_batched, runtime_for
from edgecompress.runtimes.measure import score_outputs
from edgecompress.runtimes.torch_runtime import TorchSession

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


def reference_session(artifact: Artifact, reference: ModelBundle | None) -> Any:
    """The fp32 model to compare with: the torch model when there is one, else the fp32 ONNX file the
    artifact was made from (an ONNX input to ``compress quantize``), on onnxruntime; None when neither."""
    if reference is not None:
        return TorchSession(reference.module, spec=reference.spec)
    extra = artifact.manifest.extra
    src = extra.get("source_onnx")
    if src and Path(src).is_file() and sha256_file(Path(src)) == extra.get("source_sha256"):
        from edgecompress.runtimes.ort_runtime import OrtSession

        sess = OrtSession(str(src), ["CPUExecutionProvider"], 0)
        sess.runtime = "onnxruntime fp32 source"
        return sess
    return None


def check_artifact(
    artifact: Artifact,
    data: Dataset,
    *,
    target: Any = None,
    reference: ModelBundle | None = None,
    sessions: list[Any] | None = None,
    threads: int | None = None,
    metric: str | None = None,
) -> dict[str, Any]:
    """Score the artifact on its runtime with the model's metric, next to the fp32 reference.

    Args:
        artifact: the artifact to check.
        data: the evaluation data (used whole); its arrays must fit the artifact's inputs.
        target: the device target (execution providers, threads).
        reference: the fp32 torch model (default: the artifact's fp32 ONNX source, when recorded).
        sessions: more sessions of the same model to compare (e.g. TVM, remote devices).
        metric: ``top1``, ``agreement``, ``cosine`` or ``sqnr`` (default: from the data and outputs).

    Returns:
        ``{"metric", "accuracy" (the metric's value on the artifact's runtime), "reference_accuracy",
        "accuracy_drop" (points), "samples", "rows": [{"runtime", "score", "accuracy" (top-1),
        "top1_agreement", "cosine", "sqnr_db", "max_abs_error", ...}], ...}``

    Raises:
        DataError: the data does not fit the artifact's inputs, or there is nothing to score against.
        RuntimeUnavailableError: no session can run the artifact here.
    """
    from dataclasses import replace

    from edgecompress.compress.data import check_labels
    from edgecompress.compress.errors import DataError
    from edgecompress.runtimes.measure import check_metric

    feeds = data.feeds(artifact.manifest.inputs)
    check_labels(data, artifact.manifest.outputs)
    data = replace(data, inputs=feeds)
    ref_session = reference_session(artifact, reference)
    try:
        check_metric(metric, has_labels=data.has_labels, has_reference=ref_session is not None)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    if ref_session is None and not data.has_labels:
        raise DataError(
            f"{data.name} has no labels and the artifact has no fp32 reference: pass --reference CKPT "
            "(the fp32 checkpoint) or data with 'y' labels"
        )
    # Every model runs once on the data: the reference's outputs score each runtime's, and the
    # first runtime's outputs are the base of the cross-runtime comparison.
    task = artifact.manifest.extra.get("task")
    ref_out = run_all_batched(ref_session, feeds) if ref_session is not None else None
    rows: list[dict[str, Any]] = []
    if ref_out is not None:
        own = score_outputs(ref_out, data.y, ref_out, metric=metric, task=task)
        rows.append({"runtime": f"{ref_session.runtime} (reference)", "where": "local", **own})
        metric = own["metric"]
    runtime = runtime_for(artifact)
    local = [runtime.prepare(artifact, target, threads=threads)] if runtime.supports(artifact, target) else []
    all_sessions = [*local, *(sessions or [])]
    if not all_sessions:
        from edgecompress.runtimes import RuntimeUnavailableError

        raise RuntimeUnavailableError(
            f"artifact {artifact.path} ({artifact.manifest.format}) cannot run on this machine; "
            "check it on the device with --rpc HOST:PORT --key K"
        )
    outputs = [run_all_batched(sess, feeds) for sess in all_sessions]
    for sess, out in zip(all_sessions, outputs, strict=True):
        r = score_outputs(out, data.y, ref_out, metric=metric, task=task)
        r.pop("reference_accuracy", None)
        rows.append({"runtime": sess.runtime, "where": getattr(sess, "where", "local"), **r})
        metric = r["metric"]
    main = rows[1] if ref_out is not None else rows[0]
    result: dict[str, Any] = {
        "artifact": str(artifact.path),
        "format": artifact.manifest.format,
        "data": data.name,
        "samples": len(data),
        "metric": metric,
        "rows": rows,
        "accuracy": main["score"],
    }
    if ref_out is not None and metric != "sqnr":  # SQNR has no "drop": the reference's is infinite
        result["reference_accuracy"] = rows[0]["score"]
        result["accuracy_drop"] = float(rows[0]["score"]) - float(main["score"])
    # Pairwise agreement across artifact runtimes (e.g. onnxruntime vs TVM), without a torch model too.
    if len(all_sessions) > 1:
        from edgecompress.export.verify import compare_all_outputs

        result["cross_runtime"] = [
            {"a": all_sessions[0].runtime, "b": s.runtime, **compare_all_outputs(outputs[0], out)}
            for s, out in zip(all_sessions[1:], outputs[1:], strict=True)
        ]
    return result


def _example_feeds(artifact: Artifact, batch: int) -> Any:
    """Timing inputs of the artifact's recorded input spec (a dynamic non-batch dim is a SpecError)."""
    from edgecompress.export.spec import ModelSpec

    if not artifact.manifest.inputs:
        raise CheckpointError(f"artifact {artifact.path} does not record its inputs; re-export it")
    return ModelSpec(list(artifact.manifest.inputs)).example_feeds(batch)


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
    """Latency of the artifact on its runtime on this machine (remote profiling: runtimes.tvm_rpc).

    Raises:
        SpecError: an input has a dynamic non-batch dim (the message names it; re-export with it fixed).
    """
    feeds = _example_feeds(artifact, batch)
    sess = session or runtime_for(artifact).prepare(artifact, target, threads=threads)
    return measure_latency(sess, feeds, min_runs=min_runs, min_seconds=min_seconds)


def profile_side_by_side(
    artifacts: list[Artifact],
    *,
    target: Any = None,
    batch: int = 1,
    threads: int | None = None,
    min_runs: int = 30,
    min_seconds: float = 2.0,
    rounds: int = 5,
) -> list[LatencyStats]:
    """Latency of several artifacts on their runtimes on this machine, measured in interleaved rounds
    (:func:`runtimes.measure_interleaved`), so their ratios are not at the mercy of the machine's drift.

    Raises:
        SpecError: an input has a dynamic non-batch dim (the message names it; re-export with it fixed).
    """
    from edgecompress.runtimes import measure_interleaved

    feeds = [_example_feeds(a, batch) for a in artifacts]
    sessions = [runtime_for(a).prepare(a, target, threads=threads) for a in artifacts]
    return measure_interleaved(sessions, feeds, rounds=rounds, min_runs=min_runs, min_seconds=min_seconds)
