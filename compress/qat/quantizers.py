"""LSQ fake quantizers and the quantized Conv2d/Linear wrappers.

LSQ (Esser et al., "Learned Step Size Quantization", ICLR 2020):
``v_hat = s * round(clip(v / s, -Q_N, Q_P))`` with a straight-through estimator on the round, so
``dv_hat/dv = 1`` inside the range and 0 outside, and
``dv_hat/ds = round(v/s) - v/s`` inside, ``-Q_N`` below, ``Q_P`` above; the scale's gradient is
multiplied by ``g = 1 / sqrt(Q_P * N)`` with N the number of values sharing that scale (weights per
output channel for per-channel scales; features per sample for activations). Init
``s0 = 2 * mean(|v|) / sqrt(Q_P)`` (activations: from the first batch).

Rounding is half-to-even (``torch.round``), the same as ONNX ``QuantizeLinear``, so the exported
QDQ graph computes the same values.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from edgecompress.compress.layer_forward import apply_layer


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    """``(Q_N, Q_P)``: the quantized values lie in ``[-Q_N, Q_P]``."""
    if signed:
        return 2 ** (bits - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    # value of x, gradient multiplied by g (LSQ's gradscale)
    return (x - x * g).detach() + x * g


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return (torch.round(x) - x).detach() + x


def lsq_fake_quant(
    v: torch.Tensor, scale: torch.Tensor, q_n: int, q_p: int, grad_factor: float
) -> torch.Tensor:
    """LSQ fake quantization with the LSQ gradient (``scale`` broadcastable to ``v``)."""
    s = _grad_scale(scale, grad_factor)
    return _round_ste(torch.clamp(v / s, -q_n, q_p)) * s


class LSQQuantizer(nn.Module):
    """A learned-step-size quantizer for a weight or an activation tensor.

    Args:
        bits: bit-width, 2 to 8.
        signed: signed range (weights; activations that can be negative). ``None``: decided from
            the first batch (unsigned when it has no negative value, e.g. after ReLU).
        channel_shape: shape of a per-channel scale (``(C, 1, 1, 1)`` for conv weights), or None for
            one scale.
        kind: ``weight`` or ``activation`` (how N of the gradient scale is counted).

    Example:
        >>> q = LSQQuantizer(4, signed=True); q.initialize(w); w_hat = q(w)
    """

    signed_flag: torch.Tensor
    initialized: torch.Tensor

    def __init__(
        self,
        bits: int,
        signed: bool | None,
        channel_shape: tuple[int, ...] | None = None,
        kind: str = "weight",
    ):
        super().__init__()
        self.bits = bits
        self.kind = kind
        self.channel_shape = channel_shape
        self.scale = nn.Parameter(torch.ones(channel_shape if channel_shape else ()))
        # signed: 1 / unsigned: 0 / undecided: -1 (a buffer so it survives state_dict round trips)
        self.register_buffer("signed_flag", torch.tensor(-1 if signed is None else int(signed)))
        self.register_buffer("initialized", torch.tensor(False))

    @property
    def signed(self) -> bool:
        return bool(self.signed_flag.item() != 0)

    @property
    def qrange(self) -> tuple[int, int]:
        return int_range(self.bits, self.signed)

    def _reduce_dims(self, v: torch.Tensor) -> tuple[int, ...]:
        return tuple(range(1, v.dim())) if self.channel_shape else tuple(range(v.dim()))

    @torch.no_grad()
    def initialize(self, v: torch.Tensor) -> None:
        """LSQ init ``s0 = 2 * mean(|v|) / sqrt(Q_P)`` (per channel for per-channel scales)."""
        if int(self.signed_flag.item()) < 0:
            self.signed_flag.fill_(int(bool((v < 0).any())))
        q_p = self.qrange[1]
        mean_abs = v.abs().mean(dim=self._reduce_dims(v), keepdim=bool(self.channel_shape))
        s0 = (2.0 * mean_abs / math.sqrt(q_p)).clamp_min(1e-8)
        self.scale.copy_(s0.reshape(self.scale.shape))
        self.initialized.fill_(True)

    def grad_factor(self, v: torch.Tensor) -> float:
        """LSQ's ``g = 1 / sqrt(Q_P * N)``."""
        if self.kind == "activation":
            n = v[0].numel() if v.dim() > 1 else v.numel()
        else:
            n = v.numel() // (v.shape[0] if self.channel_shape else 1)
        return 1.0 / math.sqrt(self.qrange[1] * n)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            self.initialize(v)
        q_n, q_p = self.qrange
        if torch.onnx.is_in_onnx_export():
            from edgecompress.compress.qat.qdq_symbolic import qdq_for_export

            return qdq_for_export(v, self.scale, q_n, q_p, self.channel_shape is not None, self.kind)
        return lsq_fake_quant(v, self.scale, q_n, q_p, self.grad_factor(v))

    @torch.no_grad()
    def integers(self, v: torch.Tensor) -> torch.Tensor:
        """The integer codes of ``v`` (what the exported graph stores for weights)."""
        q_n, q_p = self.qrange
        return torch.clamp(torch.round(v / self.scale), -q_n, q_p)

    def extra_repr(self) -> str:
        sign = {-1: "auto", 0: "unsigned", 1: "signed"}[int(self.signed_flag.item())]
        return (
            f"bits={self.bits}, {sign}, {'per-channel' if self.channel_shape else 'per-tensor'}, {self.kind}"
        )


class QuantWrapper(nn.Module):
    """A Conv2d or Linear whose input activation and weight pass through LSQ quantizers.

    The float module is kept as ``self.layer`` (its bias stays float, as in a QDQ graph).
    """

    def __init__(self, layer: nn.Module, weight_bits: int, act_bits: int, per_channel: bool):
        super().__init__()
        self.layer = layer
        w = layer.weight
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"{type(layer).__name__} has no weight tensor to quantize")
        channel_shape = (int(w.shape[0]), *([1] * (w.dim() - 1))) if per_channel else None
        self.weight_quant = LSQQuantizer(weight_bits, signed=True, channel_shape=channel_shape, kind="weight")
        self.act_quant = LSQQuantizer(act_bits, signed=None, kind="activation")
        with torch.no_grad():
            self.weight_quant.initialize(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lay: Any = self.layer
        xq = self.act_quant(x)
        wq = self.weight_quant(lay.weight)
        # The layer's own forward for subclasses that pad in it (EfficientNet-Lite, timm's Conv2dSame),
        # and its padding_mode ("reflect", ...) for plain convs.
        return apply_layer(lay, xq, wq, lay.bias)


def quant_wrappers(model: nn.Module) -> list[tuple[str, QuantWrapper]]:
    """The quantized layers of a model, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantWrapper)]


def is_quantized(model: Any) -> bool:
    """Whether ``model`` holds LSQ quantizers (the QDQ exporter's predicate)."""
    return isinstance(model, nn.Module) and any(isinstance(m, LSQQuantizer) for m in model.modules())
