"""Codebook layers: a weight stored as packed codeword indices, codebook(s), group scales and
(when it could not be folded away) the neuron permutation (JLCM, Yvinec et al., ICLR 2024).

Rows (output neurons) are stored in group order, groups contiguous, so the group of a row is
implied by its position: only the ``G - 1`` group boundaries are stored. Variant ``scales``:
``W_row = sigma[group(row)] * C[I_row]``; variant ``codebooks``: ``W_row = C[group(row)][I_row]``.
When the permutation is not folded into the next layer, ``row_gather`` (int16) puts rows back in
their original order.

:func:`storage_bits` is the exact accounting of what the ``onnx-codebook`` export stores.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgecompress.compress.codebook.packing import pack_indices, unpack_indices
from edgecompress.compress.layer_forward import apply_layer, has_own_forward, weightless_copy

_BYTES = {torch.uint8: 1, torch.int16: 2, torch.int32: 4, torch.int64: 8, torch.float16: 2, torch.float32: 4}


class CodebookWeight(nn.Module):
    """The stored representation of one weight tensor and its reconstruction.

    Args:
        indices: (out, D) codeword indices in stored row order.
        codebook: (1, K) for variant ``scales``, (G, K) for ``codebooks``.
        scales: (G,) group scales (variant ``scales``) or None.
        group_sizes: rows per group, in stored order (sums to ``out``).
        row_gather: (out,) stored row of each original row, or None when the order is folded/identity.
        weight_shape: the dense weight's shape.
        bits: bits per index.
        dtype: storage dtype of codebook and scales.
    """

    packed: torch.Tensor
    codebook: torch.Tensor
    scales: torch.Tensor
    bounds: torch.Tensor
    shape2d: torch.Tensor
    row_gather: torch.Tensor

    def __init__(
        self,
        indices: torch.Tensor,
        codebook: torch.Tensor,
        scales: torch.Tensor | None,
        group_sizes: list[int],
        row_gather: torch.Tensor | None,
        weight_shape: tuple[int, ...],
        bits: int,
        dtype: torch.dtype = torch.float16,
    ):
        super().__init__()
        out, d = indices.shape
        self.bits = bits
        self.weight_shape = tuple(int(s) for s in weight_shape)
        self.variant = "scales" if scales is not None else "codebooks"
        self.register_buffer("packed", pack_indices(indices, bits))
        self.register_buffer("codebook", codebook.detach().to(dtype).clone())
        self.register_buffer("scales", (scales.detach().to(dtype).clone() if scales is not None
                                        else torch.zeros(0, dtype=dtype)))  # fmt: skip
        bounds = torch.tensor(group_sizes, dtype=torch.int64).cumsum(0)[:-1]
        self.register_buffer("bounds", bounds.to(torch.int32))
        self.register_buffer("shape2d", torch.tensor([out, d], dtype=torch.int64))
        gather = row_gather if row_gather is not None else torch.zeros(0, dtype=torch.int64)
        self.register_buffer("row_gather", gather.to(torch.int16 if out < 2**15 else torch.int32))

    @property
    def rows(self) -> int:
        return int(self.shape2d[0])

    @property
    def row_length(self) -> int:
        return int(self.shape2d[1])

    def group_ids(self) -> torch.Tensor:
        """Group of every stored row, derived from the boundaries."""
        rows = torch.arange(self.rows, device=self.bounds.device)
        return (rows[:, None] >= self.bounds[None, :].to(torch.int64)).sum(dim=1)

    def indices(self) -> torch.Tensor:
        return unpack_indices(self.packed, self.bits, self.rows * self.row_length).reshape(self.rows, self.row_length)

    def dense_2d(self) -> torch.Tensor:
        """(out, D) weight in stored row order."""
        idx = self.indices()
        gid = self.group_ids()
        if self.variant == "scales":
            return self.codebook[0].float()[idx] * self.scales.float()[gid][:, None]
        return self.codebook.float()[gid[:, None], idx]

    def forward(self) -> torch.Tensor:
        """The dense weight in the layer's row order and shape."""
        if torch.onnx.is_in_onnx_export():
            from edgecompress.compress.codebook.symbolic import codebook_weight_op

            return codebook_weight_op(self).reshape(self.weight_shape)
        w = self.dense_2d()
        if self.row_gather.numel():
            w = w[self.row_gather.long()]
        return w.reshape(self.weight_shape)


class CodebookLinear(nn.Module):
    """``nn.Linear`` whose weight is a :class:`CodebookWeight` (rows = output features).

    ``linear``, the original layer, is kept (weightless) when it is a subclass with its own
    ``forward`` (weight normalisation, ...): the rebuilt weight then goes through that forward.
    """

    weight_store: CodebookWeight
    _own_forward: nn.Module | None

    def __init__(self, weight: CodebookWeight, bias: torch.Tensor | None, linear: Any = None):
        super().__init__()
        self.weight_store = weight
        self.in_features = weight.weight_shape[1]
        self.out_features = weight.weight_shape[0]
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        own = linear is not None and has_own_forward(linear)
        object.__setattr__(self, "_own_forward", weightless_copy(linear) if own else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._own_forward is not None:
            return apply_layer(self._own_forward, x, self.weight_store(), self.bias)
        return F.linear(x, self.weight_store(), self.bias)


class CodebookConv2d(nn.Module):
    """``nn.Conv2d`` whose weight is a :class:`CodebookWeight` (rows = output channels).

    The conv's computation is the original layer's (:func:`compress.layer_forward.apply_layer` on a
    weightless copy of it): its ``padding_mode`` ("reflect", ...) and, for a subclass, its own
    ``forward`` (EfficientNet-Lite's TF "same" padding) are kept.
    """

    weight_store: CodebookWeight
    _conv: nn.Module

    def __init__(self, weight: CodebookWeight, bias: torch.Tensor | None, conv: Any):
        super().__init__()
        self.weight_store = weight
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.padding_mode = conv.padding_mode
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        # unregistered: nothing of the copy goes into the state_dict
        object.__setattr__(self, "_conv", weightless_copy(conv))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_layer(self._conv, x, self.weight_store(), self.bias)


CODEBOOK_LAYERS = (CodebookLinear, CodebookConv2d)


def _tensor_bits(t: torch.Tensor) -> int:
    return t.numel() * _BYTES[t.dtype] * 8


def storage_bits(store: CodebookWeight) -> dict[str, int]:
    """Exact bits of every stored part of one weight (what the ONNX export writes).

    Returns:
        ``indices`` (packed, padding included), ``codebook``, ``scales``, ``group_bounds``,
        ``shape``, ``permutation`` and ``total``.
    """
    parts = {
        "indices": _tensor_bits(store.packed),
        "codebook": _tensor_bits(store.codebook),
        "scales": _tensor_bits(store.scales),
        "group_bounds": _tensor_bits(store.bounds),
        "shape": _tensor_bits(store.shape2d),
        "permutation": _tensor_bits(store.row_gather),
    }
    parts["total"] = sum(parts.values())
    return parts


def model_accounting(model: nn.Module, requested_bits: int | None = None) -> dict[str, Any]:
    """Bits-per-weight accounting of a (partly) codebook-compressed model, every overhead counted.

    ``bits_per_weight`` covers the weights of all Linear/Conv2d layers (compressed ones with their
    codebooks, scales, boundaries, shapes and permutations; uncompressed ones at 32 bits).
    ``other_param_bytes`` counts every other tensor (biases, norms, embeddings) at its dtype, and
    ``payload_bytes`` is the sum of all stored tensor bytes: what the artifact must hold.

    ``requested_bits`` (default: the index bits most codebook layers use) is what the user asked
    for: when ``bits_per_weight`` exceeds it by more than :data:`OVERHEAD_TOLERANCE`,
    ``overhead_note`` says so and ``overhead_layers`` names the layers costing most above it (small
    rows, as in depthwise convs, pay a codebook, scales and bounds for few weights); otherwise the
    note is None.

    Example:
        >>> acct = model_accounting(small, requested_bits=3)
        >>> acct["overhead_note"]  # None, or "4.1 bits per weight for 3-bit indices (+37%): ..."
    """
    layers: list[dict[str, Any]] = []
    weight_bits = 0
    weights = 0
    counted: set[int] = set()
    for name, mod in model.named_modules():
        if isinstance(mod, CODEBOOK_LAYERS):
            store: Any = mod.weight_store
            bits = storage_bits(store)
            n = math.prod(store.weight_shape)
            layers.append({"layer": name, "weights": n, "bits_per_weight": bits["total"] / n,
                           "index_bits": store.bits, "groups": int(store.bounds.numel()) + 1,
                           "permutation_stored": bool(store.row_gather.numel()), **bits})  # fmt: skip
            weight_bits += bits["total"]
            weights += n
            counted.update(id(t) for t in store.buffers())
        elif isinstance(mod, nn.Linear | nn.Conv2d):
            n = mod.weight.numel()
            layers.append({"layer": name, "weights": n, "bits_per_weight": 32.0, "index_bits": None, "total": n * 32})
            weight_bits += n * 32
            weights += n
            counted.add(id(mod.weight))
    other = 0
    tensors: list[torch.Tensor] = [t for _, t in model.named_parameters()]
    tensors += [t for n, t in model.named_buffers() if not n.endswith("num_batches_tracked")]  # not exported
    for t in tensors:
        if id(t) not in counted and t.dtype in _BYTES:
            other += t.numel() * _BYTES[t.dtype]
            counted.add(id(t))
    bits_per_weight = weight_bits / max(weights, 1)
    index_bits = [int(layer["index_bits"]) for layer in layers if layer["index_bits"] is not None]
    if requested_bits is None and index_bits:
        requested_bits = Counter(index_bits).most_common(1)[0][0]
    note, worst = _overhead(layers, bits_per_weight, requested_bits)
    return {
        "bits_per_weight": bits_per_weight,
        "weights": weights,
        "weight_bytes": weight_bits / 8,
        "other_param_bytes": other,
        "payload_bytes": weight_bits / 8 + other,
        "fp32_bytes": weights * 4 + other,
        "layers": layers,
        "requested_bits": requested_bits,
        "overhead_note": note,
        "overhead_layers": worst,
    }


OVERHEAD_TOLERANCE = 0.10
"""Bits per weight may exceed the requested index bits by this fraction before the accounting warns."""


def _overhead(layers: list[dict[str, Any]], bits_per_weight: float,
              requested: int | None) -> tuple[str | None, list[dict[str, Any]]]:  # fmt: skip
    """The accounting's overhead note and the (up to 3) layers costing most above ``requested`` bits."""
    if requested is None or bits_per_weight <= requested * (1 + OVERHEAD_TOLERANCE):
        return None, []
    total_excess = sum(max(layer["total"] - requested * layer["weights"], 0) for layer in layers)
    ranked = sorted(layers, key=lambda layer: layer["total"] - requested * layer["weights"], reverse=True)
    worst = [{"layer": layer["layer"], "bits_per_weight": round(layer["bits_per_weight"], 3),
              "weights": layer["weights"], "compressed": layer["index_bits"] is not None,
              "share_of_overhead": round((layer["total"] - requested * layer["weights"]) / max(total_excess, 1), 3)}
             for layer in ranked[:3] if layer["total"] > requested * layer["weights"]]  # fmt: skip
    named = ", ".join(f"{w['layer']} ({w['bits_per_weight']:.2f} bits/weight over {w['weights']} weights"
                      f"{'' if w['compressed'] else ', left in float32'})" for w in worst)  # fmt: skip
    note = (f"{bits_per_weight:.2f} bits per weight for {requested}-bit indices "
            f"(+{100 * (bits_per_weight / requested - 1):.0f}%): codebooks, group scales, bounds and permutations "
            f"cost much on small layers; worst: {named}")  # fmt: skip
    return note, worst
