"""Masked forward/backward (MDGF, SR-STE), layer scopes, and short training runs of every method."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgecompress.compress.checkpoint import ModelBundle
from edgecompress.compress.data import Splits
from edgecompress.compress.errors import ConfigError
from edgecompress.compress.scope import Scope
from edgecompress.compress.sparsity.api import apply_nm_sparsity, check_module_pattern
from edgecompress.compress.sparsity.config import NMSparsityConfig
from edgecompress.compress.sparsity.masks import nm_mask
from edgecompress.compress.sparsity.schedule import StepState
from edgecompress.compress.sparsity.sparsifier import NMSparsifier, default_scope, select_layers


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=4), nn.Flatten(),
                         nn.Linear(8 * 7 * 7, 32), nn.ReLU(), nn.Linear(32, 10))  # fmt: skip


@pytest.fixture(scope="module")
def small_splits(mnist_splits: Splits) -> Splits:
    idx = np.arange(256)
    return Splits(mnist_splits.train.subset(idx), mnist_splits.calib.subset(idx[:32]), mnist_splits.val.subset(idx[:128]),
                  mnist_splits.test.subset(idx[:128]))  # fmt: skip


def _state(alpha: float, n: int = 2, m: int = 4) -> StepState:
    return StepState("sparse", alpha, n, m, False)


def test_mdgf_forward_alpha_one_is_dense_and_alpha_zero_is_masked() -> None:
    model = _tiny_model()
    x = torch.randn(4, 1, 28, 28)
    dense_out = model(x).detach()
    weights = {
        n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)
    }
    sp = NMSparsifier(model, NMSparsityConfig(pattern="2:4", method="mdgf"))
    sp.attach()
    sp.apply_state(_state(1.0))
    assert torch.equal(model(x).detach(), dense_out)
    sp.apply_state(_state(0.0))
    masked = _tiny_model()
    with torch.no_grad():
        for name, mod in masked.named_modules():
            if name in weights:
                mod.weight.copy_(weights[name] * nm_mask(weights[name], 2, 4))
    torch.testing.assert_close(model(x), masked(x), rtol=0, atol=1e-6)
    sp.apply_state(_state(0.3))
    w = weights["4"]
    m = nm_mask(w, 2, 4)
    torch.testing.assert_close(model[4].weight, w * (m + 0.3 * (1 - m)))


def test_straight_through_gradient_and_sr_ste_decay() -> None:
    """MDGF: dL/dW = dL/dW_tilde (also for pruned weights); SR-STE adds lambda (1 - m) W."""
    lin = nn.Linear(8, 2, bias=False)
    w = lin.weight.detach().clone()
    x = torch.randn(5, 8)
    for method, lam in (("mdgf", 0.0), ("srste", 2e-4)):
        model = nn.Sequential(nn.Linear(8, 2, bias=False))
        with torch.no_grad():
            model[0].weight.copy_(w)
        sp = NMSparsifier(
            model, NMSparsityConfig(pattern="1:4", method=method, scope=Scope(include=["Linear"]))
        )
        sp.attach()
        sp.apply_state(_state(0.0, 1, 4))
        model.train()
        model(x).sum().backward()
        mask = nm_mask(w, 1, 4)
        upstream = x.sum(0).expand_as(w)  # dL/dW_tilde of sum(x @ W^T)
        grad = model[0].parametrizations.weight.original.grad
        torch.testing.assert_close(grad, upstream + lam * (1 - mask) * w)
        assert (grad * (1 - mask)).abs().sum() > 0  # pruned weights still receive gradient


def test_default_scopes() -> None:
    from edgecompress.compress.models import create_model

    vit = create_model("vit")
    names = [
        n for n, _ in default_scope(vit).select(vit) if isinstance(dict(vit.named_modules())[n], nn.Linear)
    ]
    assert names and all(".mlp." in n for n in names)
    with_attn = [n for n, _ in default_scope(vit, include_attention=True).select(vit)]
    assert any(".attn.qkv" in n for n in with_attn) and any(".attn.proj" in n for n in with_attn)
    cnn = create_model("cnn")
    layers, _ = select_layers(cnn, NMSparsityConfig())
    assert set(layers) == {"features.0.0", "features.2.0", "classifier.1", "classifier.3"}


def test_indivisible_policies() -> None:
    model = _tiny_model()  # first conv has 1 input channel, last Linear 32 inputs
    layers, skipped = select_layers(model, NMSparsityConfig(pattern="1:8", indivisible="skip"))
    assert "0" in skipped and "0" not in layers and "6" in layers
    with pytest.raises(ConfigError, match="not a multiple"):
        select_layers(model, NMSparsityConfig(pattern="1:8", indivisible="error"))
    with pytest.raises(ConfigError, match="selects no"):
        select_layers(model, NMSparsityConfig(scope=Scope(include=["re:nothing"])))


def test_oneshot_needs_no_data_and_does_not_touch_the_input() -> None:
    model = _tiny_model()
    before = model[2].weight.detach().clone()
    bundle = ModelBundle(model, "tiny", (1, 28, 28), {}, 10, {})
    sparse, metrics = apply_nm_sparsity(bundle, NMSparsityConfig(pattern="1:4", method="oneshot"))
    assert torch.equal(model[2].weight, before)
    record = sparse.metadata["nm_sparsity"]
    assert record["pattern"] == "1:4" and record["layers"]["2"]["sparsity"] == pytest.approx(0.75)
    assert all(v == 0 for v in check_module_pattern(sparse.module, record).values())
    with pytest.raises(ConfigError, match="needs data"):
        apply_nm_sparsity(bundle, NMSparsityConfig(method="srste"))


@pytest.mark.parametrize(
    "arm",
    [
        {"method": "srste"},
        {"method": "mdgf", "decay": "exp"},
        {"method": "mdgf", "decay": "linear"},
        {"method": "sdgf", "sdgf_schedule": "stepwise"},
        {"method": "sdgf", "sdgf_schedule": "geometric"},
    ],  # fmt: skip
)
def test_every_method_trains_to_the_pattern(arm: dict, small_splits: Splits, tmp_path) -> None:
    model = _tiny_model()
    bundle = ModelBundle(model, "tiny", (1, 28, 28), {}, 10, {})
    cfg = NMSparsityConfig(pattern="1:8", max_steps=10, batch_size=32, lr=1e-3, eval_every=10, **arm)
    sparse, metrics = apply_nm_sparsity(bundle, cfg, small_splits, out_dir=tmp_path)
    record = sparse.metadata["nm_sparsity"]
    assert all(v == 0 for v in check_module_pattern(sparse.module, record).values())
    assert record["layers"]["4"]["sparsity"] == pytest.approx(7 / 8)
    assert not any("parametrizations" in k for k in sparse.module.state_dict())  # plain layers again
    assert metrics["train_steps"] == 10 and 0 <= metrics["test_accuracy"] <= 100
    assert (tmp_path / "train_log.jsonl").exists()


class _Killed(RuntimeError):
    pass


def test_resume_after_a_kill_matches_an_uninterrupted_run(
    small_splits: Splits, tmp_path, monkeypatch
) -> None:
    cfg = NMSparsityConfig(
        pattern="2:4", method="mdgf", max_steps=10, batch_size=16, checkpoint_every=5, eval_every=10
    )

    def bundle() -> ModelBundle:
        return ModelBundle(_tiny_model(), "tiny", (1, 28, 28), {}, 10, {})

    full, _ = apply_nm_sparsity(bundle(), cfg, small_splits, out_dir=tmp_path / "a")
    from edgecompress.compress.sparsity import schedule as sched_mod

    real_at = sched_mod.NMSchedule.at

    def dies_at_step_7(self, step):
        if step == 7:
            raise _Killed("simulated kill")
        return real_at(self, step)

    monkeypatch.setattr(sched_mod.NMSchedule, "at", dies_at_step_7)
    with pytest.raises(_Killed):
        apply_nm_sparsity(bundle(), cfg, small_splits, out_dir=tmp_path / "b")
    monkeypatch.setattr(sched_mod.NMSchedule, "at", real_at)
    resumed, metrics = apply_nm_sparsity(bundle(), cfg, small_splits, out_dir=tmp_path / "b", resume=True)
    assert metrics["resumed_from"] == 5
    for key, value in full.module.state_dict().items():
        torch.testing.assert_close(resumed.module.state_dict()[key], value, rtol=0, atol=1e-6)


def test_lock_keeps_zeros_through_training_and_unlock_restores_keys() -> None:
    from edgecompress.compress.sparsity.lock import lock_nm_pattern, unlock_nm_pattern

    model = _tiny_model()
    bundle = ModelBundle(model, "tiny", (1, 28, 28), {}, 10, {})
    sparse, _ = apply_nm_sparsity(bundle, NMSparsityConfig(pattern="1:4", method="oneshot"))
    keys = set(sparse.module.state_dict())
    record = sparse.metadata["nm_sparsity"]
    assert lock_nm_pattern(sparse.module, record) == len(record["layers"])
    opt = torch.optim.AdamW(sparse.module.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        sparse.module(torch.randn(4, 1, 28, 28)).pow(2).mean().backward()
        opt.step()
    assert all(v == 0 for v in check_module_pattern(sparse.module, record).values())
    assert unlock_nm_pattern(sparse.module) == len(record["layers"])
    assert set(sparse.module.state_dict()) == keys
    assert all(v == 0 for v in check_module_pattern(sparse.module, record).values())
    # Without the lock the same training grows pruned weights back.
    opt = torch.optim.AdamW(sparse.module.parameters(), lr=1e-2)
    opt.zero_grad()
    sparse.module(torch.randn(4, 1, 28, 28)).pow(2).mean().backward()
    opt.step()
    assert sum(check_module_pattern(sparse.module, record).values()) > 0
