"""onnxruntime: sessions with the target's execution providers and thread count."""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any

import numpy as np

from runtimes.errors import RuntimeExecutionError, RuntimeUnavailableError

log = logging.getLogger(__name__)


class OrtSession:
    """An onnxruntime ``InferenceSession`` behind the :class:`runtimes.base.Session` interface."""

    runtime = "onnxruntime"

    def __init__(self, model_path: str, providers: list[str], threads: int):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        available = set(ort.get_available_providers())
        usable = [p for p in providers if p in available] or ["CPUExecutionProvider"]
        skipped = [p for p in providers if p not in available]
        if skipped:
            log.info("onnxruntime providers not available here, skipped: %s", ", ".join(skipped))
        try:
            self._sess = ort.InferenceSession(model_path, opts, providers=usable)
        except Exception as exc:  # onnxruntime raises its own exception classes
            raise RuntimeExecutionError(f"onnxruntime cannot load {model_path}: {exc}") from None
        self.providers = self._sess.get_providers()
        self.threads = threads
        self.input_name = self._sess.get_inputs()[0].name
        shape = self._sess.get_inputs()[0].shape
        self.input_shape = tuple(shape[1:])

    def run(self, x: np.ndarray) -> np.ndarray:
        expected = self.input_shape
        if len(x.shape) != len(expected) + 1 or any(
            isinstance(e, int) and e != s for e, s in zip(expected, x.shape[1:], strict=True)
        ):
            raise ValueError(f"input shape {list(x.shape)} does not fit the model's [batch, {', '.join(map(str, expected))}]")
        return self._sess.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def close(self) -> None:
        self._sess = None


class OrtRuntime:
    name = "onnxruntime"

    def is_available(self) -> bool:
        return importlib.util.find_spec("onnxruntime") is not None

    def supports(self, artifact: Any, target: Any) -> bool:
        return artifact.manifest.format.startswith("onnx") or artifact.manifest.format == "ort"

    def prepare(self, artifact: Any, target: Any = None, *, threads: int | None = None) -> OrtSession:
        if not self.supports(artifact, target):
            raise RuntimeUnavailableError(f"onnxruntime cannot run artifacts of format {artifact.manifest.format!r}")
        providers = list(target.ort_providers) if target is not None else ["CPUExecutionProvider"]
        # An explicit thread count makes latencies comparable run to run (onnxruntime's default varies).
        n = threads or (getattr(target, "num_threads", 0) if target is not None and not target.is_host else 0)
        n = n or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
        return OrtSession(str(artifact.model_path), providers, n)
