"""Running a Linear/Conv2d layer's own ``forward`` with another weight.

Compressed layers compute a weight (fake-quantized, rebuilt from codebooks) and apply it as the
original layer would. For plain ``nn.Linear``/``nn.Conv2d`` that is ``F.linear`` and the conv's own
``_conv_forward`` (``F.conv2d`` with the layer's arguments, after ``F.pad`` for a ``padding_mode``
other than zeros: "reflect" rebuilt as zero padding is silently another function); subclasses that
do more in ``forward`` (TensorFlow "same" padding in EfficientNet-Lite, timm's ``Conv2dSame``:
padding applied to the input, ``padding=0`` on the module; weight normalisation) must run that
forward, or what it adds is silently lost.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

_PLAIN_FORWARDS = (nn.Conv2d.forward, nn.Linear.forward)


def has_own_forward(layer: nn.Module) -> bool:
    """Whether ``layer`` is a Linear/Conv2d subclass with its own ``forward``."""
    return type(layer).forward not in _PLAIN_FORWARDS


def call_with_weight(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: Any = "keep") -> torch.Tensor:
    """``layer(x)`` with ``weight`` (and ``bias``, unless ``"keep"``) in place of its parameters.

    The parameters are swapped in for the call and restored after it. (``torch.func.functional_call``
    does the same but refuses the ONNX exporter's tracing.)
    """
    names = ["weight"] if isinstance(bias, str) else ["weight", "bias"]
    saved = {n: layer._parameters.get(n) for n in names}
    layer._parameters["weight"] = weight  # type: ignore[assignment]
    if not isinstance(bias, str):
        layer._parameters["bias"] = bias
    try:
        return layer(x)
    finally:
        for n, v in saved.items():
            layer._parameters[n] = v


def apply_layer(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``layer``'s computation on ``x`` with ``weight`` and ``bias``: ``F.conv2d`` (with the padding mode's
    ``F.pad``) / ``F.linear`` for plain layers (the graph exporters expect), the layer's own forward for
    subclasses."""
    if not has_own_forward(layer):
        if isinstance(layer, nn.Conv2d):
            # nn.Conv2d.forward's own body: padding_mode "reflect"/"replicate"/"circular" pads first
            return layer._conv_forward(x, weight, bias)
        return F.linear(x, weight, bias)
    return call_with_weight(layer, x, weight, bias)


def weightless_copy(layer: nn.Module) -> nn.Module:
    """A copy of ``layer`` without its weight and bias: its forward's behaviour (padding, ...) for
    :func:`apply_layer`, without keeping the float weights alive."""
    saved = {n: layer._parameters.get(n) for n in ("weight", "bias")}
    for n in saved:
        layer._parameters[n] = None
    try:
        return copy.deepcopy(layer)
    finally:
        for n, v in saved.items():
            layer._parameters[n] = v
