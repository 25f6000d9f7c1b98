"""Packing of b-bit codeword indices (1 <= b <= 6) into uint8.

Layout: indices are taken in blocks of 8; a block holds ``v = sum_j idx[j] << (b * j)`` (8*b bits)
written little-endian as ``b`` bytes. Every block is byte aligned, so 2, 3 and 4 bits use exactly
``b`` bytes per 8 indices and the ONNX graph rebuilds a block with one multiply-add and 8 shifts.
The last block is zero-padded; the number of indices is stored separately.
"""

from __future__ import annotations

import numpy as np
import torch

from edgecompress.compress.errors import ConfigError

MAX_PACK_BITS = 6


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= MAX_PACK_BITS:
        raise ConfigError(f"cannot pack {bits}-bit indices; valid: 1..{MAX_PACK_BITS}")


def packed_shape(n: int, bits: int) -> tuple[int, int]:
    """Shape of the uint8 array holding ``n`` indices of ``bits`` bits: (blocks of 8, bits)."""
    _check_bits(bits)
    return ((n + 7) // 8, bits)


def pack_indices(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integer indices (< 2**bits, any shape, flattened) into uint8 (blocks, bits).

    Raises:
        ConfigError: bits out of range or an index does not fit in ``bits`` bits.
    """
    _check_bits(bits)
    flat = indices.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ConfigError(f"indices must lie in [0, {2**bits - 1}] for {bits}-bit packing; "
                          f"got [{int(flat.min())}, {int(flat.max())}]")  # fmt: skip
    blocks, _ = packed_shape(flat.numel(), bits)
    padded = torch.zeros(blocks * 8, dtype=torch.int64)
    padded[: flat.numel()] = flat
    shifts = torch.arange(8, dtype=torch.int64) * bits
    value = (padded.reshape(blocks, 8) << shifts).sum(dim=1, keepdim=True)  # (blocks, 1), < 2**(8*bits)
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    return ((value >> byte_shifts) & 0xFF).to(torch.uint8)


def unpack_indices(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_indices`: the first ``n`` indices as int64 (flat)."""
    _check_bits(bits)
    if tuple(packed.shape) != packed_shape(n, bits):
        raise ConfigError(f"packed array has shape {tuple(packed.shape)}; {n} indices of {bits} bits need "
                          f"{packed_shape(n, bits)}")  # fmt: skip
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=packed.device) * 8
    value = (packed.to(torch.int64) << byte_shifts).sum(dim=1, keepdim=True)
    shifts = torch.arange(8, dtype=torch.int64, device=packed.device) * bits
    return ((value >> shifts) & (2**bits - 1)).reshape(-1)[:n]


def unpack_indices_numpy(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """NumPy twin of :func:`unpack_indices` (used by tests and tools that do not load torch models)."""
    _check_bits(bits)
    value = (packed.astype(np.int64) << (np.arange(bits, dtype=np.int64) * 8)).sum(axis=1, keepdims=True)
    return ((value >> (np.arange(8, dtype=np.int64) * bits)) & (2**bits - 1)).reshape(-1)[:n]
