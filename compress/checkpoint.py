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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.errors import CheckpointError

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
        input_shape: shape of one input sample without the batch dimension, e.g. ``(1, 28, 28)``.
        preprocessing: how raw inputs are turned into the model's input (scale, mean, std).
        num_classes: output classes, when known.
        metadata: anything else recorded with the checkpoint (training metrics, stages applied).
        source: the file it was loaded from.
    """

    module: Any
    model_name: str
    input_shape: tuple[int, ...]
    preprocessing: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    exported_program: Any = None  # the torch.export program, for .pt2 inputs

    def example_input(self, batch: int = 1, seed: int = 0):
        """A fixed random input of the right shape (for export and verification)."""
        import torch

        g = torch.Generator().manual_seed(seed)
        return torch.randn((batch, *self.input_shape), generator=g)


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
    from compress.models import create_model, list_models

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
                f"{path} contains pickled Python objects beyond tensors ({str(exc).splitlines()[0][:200]}); "
                "loading it could run arbitrary code. If you trust its source, pass --trust-pickle"
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
    module.load_state_dict(state, strict=True)


def _check_input_shape(bundle: ModelBundle) -> None:
    import torch

    try:
        with torch.no_grad():
            bundle.module(torch.zeros((1, *bundle.input_shape)))
    except Exception as exc:  # any failure here means the shape does not fit the model
        raise CheckpointError(
            f"model {bundle.model_name!r} does not accept input shape {list(bundle.input_shape)} "
            f"(without batch): {str(exc).splitlines()[0][:200]}; pass the right --input-shape"
        ) from None


def load_checkpoint(
    path: str | Path,
    *,
    model_factory: str | None = None,
    allow_code: bool = False,
    trust_pickle: bool = False,
    input_shape: tuple[int, ...] | None = None,
    check_shape: bool = True,
) -> ModelBundle:
    """Load a checkpoint into a :class:`ModelBundle` (module in eval mode).

    Args:
        path: the checkpoint file.
        model_factory: built-in model name or ``package.module:function`` (for plain state_dicts).
        allow_code: allow importing ``model_factory`` when it names user code.
        trust_pickle: allow unpickling arbitrary objects (whole pickled modules).
        input_shape: overrides the shape recorded in the checkpoint.
        check_shape: run one forward pass with the input shape to catch mismatches early.

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
    if suffix == ".pt2":
        bundle = _load_exported_program(p, input_shape)
    elif suffix == ".safetensors":
        bundle = _load_safetensors(p, model_factory, allow_code, input_shape)
    elif suffix in STATE_DICT_SUFFIXES:
        bundle = _load_torch(p, model_factory, allow_code, trust_pickle, input_shape)
    else:
        raise CheckpointError(
            f"{p}: unknown checkpoint format {suffix!r}; use .pt/.pth (state_dict), .safetensors, .pt2 or .onnx"
        )
    if suffix != ".pt2":  # modules of torch.export programs refuse .eval(); they are exported in eval mode
        bundle.module.eval()
    if check_shape:
        _check_input_shape(bundle)
    return bundle


def _shape_from(meta_shape: Any, override: tuple[int, ...] | None, name: str, source: Path) -> tuple[int, ...]:
    if override:
        return tuple(int(s) for s in override)
    if meta_shape:
        return tuple(int(s) for s in meta_shape)
    from compress.models import list_models

    if name in list_models():
        return (1, 28, 28)
    raise CheckpointError(f"{source}: the input shape is not recorded; pass --input-shape C,H,W")


def _load_torch(
    p: Path, factory: str | None, allow_code: bool, trust_pickle: bool, input_shape: tuple[int, ...] | None
) -> ModelBundle:
    import torch

    obj = _torch_load(p, trust_pickle)
    if isinstance(obj, torch.nn.Module):
        shape = _shape_from(None, input_shape, type(obj).__name__, p)
        return ModelBundle(obj, type(obj).__name__, shape, source=str(p))
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
        _load_into(module, obj["state_dict"], str(p))
        return ModelBundle(
            module,
            name,
            _shape_from(obj.get("input_shape"), input_shape, name, p),
            dict(obj.get("preprocessing") or {}),
            obj.get("num_classes"),
            json.loads(obj.get("metadata_json") or "{}"),
            str(p),
        )
    state = obj.get("state_dict", obj) if isinstance(obj.get("state_dict"), dict) else obj
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{p} is a dict but not a state_dict (some values are not tensors)")
    if not factory:
        raise CheckpointError(f"{p} is a plain state_dict; say which model it belongs to with --model-factory")
    module = resolve_factory(factory, allow_import=allow_code)()
    _load_into(module, state, str(p))
    return ModelBundle(module, factory, _shape_from(None, input_shape, factory, p), source=str(p))


def _load_safetensors(
    p: Path, factory: str | None, allow_code: bool, input_shape: tuple[int, ...] | None
) -> ModelBundle:
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
    _load_into(module, state, str(p))
    return ModelBundle(
        module,
        name,
        _shape_from(info.get("input_shape"), input_shape, name, p),
        info.get("preprocessing", {}),
        info.get("num_classes"),
        info.get("metadata", {}),
        str(p),
    )


def _load_exported_program(p: Path, input_shape: tuple[int, ...] | None) -> ModelBundle:
    import torch

    try:
        program = torch.export.load(str(p))
    except Exception as exc:  # torch.export.load raises many types for damaged files
        raise CheckpointError(f"{p} is truncated or not a torch.export program: {str(exc)[:200]}") from None
    shape = input_shape
    if shape is None:
        user_inputs = [
            s.arg.name for s in program.graph_signature.input_specs if s.kind == torch.export.graph_signature.InputKind.USER_INPUT
        ]
        for node in program.graph.nodes:
            if node.op == "placeholder" and node.name in user_inputs[:1] and "val" in node.meta:
                shape = tuple(int(d) for d in node.meta["val"].shape[1:])
    if not shape:
        raise CheckpointError(f"{p}: cannot read the input shape from the program; pass --input-shape C,H,W")
    return ModelBundle(program.module(), f"torch.export:{p.name}", tuple(shape), source=str(p), exported_program=program)


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

    from export.fileio import atomic_path

    p = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in (state_dict or bundle.module.state_dict()).items()}
    with atomic_path(p) as tmp:
        if p.suffix.lower() == ".safetensors":
            from safetensors.torch import save_file

            info = {
                "model": bundle.model_name,
                "model_kwargs": model_kwargs or {},
                "input_shape": list(bundle.input_shape),
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
                    "preprocessing": bundle.preprocessing,
                    "num_classes": bundle.num_classes,
                    # JSON keeps arbitrary metadata loadable under weights_only=True.
                    "metadata_json": json.dumps(bundle.metadata, default=str),
                    "state_dict": state,
                },
                tmp,
            )
    return p
