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

from compress.progress import progress
from compress.ptq.config import PTQConfig

log = logging.getLogger(__name__)


def layer_sensitivity(
    prepared: Any,
    config: PTQConfig,
    calib_x: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    fp32_logits: np.ndarray,
    calib_cache: Path,
    *,
    threads: int = 1,
) -> list[dict[str, Any]]:
    """One row per weighted layer, most harmful first.

    Returns:
        ``[{"node", "op_type", "accuracy", "accuracy_drop", "sqnr_db", "error"}]``; ``error`` is set (and
        the numbers None) when onnxruntime cannot quantize that layer alone with ``config``.
    """
    from compress.ptq.ort_backend import make_session, quantize_to_file, run_logits, trial_failure_types
    from export.verify import sqnr_db

    base = config.model_copy(update={"keep_float": "none", "keep_float_k": 0, "exclude_nodes": ()})
    fp32_acc = float(100.0 * np.mean(fp32_logits.argmax(1) == val_y))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="quantune-sens-") as tmp, progress(
        "layer sensitivity", len(prepared.weighted_nodes)
    ) as bar:
        for name, op in zip(prepared.weighted_nodes, prepared.node_types, strict=True):
            out = Path(tmp) / "layer.onnx"
            row: dict[str, Any] = {"node": name, "op_type": op, "accuracy": None, "accuracy_drop": None,
                                   "sqnr_db": None, "error": None}  # fmt: skip
            try:
                quantize_to_file(prepared, base, calib_x, out, calib_cache, nodes_to_quantize=[name])
                logits = run_logits(make_session(out, threads), val_x)
            except trial_failure_types() as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc).strip()[:200]}"
                rows.append(row)
                bar.advance()
                continue
            acc = float(100.0 * np.mean(logits.argmax(1) == val_y))
            row.update(accuracy=acc, accuracy_drop=round(fp32_acc - acc, 4), sqnr_db=float(sqnr_db(fp32_logits, logits)))
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
