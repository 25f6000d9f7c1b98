"""Turning what a Python caller hands a verb into what the library works on.

A model is an ``nn.Module``, a ``ModelBundle``, a checkpoint path, an ``.onnx`` file, an artifact (or
its folder) or a previous verb's :class:`Result`; data is a path or built-in dataset name, a
``Dataset``/``Splits``, arrays (``x``, ``(x, y)``, ``{name: array, "y": labels}``) or an iterable of
batches (:class:`Data`); a config is the technique's pydantic model, a dict, a YAML/JSON file or
keyword options. The CLI passes paths and strings through the same functions.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from edgecompress.compress.api.result import Data, Result
from edgecompress.compress.errors import CheckpointError, ConfigError, DataError, describe_validation

C = TypeVar("C")


def as_target(target: Any) -> Any:
    """A ``Target`` from its name (or the object itself); None stays None."""
    if target is None or not isinstance(target, str):
        return target
    from edgecompress.targets import get_target

    return get_target(target)


def workdir_for(verb: str, workdir: str | Path | None) -> Path:
    """The folder a verb writes into: the one given, else a new one under the system's temp folder
    (kept: its path is in the result)."""
    if workdir is not None:
        return Path(workdir)
    return Path(tempfile.mkdtemp(prefix=f"edgecompress-{verb}-"))


def input_specs(inputs: Iterable[Any] | None) -> list[Any] | None:
    """``inputs``: ``TensorSpec`` objects or ``"NAME:SHAPE[:DTYPE]"`` strings (the ``--input`` form)."""
    if not inputs:
        return None
    from edgecompress.export.artifact import TensorSpec
    from edgecompress.export.spec import parse_input_option

    return [i if isinstance(i, TensorSpec) else parse_input_option(str(i)) for i in inputs]


def as_bundle(model: Any, *, model_factory: str | None = None, trust_pickle: bool = False,
              input_shape: tuple[int, ...] | None = None, inputs: Iterable[Any] | None = None) -> Any:  # fmt: skip
    """A ``ModelBundle`` for a torch model given as a module, a bundle, a previous result or a checkpoint.

    A module needs its inputs: ``input_shape`` (one float input, without batch) or ``inputs``. A
    ``model_factory`` given here may be imported (passing it is the permission).

    Raises:
        CheckpointError: an unreadable checkpoint, a module without inputs, or something that is no model.
    """
    from edgecompress.compress.checkpoint import ModelBundle, check_inputs, load_checkpoint

    if isinstance(model, Result):
        if model.bundle is None:
            raise CheckpointError(f"the result of {model.verb!r} holds no torch model (it wrote {model.artifact}); "
                                  "pass a checkpoint or module")  # fmt: skip
        return model.bundle
    if isinstance(model, ModelBundle):
        return model
    if isinstance(model, str | Path):
        return load_checkpoint(model, model_factory=model_factory, allow_code=model_factory is not None,
                               trust_pickle=trust_pickle, input_shape=input_shape, inputs=input_specs(inputs))  # fmt: skip
    import torch

    if not isinstance(model, torch.nn.Module):
        raise CheckpointError(f"expected an nn.Module, a checkpoint path or a result, got {type(model).__name__}")
    from edgecompress.export.spec import ModelSpec

    specs = input_specs(inputs)
    if specs is None and not input_shape:
        raise CheckpointError(f"the {type(model).__name__} module's inputs are unknown: pass input_shape=(C, H, W) "
                              "for one float input, or inputs=['NAME:SHAPE:DTYPE', ...]")  # fmt: skip
    spec = ModelSpec(specs) if specs else ModelSpec.single(tuple(input_shape or ()))
    bundle = ModelBundle(model.eval(), model_name=type(model).__name__, spec=spec, source="python")
    check_inputs(bundle)
    return bundle


def as_source(model: Any, work: Path, *, target: Any = None, model_factory: str | None = None,
              trust_pickle: bool = False, input_shape: tuple[int, ...] | None = None,
              inputs: Iterable[Any] | None = None) -> Any:  # fmt: skip
    """A torch ``ModelBundle`` or an ONNX ``Artifact`` for the verbs that take either (export, quantize):
    an ``.onnx`` file is imported as an artifact into ``work``; an artifact folder is loaded (its hashes
    checked); anything else is a torch model (:func:`as_bundle`)."""
    from edgecompress.compress.checkpoint import is_onnx_file
    from edgecompress.export.artifact import Artifact, load_artifact

    if isinstance(model, Result):
        return model.bundle if model.bundle is not None else model.artifact
    if isinstance(model, Artifact):
        return model
    if isinstance(model, str | Path) and Path(model).is_dir():
        return load_artifact(model)
    if isinstance(model, str | Path) and is_onnx_file(model):
        if input_shape:
            raise ConfigError("an ONNX file brings its own inputs: fix dynamic dims with --input NAME:SHAPE")
        from edgecompress.compress.exporting import import_onnx_file

        return import_onnx_file(model, work, target=target, inputs=input_specs(inputs))
    return as_bundle(model, model_factory=model_factory, trust_pickle=trust_pickle, input_shape=input_shape,
                     inputs=inputs)  # fmt: skip


def as_config(cls: type[C], config: Any, options: Mapping[str, Any], what: str) -> C:
    """The technique's validated config from ``config`` (an instance, a dict or a YAML/JSON file)
    with the keyword ``options`` on top (None values mean "not given").

    Raises:
        ConfigError: an unreadable file or an invalid option, named with its valid values.
    """
    base: dict[str, Any]
    if config is None:
        base = {}
    elif isinstance(config, cls):
        base = config.model_dump(exclude_unset=True)  # type: ignore[attr-defined]
    elif isinstance(config, Mapping):
        base = dict(config)
    elif isinstance(config, str | Path):
        base = read_config_file(Path(config))
    else:
        raise ConfigError(f"{what} config: expected a {cls.__name__}, a dict or a file, got {type(config).__name__}")
    base.update({k: v for k, v in options.items() if v is not None})
    from pydantic import ValidationError

    try:
        return cls.model_validate(base)  # type: ignore[attr-defined,no-any-return]
    except ValidationError as exc:
        raise ConfigError(f"invalid {what} options: {describe_validation(exc, cls)}") from None


def read_config_file(path: Path) -> dict[str, Any]:
    """A YAML (or JSON) mapping of options."""
    import yaml

    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of options, got {type(data).__name__}")
    return data


def as_splits(data: Any = None, *, calib_data: Any = None, eval_data: Any = None, seed: int = 0,
              preprocessing: dict[str, Any] | None = None, input_shape: tuple[int, ...] | None = None) -> Any:  # fmt: skip
    """The data of one verb by role (``Splits``): ``data`` is split into train/calib/val/test,
    ``calib_data`` and ``eval_data`` are used whole for their role (see ``compress.data.load_data``).
    Paths and built-in names are loaded with the model's ``preprocessing``; Python arrays and batches
    are taken as the model's inputs, already preprocessed."""
    from edgecompress.compress.data import Splits, load_data

    if isinstance(data, Splits) and calib_data is None and eval_data is None:
        return data
    return load_data(as_dataset(data, "data"), calib_data=as_dataset(calib_data, "calibration data"),
                     eval_data=as_dataset(eval_data, "evaluation data"), seed=seed, preprocessing=preprocessing,
                     input_shape=input_shape)  # fmt: skip


def splits_for(bundle: Any, data: Any = None, *, calib_data: Any = None, eval_data: Any = None, seed: int = 0) -> Any:
    """:func:`as_splits` with the torch model's preprocessing and input size, named and ordered as its inputs."""
    from edgecompress.compress.data import image_shape

    splits = as_splits(data, calib_data=calib_data, eval_data=eval_data, seed=seed,
                       preprocessing=bundle.preprocessing or None, input_shape=image_shape(bundle.spec.inputs))  # fmt: skip
    return splits.for_model(bundle.spec)


def as_dataset(obj: Any, role: str) -> Any:
    """A ``Dataset`` from Python data (paths, names and ``Dataset`` objects pass through)."""
    from edgecompress.compress.data import Dataset

    if obj is None or isinstance(obj, str | Path | Dataset):
        return obj
    if isinstance(obj, Data):
        return _collect(obj, obj.name, batched=obj.batched)
    if isinstance(obj, Mapping) or _is_array(obj) or (isinstance(obj, tuple) and len(obj) == 2):
        inputs, y = _split_element(obj)
        return _dataset({k: _numpy(v) for k, v in inputs.items()}, None if y is None else _numpy(y), "python arrays")
    if isinstance(obj, Iterable):
        return _collect(Data(obj), f"python {role}", batched=True)
    raise DataError(f"{role}: expected a path, a dataset name, arrays, (x, y) or an iterable of batches, "
                    f"got {type(obj).__name__}")  # fmt: skip


def _is_array(obj: Any) -> bool:
    return hasattr(obj, "shape") and hasattr(obj, "dtype")


def _numpy(value: Any) -> Any:
    import numpy as np

    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _split_element(item: Any) -> tuple[dict[str, Any], Any]:
    """``x`` | ``(x, y)`` | ``{name: x, "y": y}`` -> ``({name: x}, y)``."""
    if isinstance(item, Mapping):
        inputs = {str(k): v for k, v in item.items() if k != "y"}
        return inputs, item.get("y")
    if isinstance(item, tuple | list) and len(item) == 2:
        x, y = item
        inputs = {str(k): v for k, v in x.items()} if isinstance(x, Mapping) else {"x": x}
        return inputs, y
    if _is_array(item):
        return {"x": item}, None
    raise DataError(f"a data element must be an array, (inputs, labels) or a dict of arrays, got {type(item).__name__}")


def _collect(data: Data, name: str, *, batched: bool) -> Any:
    import numpy as np

    parts: dict[str, list[Any]] = {}
    labels: list[Any] = []
    for item in data:
        inputs, y = _split_element(item)
        for k, v in inputs.items():
            a = _numpy(v)
            parts.setdefault(k, []).append(a if batched else a[None])
        if y is not None:
            labels.append(np.atleast_1d(_numpy(y)))
    if not parts:
        raise DataError(f"{name} yielded no samples")
    if labels and len(labels) != len(next(iter(parts.values()))):
        raise DataError(f"{name}: some elements have labels and some do not")
    return _dataset({k: np.concatenate(v) for k, v in parts.items()}, np.concatenate(labels) if labels else None, name)


def _dataset(inputs: dict[str, Any], y: Any, name: str) -> Any:
    import numpy as np

    from edgecompress.compress.data import Dataset

    inputs = {k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in inputs.items()}
    if y is not None:
        y = np.asarray(y).reshape(-1).astype(np.int64)
    return Dataset(inputs, y, name, num_classes=int(y.max()) + 1 if y is not None and len(y) else None)
