"""Neuron grouping and permutation folding: the folded float model computes the same function."""

from __future__ import annotations

import torch

from edgecompress.compress.codebook.api import group_and_fold, select_layers
from edgecompress.compress.codebook.config import JLCMConfig
from edgecompress.compress.codebook.grouping import group_neurons
from edgecompress.compress.models import create_model


def test_groups_are_contiguous_and_cover_all_rows() -> None:
    torch.manual_seed(0)
    w = torch.cat([torch.randn(10, 30) * 0.1, torch.randn(6, 30) * 2.0])
    order, sizes = group_neurons(w, 2)
    assert sorted(order.tolist()) == list(range(16))
    assert sorted(sizes) == [6, 10]
    # the low-magnitude group comes first (groups sorted by scale) and holds exactly rows 0..9
    assert set(order[: sizes[0]].tolist()) == set(range(10))


def _fold_and_compare(name: str) -> dict:
    torch.manual_seed(0)
    model = create_model(name).eval()
    for m in model.modules():  # non-trivial BatchNorm statistics, so a wrong fold would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        before = model(x)
    cfg = JLCMConfig(groups=4)
    stored = group_and_fold(model, select_layers(model, cfg), cfg, x[:2])
    with torch.no_grad():
        after = model(x)
    assert torch.allclose(before, after, atol=1e-5), (before - after).abs().max()
    return stored


def test_folding_keeps_the_cnn_function_and_folds_where_possible() -> None:
    stored = _fold_and_compare("cnn")
    folded = {name for name, (_, _, gather, was_folded) in stored.items() if was_folded}
    assert folded == {"features.0.0", "features.2.0", "classifier.1"}  # conv->BN->conv, conv->flatten->linear
    _, sizes, gather, _ = stored["classifier.3"]  # the logits: no consumer, the permutation is stored
    assert gather is not None and sum(sizes) == 10


def test_folding_keeps_the_vit_function() -> None:
    stored = _fold_and_compare("vit")
    assert stored["blocks.0.mlp.0"][3] is True  # fc1 -> GELU -> fc2
    assert stored["blocks.0.attn.qkv"][3] is False  # reshaped into heads: gather instead
