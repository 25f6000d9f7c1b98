"""GAQAT's conflict, disorder and freezing (Jiang et al., arXiv 2412.05551), and the training hooks.

For every quantizer scale ``s_l`` the SAGM update splits into a task part
``g_task = dL(theta)/ds_l`` and a smoothness part ``g_smooth = (dL(theta')/ds_l - dL(theta)/ds_l) / 2``
(their sum is the SAGM direction). A scale is *in conflict* when the two signs differ (the
fraction of channels that differ, for per-channel scales). The *disorder* over the last n steps is
``D_l = 1/(n-1) * sum_t [sign(g_task_t) != sign(g_task_{t-1})]``. Every K steps after the warm-up,
each not-yet-frozen scale with ``D_l < tau`` is frozen for good: ``freeze="task"`` drops its task
part (the scale then follows ``g_smooth`` only), ``"smooth"`` drops the smoothness part, ``"scale"``
stops the scale. Weights and all other parameters keep the normal SAGM update.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from edgecompress.compress.qat.config import GAQATConfig
from edgecompress.compress.qat.quantizers import LSQQuantizer
from edgecompress.compress.qat.sharpness import SharpnessAwareOptimizer, frozen_batchnorm_stats
from edgecompress.compress.training import TrainConfig, TrainingHooks

log = logging.getLogger(__name__)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def named_scales(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(quantizer name, scale)`` for every LSQ quantizer, names independent of a DDP wrapper."""
    return [(n, m.scale) for n, m in _unwrap(model).named_modules() if isinstance(m, LSQQuantizer)]


class GAQATController:
    """Tracks conflict and disorder per scale and applies the freezing rule.

    Args:
        scales: ``(name, parameter)`` pairs to watch.
        freeze: ``task``, ``smooth`` or ``scale``; None only observes (QAT+SAGM diagnostics).
        window, freeze_every, tau, warmup_steps: n, K, tau and the warm-up of the freezing rule.
    """

    def __init__(self, scales: list[tuple[str, nn.Parameter]], freeze: str | None, window: int = 20,
                 freeze_every: int = 20, tau: float = 0.3, warmup_steps: int = 200):  # fmt: skip
        self.scales = scales
        self.freeze = freeze
        self.window = window
        self.freeze_every = freeze_every
        self.tau = tau
        self.warmup_steps = warmup_steps
        self.history = {n: torch.zeros((window, p.numel()), dtype=torch.int8) for n, p in scales}
        self.count = {n: 0 for n, _ in scales}
        self.frozen: dict[str, int] = {}  # name -> step at which it was frozen

    def disorder(self, name: str) -> float | None:
        """``D_l`` over the last n task-gradient signs, or None before n steps were seen."""
        c = self.count[name]
        if c < self.window:
            return None
        order = [(c + i) % self.window for i in range(self.window)]  # oldest first
        signs = self.history[name][order]
        flips = (signs[1:] != signs[:-1]).float()
        return float(flips.mean())

    @torch.no_grad()
    def apply(self, first_grads: dict[torch.Tensor, torch.Tensor], step: int) -> dict[str, Any]:
        """Split, log, freeze and set each scale's gradient; ``step`` counts from 1. Returns the log record."""
        conflict: dict[str, float] = {}
        for name, p in self.scales:
            g_task = first_grads.get(p)
            if g_task is None or p.grad is None:
                continue
            g_smooth = p.grad - g_task
            conflict[name] = float((torch.sign(g_task) != torch.sign(g_smooth)).float().mean())
            if name not in self.frozen:
                c = self.count[name]
                self.history[name][c % self.window] = torch.sign(g_task).reshape(-1).to(torch.int8)
                self.count[name] = c + 1
            mode = self.freeze if name in self.frozen else None
            if mode == "task":
                p.grad = g_smooth.clone()
            elif mode == "smooth":
                p.grad = g_task.clone()
            elif mode == "scale":
                p.grad = None  # the base optimizer skips it: no momentum drift either
        record: dict[str, Any] = {"conflict": conflict}
        if self.freeze is not None and step >= self.warmup_steps and step % self.freeze_every == 0:
            disorder = {
                n: d for n, _ in self.scales if n not in self.frozen and (d := self.disorder(n)) is not None
            }
            newly = sorted(n for n, d in disorder.items() if d < self.tau)
            for n in newly:
                self.frozen[n] = step
            record["disorder"] = disorder
            if newly:
                record["frozen"] = newly
                log.info("GAQAT step %d: froze the %s gradient of %s", step, self.freeze, ", ".join(newly))
        record["n_frozen"] = len(self.frozen)
        return record

    def state_dict(self) -> dict[str, Any]:
        return {"history": dict(self.history), "count": dict(self.count), "frozen": dict(self.frozen)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = {n: t.clone() for n, t in state["history"].items()}
        self.count = {n: int(c) for n, c in state["count"].items()}
        self.frozen = {n: int(s) for n, s in state["frozen"].items()}


class QATHooks(TrainingHooks):
    """Plugs LSQ QAT, SAM/SAGM and GAQAT into the shared :class:`compress.training.Trainer`.

    The scales get their own parameter group (no weight decay, ``lr_scale = scale_lr_factor``).
    With ``method="qat-sagm"``/``"qat-sam"`` the controller only logs conflict rates.
    """

    def __init__(self, config: GAQATConfig, *, sharpness: str | None = "config", observe: bool = True):
        self.config = config
        self.mode = config.sharpness_mode if sharpness == "config" else sharpness
        self.observe = observe
        self.controller: GAQATController | None = None
        self._last: dict[str, Any] = {}
        self._pending_state: dict[str, Any] | None = None

    def make_optimizer(self, model: Any, config: TrainConfig) -> Any:
        scales = named_scales(model)
        scale_ids = {id(p) for _, p in scales}
        weights = [p for p in model.parameters() if p.requires_grad and id(p) not in scale_ids]
        groups = [{"params": weights, "weight_decay": config.weight_decay}]
        if scales:
            groups.append({"params": [p for _, p in scales], "weight_decay": 0.0,
                           "lr_scale": self.config.scale_lr_factor})  # fmt: skip
        if config.optimizer == "sgd":
            base: torch.optim.Optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
        elif config.optimizer == "adamw":
            base = torch.optim.AdamW(groups, lr=config.lr)
        else:
            base = torch.optim.Adam(groups, lr=config.lr)
        if self.mode is not None and scales and (self.observe or self.config.method == "gaqat"):
            freeze = self.config.freeze if self.config.method == "gaqat" else None
            c = self.config
            self.controller = GAQATController(scales, freeze, c.window, c.freeze_every, c.tau, c.warmup_steps)
            if self._pending_state is not None:
                self.controller.load_state_dict(self._pending_state)
                self._pending_state = None
        if self.mode is None:
            return base
        return SharpnessAwareOptimizer(base, self.config.rho, self.config.alpha, self.mode)

    def training_step(self, model: Any, optimizer: Any, x: Any, y: Any, step: int) -> float:
        if not isinstance(optimizer, SharpnessAwareOptimizer):
            return super().training_step(model, optimizer, x, y, step)
        optimizer.zero_grad(set_to_none=True)
        loss = self.loss(model, x, y)
        loss.backward()
        optimizer.perturb()
        optimizer.zero_grad(set_to_none=True)
        with frozen_batchnorm_stats(model):
            self.loss(model, x, y).backward()
        optimizer.restore_and_combine()
        if self.controller is not None:
            self._last = self.controller.apply(optimizer.first_grads, step + 1)
        optimizer.step()
        return float(loss.detach())

    def on_step_end(self, model: Any, step: int) -> dict[str, Any]:
        out, self._last = self._last, {}
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"controller": self.controller.state_dict()} if self.controller is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "controller" not in state:
            return
        if self.controller is None:
            self._pending_state = state["controller"]
        else:
            self.controller.load_state_dict(state["controller"])
