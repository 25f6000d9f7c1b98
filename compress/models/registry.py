"""The registry of built-in example models (timm style: ``@register_model`` + one factory)."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

from compress.errors import CheckpointError

_MODELS: dict[str, Callable[..., Any]] = {}
_DESCRIPTIONS: dict[str, str] = {}


def register_model(name: str, description: str = "") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a model factory under ``name``."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _MODELS[name] = fn
        _DESCRIPTIONS[name] = description or (fn.__doc__ or "").strip().splitlines()[0]
        return fn

    return deco


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
    if not _MODELS:
        import compress.models.zoo  # noqa: F401  (registers the built-in models)
