"""Numeric comparison of model outputs (used by export checks and runtimes.measure)."""

from __future__ import annotations

import numpy as np


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB of ``test`` against ``reference`` (inf when equal)."""
    ref = np.asarray(reference, dtype=np.float64)
    noise = float(np.sum((ref - np.asarray(test, dtype=np.float64)) ** 2))
    signal = float(np.sum(ref**2))
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * float(np.log10(signal / noise))


def compare_outputs(reference: np.ndarray, test: np.ndarray) -> dict[str, float]:
    """Max absolute error, SQNR and top-1 agreement (for logits) between two output arrays."""
    ref = np.asarray(reference)
    out = np.asarray(test)
    if ref.shape != out.shape:
        raise ValueError(f"output shapes differ: reference {ref.shape} vs {out.shape}")
    result = {"max_abs_error": float(np.max(np.abs(ref.astype(np.float64) - out))), "sqnr_db": sqnr_db(ref, out)}
    if ref.ndim == 2 and ref.shape[1] > 1:
        result["top1_agreement"] = float(100.0 * np.mean(ref.argmax(1) == out.argmax(1)))
    return result
