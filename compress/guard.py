"""The accuracy guard: every command that writes a model proves it against the fp32 reference.

``sparsify``, ``qat``, ``codebook``, ``quantize`` and ``export`` score what they wrote on its runtime
(:func:`compress.evaluation.check_artifact`, the model's metric) and judge the drop here: more than
``max_drop`` points (default: the target's ``max_accuracy_drop`` budget, 1 point), or an SQNR
under ``min_sqnr_db`` when the metric is SQNR, fails the guard. The artifact is still written
for inspection, its manifest (and the technique's checkpoint) say ``"guard": "failed"``, the
command exits 4 with the layers that lost most and what to try instead, and ``compress export``
and ``compress run`` refuse such an input unless ``--allow-failed`` is given.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edgecompress.compress.errors import GateFailure

log = logging.getLogger(__name__)

DEFAULT_MAX_DROP = 1.0
"""Points of the metric (top-1 %, agreement %, 100 x cosine) lost against fp32, when the target has no budget."""
DEFAULT_MIN_SQNR_DB = 20.0
"""The floor of an output SQNR against fp32 when the metric is ``sqnr`` (no drop exists: fp32's is infinite)."""

REMEDIES: dict[str, list[str]] = {
    "sparsify": ["train instead of one-shot pruning (--method srste or mdgf, more --max-steps)",
                 "a milder pattern (e.g. 4:8 instead of 2:4)",
                 "leave the most sensitive layers dense (the layers below)"],
    "qat": ["more bits (--bits 8, or --first-last-bits 8)", "more --max-steps or a lower --lr",
            "per-channel weight scales (drop --per-tensor)"],
    "codebook": ["fewer neuron groups per codebook (--groups) or more bits (--bits)",
                 "more layer-wise --steps and an end-to-end phase (--e2e-steps)", "more --calib-samples"],
    "quantize": ["quantization-aware training instead of PTQ (compress qat --bits 8)",
                 "keep the most sensitive layers in float (the layers below; search space 'keep_float')",
                 "more trials (--budget-trials) or another --space"],
    "export": ["export without optimisations that change numerics, or report the mismatch as a bug"],
}  # fmt: skip


class GuardFailure(GateFailure):
    """A written model lost more than the guard allows (exit code 4).

    Attributes:
        verdict: :func:`judge`'s result.
        layers: the layers that lost most (``{"layer", "sqnr_db", ...}``), worst first.
        remedies: what to try instead.
    """

    def __init__(self, message: str, verdict: dict[str, Any], layers: list[dict[str, Any]], remedies: list[str]):
        sqnr = verdict["metric"] == "sqnr"
        failure = {"target": verdict.get("target") or "-",
                   "gate": "guard: min SQNR dB" if sqnr else f"guard: max {verdict['metric']} drop (points)",
                   "limit": verdict["limit"], "value": verdict["value"] if sqnr else verdict["drop"],
                   "excess": verdict["excess"]}  # fmt: skip
        super().__init__(message, [failure])
        self.verdict = verdict
        self.layers = layers
        self.remedies = remedies


def judge(check: Mapping[str, Any], *, target: Any = None, max_drop: float | None = None,
          min_sqnr_db: float | None = None) -> dict[str, Any]:  # fmt: skip
    """The guard's verdict on a :func:`~compress.evaluation.check_artifact` result.

    Returns ``{"status": "passed"|"failed", "metric", "value", "reference", "drop", "limit",
    "excess", "samples", "runtime", "target"}``. ``drop`` and ``limit`` are points of the metric
    (``drop`` is None for SQNR, whose ``limit`` is the floor in dB).
    """
    metric = check["metric"]
    value = float(check["accuracy"])
    verdict: dict[str, Any] = {"metric": metric, "value": value, "reference": check.get("reference_accuracy"),
                               "samples": check.get("samples"), "target": getattr(target, "name", None),
                               "runtime": (check.get("rows") or [{}])[-1].get("runtime")}  # fmt: skip
    if metric == "sqnr":
        limit = DEFAULT_MIN_SQNR_DB if min_sqnr_db is None else float(min_sqnr_db)
        failed = not value >= limit  # NaN fails
        verdict.update(drop=None, limit=limit, excess=round(limit - value, 3) if failed else 0.0)
    else:
        budget = getattr(getattr(target, "budgets", None), "max_accuracy_drop", None)
        limit = float(max_drop if max_drop is not None else budget if budget is not None else DEFAULT_MAX_DROP)
        drop = check.get("accuracy_drop")
        if drop is None:  # no fp32 reference ran: nothing to compare with is a failure, not a pass
            drop = math.inf
        failed = not drop <= limit
        verdict.update(drop=float(drop), limit=limit, excess=round(float(drop) - limit, 3) if failed else 0.0)
    verdict["status"] = "failed" if failed else "passed"
    return verdict


def record(artifact: Any, verdict: Mapping[str, Any]) -> None:
    """Write the verdict into the artifact's manifest: ``extra["guard"]`` is the status, ``metrics["guard"]`` the rest."""
    artifact.manifest.extra["guard"] = verdict["status"]
    artifact.update_metrics(guard=dict(verdict))


def enforce(verdict: Mapping[str, Any], technique: str, *, layers: Sequence[Mapping[str, Any]] = (),
            written: str = "") -> None:  # fmt: skip
    """Raise :class:`GuardFailure` (exit 4) when the verdict failed; the message says what was kept."""
    if verdict["status"] != "failed":
        return
    if verdict["metric"] == "sqnr":
        what = f"SQNR {verdict['value']:.1f} dB against fp32 is under the {verdict['limit']:.1f} dB floor"
    else:
        ref = verdict.get("reference")
        what = (f"{verdict['metric']} {verdict['value']:.2f} vs fp32 {ref:.2f}" if ref is not None else
                f"{verdict['metric']} {verdict['value']:.2f}") + f": a drop of {verdict['drop']:.2f} points, more " \
            f"than the {verdict['limit']:.2f} allowed (--max-drop)"  # fmt: skip
    kept = f"; the result is kept for inspection in {written}, marked guard: failed" if written else ""
    raise GuardFailure(f"{technique} broke the model: {what} on {verdict.get('samples')} samples{kept}",
                       dict(verdict), [dict(r) for r in layers], REMEDIES.get(technique, []))  # fmt: skip


def refuse_failed(status: str | None, what: str, *, allow_failed: bool) -> None:
    """Refuse an input whose guard failed (``--allow-failed`` takes it anyway, with a warning)."""
    if status != "failed":
        return
    if allow_failed:
        log.warning("%s failed its accuracy guard; using it anyway (--allow-failed)", what)
        return
    from edgecompress.compress.errors import ConfigError

    raise ConfigError(f"{what} failed its accuracy guard when it was written (its metadata says guard: failed); "
                      "fix the compression, or pass --allow-failed to use it anyway")  # fmt: skip


def input_guard_status(path: Any) -> str | None:
    """The guard status of an ONNX file inside an artifact folder (its ``manifest.json``), else None."""
    import json
    from pathlib import Path

    manifest = Path(path).parent / "manifest.json"
    try:
        status = json.loads(manifest.read_text()).get("extra", {}).get("guard")
    except (OSError, ValueError, AttributeError):
        return None
    return status if isinstance(status, str) else None


def layer_sensitivity(compressed: Any, reference: Any, inputs: Any, *, limit: int = 8) -> list[dict[str, Any]]:
    """The layers of a compressed torch model that lose most, each measured alone.

    Every layer (by name, the weight-carrying leaves the compressed model replaced or modified) is
    fed the fp32 model's own input to that layer, so an error does not accumulate from the layers
    before it; its output is compared with the fp32 layer's (SQNR in dB, worst first).
    ``inputs`` is one batch (a tensor or a tuple of tensors in ``forward`` order).
    """
    import torch

    from edgecompress.compress.training import forward
    from edgecompress.export.verify import sqnr_db

    ref_mods = dict(reference.named_modules())
    names = [n for n, m in compressed.named_modules()
             if n and n in ref_mods and _has_weight(ref_mods[n]) and not list(ref_mods[n].children())]  # fmt: skip
    captured: dict[str, tuple[Any, Any]] = {}

    def hook(name: str) -> Any:
        def fn(_m: Any, args: tuple[Any, ...], out: Any) -> None:
            if name not in captured and args and isinstance(out, torch.Tensor):
                captured[name] = (args, out.detach())

        return fn

    handles = [ref_mods[n].register_forward_hook(hook(n)) for n in names]
    was = reference.training, compressed.training
    reference.eval()
    compressed.eval()
    rows = []
    try:
        with torch.no_grad():
            forward(reference, inputs)
            mods = dict(compressed.named_modules())
            for name in names:
                if name not in captured:
                    continue
                args, want = captured[name]
                got = mods[name](*args)
                if not isinstance(got, torch.Tensor) or got.shape != want.shape:
                    continue
                rows.append({"layer": name, "kind": type(mods[name]).__name__,
                             "sqnr_db": round(sqnr_db(want.numpy(), got.numpy()), 2),
                             "max_abs_error": float((want - got).abs().max())})  # fmt: skip
    finally:
        for h in handles:
            h.remove()
        reference.train(was[0])
        compressed.train(was[1])
    rows.sort(key=lambda r: r["sqnr_db"] if np.isfinite(r["sqnr_db"]) else math.inf)
    return rows[:limit]


def _has_weight(module: Any) -> bool:
    return getattr(module, "weight", None) is not None


def guard_module_result(artifact: Any, data: Any, *, technique: str, reference: Any, compressed: Any,
                        target: Any = None, metric: str | None = None, max_drop: float | None = None,
                        min_sqnr_db: float | None = None) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:  # fmt: skip
    """Check a torch technique's artifact on its runtime against the fp32 ``reference`` bundle, judge
    and record it; on failure, measure the worst layers of the ``compressed`` torch module.

    Returns ``(check, verdict, worst_layers)``; raising is left to :func:`enforce` (after the
    command has written its outputs).
    """
    from edgecompress.compress.evaluation import check_artifact
    from edgecompress.compress.training import dataset_tensors

    check = check_artifact(artifact, data, target=target, reference=reference, metric=metric)
    verdict = judge(check, target=target, max_drop=max_drop, min_sqnr_db=min_sqnr_db)
    record(artifact, verdict)
    layers: list[dict[str, Any]] = []
    if verdict["status"] == "failed" and compressed is not None:
        try:
            layers = layer_sensitivity(compressed, reference.module, dataset_tensors(data.for_model(reference.spec), 8))
        except Exception as exc:  # the table helps; its absence must not hide the verdict
            log.warning("per-layer sensitivity not measured: %s", exc)
    return check, verdict, layers
