"""Packing of codeword indices: exact round trips, sizes and errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from edgecompress.compress.codebook.packing import (
    pack_indices,
    packed_shape,
    unpack_indices,
    unpack_indices_numpy,
)
from edgecompress.compress.errors import ConfigError


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("n", [1, 5, 8, 13, 1001])
def test_round_trip_is_exact(bits: int, n: int) -> None:
    gen = torch.Generator().manual_seed(bits * 1000 + n)
    idx = torch.randint(0, 2**bits, (n,), generator=gen)
    packed = pack_indices(idx, bits)
    assert packed.dtype == torch.uint8
    assert tuple(packed.shape) == ((n + 7) // 8, bits)
    assert torch.equal(unpack_indices(packed, bits, n), idx)
    assert np.array_equal(unpack_indices_numpy(packed.numpy(), bits, n), idx.numpy())


def test_extreme_values_survive() -> None:
    idx = torch.tensor([7, 0, 7, 7, 0, 0, 7, 7, 7, 0, 7])
    assert torch.equal(unpack_indices(pack_indices(idx, 3), 3, idx.numel()), idx)


def test_storage_is_bits_per_index() -> None:
    assert packed_shape(80, 3) == (10, 3)  # 80 indices * 3 bits = 30 bytes
    assert packed_shape(81, 2) == (11, 2)


def test_out_of_range_index_is_rejected_with_the_range() -> None:
    with pytest.raises(ConfigError, match=r"\[0, 3\]"):
        pack_indices(torch.tensor([0, 4]), 2)
    with pytest.raises(ConfigError, match="valid: 1..6"):
        pack_indices(torch.tensor([0]), 7)


def test_package_import_stays_light() -> None:
    code = "import sys, compress.codebook, compress.codebook.stage; print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"
