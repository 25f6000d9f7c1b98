"""N:M masks: exactly N of every M kept, the largest magnitudes, conv grouped along input channels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edgecompress.compress.sparsity.masks import kept_per_group, layer_compressed_size, nm_mask, nm_violations

ALL_PATTERNS = [(n, m) for m in (2, 4, 8, 16, 32) for n in range(1, m)]


def _groups_linear(w: torch.Tensor, m: int) -> torch.Tensor:
    return w.reshape(w.shape[0], -1, m)


@pytest.mark.parametrize(("n", "m"), ALL_PATTERNS)
def test_linear_mask_keeps_exactly_n_largest_per_group(n: int, m: int) -> None:
    g = torch.Generator().manual_seed(n * 100 + m)
    w = torch.randn(6, 2 * m, generator=g)
    mask = nm_mask(w, n, m)
    assert mask.shape == w.shape and set(mask.unique().tolist()) <= {0.0, 1.0}
    groups, gmask = _groups_linear(w.abs(), m), _groups_linear(mask, m)
    assert torch.all(gmask.sum(-1) == n)
    kept_min = torch.where(gmask.bool(), groups, torch.inf).amin(-1)
    dropped_max = torch.where(gmask.bool(), -torch.inf, groups).amax(-1)
    assert torch.all(kept_min >= dropped_max)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (1, 8), (3, 8), (1, 16), (5, 32)])
def test_conv_mask_groups_input_channels_with_kernel_position_fixed(n: int, m: int) -> None:
    g = torch.Generator().manual_seed(m)
    w = torch.randn(5, 2 * m, 3, 3, generator=g)
    mask = nm_mask(w, n, m)
    ohwi = mask.permute(0, 2, 3, 1)  # layout O, H, W, I
    assert torch.all(ohwi.reshape(5, 3, 3, 2, m).sum(-1) == n)
    # The same mask computed position by position as a Linear over input channels.
    for kh in range(3):
        for kw in range(3):
            assert torch.equal(mask[:, :, kh, kw], nm_mask(w[:, :, kh, kw].contiguous(), n, m))
    assert nm_violations(mask.numpy(), n, m, group_axis=1) == 0


def test_mask_on_example_row() -> None:
    mask = nm_mask(torch.tensor([[0.1, -3.0, 2.0, 0.5, 9.0, 0.0, -0.2, 0.3]]), 2, 4)
    assert mask.tolist() == [[0, 1, 1, 0, 1, 0, 0, 1]]


@pytest.mark.parametrize(("n", "m", "width"), [(2, 4, 10), (1, 8, 20), (2, 4, 1), (1, 16, 7), (3, 8, 13)])
def test_indivisible_width_keeps_proportional_share_of_partial_group(n: int, m: int, width: int) -> None:
    w = torch.randn(3, width, generator=torch.Generator().manual_seed(width))
    mask = nm_mask(w, n, m)
    rest = width % m
    full = width - rest
    if full:
        assert torch.all(mask[:, :full].reshape(3, -1, m).sum(-1) == n)
    expected_tail = min(rest, math.ceil(n * rest / m))
    assert torch.all(mask[:, full:].sum(-1) == expected_tail)
    assert expected_tail <= n  # the zero-padded row is N:M
    assert nm_violations((w * mask).numpy(), n, m, group_axis=1) == 0
    assert kept_per_group(n, m, width)[-1] == expected_tail


def test_violations_counted_on_any_axis() -> None:
    a = np.zeros((4, 8), dtype=np.float32)
    a[0, :3] = 1.0  # 3 non-zeros in the first group of 4 along axis 1
    assert nm_violations(a, 2, 4, group_axis=1) == 1
    assert nm_violations(a.T, 2, 4, group_axis=0) == 1
    assert nm_violations(a.T, 2, 4, group_axis=1) == 0  # along the other axis every group is fine
    a[1, 4:8] = [1, 0, 0, 1]
    assert nm_violations(a, 2, 4, group_axis=1) == 1


def test_mask_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="2-d"):
        nm_mask(torch.randn(3), 2, 4)


def test_compressed_size_counts_values_and_indices() -> None:
    size = layer_compressed_size((64, 128), 2, 4, value_bits=32)
    kept = 64 * 128 // 2
    assert size["kept"] == kept
    assert size["compressed_bytes"] == kept * (32 + 2) // 8  # 2-bit index per kept value for M=4
    size8 = layer_compressed_size((64, 128), 1, 16, value_bits=8)
    assert size8["compressed_bytes"] == math.ceil(64 * 8 * (8 + 4) / 8)
