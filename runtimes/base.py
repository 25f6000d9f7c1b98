"""The Runtime and Session interfaces, and the registry of runtimes.

A runtime runs artifacts: ``is_available()``, ``supports(artifact, target)`` and
``prepare(artifact, target) -> Session``; a session runs a batch of feeds (``{input name: array}``,
or one array for a one-input model): ``run_all(feeds) -> [outputs]``, ``run(feeds) -> first output``. Timing and
accuracy are measured for every runtime alike by :mod:`edgecompress.runtimes.measure`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

from edgecompress.runtimes.errors import RuntimeUnavailableError


@runtime_checkable
class Session(Protocol):
    """A loaded model ready to run."""

    runtime: str
    threads: int
    input_names: list[str]

    def run_all(self, x: np.ndarray | Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run one batch (feeds by input name, or one array for a one-input model): every output."""
        ...

    def run(self, x: np.ndarray | Mapping[str, np.ndarray]) -> np.ndarray:
        """Run one batch and return the first output."""
        ...

    def close(self) -> None: ...


class Runtime(Protocol):
    name: str

    def is_available(self) -> bool: ...

    def supports(self, artifact: Any, target: Any) -> bool: ...

    def prepare(self, artifact: Any, target: Any = None, *, threads: int | None = None) -> Session: ...


_RUNTIMES: dict[str, Callable[[], Runtime]] = {}


def register_runtime(name: str, factory: Callable[[], Runtime]) -> None:
    """Register a runtime factory under ``name`` (factories keep imports lazy)."""
    _RUNTIMES[name] = factory


def get_runtime(name: str) -> Runtime:
    """The runtime called ``name``.

    Raises:
        RuntimeUnavailableError: unknown name (lists the known ones) or its library is missing.
    """
    _ensure_builtins()
    if name not in _RUNTIMES:
        raise RuntimeUnavailableError(f"unknown runtime {name!r}; known: {', '.join(sorted(_RUNTIMES))}")
    rt = _RUNTIMES[name]()
    if not rt.is_available():
        raise RuntimeUnavailableError(f"runtime {name!r} is not installed; pip install edgecompress (it is a dependency)")
    return rt


def list_runtimes() -> list[str]:
    _ensure_builtins()
    return sorted(_RUNTIMES)


def runtime_for(artifact: Any) -> Runtime:
    """The runtime that runs an artifact of this format (``onnx*`` -> onnxruntime, ``tvm`` -> tvm)."""
    fmt = artifact.manifest.format
    if fmt.startswith("onnx") or fmt == "ort":
        return get_runtime("onnxruntime")
    if fmt.startswith("tvm"):
        return get_runtime("tvm")
    raise RuntimeUnavailableError(f"no runtime runs artifacts of format {fmt!r}")


def _ensure_builtins() -> None:
    if "onnxruntime" in _RUNTIMES:
        return
    from edgecompress.runtimes.ort_runtime import OrtRuntime
    from edgecompress.runtimes.torch_runtime import TorchRuntime

    register_runtime("onnxruntime", OrtRuntime)
    register_runtime("torch", TorchRuntime)
    try:
        from edgecompress.runtimes.tvm_runtime import TvmRuntime  # added by the TVM backend

        register_runtime("tvm", TvmRuntime)
    except ImportError:
        pass
