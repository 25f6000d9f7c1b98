"""SAM and SAGM as wrappers around any torch optimizer.

SAM (Foret et al., "Sharpness-Aware Minimization", ICLR 2021): ``g = grad L(theta)``,
``theta' = theta + rho * g / ||g||``, update direction ``g_p = grad L(theta')``.
SAGM (Wang et al., "Sharpness-Aware Gradient Matching for Domain Generalization", CVPR 2023), as
ALGORITHMS.md section 1 states it: ``theta' = theta + (rho / ||g|| - alpha) * g`` and update
direction ``(g + g_p) / 2``. ``||g||`` is the norm over all parameters together.

The perturbed pass runs in train mode (batch statistics) but BatchNorm running statistics are
restored afterwards, so only the clean pass updates them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from edgecompress.compress.errors import ConfigError

MODES = ("sam", "sagm")


@contextlib.contextmanager
def frozen_batchnorm_stats(model: nn.Module) -> Iterator[None]:
    """Run the body without changing any BatchNorm running statistics (exactly, for any momentum)."""
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            saved.append((m, [b.detach().clone() if b is not None else None
                              for b in (m.running_mean, m.running_var, m.num_batches_tracked)]))  # fmt: skip
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (mean, var, count) in saved:
                for buf, old in (
                    (m.running_mean, mean),
                    (m.running_var, var),
                    (m.num_batches_tracked, count),
                ):
                    if buf is not None and old is not None:
                        buf.copy_(old)


class SharpnessAwareOptimizer:
    """Wraps a torch optimizer with SAM or SAGM's two-pass update.

    Use :meth:`perturb` after the clean backward pass, run the perturbed forward/backward, then
    :meth:`restore_and_combine` and :meth:`step`. ``first_grads`` keeps ``g`` (the clean gradient)
    of every parameter until the next :meth:`perturb`, which GAQAT reads.

    Args:
        base: the optimizer that applies the combined direction (Adam, SGD, ...).
        rho: perturbation radius (default 0.05).
        alpha: SAGM's gradient-alignment coefficient (default 0.001; ignored by SAM).
        mode: ``sam`` or ``sagm``.

    Example:
        >>> opt = SharpnessAwareOptimizer(torch.optim.Adam(model.parameters()), rho=0.05, alpha=0.001)
    """

    def __init__(
        self, base: torch.optim.Optimizer, rho: float = 0.05, alpha: float = 0.001, mode: str = "sagm"
    ):
        if mode not in MODES:
            raise ConfigError(f"unknown sharpness-aware mode {mode!r}; valid: {', '.join(MODES)}")
        if rho < 0:
            raise ConfigError(f"rho must be >= 0, got {rho}")
        self.base = base
        self.rho = rho
        self.alpha = alpha if mode == "sagm" else 0.0
        self.mode = mode
        self.first_grads: dict[torch.Tensor, torch.Tensor] = {}
        self._offsets: dict[torch.Tensor, torch.Tensor] = {}

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.base.param_groups

    def _params(self) -> Iterator[torch.Tensor]:
        for group in self.base.param_groups:
            yield from group["params"]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def perturb(self) -> None:
        """Save ``g`` and move the parameters to ``theta'``."""
        self.first_grads = {p: p.grad.detach().clone() for p in self._params() if p.grad is not None}
        norm = torch.sqrt(
            sum((g.double() ** 2).sum() for g in self.first_grads.values())
            or torch.zeros((), dtype=torch.float64)
        )
        coef = float(self.rho / (float(norm) + 1e-12)) - self.alpha
        self._offsets = {}
        for p, g in self.first_grads.items():
            e = g * coef
            p.add_(e)
            self._offsets[p] = e

    @torch.no_grad()
    def restore_and_combine(self) -> None:
        """Move back to ``theta`` and set each gradient to the update direction."""
        for p, e in self._offsets.items():
            p.sub_(e)
        self._offsets = {}
        for p, g in self.first_grads.items():
            g_p = p.grad if p.grad is not None else torch.zeros_like(g)
            p.grad = (g + g_p) / 2 if self.mode == "sagm" else g_p.clone()

    def step(self) -> None:
        """Apply the base optimizer to the combined direction."""
        self.base.step()

    def state_dict(self) -> dict[str, Any]:
        return self.base.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base.load_state_dict(state)
