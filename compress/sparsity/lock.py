"""Keeping an N:M pattern through later training (QAT, fine-tuning): :func:`lock_nm_pattern`.

A later stage that trains the weights (QAT) would let the pruned weights grow back. Locking puts
a fixed-mask parametrization on every sparse layer: ``weight`` reads ``W * mask``, so the forward
pass (and a fake-quantizer reading ``layer.weight``) sees exact zeros, and the gradient of the
pruned entries is zero. :func:`unlock_nm_pattern` bakes the masked weights back into plain
``weight`` parameters (state-dict keys as before locking).

Example:
    >>> lock_nm_pattern(model, bundle.metadata["nm_sparsity"])
    >>> ...  # train
    >>> unlock_nm_pattern(model)
"""

from __future__ import annotations

from typing import Any


def _fixed_mask_cls():
    import torch

    class FixedNMMask(torch.nn.Module):
        """``W -> W * mask`` with a constant 0/1 mask (a buffer, saved with the state dict)."""

        def __init__(self, mask: Any):
            super().__init__()
            self.register_buffer("mask", mask)

        def forward(self, w: Any) -> Any:
            return w * self.mask

    return FixedNMMask


def _find_layer(module: Any, name: str) -> Any:
    """The layer called ``name``, or the one a wrapper moved it to (``name.layer``, ``name.module``)."""
    mods = dict(module.named_modules())
    for cand in (name, f"{name}.layer", f"{name}.module"):
        if cand in mods and hasattr(mods[cand], "weight"):
            return mods[cand]
    from edgecompress.compress.errors import UnsupportedError

    raise UnsupportedError(f"sparse layer {name!r} is not in the model; cannot lock its N:M pattern")


def lock_nm_pattern(module: Any, record: dict[str, Any]) -> int:
    """Freeze the current zero pattern of the sparse layers in ``record`` (``metadata["nm_sparsity"]``).

    Returns:
        The number of layers locked.
    """
    import torch
    from torch.nn.utils import parametrize

    cls = _fixed_mask_cls()
    count = 0
    for name in record["layers"]:
        layer = _find_layer(module, name)
        if parametrize.is_parametrized(layer, "weight"):
            continue
        mask = (layer.weight.detach() != 0).to(layer.weight.dtype)
        with torch.no_grad():
            layer.weight.mul_(mask)
        parametrize.register_parametrization(layer, "weight", cls(mask))
        count += 1
    return count


def unlock_nm_pattern(module: Any) -> int:
    """Remove every lock, leaving plain weights that hold the masked values. Returns the count."""
    from torch.nn.utils import parametrize

    count = 0
    for mod in list(module.modules()):
        if parametrize.is_parametrized(mod, "weight") and any(
            type(p).__name__ == "FixedNMMask" for p in mod.parametrizations.weight
        ):
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
            count += 1
    return count


def restore_locked_pattern(module: Any, metadata: dict[str, Any], state: dict[str, Any]) -> Any:
    """A checkpoint of a model whose N:M pattern was locked holds the weights with their
    parametrization: lock the fresh module the same way before they load."""
    record = metadata.get("nm_sparsity")
    if record and any(".parametrizations.weight.original" in k for k in state):
        lock_nm_pattern(module, record)
    return module
