"""Numeric comparison of model outputs (used by export checks and runtimes.measure)."""

from __future__ import annotations

from collections.abc import Sequence

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


def top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in % of ``(N, classes)`` logits against integer labels."""
    return float(100.0 * np.mean(np.asarray(logits).argmax(1) == np.asarray(labels)))


def top1_agreement(reference: np.ndarray, test: np.ndarray) -> float:
    """How often (%) ``test``'s top-1 class is ``reference``'s (logits of the same samples)."""
    return float(100.0 * np.mean(np.asarray(reference).argmax(1) == np.asarray(test).argmax(1)))


def compare_outputs(reference: np.ndarray, test: np.ndarray) -> dict[str, float]:
    """Max absolute error, SQNR and top-1 agreement (for logits) between two output arrays."""
    ref = np.asarray(reference)
    out = np.asarray(test)
    if ref.shape != out.shape:
        raise ValueError(f"output shapes differ: reference {ref.shape} vs {out.shape}")
    result = {"max_abs_error": float(np.max(np.abs(ref.astype(np.float64) - out))), "sqnr_db": sqnr_db(ref, out)}
    if ref.ndim == 2 and ref.shape[1] > 1:
        result["top1_agreement"] = top1_agreement(ref, out)
    return result


def _per_sample(outputs: Sequence[np.ndarray]) -> np.ndarray:
    """All outputs as one ``(N, features)`` float64 matrix (outputs without a batch dim: one row)."""
    arrays = [np.asarray(o, dtype=np.float64) for o in outputs]
    n = {len(a) if a.ndim else 1 for a in arrays}
    if len(n) != 1:
        return np.concatenate([a.reshape(1, -1) for a in arrays], axis=1)
    rows = n.pop()
    return np.concatenate([a.reshape(rows, -1) for a in arrays], axis=1)


def cosine_similarity(reference: Sequence[np.ndarray], test: Sequence[np.ndarray]) -> float:
    """Mean over samples of the cosine similarity of all outputs (1.0 = same direction).

    A sample whose reference and test outputs are both zero counts as identical.
    """
    ref, out = _per_sample(reference), _per_sample(test)
    num = np.sum(ref * out, axis=1)
    den = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
    both_zero = (np.linalg.norm(ref, axis=1) == 0) & (np.linalg.norm(out, axis=1) == 0)
    cos = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(both_zero, 1.0, 0.0))
    return float(np.mean(cos))


def compare_all_outputs(reference: Sequence[np.ndarray], test: Sequence[np.ndarray]) -> dict[str, float]:
    """:func:`compare_outputs` over every output of a model: max error and SQNR over all outputs,
    the mean per-sample cosine similarity, and top-1 agreement of the first output when it is logits."""
    if len(reference) != len(test):
        raise ValueError(f"output counts differ: reference {len(reference)} vs {len(test)}")
    for i, (r, t) in enumerate(zip(reference, test, strict=True)):
        if np.shape(r) != np.shape(t):
            raise ValueError(f"output {i} shapes differ: reference {np.shape(r)} vs {np.shape(t)}")
    ref, out = _per_sample(reference), _per_sample(test)
    result = {
        "max_abs_error": float(np.max(np.abs(ref - out))) if ref.size else 0.0,
        "sqnr_db": sqnr_db(ref, out),
        "cosine": cosine_similarity(reference, test),
    }
    first = np.asarray(reference[0])
    if first.ndim == 2 and first.shape[1] > 1:
        result["top1_agreement"] = top1_agreement(first, test[0])
    return result
