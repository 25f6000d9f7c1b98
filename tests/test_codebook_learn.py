"""Initialisation and mapping updates: k-means init, proximal moves to neighbours only, learning helps."""

from __future__ import annotations

import torch
from torch import nn

from edgecompress.compress.codebook.config import JLCMConfig
from edgecompress.compress.codebook.learn import (
    TrainableCodebookLayer,
    kmeans_1d,
    learn_layer,
    nearest_codeword,
)


def _layer(update: str, **kw: object) -> tuple[TrainableCodebookLayer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    lin = nn.Linear(32, 24)
    cfg = JLCMConfig(bits=3, update=update, **kw)  # type: ignore[arg-type]
    w = lin.weight.detach()
    layer = TrainableCodebookLayer(lin, w, [12, 12], None, cfg)
    # correlated inputs (as real activations are): output error is then not plain weight error
    mix = torch.randn(32, 32) * torch.logspace(0, -2, 32)[:, None]
    x = torch.randn(256, 32) @ mix
    return layer, x, lin(x).detach()


def test_kmeans_init_assigns_nearest_codeword() -> None:
    layer, _, _ = _layer("proximal")
    cb = layer.codebook.detach()[0]
    assert bool((cb[1:] > cb[:-1]).all())
    u = layer.quantised_2d().detach() / layer.scales.detach()[layer.gid][:, None]
    w_norm = layer.template.weight.detach() / layer.scales.detach()[layer.gid][:, None]
    assert torch.equal(layer.idx, nearest_codeword(w_norm, cb))
    assert torch.allclose(u, cb[layer.idx], atol=1e-6)


def test_kmeans_1d_finds_clusters() -> None:
    x = torch.cat([torch.full((50,), -1.0), torch.full((50,), 2.0)]) + 0.01 * torch.randn(100)
    c = kmeans_1d(x, 2)
    assert abs(float(c[0]) + 1) < 0.05 and abs(float(c[1]) - 2) < 0.05


def test_proximal_update_moves_only_to_neighbouring_codewords() -> None:
    layer, _, _ = _layer("proximal", move_fraction=0.5)
    gen = torch.Generator().manual_seed(1)
    total = 0
    for _ in range(5):
        before = layer.idx.clone()
        moved = layer._proximal_step(torch.randn(layer.idx.shape, generator=gen) * 10)
        step = (layer.idx - before).abs()
        assert int(step.max()) <= 1
        assert int((step > 0).sum()) == moved
        total += moved
    assert total > 0


def test_without_the_neighbour_rule_moves_can_jump_further() -> None:
    layer, _, _ = _layer("proximal", move_fraction=1.0, neighbours_only=False, proximal_temperature=100.0)
    before = layer.idx.clone()
    layer._proximal_step(torch.randn(layer.idx.shape, generator=torch.Generator().manual_seed(1)) * 10)
    assert int((layer.idx - before).abs().max()) > 1


def test_learning_reduces_reconstruction_error_both_updates() -> None:
    for update in ("proximal", "ste"):
        layer, x, y = _layer(update)
        stats = learn_layer(layer, x, y, steps=30, batch_size=64, seed=0)
        assert stats["loss_final"] < stats["loss_init"], (update, stats)


def test_finalized_layer_matches_the_trained_one() -> None:
    layer, x, y = _layer("proximal", codebook_dtype="float32")
    learn_layer(layer, x, y, steps=20, batch_size=64, seed=0)
    frozen = layer.finalize()
    with torch.no_grad():
        assert torch.allclose(frozen(x), layer(x), atol=1e-5)
