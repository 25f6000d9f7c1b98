"""Schedules of N:M training: phases, the MDGF alpha decay and the SDGF pattern sequence.

Bambhaniya et al., "Progressive Gradient Flow for Robust N:M Sparsity Training in Transformers"
(arXiv 2402.04744): training is dense, then sparse with a decaying gradient flow, then fine-tuned
with a hard mask. ``t`` counts optimizer steps after the dense phase.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from edgecompress.compress.errors import ConfigError
from edgecompress.compress.sparsity.config import NMSparsityConfig


def default_kappa(decay: str, total_steps: int, dense_fraction: float, alpha_target: float = 0.05,
                  target_fraction: float = 0.3) -> float:  # fmt: skip
    """kappa such that alpha reaches ``alpha_target`` at ``target_fraction`` of ``total_steps``.

    Exponential: ``exp(-kappa t*) = alpha_target``; linear: ``1 - kappa t* = alpha_target``, with
    ``t* = (target_fraction - dense_fraction) * total_steps`` steps after the dense phase.
    """
    t_star = max(1.0, (target_fraction - dense_fraction) * total_steps)
    if decay == "exp":
        return math.log(1.0 / alpha_target) / t_star
    if decay == "linear":
        return (1.0 - alpha_target) / t_star
    raise ConfigError(f"unknown MDGF decay {decay!r}; known: exp, linear")


def mdgf_alpha(decay: str, kappa: float, t: int) -> float:
    """alpha_t: ``exp(-kappa t)`` or ``max(0, 1 - kappa t)`` (1 before the sparse phase, t < 0)."""
    if t < 0:
        return 1.0
    if decay == "exp":
        return math.exp(-kappa * t)
    return max(0.0, 1.0 - kappa * t)


def sdgf_patterns(n: int, m: int, kind: str) -> list[tuple[int, int]]:
    """The SDGF pattern sequence ending at N:M.

    Stepwise: (M-1):M, M/2:M, M/4:M, ..., N:M (e.g. 7:8, 4:8, 2:8, 1:8 for 1:8).
    Geometric: 8N:8M, 4N:4M, 2N:2M, N:M (the same density in ever finer blocks).

    Example:
        >>> sdgf_patterns(1, 8, "stepwise")
        [(7, 8), (4, 8), (2, 8), (1, 8)]
    """
    if kind == "geometric":
        return [(k * n, k * m) for k in (8, 4, 2, 1)]
    if kind != "stepwise":
        raise ConfigError(f"unknown SDGF schedule {kind!r}; known: stepwise, geometric")
    keeps = [m - 1]
    k = m // 2
    while k > n:
        keeps.append(k)
        k //= 2
    keeps.append(n)
    ordered: list[int] = []
    for keep in keeps:
        if keep >= n and keep not in ordered and (not ordered or keep < ordered[-1]):
            ordered.append(keep)
    return [(keep, m) for keep in ordered]


@dataclass(frozen=True)
class StepState:
    """What the layers do at one optimizer step."""

    phase: str  # "dense", "sparse", "finetune"
    alpha: float  # weight of the pruned weights in the forward pass (1 dense, 0 hard mask)
    n: int
    m: int
    freeze_mask: bool  # fine-tune: the mask is fixed and pruned weights stay zero


class NMSchedule:
    """Maps an optimizer step to the :class:`StepState` of the configured method.

    Example:
        >>> s = NMSchedule(NMSparsityConfig(pattern="1:8", method="sdgf"), total_steps=1000)
        >>> s.at(999).n, s.at(999).m
        (1, 8)
    """

    def __init__(self, config: NMSparsityConfig, total_steps: int):
        self.config = config
        self.total = max(1, int(total_steps))
        self.n, self.m = config.n_m
        self.dense_end = int(round(config.resolved_dense_fraction * self.total))
        self.finetune_start = max(
            self.dense_end + 1, int(round((1 - config.resolved_finetune_fraction) * self.total))
        )
        if config.kappa is not None:
            self.kappa = config.kappa
        else:
            self.kappa = default_kappa(config.decay, self.total, config.resolved_dense_fraction, config.alpha_target,
                                       config.alpha_target_fraction)  # fmt: skip
        self.patterns = (
            sdgf_patterns(self.n, self.m, config.sdgf_schedule)
            if config.method == "sdgf"
            else [(self.n, self.m)]
        )

    def at(self, step: int) -> StepState:
        """The state for the optimizer step ``step`` (0-based)."""
        method = self.config.method
        if step < self.dense_end:
            return StepState("dense", 1.0, self.n, self.m, False)
        if step >= self.finetune_start and self.config.resolved_finetune_fraction > 0:
            return StepState("finetune", 0.0, self.n, self.m, True)
        t = step - self.dense_end
        if method == "mdgf":
            return StepState("sparse", mdgf_alpha(self.config.decay, self.kappa, t), self.n, self.m, False)
        if method == "sdgf":
            span = max(1, self.finetune_start - self.dense_end)
            idx = min(len(self.patterns) - 1, t * len(self.patterns) // span)
            n, m = self.patterns[idx]
            return StepState("sparse", 0.0, n, m, False)
        return StepState("sparse", 0.0, self.n, self.m, False)
