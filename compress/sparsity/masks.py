"""N:M masks: keep the N largest-magnitude weights in every group of M along the input dimension.

Layouts (Zhou et al., ICLR 2021; ALGORITHMS.md section 3):

* Linear ``(O, I)``: groups of M consecutive input features of one output row.
* Conv2d ``(O, I, kH, kW)``: groups along the input channels with the kernel position fixed,
  i.e. the weight is viewed as ``(O, kH, kW, I)`` and grouped along its last axis.

Input dimensions that are not a multiple of M are handled as zero-padded to the next multiple:
the last, partial group of ``r < M`` weights keeps ``ceil(N * r / M)`` of them (never more than
N, so the padded row satisfies N:M; the same rule keeps the density of coarse SDGF patterns such
as 8:32 on a 16-wide input).

The torch functions build masks during training; the numpy functions verify exported arrays.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def kept_per_group(n: int, m: int, width: int) -> list[int]:
    """How many weights each group of a row of ``width`` inputs keeps (last group may be partial)."""
    full, rest = divmod(width, m)
    return [n] * full + ([min(rest, math.ceil(n * rest / m))] if rest else [])


def _rows_view(weight: Any) -> Any:
    """(O, I) or (O, I, kH, kW) -> 2-d (rows, I) with the grouped axis last."""
    if weight.dim() == 2:
        return weight
    if weight.dim() == 4:
        return weight.permute(0, 2, 3, 1).reshape(-1, weight.shape[1])
    raise ValueError(f"N:M masks need a 2-d (Linear) or 4-d (Conv2d) weight, got shape {tuple(weight.shape)}")


def _from_rows(rows: Any, shape: tuple[int, ...]) -> Any:
    if len(shape) == 2:
        return rows
    o, i, kh, kw = shape
    return rows.reshape(o, kh, kw, i).permute(0, 3, 1, 2).contiguous()


def nm_mask(weight: Any, n: int, m: int) -> Any:
    """The N:M magnitude mask of a Linear or Conv2d weight (same shape, dtype of ``weight``, 0/1).

    Args:
        weight: a ``(O, I)`` or ``(O, I, kH, kW)`` tensor.
        n, m: keep ``n`` of every ``m`` weights along the input dimension.

    Example:
        >>> nm_mask(torch.tensor([[0.1, -3.0, 2.0, 0.5]]), 2, 4)
        tensor([[0., 1., 1., 0.]])
    """
    import torch

    if not 1 <= n <= m:
        raise ValueError(f"N:M needs 1 <= N <= M, got {n}:{m}")
    shape = tuple(weight.shape)
    rows = _rows_view(weight.detach().abs())
    width = rows.shape[1]
    if n == m:
        return torch.ones_like(weight)
    groups = math.ceil(width / m)
    padded = torch.full((rows.shape[0], groups * m), -1.0, dtype=rows.dtype, device=rows.device)
    padded[:, :width] = rows
    grouped = padded.reshape(rows.shape[0], groups, m)
    top = grouped.topk(n, dim=-1).indices
    mask = torch.zeros_like(grouped).scatter_(-1, top, 1.0).reshape(rows.shape[0], groups * m)
    rest = width % m
    if rest:
        # The partial group keeps ceil(n * rest / m) weights (see the module docstring).
        keep = min(rest, math.ceil(n * rest / m))
        tail = padded[:, width - rest : width]
        tail_top = tail.topk(keep, dim=-1).indices
        mask[:, width - rest :] = 0
        mask[:, width - rest : width] = torch.zeros_like(tail).scatter_(-1, tail_top, 1.0)
    return _from_rows(mask[:, :width], shape).to(weight.dtype)


# --- numpy verification of exported weights ---------------------------------------------------


def rows_for_axis(array: np.ndarray, group_axis: int) -> np.ndarray:
    """View ``array`` as 2-d rows whose last axis is ``group_axis`` (the other axes flattened)."""
    moved = np.moveaxis(np.asarray(array), group_axis, -1)
    return moved.reshape(-1, moved.shape[-1])


def nm_violations(array: np.ndarray, n: int, m: int, group_axis: int) -> int:
    """Number of groups of ``array`` (grouped along ``group_axis``) holding more than N non-zeros.

    A partial last group is checked as zero-padded to M (at most N non-zeros).
    """
    rows = rows_for_axis(array, group_axis) != 0
    width = rows.shape[1]
    groups = math.ceil(width / m)
    padded = np.zeros((rows.shape[0], groups * m), dtype=bool)
    padded[:, :width] = rows
    counts = padded.reshape(rows.shape[0], groups, m).sum(-1)
    return int((counts > n).sum())


def sparsity_of(array: np.ndarray) -> float:
    """Fraction of exact zeros."""
    a = np.asarray(array)
    return float((a == 0).sum() / max(1, a.size))


def compressed_bits(numel_kept: int, m: int, value_bits: int) -> int:
    """Bits to store ``numel_kept`` kept values plus their in-group position (``ceil(log2 M)`` bits each).

    This is the layout of NVIDIA's 2:4 format (values + 2-bit indices) generalised to N:M.
    """
    return numel_kept * (value_bits + max(1, math.ceil(math.log2(m))))


def layer_compressed_size(
    shape: tuple[int, ...], n: int, m: int, *, group_axis: int = 1, value_bits: int = 32
) -> dict[str, int]:
    """Dense and N:M-compressed bytes of one weight tensor of ``shape``."""
    numel = int(np.prod(shape))
    width = shape[group_axis]
    kept = (numel // width) * sum(kept_per_group(n, m, width))
    return {
        "numel": numel,
        "kept": kept,
        "dense_bytes": numel * value_bits // 8,
        "compressed_bytes": math.ceil(compressed_bits(kept, m, value_bits) / 8),
    }
