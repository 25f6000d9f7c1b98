"""Per-layer sensitivity: which quantized layer costs the accuracy.

For a chosen configuration each weighted layer (Conv/Gemm/MatMul) is quantized *alone* (everything
else in float) with the same calibration and scheme; the accuracy drop and the logits SQNR vs fp32
of that model are the layer's contribution. Quantune (Lee et al., 2022) motivates mixed precision by
such layer sensitivity; the ranking also drives ``keep_float='sensitive'``.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgecompress.compress.progress import progress
from edgecompress.compress.ptq.config import PTQConfig

log = logging.getLogger(__name__)


def layer_sensitivity(
    prepared: Any,
    config: PTQConfig,
    calib: dict[str, np.ndarray],
    val: dict[str, np.ndarray],
    val_y: np.ndarray | None,
    fp32_outputs: list[np.ndarray],
    calib_cache: Path,
    *,
    threads: int = 1,
    metric: str = "top1",
) -> list[dict[str, Any]]:
    """One row per weighted layer, most harmful first.

    Returns:
        ``[{"node", "op_type", "accuracy", "accuracy_drop", "sqnr_db", "error"}]`` (``accuracy`` is the
        ``metric``'s score); ``error`` is set (and the numbers None) when onnxruntime cannot quantize
        that layer alone with ``config``.
    """
    from edgecompress.compress.ptq.evaluator import trial_score
    from edgecompress.compress.ptq.ort_backend import model_outputs, quantize_to_file, trial_failure_types
    from edgecompress.export.verify import compare_all_outputs

    base = config.model_copy(update={"keep_float": "none", "keep_float_k": 0, "exclude_nodes": ()})
    fp32_acc = trial_score(metric, fp32_outputs, val_y, fp32_outputs)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="quantune-sens-") as tmp, progress(
        "layer sensitivity", len(prepared.weighted_nodes)
    ) as bar:
        for name, op in zip(prepared.weighted_nodes, prepared.node_types, strict=True):
            out = Path(tmp) / "layer.onnx"
            row: dict[str, Any] = {"node": name, "op_type": op, "accuracy": None, "accuracy_drop": None,
                                   "sqnr_db": None, "error": None}  # fmt: skip
            try:
                quantize_to_file(prepared, base, calib, out, calib_cache, nodes_to_quantize=[name])
                outputs = model_outputs(out, val, threads)
            except trial_failure_types() as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc).strip()[:200]}"
                rows.append(row)
                bar.advance()
                continue
            acc = trial_score(metric, outputs, val_y, fp32_outputs)
            drop = fp32_acc - acc if np.isfinite(fp32_acc) else -acc  # SQNR: a lower dB is the larger "drop"
            row.update(accuracy=acc, accuracy_drop=round(float(drop), 4),
                       sqnr_db=float(compare_all_outputs(fp32_outputs, outputs)["sqnr_db"]))  # fmt: skip
            rows.append(row)
            bar.advance()
    # Most harmful first: larger accuracy drop, then lower SQNR; failed layers last.
    rows.sort(key=lambda r: (r["error"] is not None, -(r["accuracy_drop"] or 0.0), r["sqnr_db"] or 0.0))
    return rows


def sensitivity_markdown(rows: list[dict[str, Any]], config_label: str) -> str:
    lines = [f"# Per-layer sensitivity ({config_label})", "",
             "Each layer quantized alone; drop and SQNR of the model's logits vs fp32.", "",
             "| layer | op | accuracy % | drop (pt) | SQNR dB | error |", "|---|---|---|---|---|---|"]  # fmt: skip

    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)

    for r in rows:
        lines.append(f"| {r['node']} | {r['op_type']} | {f(r['accuracy'])} | {f(r['accuracy_drop'])} | "
                     f"{f(r['sqnr_db'])} | {r['error'] or ''} |")  # fmt: skip
    return "\n".join(lines) + "\n"
