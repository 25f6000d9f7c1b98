"""The registry of example models: the built-in ones as data (their factories are imported when one
is built, so listing or describing them loads no torch), and a user's or a test's own, registered
with ``@register_model`` (timm style)."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

from edgecompress.compress.errors import CheckpointError

_MODELS: dict[str, Callable[..., Any]] = {}
_DESCRIPTIONS: dict[str, str] = {}
_INPUTS: dict[str, list[dict[str, Any]]] = {}
_TASKS: dict[str, str] = {}
TASKS = ("classification", "embedding", "other")
DEFAULT_INPUTS = [{"name": "input", "shape": ["batch", 1, 28, 28], "dtype": "float32"}]
_ZOO, _PRE = "edgecompress.compress.models.zoo", "edgecompress.compress.models.pretrained"


def _image(size: int) -> list[dict[str, Any]]:
    return [{"name": "input", "shape": ["batch", 3, size, size], "dtype": "float32"}]


#: name -> (factory "module:function", description, inputs, task)
BUILTIN_MODELS: dict[str, tuple[str, str, list[dict[str, Any]], str]] = {
    "cnn": (f"{_ZOO}:cnn", "small CNN: 2 conv+BN blocks, 2 linear layers (~110k params)", DEFAULT_INPUTS, "classification"),
    "mobilenetv2": (f"{_ZOO}:mobilenetv2", "MobileNetV2-style: inverted residuals, depthwise convs", DEFAULT_INPUTS,
                    "classification"),
    "resnet": (f"{_ZOO}:resnet", "ResNet-style: 3 stages of basic residual blocks", DEFAULT_INPUTS, "classification"),
    "squeezenet": (f"{_ZOO}:squeezenet", "SqueezeNet-style: fire modules, no BatchNorm", DEFAULT_INPUTS, "classification"),
    "shufflenet": (f"{_ZOO}:shufflenet", "ShuffleNetV2-style: channel split + shuffle, depthwise convs", DEFAULT_INPUTS,
                   "classification"),
    "vit": (f"{_ZOO}:vit", "small ViT: 4x4 patches, 4 blocks, width 64", DEFAULT_INPUTS, "classification"),
    # The encoder's example inputs (tracing, verification, profiling) draw token ids over the byte
    # vocabulary and an all-ones mask; real checks use real text.
    "text-encoder": ("edgecompress.compress.models.encoder:text_encoder",
                     "BERT-style byte-level text encoder: 4 blocks, width 128, mean-pooled",
                     [{"name": "input_ids", "shape": ["batch", 64], "dtype": "int64", "range": [0, 260]},
                      {"name": "attention_mask", "shape": ["batch", 64], "dtype": "int64", "range": [1, 2]}],
                     "embedding"),
    "efficientnet-lite1": (f"{_PRE}:efficientnet_lite1",
                           "EfficientNet-Lite1, ImageNet (5.4M params, 3x240x240; extra 'examples')", _image(240),
                           "classification"),
    "efficientnet-lite2": (f"{_PRE}:efficientnet_lite2",
                           "EfficientNet-Lite2, ImageNet (6.1M params, 3x260x260; extra 'examples')", _image(260),
                           "classification"),
}  # fmt: skip


def register_model(
    name: str, description: str = "", *, inputs: list[dict[str, Any]] | None = None, task: str = "classification"
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a model factory under ``name``.

    Args:
        inputs: the model's inputs as ``TensorSpec`` dicts (default: one 1x28x28 float input).
        task: ``classification`` (its first output is logits), ``embedding`` or ``other``: picks the
            default metric on unlabelled data (agreement for classifiers, cosine otherwise).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _MODELS[name] = fn
        _DESCRIPTIONS[name] = description or (fn.__doc__ or "").strip().splitlines()[0]
        _INPUTS[name] = inputs or DEFAULT_INPUTS
        _TASKS[name] = task
        return fn

    return deco


def unregister_model(name: str) -> None:
    """Remove a registered model (a user's or a test's registration; unknown names are ignored)."""
    for table in (_MODELS, _DESCRIPTIONS, _INPUTS, _TASKS):
        table.pop(name, None)


def builtin_model_task(name: str) -> str | None:
    """The task of the built-in model ``name`` (None for other names)."""
    _ensure_loaded()
    return _TASKS.get(name)


def builtin_model_spec(name: str) -> Any:
    """The inputs of the built-in model ``name`` as a ``ModelSpec`` (None for other names)."""
    from edgecompress.export.spec import ModelSpec

    _ensure_loaded()
    return ModelSpec.from_json({"inputs": _INPUTS[name]}) if name in _INPUTS else None


def list_models(pattern: str = "*") -> list[str]:
    """Names of the registered models matching the glob ``pattern``."""
    _ensure_loaded()
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def describe_model(name: str) -> str:
    _ensure_loaded()
    return _DESCRIPTIONS.get(name, "")


def create_model(name: str, **kwargs: Any):
    """Build a registered model (random weights).

    Raises:
        CheckpointError: unknown name (the message lists the known ones).
    """
    _ensure_loaded()
    if name not in _MODELS:
        raise CheckpointError(f"unknown built-in model {name!r}; known: {', '.join(sorted(_MODELS))}")
    return _MODELS[name](**kwargs)


def _ensure_loaded() -> None:
    """Fill the tables with the built-in models not registered otherwise (a user's or a test's
    registration of the same name wins). Their factories are resolved when a model is built."""
    if _LOADED:
        return
    _LOADED.append(True)
    for name, (factory, description, inputs, task) in BUILTIN_MODELS.items():
        if name not in _MODELS:
            _MODELS[name] = _lazy(factory)
            _DESCRIPTIONS[name], _INPUTS[name], _TASKS[name] = description, inputs, task


_LOADED: list[bool] = []


def _lazy(ref: str) -> Callable[..., Any]:
    def build(**kwargs: Any) -> Any:
        import importlib

        module, _, attr = ref.partition(":")
        return getattr(importlib.import_module(module), attr)(**kwargs)

    return build
