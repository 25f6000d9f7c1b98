"""SAM/SAGM wrapper against a hand-computed two-parameter step; BatchNorm statistics in the perturbed pass."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from edgecompress.compress.errors import ConfigError
from edgecompress.compress.qat.sharpness import SharpnessAwareOptimizer, frozen_batchnorm_stats


def _loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a**2 + 3 * b  # gradient (2a, 3)


def _one_step(mode: str, rho: float, alpha: float, lr: float) -> tuple[float, float]:
    a = nn.Parameter(torch.tensor(1.0, dtype=torch.float64))
    b = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
    opt = SharpnessAwareOptimizer(torch.optim.SGD([a, b], lr=lr), rho=rho, alpha=alpha, mode=mode)
    opt.zero_grad()
    _loss(a, b).backward()
    opt.perturb()
    opt.zero_grad()
    _loss(a, b).backward()
    opt.restore_and_combine()
    opt.step()
    return a.item(), b.item()


@pytest.mark.parametrize("mode", ["sagm", "sam"])
def test_two_parameter_step_by_hand(mode: str) -> None:
    rho, alpha, lr = 0.5, 0.1, 0.1
    g = (2.0, 3.0)  # at (a, b) = (1, 2)
    norm = math.sqrt(13.0)
    coef = rho / norm - (alpha if mode == "sagm" else 0.0)
    a_p = 1.0 + coef * g[0]  # perturbed point theta' = theta + coef * g
    g_p = (2 * a_p, 3.0)
    direction = ((g[0] + g_p[0]) / 2, (g[1] + g_p[1]) / 2) if mode == "sagm" else g_p
    a, b = _one_step(mode, rho, alpha, lr)
    assert a == pytest.approx(1.0 - lr * direction[0], abs=1e-12)
    assert b == pytest.approx(2.0 - lr * direction[1], abs=1e-12)
    # SAGM and SAM really differ here
    other = _one_step("sam" if mode == "sagm" else "sagm", rho, alpha, lr)
    assert abs(other[0] - a) > 1e-3


def test_parameters_are_restored_after_the_perturbed_pass() -> None:
    p = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = SharpnessAwareOptimizer(torch.optim.SGD([p], lr=0.0), rho=0.05, alpha=0.001)
    opt.zero_grad()
    (p**2).sum().backward()
    opt.perturb()
    assert not torch.equal(p.detach(), torch.tensor([1.0, -2.0]))
    opt.zero_grad()
    (p**2).sum().backward()
    opt.restore_and_combine()
    assert torch.equal(p.detach(), torch.tensor([1.0, -2.0]))


def test_batchnorm_statistics_frozen_in_perturbed_pass() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model.train()
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    bn = model[1]
    assert isinstance(bn, nn.BatchNorm1d)
    before = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    with frozen_batchnorm_stats(model):
        model(x).sum().backward()  # train mode: batch statistics are used ...
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert torch.equal(bn.num_batches_tracked, before[2])
    model(x)  # ... and outside the context they update as usual
    assert not torch.equal(bn.running_mean, before[0])


def test_unknown_mode_is_rejected() -> None:
    with pytest.raises(ConfigError, match="valid: sam, sagm"):
        SharpnessAwareOptimizer(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), mode="asam")
