"""Model I/O as data: named inputs (shape with dynamic dims, dtype) and named outputs.

Every exporter, runtime, check, profile, technique and the Quantune evaluator take inputs as
*feeds*, a ``{input name: array}`` dict (a single array is accepted for a one-input model), and
read a model's I/O from a :class:`ModelSpec`, never from a convention such as "one float input
called ``input``".

CLI spelling of one input (shape without the batch dim, ``x`` between dims, dtype optional)::

    input_ids:32:int64      attention_mask:32:int64      x:3x224x224      image:3xHxW:float32
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgecompress.export.artifact import TensorSpec
from edgecompress.export.errors import SpecError

DTYPES = ("float32", "float16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")
BATCH = "batch"
INTEGER_DTYPES = ("int64", "int32", "int16", "int8", "uint8")
# Integer inputs without a recorded range get example values in [0, 2): valid as masks, segment ids
# and token ids of any vocabulary. Real checks use real data.
DEFAULT_INT_RANGE = (0, 2)
BYTE_RANGES = {"uint8": (0, 256), "int8": (-128, 128)}
"""Example values of byte inputs (raw pixels) span the type; other integers default to ``[0, 2)``."""

Feeds = dict[str, np.ndarray]


def _dim(text: str, where: str) -> int | str:
    text = text.strip()
    if not text:
        raise SpecError(f"{where}: empty dimension")
    if text.lstrip("-").isdigit():
        value = int(text)
        if value <= 0:
            raise SpecError(f"{where}: dimension {value} must be positive (or a name for a dynamic dim)")
        return value
    if not text.replace("_", "").isalnum():
        raise SpecError(f"{where}: dimension {text!r} is neither a positive integer nor a name")
    return text


def parse_shape_text(text: str, where: str = "shape") -> list[int | str]:
    """``3x224x224`` or ``3,224,224`` -> ``[3, 224, 224]``; names (``H``) stay dynamic dims."""
    parts = [p for p in text.replace(",", "x").split("x")] if text.strip() else []
    if text.strip() and any(not p.strip() for p in parts):
        raise SpecError(f"{where} {text!r}: write dims separated by 'x', like 3x224x224")
    return [_dim(p, where) for p in parts]


def parse_input_option(text: str) -> TensorSpec:
    """One ``--input NAME:SHAPE[:DTYPE]`` value (shape without batch) -> a :class:`TensorSpec`.

    Raises:
        SpecError: a malformed value or an unknown dtype (the message shows the valid form).

    Example:
        >>> parse_input_option("input_ids:32:int64").shape
        ['batch', 32]
    """
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0].strip():
        raise SpecError(
            f"--input {text!r}: expected NAME:SHAPE[:DTYPE] with the shape without batch, "
            "e.g. input_ids:32:int64 or x:3x224x224"
        )
    name, shape_text = parts[0].strip(), parts[1]
    dtype = parts[2].strip() if len(parts) == 3 else "float32"
    if dtype not in DTYPES:
        raise SpecError(f"--input {text!r}: unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    shape = parse_shape_text(shape_text, f"--input {text!r}") if shape_text.strip() else []
    return TensorSpec(name=name, shape=[BATCH, *shape], dtype=dtype)


def numpy_dtype(dtype: str) -> np.dtype:
    if dtype not in DTYPES:
        raise SpecError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    return np.dtype(np.bool_ if dtype == "bool" else dtype)


def dtype_name(dtype: Any) -> str:
    """The spec name of a numpy/torch/onnx dtype (``torch.int64`` -> ``int64``)."""
    text = str(dtype).replace("torch.", "").replace("tensor(", "").rstrip(")")
    aliases = {"float": "float32", "double": "float64", "long": "int64", "int": "int32", "half": "float16",
               "short": "int16", "bool_": "bool"}  # fmt: skip
    text = aliases.get(text, text)
    if text not in DTYPES:
        raise SpecError(f"tensor type {dtype} is not supported as a model input or output; supported: {', '.join(DTYPES)}")
    return text


def onnx_dtype_name(elem_type: int) -> str:
    """The spec name of an ONNX ``TensorProto`` element type."""
    import onnx

    return dtype_name(onnx.helper.tensor_dtype_to_np_dtype(elem_type)) if elem_type else "float32"


@dataclass
class ModelSpec:
    """A model's named inputs and outputs.

    The first dim of every input and output is the batch (dynamic by default). Other dims may be
    dynamic (named); :meth:`with_overrides` fixes them from ``--input NAME:SHAPE`` values.
    """

    inputs: list[TensorSpec]
    outputs: list[TensorSpec] = field(default_factory=list)

    @classmethod
    def single(cls, shape: Sequence[int], *, name: str = "input", dtype: str = "float32") -> ModelSpec:
        """One input of ``shape`` (without batch): the ``--input-shape`` shorthand."""
        return cls([TensorSpec(name=name, shape=[BATCH, *[int(s) for s in shape]], dtype=dtype)])

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelSpec:
        return cls([TensorSpec(**i) for i in data.get("inputs", [])], [TensorSpec(**o) for o in data.get("outputs", [])])

    @classmethod
    def from_onnx(cls, model: Any) -> ModelSpec:
        """The graph inputs (initializers excluded) and outputs of an ``onnx.ModelProto``."""
        inits = {i.name for i in model.graph.initializer}

        def spec(v: Any) -> TensorSpec:
            dims = [d.dim_param or (d.dim_value if d.dim_value > 0 else f"d{i}")
                    for i, d in enumerate(v.type.tensor_type.shape.dim)]  # fmt: skip
            return TensorSpec(name=v.name, shape=dims, dtype=onnx_dtype_name(v.type.tensor_type.elem_type))

        return cls([spec(i) for i in model.graph.input if i.name not in inits], [spec(o) for o in model.graph.output])

    def to_json(self) -> dict[str, Any]:
        return {"inputs": [i.model_dump(exclude_none=True) for i in self.inputs],
                "outputs": [o.model_dump(exclude_none=True) for o in self.outputs]}  # fmt: skip

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs]

    def describe(self) -> str:
        return ", ".join(f"{i.name}:{'x'.join(map(str, i.shape[1:])) or 'scalar'}:{i.dtype}" for i in self.inputs)

    def with_overrides(self, overrides: Iterable[TensorSpec]) -> ModelSpec:
        """This spec with the inputs named in ``overrides`` replaced (shape and dtype).

        Raises:
            SpecError: an override names no input of the model, or changes the number of dims.
        """
        by_name = {o.name: o for o in overrides}
        if not by_name:
            return self
        unknown = sorted(set(by_name) - set(self.input_names))
        if unknown and len(self.inputs) == 1 and len(by_name) == 1:
            # One input, one override under another name: the user named the dims, not the input.
            only = next(iter(by_name.values()))
            by_name = {self.inputs[0].name: TensorSpec(name=self.inputs[0].name, shape=only.shape, dtype=only.dtype,
                                                       range=only.range)}  # fmt: skip
            unknown = []
        if unknown:
            raise SpecError(f"--input names {unknown} are not inputs of the model; its inputs: {self.describe()}")
        new = []
        for i in self.inputs:
            o = by_name.get(i.name)
            if o is None:
                new.append(i)
                continue
            if i.shape and len(o.shape) != len(i.shape):
                raise SpecError(
                    f"--input {o.name}: {len(o.shape) - 1} dims given (without batch), the model's input has "
                    f"{len(i.shape) - 1} ({'x'.join(map(str, i.shape[1:]))})"
                )
            new.append(TensorSpec(name=i.name, shape=[i.shape[0] if i.shape else BATCH, *o.shape[1:]], dtype=o.dtype,
                                  range=o.range or i.range))  # fmt: skip
        return ModelSpec(new, list(self.outputs))

    def require_static(self, purpose: str) -> None:
        """Raise when a non-batch input dim is dynamic, naming the input, the dim and the fix.

        Raises:
            SpecError: a dynamic dim other than the batch.
        """
        for i in self.inputs:
            for pos, d in enumerate(i.shape[1:], start=1):
                if not (isinstance(d, int) and d > 0):
                    fixed = "x".join(str(s) if isinstance(s, int) and s > 0 else "N" for s in i.shape[1:])
                    raise SpecError(
                        f"input {i.name!r} has the dynamic dim {d!r} (dim {pos} of {i.shape}); {purpose} needs a fixed "
                        f"shape: pass --input {i.name}:{fixed}:{i.dtype} with the size for N"
                    )

    def example_feeds(self, batch: int = 1, seed: int = 0) -> Feeds:
        """Fixed random inputs of the right shapes and dtypes (for export tracing and verification).

        Floats are standard normal; integers are drawn from the input's recorded ``range`` (default
        ``[0, 2)``, the whole type for uint8/int8); bools are random.

        Raises:
            SpecError: a dynamic non-batch dim (see :meth:`require_static`).
        """
        self.require_static("making example inputs")
        rng = np.random.default_rng(seed)
        feeds: Feeds = {}
        for i in self.inputs:
            shape = (batch, *[int(d) for d in i.shape[1:]])
            if i.dtype in INTEGER_DTYPES:
                lo, hi = (int(v) for v in (i.range or BYTE_RANGES.get(i.dtype, DEFAULT_INT_RANGE)))
                feeds[i.name] = rng.integers(lo, max(hi, lo + 1), size=shape).astype(numpy_dtype(i.dtype))
            elif i.dtype == "bool":
                feeds[i.name] = rng.integers(0, 2, size=shape).astype(np.bool_)
            else:
                feeds[i.name] = rng.standard_normal(shape).astype(numpy_dtype(i.dtype))
        return feeds

    def shape_dict(self, batch: int) -> dict[str, list[int]]:
        """Static shapes with ``batch`` for every input (TVM's import).

        Raises:
            SpecError: a dynamic non-batch dim.
        """
        self.require_static("compiling with TVM")
        return {i.name: [batch, *[int(d) for d in i.shape[1:]]] for i in self.inputs}

    def match(self, arrays: Mapping[str, np.ndarray], *, source: str = "data") -> Feeds:
        """Map data arrays onto the model's inputs, checking names, dims and dtypes.

        A single array (key ``x`` or any other) feeds a single-input model; otherwise the names
        must be the model's input names. Integer data for an integer input is cast to its width;
        float data is cast to the input's float type.

        Raises:
            SpecError: a missing or unknown array, a shape or a dtype that does not fit (named).
        """
        arrays = {k: v for k, v in arrays.items() if k != "y"}
        if len(self.inputs) == 1 and len(arrays) == 1:
            arrays = {self.inputs[0].name: next(iter(arrays.values()))}
        missing = [n for n in self.input_names if n not in arrays]
        extra = sorted(set(arrays) - set(self.input_names))
        if missing or extra:
            raise SpecError(
                f"{source} has arrays {sorted(arrays)} but the model's inputs are {self.describe()}"
                + (f"; missing: {missing}" if missing else "") + (f"; not inputs of the model: {extra}" if extra else "")
                + "; name one array per model input (a single-input model takes 'x')"
            )
        feeds: Feeds = {}
        counts = {len(a) for a in arrays.values()}
        if len(counts) > 1:
            raise SpecError(f"{source}: arrays have different sample counts {sorted(counts)}; one count for all inputs")
        for i in self.inputs:
            a = np.asarray(arrays[i.name])
            want = [*i.shape[1:]]
            if a.ndim == len(want) and want and want[0] == 1:  # (N, H, W) images for a 1-channel model
                a = a[:, None]
            if a.ndim != len(want) + 1:
                raise SpecError(
                    f"{source}: array {i.name!r} has shape {list(a.shape)} ({a.ndim - 1} dims per sample); the model's "
                    f"input {i.name!r} takes [N, {', '.join(map(str, want))}]"
                )
            for pos, (w, got) in enumerate(zip(want, a.shape[1:], strict=True), start=1):
                if isinstance(w, int) and w > 0 and w != got:
                    raise SpecError(
                        f"{source}: array {i.name!r} has shape {list(a.shape)}; the model's input {i.name!r} takes "
                        f"[N, {', '.join(map(str, want))}] (dim {pos} is {got}, expected {w})"
                    )
            wants_int = i.dtype in INTEGER_DTYPES or i.dtype == "bool"
            is_int = np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_
            if wants_int and not is_int:
                raise SpecError(f"{source}: array {i.name!r} is {a.dtype} but the model's input {i.name!r} is {i.dtype}")
            feeds[i.name] = np.ascontiguousarray(a, dtype=numpy_dtype(i.dtype))
        return feeds


def as_feeds(inputs: np.ndarray | Mapping[str, np.ndarray], names: Sequence[str]) -> Feeds:
    """A session's input as feeds: a dict is taken as is, a single array feeds the only input.

    Raises:
        SpecError: a single array for a model of several inputs, or missing names.
    """
    if isinstance(inputs, Mapping):
        if len(names) == 1 and len(inputs) == 1 and names[0] not in inputs:
            return {names[0]: next(iter(inputs.values()))}
        missing = [n for n in names if n not in inputs]
        if missing:
            raise SpecError(f"inputs {missing} are missing; the model takes {list(names)}, got {sorted(inputs)}")
        return {n: inputs[n] for n in names}
    if len(names) != 1:
        raise SpecError(f"the model takes {len(names)} inputs {list(names)}: pass a dict of arrays, not one array")
    return {names[0]: inputs}


def batch_size(feeds: Mapping[str, np.ndarray]) -> int:
    return len(next(iter(feeds.values()))) if feeds else 0


def slice_feeds(feeds: Mapping[str, np.ndarray], start: int, stop: int) -> Feeds:
    return {k: v[start:stop] for k, v in feeds.items()}
