"""onnxruntime: sessions with the target's execution providers and thread count."""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from edgecompress.export.artifact import TensorSpec
from edgecompress.export.errors import SpecError
from edgecompress.export.spec import as_feeds, numpy_dtype
from edgecompress.runtimes.errors import RuntimeExecutionError, RuntimeUnavailableError

log = logging.getLogger(__name__)


def build_session(model_path: str, providers: list[str], threads: int, settings: dict[str, Any] | None = None) -> Any:
    """:func:`edgecompress.export.ort_session.ort_session` for the runtime: a model onnxruntime cannot
    load raises :class:`RuntimeExecutionError`."""
    from edgecompress.export.ort_session import SessionError, ort_session

    try:
        return ort_session(model_path, providers=providers, threads=threads, settings=settings)
    except SessionError as exc:
        raise RuntimeExecutionError(str(exc)) from None


class OrtSession:
    """An onnxruntime ``InferenceSession`` behind the :class:`runtimes.base.Session` interface."""

    runtime = "onnxruntime"

    def __init__(self, model_path: str, providers: list[str], threads: int, settings: dict[str, Any] | None = None):
        from edgecompress.export.spec import dtype_name

        self._sess = build_session(model_path, providers, threads, settings)
        self.providers = self._sess.get_providers()
        opts = self._sess.get_session_options()
        self.threads = int(opts.intra_op_num_threads or threads)
        graph_inputs = self._sess.get_inputs()
        self.inputs = [TensorSpec(name=i.name, shape=[d if isinstance(d, int) else str(d) for d in i.shape],
                                  dtype=dtype_name(i.type)) for i in graph_inputs]  # fmt: skip
        self.input_names = [i.name for i in self.inputs]
        self.output_names = [o.name for o in self._sess.get_outputs()]
        self._dtypes = {i.name: numpy_dtype(i.dtype) for i in self.inputs}
        # a graph traced at a fixed batch (e.g. 1) runs larger batches in slices of that size
        first = [i.shape[0] for i in self.inputs if i.shape]
        self.fixed_batch = first[0] if first and isinstance(first[0], int) and first[0] > 0 else None

    def run_all(self, x: np.ndarray | Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Every output for one batch (one array for a single-input model, or feeds by input name).

        Raises:
            SpecError: an input is missing or its shape does not fit the model (named).
        """
        feeds = as_feeds(x, self.input_names)
        for spec in self.inputs:
            a = feeds[spec.name]
            want = spec.shape[1:]
            if a.ndim != len(want) + 1 or any(isinstance(e, int) and e != s for e, s in zip(want, a.shape[1:], strict=True)):
                raise SpecError(
                    f"input {spec.name!r} shape {list(a.shape)} does not fit the model's [batch, {', '.join(map(str, want))}]"
                )
        n = len(next(iter(feeds.values()))) if feeds else 0
        step = self.fixed_batch
        if step is not None and n > step:
            parts = [self.run_all({k: v[i : i + step] for k, v in feeds.items()}) for i in range(0, n, step)]
            return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]
        return list(self._sess.run(None, {k: np.ascontiguousarray(v, dtype=self._dtypes[k]) for k, v in feeds.items()}))

    def run(self, x: np.ndarray | Mapping[str, np.ndarray]) -> np.ndarray:
        """The first output for one batch."""
        return self.run_all(x)[0]

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
        settings = artifact.manifest.extra.get("ort_session") or None
        if settings:  # the artifact says how the device opens it (e.g. .ort with XNNPACK)
            providers = [str(p) for p in settings.get("providers", ["CPUExecutionProvider"])]
        else:
            providers = list(target.ort_providers) if target is not None else ["CPUExecutionProvider"]
        # An explicit thread count makes latencies comparable run to run (onnxruntime's default varies).
        n = threads or (getattr(target, "num_threads", 0) if target is not None and not target.is_host else 0)
        if threads and settings:  # an explicit count sizes every pool, the providers' own included
            pools = {p: {**o, "intra_op_num_threads": str(threads)} if "intra_op_num_threads" in o else o
                     for p, o in settings.get("provider_options", {}).items()}  # fmt: skip
            settings = {**settings, "intra_op_num_threads": threads, "provider_options": pools}
        n = n or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
        return OrtSession(str(artifact.model_path), providers, n, settings)
