"""Errors of the compress domain. The CLI maps them to exit codes (see compress.cli.errors)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def first_line(exc: BaseException, limit: int = 300, empty: str = "") -> str:
    """The first line of an exception's message, cut to ``limit`` (``empty`` when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else empty


def describe_validation(exc: Any, model: Any = None, *, model_at: Callable[[tuple[str, ...]], Any] | None = None) -> str:
    """One line per problem of a pydantic ``ValidationError``: where, what, and for an unknown key
    the valid keys of the model it appeared in (``model`` at the top level; ``model_at(parent_loc)``
    finds nested ones)."""
    parts = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            cls = model_at(loc[:-1]) if model_at is not None else (model if len(loc) == 1 else None)
            if cls is not None:
                msg = f"unknown key {loc[-1]!r}; valid keys: {', '.join(cls.model_fields)}"
        elif "input" in err and err["type"] not in ("missing",):
            msg += f" (got {err['input']!r})"
        parts.append(f"{'.'.join(loc) or '(top level)'}: {msg}")
    return "; ".join(parts)


class CompressError(Exception):
    """Base of the errors this package raises on purpose."""


class CheckpointError(CompressError, ValueError):
    """A checkpoint cannot be read, is unsafe to load, or does not fit its model (exit code 2)."""


class DataError(CompressError, ValueError):
    """A dataset is missing, empty, malformed or contains non-finite values (exit code 2)."""


class ConfigError(CompressError, ValueError):
    """A technique config or a recipe is invalid (exit code 2)."""


class UnsupportedError(CompressError, NotImplementedError):
    """The combination asked for cannot work (technique on this model, stage order): exit code 3."""


class GateFailure(CompressError, RuntimeError):
    """One or more gates (accuracy, latency, size) failed (exit code 4).

    Attributes:
        failures: one dict per failed gate: ``{"target", "gate", "limit", "value", "excess"}``.
        comparison: the rows of the comparison with a baseline run, when there was one
            (:func:`compress.regression.compare_runs`).
    """

    def __init__(self, message: str, failures: list[dict] | None = None, comparison: list[dict] | None = None):
        super().__init__(message)
        self.failures = failures or []
        self.comparison = comparison
