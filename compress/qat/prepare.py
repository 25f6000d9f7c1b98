"""``prepare``: swap the in-scope Conv2d/Linear layers of any ``nn.Module`` for LSQ-quantized ones."""

from __future__ import annotations

import logging
from typing import Any, cast

import torch
from torch import nn

from edgecompress.compress.qat.config import GAQATConfig
from edgecompress.compress.qat.quantizers import LSQQuantizer, QuantWrapper, quant_wrappers
from edgecompress.compress.scope import Scope

log = logging.getLogger(__name__)

SUPPORTED = (nn.Conv2d, nn.Linear)


def _set_child(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def prepare(model: nn.Module, config: GAQATConfig, scope: Scope | None = None) -> nn.Module:
    """Insert LSQ quantizers into ``model`` (in place) and return it.

    Every Conv2d/Linear chosen by ``scope`` (default ``config.scope``) is wrapped so that its input
    activation and its weight are fake-quantized: weights signed at ``config.bits`` (per-channel or
    per-tensor), input activations at ``config.activation_bits`` (unsigned when the first batch has
    no negative value, e.g. after ReLU; signed otherwise). The first and last wrapped layers use
    ``config.first_last_bits`` when it is set (common practice since LSQ, Esser et al. 2020).
    Activation scales are initialised from the first batch the model sees; call
    :func:`initialize_activation_scales` before distributed training so every rank agrees.

    Raises:
        ConfigError: the scope selects no Conv2d/Linear layer, or a selected module is of another type.
    """
    scope = scope or config.scope
    chosen = [(n, m) for n, m in scope.select(model) if not isinstance(m, QuantWrapper | LSQQuantizer)]
    bad = [f"{n} ({type(m).__name__})" for n, m in chosen if not isinstance(m, SUPPORTED)]
    chosen = [(n, m) for n, m in chosen if isinstance(m, SUPPORTED)]
    if bad:
        log.info("QAT leaves modules it cannot quantize in float: %s", ", ".join(bad[:10]))
    if not chosen:
        scope.nothing_selected(model, SUPPORTED, "QAT")
    for i, (name, module) in enumerate(chosen):
        edge = i in (0, len(chosen) - 1) and config.first_last_bits is not None
        wb = config.first_last_bits if edge and config.first_last_bits else config.bits
        ab = config.first_last_bits if edge and config.first_last_bits else config.activation_bits
        _set_child(model, name, QuantWrapper(cast(nn.Module, module), wb, ab, config.per_channel))
    log.info("QAT: quantized %d layers (W%d A%d, edges %s)", len(chosen), config.bits, config.activation_bits,
             config.first_last_bits)  # fmt: skip
    return model


@torch.no_grad()
def initialize_activation_scales(model: nn.Module, x: torch.Tensor | tuple[torch.Tensor, ...]) -> None:
    """Run one batch so every activation quantizer takes its LSQ init (and signedness) from it.

    The model's BatchNorm running statistics are left unchanged.
    """
    from edgecompress.compress.training import forward

    was_training = model.training
    model.eval()
    forward(model, x)
    model.train(was_training)


def describe_quantization(model: nn.Module) -> list[dict[str, Any]]:
    """One row per quantized layer: bits, signedness and scale shape (for reports and manifests)."""
    rows = []
    for name, w in quant_wrappers(model):
        rows.append({
            "layer": name,
            "type": type(w.layer).__name__,
            "weight_bits": w.weight_quant.bits,
            "act_bits": w.act_quant.bits,
            "act_signed": w.act_quant.signed,
            "per_channel": w.weight_quant.channel_shape is not None,
        })  # fmt: skip
    return rows


def restore_quantizers(module: Any, metadata: dict[str, Any], state: dict[str, Any]) -> Any:
    """A QAT checkpoint (without codebooks): put the LSQ quantizers back before the weights load."""
    if "qat" not in metadata or metadata.get("codebook_layout"):
        return module
    from edgecompress.compress.qat.config import GAQATConfig

    return prepare(module, GAQATConfig.model_validate(metadata["qat"]["config"]))
