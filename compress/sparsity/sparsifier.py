"""Applying N:M sparsity to a torch model: layer selection, masked forward, training hooks, baking.

During training every selected layer's ``weight`` is a ``torch.nn.utils.parametrize``
parametrization of the dense weight ``W``; its forward computes a fresh N:M mask from ``|W|`` on
every call and returns ``W * (m + alpha (1 - m))``. The backward pass is straight-through
(``dL/dW = dL/dW_tilde``) plus, for SR-STE (Zhou et al., ICLR 2021), the sparse-refined term
``lambda_W (1 - m) W``. MDGF (Bambhaniya et al., arXiv 2402.04744) sets ``alpha`` from its decay
schedule, SDGF changes the pattern; both are driven by :class:`NMSparsityHooks` from the step
number, so a resumed run continues the schedule exactly.

After training, :meth:`NMSparsifier.finalize` removes the parametrizations and leaves plain
``nn.Linear``/``nn.Conv2d`` layers whose weights hold exact zeros in the N:M pattern.
"""

from __future__ import annotations

import logging
from typing import Any

from edgecompress.compress.errors import ConfigError, UnsupportedError
from edgecompress.compress.scope import Scope
from edgecompress.compress.sparsity.config import ATTENTION_PATTERN, FEED_FORWARD_PATTERN, NMSparsityConfig
from edgecompress.compress.sparsity.masks import nm_mask
from edgecompress.compress.sparsity.schedule import NMSchedule, StepState
from edgecompress.compress.training import TrainingHooks

log = logging.getLogger(__name__)

SUPPORTED_LAYERS = ("Linear", "Conv2d")


def is_transformer(model: Any) -> bool:
    """Whether the model contains attention (class names containing ``Attention``)."""
    return any("Attention" in type(mod).__name__ for mod in model.modules())


def default_scope(model: Any, include_attention: bool = False) -> Scope:
    """Linear+Conv2d for CNNs; feed-forward layers (and optionally attention) for transformers."""
    if not is_transformer(model):
        return Scope(include=list(SUPPORTED_LAYERS))
    include = [FEED_FORWARD_PATTERN] + ([ATTENTION_PATTERN] if include_attention else [])
    return Scope(include=include)


def select_layers(model: Any, config: NMSparsityConfig) -> tuple[dict[str, Any], dict[str, str]]:
    """The layers to sparsify and the ones skipped with the reason.

    Returns:
        ``(layers, skipped)``: name -> module, and name -> reason.

    Raises:
        ConfigError: the scope selects no supported layer, or ``indivisible="error"`` meets a
            layer whose input dimension is not a multiple of M.
    """
    import torch

    n, m = config.n_m
    scope = config.scope or default_scope(model, config.include_attention)
    layers: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for name, mod in scope.select(model):
        if not isinstance(mod, torch.nn.Linear | torch.nn.Conv2d):
            continue
        width = mod.weight.shape[1]
        if width % m:
            if config.indivisible == "error":
                raise ConfigError(
                    f"layer {name!r} has input dimension {width}, not a multiple of M={m}; "
                    f"use indivisible='pad' (zero-padded groups) or 'skip' (leave it dense)"
                )
            if config.indivisible == "skip":
                skipped[name] = f"input dimension {width} is not a multiple of {m}"
                continue
        layers[name] = mod
    if not layers:
        scope.nothing_selected(model, (torch.nn.Linear, torch.nn.Conv2d), "sparsity",
                               why=" (after skipping indivisible layers)" if skipped else "")  # fmt: skip
    return layers, skipped


def _masked_weight_fn():
    import torch

    class MaskedWeight(torch.autograd.Function):
        """Forward ``W (m + alpha (1 - m))``; backward straight-through + ``decay (1 - m) W``."""

        @staticmethod
        def forward(ctx: Any, w: Any, mask: Any, alpha: float, decay: float) -> Any:
            ctx.save_for_backward(w, mask)
            ctx.decay = decay
            if alpha == 0.0:
                return w * mask
            return w * (mask + alpha * (1 - mask))

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            w, mask = ctx.saved_tensors
            if ctx.decay:
                grad = grad + ctx.decay * (1 - mask) * w
            return grad, None, None, None

    return MaskedWeight


def _parametrization_cls():
    import torch

    masked = _masked_weight_fn()

    class NMParametrization(torch.nn.Module):
        """The masked weight of one layer; the mask is recomputed from |W| on every call unless frozen."""

        def __init__(self, n: int, m: int, decay: float):
            super().__init__()
            self.n, self.m, self.alpha, self.decay = n, m, 0.0, decay
            self.frozen: Any = None

        def mask_for(self, w: Any) -> Any:
            return self.frozen if self.frozen is not None else nm_mask(w, self.n, self.m)

        def forward(self, w: Any) -> Any:
            if self.alpha >= 1.0 and self.frozen is None:
                return w  # dense phase: no mask, plain gradient
            return masked.apply(
                w, self.mask_for(w), float(self.alpha), float(self.decay) if self.training else 0.0
            )

    return NMParametrization


class NMSparsifier:
    """Holds the selected layers of a model and switches their masking.

    Example:
        >>> sp = NMSparsifier(model, NMSparsityConfig(pattern="2:4", method="oneshot"))
        >>> sp.prune_oneshot()
        >>> report = sp.finalize()
    """

    def __init__(self, model: Any, config: NMSparsityConfig):
        self.model = model
        self.config = config
        self.n, self.m = config.n_m
        self.layers, self.skipped = select_layers(model, config)
        self._params: dict[str, Any] = {}
        self.state: StepState | None = None

    # --- training ---------------------------------------------------------------------------
    def attach(self) -> None:
        """Parametrize every selected weight (before the optimizer is built)."""
        from torch.nn.utils import parametrize

        cls = _parametrization_cls()
        decay = self.config.resolved_sparse_refined_decay
        for name, mod in self.layers.items():
            if parametrize.is_parametrized(mod, "weight"):
                raise UnsupportedError(
                    f"layer {name!r} is already parametrized; N:M needs plain Linear/Conv2d weights"
                )
            p = cls(self.n, self.m, decay)
            parametrize.register_parametrization(mod, "weight", p, unsafe=True)
            self._params[name] = p
        log.info("N:M %d:%d on %d layers (%d skipped)", self.n, self.m, len(self.layers), len(self.skipped))

    def apply_state(self, state: StepState) -> None:
        """Set alpha, the current pattern and (at fine-tune start) freeze the masks."""
        import torch

        for name, p in self._params.items():
            p.alpha, p.n, p.m = state.alpha, state.n, state.m
            if state.freeze_mask and p.frozen is None:
                w = self.layers[name].parametrizations.weight.original
                with torch.no_grad():
                    p.frozen = nm_mask(w, state.n, state.m)
                    w.mul_(p.frozen)  # hard mask: pruned weights are zero from here on
            elif not state.freeze_mask:
                p.frozen = None
        self.state = state

    # --- one-shot and baking ----------------------------------------------------------------
    def prune_oneshot(self) -> None:
        """Magnitude-prune every selected layer to N:M in place (no training)."""
        import torch

        with torch.no_grad():
            for mod in self.layers.values():
                mod.weight.mul_(nm_mask(mod.weight, self.n, self.m))

    def finalize(self) -> dict[str, Any]:
        """Remove the parametrizations, leave exact N:M zeros, and return the per-layer record."""
        import torch
        from torch.nn.utils import parametrize

        for name, mod in self.layers.items():
            if parametrize.is_parametrized(mod, "weight"):
                p = self._params[name]
                with torch.no_grad():
                    w = mod.parametrizations.weight.original.detach()
                    mask = p.frozen if p.frozen is not None else nm_mask(w, self.n, self.m)
                parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)
                with torch.no_grad():
                    mod.weight.mul_(mask)
            else:
                with torch.no_grad():
                    mod.weight.mul_(nm_mask(mod.weight, self.n, self.m))
        self._params.clear()
        return self.record()

    def record(self) -> dict[str, Any]:
        """The pattern metadata kept with the model: pattern, and per layer kind, shape and sparsity."""
        layers = {}
        for name, mod in self.layers.items():
            w = mod.weight.detach()
            layers[name] = {
                "kind": type(mod).__name__,
                "shape": list(w.shape),
                "group_axis": 1,
                "sparsity": round(float((w == 0).sum()) / w.numel(), 6),
                "padded": bool(w.shape[1] % self.m),
            }
        return {
            "pattern": f"{self.n}:{self.m}",
            "n": self.n,
            "m": self.m,
            "method": self.config.method,
            "layers": layers,
            "skipped": dict(self.skipped),
        }


class NMSparsityHooks(TrainingHooks):
    """Trainer hooks that run the N:M schedule (SR-STE, MDGF, SDGF) step by step.

    The state at step ``t`` is a pure function of ``t`` (:class:`NMSchedule`), set at the start of
    each step, so resuming from a checkpoint continues with the same alpha and pattern; frozen
    fine-tune masks are saved in :meth:`state_dict`.
    """

    def __init__(self, sparsifier: NMSparsifier, schedule: NMSchedule):
        self.sparsifier = sparsifier
        self.schedule = schedule

    def training_step(self, model: Any, optimizer: Any, x: Any, y: Any, step: int) -> float:
        self.sparsifier.apply_state(self.schedule.at(step))
        return super().training_step(model, optimizer, x, y, step)

    def on_step_end(self, model: Any, step: int) -> dict[str, Any]:
        state = self.sparsifier.state
        if state is None or (step % 10 and step != self.schedule.total):
            return {}
        return {"phase": state.phase, "alpha": round(state.alpha, 5), "pattern": f"{state.n}:{state.m}"}

    def state_dict(self) -> dict[str, Any]:
        return {name: p.frozen for name, p in self.sparsifier._params.items() if p.frozen is not None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, mask in state.items():
            if name in self.sparsifier._params:
                self.sparsifier._params[name].frozen = mask
