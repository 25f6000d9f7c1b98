"""Loading and saving model checkpoints safely.

Supported inputs:

* our checkpoint format: a ``.pt`` dict with the model name, input shape, preprocessing and the
  ``state_dict`` (written by :func:`save_checkpoint`), loaded with ``weights_only=True``;
* a plain ``state_dict`` (``.pt``/``.pth``/``.bin``, ``weights_only=True``) or ``.safetensors``,
  with a model factory: a built-in model name or ``package.module:function``;
* a ``torch.export`` program (``.pt2``);
* a whole pickled ``nn.Module``, only with ``trust_pickle=True`` (it can run arbitrary code).

ONNX files are not checkpoints: the ONNX-only commands take them (see :func:`is_onnx_file`).
"""

from __future__ import annotations

import importlib
import json
import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgecompress.compress.errors import CheckpointError
from edgecompress.export.artifact import TensorSpec
from edgecompress.export.errors import SpecError
from edgecompress.export.spec import ModelSpec

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "edgecompress-checkpoint"
CHECKPOINT_VERSION = 1
STATE_DICT_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt"}


@dataclass
class ModelBundle:
    """A model with what is needed to feed it.

    Attributes:
        module: the ``nn.Module`` (in eval mode after loading).
        model_name: built-in name, factory spec, or a description of the source.
        input_shape: the first input's shape without the batch dimension, e.g. ``(1, 28, 28)``
            (the shorthand for one float input; ``spec`` is the whole truth).
        preprocessing: how raw inputs are turned into the model's input (scale, mean, std).
        num_classes: output classes, when known.
        metadata: anything else recorded with the checkpoint (training metrics, stages applied).
        source: the file it was loaded from.
        spec: the named inputs (shapes, dtypes) and outputs; built from ``input_shape`` when not given.
    """

    module: Any
    model_name: str
    input_shape: tuple[Any, ...] = ()
    preprocessing: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    exported_program: Any = None  # the torch.export program, for .pt2 inputs
    spec: ModelSpec = field(default_factory=lambda: ModelSpec([]))

    def __post_init__(self) -> None:
        if not self.spec.inputs:
            if not self.input_shape:
                raise CheckpointError(f"model {self.model_name!r}: no inputs given; pass --input NAME:SHAPE:DTYPE")
            self.spec = ModelSpec.single(tuple(self.input_shape))
        self.input_shape = tuple(self.spec.inputs[0].shape[1:])

    @property
    def task(self) -> str | None:
        """``classification``, ``embedding`` or ``other`` when known (recorded, or the built-in model's)."""
        if self.metadata.get("task"):
            return str(self.metadata["task"])
        from edgecompress.compress.models import builtin_model_task

        return builtin_model_task(self.model_name)

    def derive(self, module: Any, **changes: Any) -> ModelBundle:
        """A bundle for a compressed ``module`` of this model: same I/O, preprocessing and source info."""
        return replace(self, module=module, exported_program=None, **changes)

    def example_feeds(self, batch: int = 1, seed: int = 0) -> dict[str, Any]:
        """Fixed random inputs of the right shapes and dtypes (for export and verification)."""
        return self.spec.example_feeds(batch, seed)


def is_onnx_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".onnx"


def resolve_factory(spec: str, *, allow_import: bool) -> Callable[..., Any]:
    """Turn a factory spec into a callable.

    Args:
        spec: a built-in model name (``cnn``) or ``package.module:function``.
        allow_import: importing user code is only done when the user asked for it explicitly
            (``--model-factory`` on the command line, ``--allow-code`` for recipes).

    Raises:
        CheckpointError: unknown name, import failure, or import not allowed.
    """
    from edgecompress.compress.models import create_model, list_models

    if ":" not in spec:
        if spec not in list_models():
            raise CheckpointError(
                f"unknown model {spec!r}; built-in: {', '.join(list_models())}, or give package.module:function"
            )
        return lambda **kw: create_model(spec, **kw)
    if not allow_import:
        raise CheckpointError(
            f"model factory {spec!r} names Python code; importing it needs an explicit flag "
            "(--model-factory on the command line, or --allow-code for a recipe)"
        )
    module_name, _, fn_name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as exc:
        raise CheckpointError(f"cannot import model factory {spec!r}: {exc}") from None
    if not callable(fn):
        raise CheckpointError(f"model factory {spec!r} is not callable")
    return fn


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust_pickle:
            raise CheckpointError(
                f"{path} contains pickled Python objects beyond tensors: loading it could run arbitrary code. "
                f"If you trust its source, pass --trust-pickle (torch: {str(exc).splitlines()[0][:120]})"
            ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is truncated or not a PyTorch checkpoint: {str(exc).splitlines()[0][:200]}") from None
    log.warning("loading %s with weights_only=False because --trust-pickle was given", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # arbitrary unpickling failures of a trusted file: report them as bad input
        raise CheckpointError(f"{path} could not be unpickled: {exc}") from None


def _load_into(module: Any, state: dict[str, Any], source: str) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if shapes:
            parts.append(f"shape mismatches {shapes[:3]}")
        raise CheckpointError(
            f"state_dict in {source} does not match the model ({'; '.join(parts)}); "
            "check --model-factory (or the built-in model name)"
        )
    bad = [k for k, v in state.items() if hasattr(v, "is_floating_point") and v.is_floating_point()
           and not bool(v.isfinite().all())]  # fmt: skip
    if bad:
        raise CheckpointError(f"{source} holds NaN or infinite weights in {bad[:5]}{' ...' if len(bad) > 5 else ''}: "
                              "the model diverged or the file is damaged; use an earlier checkpoint")  # fmt: skip
    module.load_state_dict(state, strict=True)


def restore_structure(module: Any, metadata: dict[str, Any], state: dict[str, Any]) -> Any:
    """Rebuild what a technique changed in the architecture before its weights load: the locked N:M
    mask, LSQ quantizers, codebook layers (each technique's restorer, in the order
    :mod:`edgecompress.compress.registry` lists them). So every technique's checkpoint loads here."""
    from edgecompress.compress import registry

    for restore in registry.restorers():
        module = restore(module, metadata, state)
    return module


def mark_technique(module: Any, metadata: dict[str, Any]) -> None:
    """After loading: each technique's marker runs (an N:M sparse model is marked again, so exporting
    it re-verifies the pattern); the module is put in eval mode."""
    from edgecompress.compress import registry

    for mark in registry.markers():
        mark(module, metadata)
    if hasattr(module, "eval"):
        module.eval()


def check_inputs(bundle: ModelBundle) -> None:
    """Run the model once on example inputs: a mismatch fails here, named, and the outputs are recorded."""
    from edgecompress.export.torch_io import forward_order, probe_outputs

    spec = forward_order(bundle.module, bundle.spec)
    if any(not isinstance(d, int) for i in spec.inputs for d in i.shape[1:]):
        return  # dynamic dims: checked when the shape is fixed (export, data)
    try:
        bundle.spec = ModelSpec(spec.inputs, probe_outputs(bundle.module, spec))
    except SpecError as exc:
        raise CheckpointError(f"model {bundle.model_name!r}: {exc}") from None


def load_checkpoint(
    path: str | Path,
    *,
    model_factory: str | None = None,
    allow_code: bool = False,
    trust_pickle: bool = False,
    input_shape: tuple[int, ...] | None = None,
    inputs: list[TensorSpec] | None = None,
    check_shape: bool = True,
) -> ModelBundle:
    """Load a checkpoint into a :class:`ModelBundle` (module in eval mode).

    Args:
        path: the checkpoint file.
        model_factory: built-in model name or ``package.module:function`` (for plain state_dicts).
        allow_code: allow importing ``model_factory`` when it names user code.
        trust_pickle: allow unpickling arbitrary objects (whole pickled modules).
        input_shape: one float input of this shape (without batch), overriding the recorded inputs.
        inputs: the model's inputs (``--input NAME:SHAPE:DTYPE``), overriding the recorded ones by name.
        check_shape: run one forward pass on example inputs to catch mismatches early (and record
            the outputs).

    Raises:
        CheckpointError: missing, truncated, unsafe, or mismatching checkpoints, with the fix.

    Example:
        >>> bundle = load_checkpoint("ex/cnn.pt")
        >>> bundle.input_shape
        (1, 28, 28)
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist")
    suffix = p.suffix.lower()
    if suffix == ".onnx":
        raise CheckpointError(f"{p} is an ONNX model; only 'compress quantize' and 'compress export' take ONNX files")
    if input_shape and inputs:
        raise CheckpointError("give the inputs either as --input-shape (one float input) or as --input, not both")
    # An unnamed input is the --input-shape shorthand: it keeps the recorded input's name.
    override = ModelSpec.single(input_shape, name="") if input_shape else (ModelSpec(list(inputs)) if inputs else None)
    if suffix == ".pt2":
        bundle = _load_exported_program(p, override)
    elif suffix == ".safetensors":
        bundle = _load_safetensors(p, model_factory, allow_code, override)
    elif suffix in STATE_DICT_SUFFIXES:
        bundle = _load_torch(p, model_factory, allow_code, trust_pickle, override)
    else:
        raise CheckpointError(
            f"{p}: unknown checkpoint format {suffix!r}; use .pt/.pth (state_dict), .safetensors, .pt2 or .onnx"
        )
    if suffix != ".pt2":  # modules of torch.export programs refuse .eval(); they are exported in eval mode
        bundle.module.eval()
    if check_shape:
        check_inputs(bundle)
    return bundle


def _spec_from(recorded: Any, override: ModelSpec | None, name: str, source: Path) -> ModelSpec:
    """The model's inputs: the recorded spec (or a recorded input shape), with ``override`` applied;
    a built-in model's own inputs when nothing is recorded."""
    spec: ModelSpec | None = None
    if isinstance(recorded, dict) and recorded.get("inputs"):
        spec = ModelSpec.from_json(recorded)
    elif isinstance(recorded, (list, tuple)) and recorded:
        spec = ModelSpec.single(tuple(int(s) for s in recorded))
    else:
        from edgecompress.compress.models import builtin_model_spec

        spec = builtin_model_spec(name)
    if override is not None:
        if spec is None:
            return ModelSpec([i if i.name else TensorSpec(name="input", shape=i.shape) for i in override.inputs])
        if len(override.inputs) == 1 and not override.inputs[0].name:  # --input-shape: one float input
            if len(spec.inputs) != 1:
                raise CheckpointError(
                    f"--input-shape describes one float input; the model has {len(spec.inputs)} ({spec.describe()}): "
                    "give each with --input NAME:SHAPE:DTYPE"
                )
            return ModelSpec([TensorSpec(name=spec.inputs[0].name, shape=override.inputs[0].shape)])
        try:
            return spec.with_overrides(override.inputs)
        except SpecError as exc:
            raise CheckpointError(str(exc)) from None
    if spec is None:
        raise CheckpointError(
            f"{source}: the model's inputs are not recorded; pass --input NAME:SHAPE:DTYPE (repeatable) "
            "or --input-shape C,H,W for one float input"
        )
    return spec


def _load_torch(
    p: Path, factory: str | None, allow_code: bool, trust_pickle: bool, override: ModelSpec | None
) -> ModelBundle:
    import torch

    obj = _torch_load(p, trust_pickle)
    if isinstance(obj, torch.nn.Module):
        spec = _spec_from(None, override, type(obj).__name__, p)
        return ModelBundle(obj, type(obj).__name__, source=str(p), spec=spec)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{p} holds a {type(obj).__name__}, not a state_dict or a model checkpoint")
    if obj.get("format") == CHECKPOINT_FORMAT:
        if int(obj.get("version", 0)) > CHECKPOINT_VERSION:
            raise CheckpointError(
                f"{p} has checkpoint format version {obj.get('version')}; this edgecompress reads up to "
                f"{CHECKPOINT_VERSION}: upgrade edgecompress"
            )
        name = factory or obj["model"]
        module = resolve_factory(name, allow_import=allow_code)(**obj.get("model_kwargs", {}))
        metadata = json.loads(obj.get("metadata_json") or "{}")
        module = restore_structure(module, metadata, obj["state_dict"])
        _load_into(module, obj["state_dict"], str(p))
        mark_technique(module, metadata)
        recorded = json.loads(obj["model_spec_json"]) if obj.get("model_spec_json") else obj.get("input_shape")
        return ModelBundle(
            module,
            name,
            preprocessing=dict(obj.get("preprocessing") or {}),
            num_classes=obj.get("num_classes"),
            metadata=metadata,
            source=str(p),
            spec=_spec_from(recorded, override, name, p),
        )
    state = obj.get("state_dict", obj) if isinstance(obj.get("state_dict"), dict) else obj
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{p} is a dict but not a state_dict (some values are not tensors)")
    if not factory:
        raise CheckpointError(f"{p} is a plain state_dict; say which model it belongs to with --model-factory")
    module = resolve_factory(factory, allow_import=allow_code)()
    _load_into(module, state, str(p))
    return ModelBundle(module, factory, source=str(p), spec=_spec_from(None, override, factory, p))


def _load_safetensors(p: Path, factory: str | None, allow_code: bool, override: ModelSpec | None) -> ModelBundle:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(p), framework="pt") as fh:
            meta = fh.metadata() or {}
        state = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{p} is truncated or not a safetensors file: {exc}") from None
    info = json.loads(meta.get("edgecompress", "{}"))
    name = factory or info.get("model")
    if not name:
        raise CheckpointError(f"{p} does not name its model; say which with --model-factory")
    module = resolve_factory(name, allow_import=allow_code)(**info.get("model_kwargs", {}))
    module = restore_structure(module, info.get("metadata", {}), state)
    _load_into(module, state, str(p))
    mark_technique(module, info.get("metadata", {}))
    return ModelBundle(
        module,
        name,
        preprocessing=info.get("preprocessing", {}),
        num_classes=info.get("num_classes"),
        metadata=info.get("metadata", {}),
        source=str(p),
        spec=_spec_from(info.get("model_spec") or info.get("input_shape"), override, name, p),
    )


def _load_exported_program(p: Path, override: ModelSpec | None) -> ModelBundle:
    import torch

    from edgecompress.export.spec import dtype_name

    try:
        program = torch.export.load(str(p))
    except Exception as exc:  # torch.export.load raises many types for damaged files
        raise CheckpointError(f"{p} is truncated or not a torch.export program: {str(exc)[:200]}") from None
    user_inputs = [s.arg.name for s in program.graph_signature.input_specs
                   if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]  # fmt: skip
    recorded = []
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs and "val" in node.meta:
            val = node.meta["val"]
            dims = [int(d) if isinstance(d, int) else str(d) for d in val.shape]
            recorded.append(TensorSpec(name=node.name, shape=["batch", *dims[1:]], dtype=dtype_name(val.dtype)))
    spec = ModelSpec(recorded) if recorded else None
    if override is not None:
        spec = spec.with_overrides(override.inputs) if spec is not None else override
    if spec is None or not spec.inputs:
        raise CheckpointError(f"{p}: cannot read the inputs from the program; pass --input NAME:SHAPE:DTYPE")
    return ModelBundle(program.module(), f"torch.export:{p.name}", source=str(p), exported_program=program, spec=spec)


def save_checkpoint(
    bundle: ModelBundle,
    path: str | Path,
    *,
    model_kwargs: dict[str, Any] | None = None,
    state_dict: dict[str, Any] | None = None,
) -> Path:
    """Write ``bundle`` as our checkpoint format (``.pt``) or safetensors, atomically.

    The file is written to a temporary name in the same folder and renamed, so a crash never
    leaves a half-written checkpoint.
    """
    import torch

    from edgecompress.export.fileio import atomic_path

    p = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in (state_dict or bundle.module.state_dict()).items()}
    with atomic_path(p) as tmp:
        if p.suffix.lower() == ".safetensors":
            from safetensors.torch import save_file

            info = {
                "model": bundle.model_name,
                "model_kwargs": model_kwargs or {},
                "model_spec": bundle.spec.to_json(),
                "preprocessing": bundle.preprocessing,
                "num_classes": bundle.num_classes,
                "metadata": bundle.metadata,
            }
            save_file(state, tmp, metadata={"edgecompress": json.dumps(info)})
        else:
            torch.save(
                {
                    "format": CHECKPOINT_FORMAT,
                    "version": CHECKPOINT_VERSION,
                    "model": bundle.model_name,
                    "model_kwargs": model_kwargs or {},
                    "input_shape": list(bundle.input_shape),
                    "model_spec_json": json.dumps(bundle.spec.to_json()),
                    "preprocessing": bundle.preprocessing,
                    "num_classes": bundle.num_classes,
                    # JSON keeps arbitrary metadata loadable under weights_only=True.
                    "metadata_json": json.dumps(bundle.metadata, default=str),
                    "state_dict": state,
                },
                tmp,
            )
    return p
