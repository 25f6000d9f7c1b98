"""torch modules behind a :class:`~export.spec.ModelSpec`: named inputs in, a flat list of named outputs out.

A module may take several inputs (``forward(input_ids, attention_mask)``) and return a tensor,
a tuple/list or a dict of tensors (nested too). Export, verification and the torch reference all
see it through :class:`FlatOutputs`, which returns a tuple of tensors in a fixed order, and
:func:`output_names`, which names them (``output`` for a single tensor, dict keys, or
``output_0, output_1, ...``).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgecompress.export.artifact import TensorSpec
from edgecompress.export.errors import SpecError
from edgecompress.export.spec import BATCH, Feeds, ModelSpec, as_feeds, dtype_name


def _flatten(out: Any, prefix: str) -> list[tuple[str, Any]]:
    import torch

    if isinstance(out, torch.Tensor):
        return [(prefix, out)]
    if isinstance(out, Mapping):
        items: list[tuple[str, Any]] = []
        for k, v in out.items():
            items += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return items
    if isinstance(out, (tuple, list)):
        items = []
        for i, v in enumerate(out):
            items += _flatten(v, f"{prefix}_{i}" if prefix else f"output_{i}")
        return items
    if hasattr(out, "to_tuple"):  # ModelOutput-style containers (transformers)
        return _flatten(dict(out.items()) if hasattr(out, "items") else out.to_tuple(), prefix)
    return []  # None and non-tensor leaves are not outputs


def flatten_outputs(out: Any) -> list[tuple[str, Any]]:
    """``[(name, tensor), ...]`` of a module's output (tensor, tuple, list or dict, nested)."""
    items = _flatten(out, "")
    return [(name or "output", t) for name, t in items]


def flat_outputs_module(module: Any) -> Any:
    """``module`` wrapped so that it returns a flat tuple of tensors (a no-op for one tensor)."""
    import torch

    class FlatOutputs(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args: Any) -> Any:
            items = flatten_outputs(self.inner(*args))
            return items[0][1] if len(items) == 1 else tuple(t for _, t in items)

    # The wrapper takes the inner module's mode: torch.onnx.export restores the wrapper's mode after
    # exporting, and a new module is in training mode (it would switch BatchNorm to batch statistics).
    return FlatOutputs(module).train(bool(getattr(module, "training", False)))


def forward_order(module: Any, spec: ModelSpec) -> ModelSpec:
    """``spec`` with its inputs in the order of ``module.forward``'s parameters when every input
    name is one of them (so ``--input attention_mask ... --input input_ids ...`` still feeds the
    right argument); otherwise the inputs are passed positionally in the order given."""
    try:
        params = [p for p in inspect.signature(module.forward).parameters if p not in ("self", "args", "kwargs")]
    except (TypeError, ValueError):
        return spec
    names = spec.input_names
    if len(names) > 1 and set(names) <= set(params):
        order = sorted(spec.inputs, key=lambda i: params.index(i.name))
        return ModelSpec(order, list(spec.outputs))
    return spec


def to_tensors(feeds: Feeds, spec: ModelSpec) -> tuple[Any, ...]:
    import torch

    return tuple(torch.from_numpy(np.ascontiguousarray(feeds[i.name])) for i in spec.inputs)


def run_module(module: Any, inputs: np.ndarray | Mapping[str, np.ndarray], spec: ModelSpec) -> list[np.ndarray]:
    """All outputs of ``module`` for ``inputs`` (feeds or one array), as numpy arrays, no gradients."""
    import torch

    feeds = as_feeds(inputs, spec.input_names)
    with torch.inference_mode():
        out = module(*to_tensors(feeds, spec))
    return [t.detach().float().numpy() if t.dtype == torch.bfloat16 else t.detach().numpy()
            for _, t in flatten_outputs(out)]  # fmt: skip


def probe_outputs(module: Any, spec: ModelSpec, batch: int = 1) -> list[TensorSpec]:
    """Run ``module`` once on example inputs and describe its outputs (names, shapes, dtypes).

    Raises:
        SpecError: the module does not accept the inputs (the message names them and the fix).
    """
    import torch

    feeds = spec.example_feeds(batch)
    try:
        with torch.inference_mode():
            out = module(*to_tensors(feeds, spec))
    except Exception as exc:  # any failure here means the inputs do not fit the model
        raise SpecError(
            f"the model does not accept inputs {spec.describe()} (without batch): "
            f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__}; "
            "pass the right --input NAME:SHAPE:DTYPE (repeatable) or --input-shape"
        ) from None
    items = flatten_outputs(out)
    if not items:
        raise SpecError(f"the model returned no tensor ({type(out).__name__}); it needs a tensor, tuple or dict output")
    return [TensorSpec(name=n, shape=[BATCH, *[int(d) for d in t.shape[1:]]] if t.ndim else [],
                       dtype=dtype_name(t.dtype)) for n, t in items]  # fmt: skip


@dataclass
class ExportIO:
    """What ``torch.onnx.export`` needs to know of the model's I/O: example args, names, dynamic axes."""

    args: tuple[Any, ...]
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)

    @classmethod
    def build(cls, spec: ModelSpec, feeds: Feeds, *, dynamic_batch: bool = True) -> ExportIO:
        axes: dict[str, dict[int, str]] = {}
        for i in spec.inputs:
            dims = {pos: str(d) for pos, d in enumerate(i.shape) if pos > 0 and not isinstance(d, int)}
            if dynamic_batch:
                dims[0] = BATCH
            if dims:
                axes[i.name] = dims
        if dynamic_batch:
            for o in spec.outputs:
                if o.shape:
                    axes[o.name] = {0: BATCH}
        if len(set(spec.output_names)) != len(spec.output_names):
            raise SpecError(f"output names {spec.output_names} are not unique")
        return cls(to_tensors(feeds, spec), spec.input_names, spec.output_names, axes)


def model_spec_for(module: Any, spec: ModelSpec) -> ModelSpec:
    """``spec`` in forward order, with its outputs probed from the module when not recorded."""
    spec = forward_order(module, spec)
    if not spec.outputs:
        spec = ModelSpec(list(spec.inputs), probe_outputs(module, spec))
    return spec
