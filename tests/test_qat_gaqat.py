"""GAQAT: conflict and disorder by hand, freezing stops exactly the chosen gradient part, resume equals an uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgecompress.compress.data import Dataset
from edgecompress.compress.qat import GAQATConfig
from edgecompress.compress.qat.gaqat import GAQATController, QATHooks
from edgecompress.compress.qat.train import quantize_model, train_quantized
from edgecompress.compress.training import TrainConfig


def _scale(values: list[float]) -> nn.Parameter:
    return nn.Parameter(torch.tensor(values))


def test_conflict_rate_and_split_by_hand() -> None:
    p = _scale([0.1, 0.1, 0.1, 0.1])
    ctl = GAQATController([("l", p)], freeze=None, window=3, freeze_every=1, tau=0.5, warmup_steps=0)
    g_task = torch.tensor([1.0, -1.0, 2.0, -2.0])
    p.grad = torch.tensor([3.0, 0.5, 1.0, -3.0])  # SAGM direction; smooth = grad - task = [2, 1.5, -1, -1]
    rec = ctl.apply({p: g_task}, step=1)
    assert rec["conflict"]["l"] == pytest.approx(0.5)  # channels 1 and 2 disagree
    assert torch.equal(p.grad, torch.tensor([3.0, 0.5, 1.0, -3.0]))  # observing changes nothing


def test_disorder_over_window_by_hand() -> None:
    p = _scale([0.1, 0.1])
    ctl = GAQATController([("l", p)], freeze="task", window=4, freeze_every=100, tau=0.3, warmup_steps=0)
    signs = [[1, 1], [-1, 1], [1, 1], [1, 1], [-1, 1]]
    for t, s in enumerate(signs, start=1):
        p.grad = torch.zeros(2)
        ctl.apply({p: torch.tensor(s, dtype=torch.float32)}, step=t)
    # last 4 steps: channel 0 = [-1, 1, 1, -1] -> 2 flips of 3; channel 1 none -> D = (2/3 + 0) / 2
    assert ctl.disorder("l") == pytest.approx(1 / 3)


@pytest.mark.parametrize("mode", ["task", "smooth", "scale"])
def test_freezing_removes_exactly_the_chosen_part(mode: str) -> None:
    p = _scale([0.5, 0.5])
    ctl = GAQATController([("l", p)], freeze=mode, window=2, freeze_every=2, tau=0.9, warmup_steps=0)
    opt = torch.optim.SGD([p], lr=0.1)
    g_task = torch.tensor([1.0, -2.0])
    combined = torch.tensor([0.25, -1.0])  # smooth part = [-0.75, 1.0]
    for step in (1, 2):  # the same signs twice: disorder 0 < tau, frozen at step 2 (a K-step)
        p.grad = combined.clone()
        rec = ctl.apply({p: g_task}, step=step)
    assert rec.get("frozen") == ["l"] and ctl.frozen == {"l": 2}
    before = p.detach().clone()
    p.grad = combined.clone()
    ctl.apply({p: g_task}, step=3)
    opt.step()
    expected_grad = {"task": combined - g_task, "smooth": g_task, "scale": torch.zeros(2)}[mode]
    assert torch.allclose(p.detach(), before - 0.1 * expected_grad)
    if mode == "scale":
        assert p.grad is None


def _tiny_data(n: int = 96) -> Dataset:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 1, 8, 8)).astype(np.float32)
    y = (x[:, 0, :4].mean(axis=(1, 2)) > 0).astype(np.int64)
    return Dataset(x, y, "tiny", 2, {})


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 8), nn.ReLU(),
                         nn.Linear(8, 2))  # fmt: skip


def test_freeze_on_a_real_model_keeps_scale_fixed_while_weights_move() -> None:
    data = _tiny_data()
    cfg = GAQATConfig(method="gaqat", freeze="scale", bits=3, warmup_steps=0, window=2, freeze_every=2, tau=1.01,
                      first_last_bits=None, max_steps=6, batch_size=16, lr=1e-2)  # fmt: skip
    model = quantize_model(_tiny_model(), cfg, data.x)
    hooks = QATHooks(cfg)
    opt = hooks.make_optimizer(model, TrainConfig(max_steps=6, lr=1e-2, optimizer="sgd", momentum=0.0))
    x, y = torch.from_numpy(data.x[:16]), torch.from_numpy(data.y[:16])
    for step in range(2):
        hooks.training_step(model, opt, x, y, step)
    assert hooks.controller is not None and len(hooks.controller.frozen) == 6  # tau > 1 freezes all at step 2
    scales = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("scale")}
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("weight")}
    hooks.training_step(model, opt, x, y, 2)
    for n, p in model.named_parameters():
        if n in scales:
            assert torch.equal(p.detach(), scales[n]), n
        if n in weights:
            assert not torch.equal(p.detach(), weights[n]), n


class _Interrupt(QATHooks):
    def on_step_end(self, model: nn.Module, step: int) -> dict:
        if step == 7:
            raise KeyboardInterrupt
        return super().on_step_end(model, step)


def test_resume_after_interrupt_equals_uninterrupted_run(tmp_path: Path) -> None:
    data = _tiny_data()
    cfg = GAQATConfig(method="gaqat", bits=4, warmup_steps=2, window=2, freeze_every=2, tau=0.6, first_last_bits=None,
                      max_steps=10, batch_size=16, lr=5e-3, checkpoint_every=5, seed=3)  # fmt: skip
    base = _tiny_model()
    full = quantize_model(base, cfg, data.x)
    hooks_full = QATHooks(cfg)
    train_quantized(full, data, None, cfg, tmp_path / "full", hooks=hooks_full)

    part = quantize_model(base, cfg, data.x)
    with pytest.raises(KeyboardInterrupt):
        train_quantized(part, data, None, cfg, tmp_path / "part", hooks=_Interrupt(cfg))
    resumed = quantize_model(base, cfg, data.x)
    hooks_resumed = QATHooks(cfg)
    result = train_quantized(resumed, data, None, cfg, tmp_path / "part", resume=True, hooks=hooks_resumed)
    assert result.resumed_from == 5 and result.steps == 10
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert hooks_full.controller is not None and hooks_resumed.controller is not None
    assert hooks_full.controller.frozen == hooks_resumed.controller.frozen
    full_log = [json.loads(ln) for ln in (tmp_path / "full" / "train_log.jsonl").read_text().splitlines()]
    part_log = [json.loads(ln) for ln in (tmp_path / "part" / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in part_log if "loss" in r]  # the trainer may add event records (e.g. "resumed")
    assert [r["step"] for r in steps] == list(range(1, 11)) and all("conflict" in r for r in steps)
    assert [r["conflict"] for r in steps] == [r["conflict"] for r in full_log if "loss" in r]
