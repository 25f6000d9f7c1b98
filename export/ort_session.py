"""The one onnxruntime session builder: every session in the toolchain (export checks, runtimes,
quantization backends, the TVM importer's constant folding) is made here, so options, providers
and threads are set one way.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

OPTIMIZATION = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
                "all": "ORT_ENABLE_ALL"}  # fmt: skip


class SessionError(RuntimeError):
    """onnxruntime cannot load a model (its own exception classes, wrapped with the file's name)."""


def ort_session(model_path: Any, *, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0,
                settings: dict[str, Any] | None = None, optimization: str = "all",
                optimized_model_path: Any = None, log_level: int = 3) -> Any:  # fmt: skip
    """An ``onnxruntime.InferenceSession`` with the providers this onnxruntime has, in the order given.

    Args:
        model_path: the ``.onnx`` (or ``.ort``) file.
        providers: execution providers in order of preference; those this build lacks are skipped
            (CPU when none is left).
        threads: intra-op threads (0: onnxruntime's default).
        settings: an artifact's recorded ``ort_session`` (:mod:`edgecompress.export.ort_mobile`):
            provider options, session config entries and thread counts are applied as recorded.
            When a skipped provider held the threads (XNNPACK's own pool, with onnxruntime's intra-op
            pool at one thread), its thread count goes to the intra-op pool instead, so the model is
            not measured single-threaded by accident.
        optimization: the graph optimisation level (``disabled``, ``basic``, ``extended``, ``all``).
        optimized_model_path: write the optimised graph there (onnxruntime's constant folding).
        log_level: onnxruntime's log severity (3: errors only).

    Raises:
        SessionError: onnxruntime cannot load the model.
    """
    import onnxruntime as ort

    settings = settings or {}
    opts = ort.SessionOptions()
    opts.log_severity_level = log_level
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATION[optimization])
    if optimized_model_path is not None:
        opts.optimized_model_filepath = str(optimized_model_path)
    for key, value in settings.get("session_config", {}).items():
        opts.add_session_config_entry(str(key), str(value))
    available = set(ort.get_available_providers())
    options = settings.get("provider_options", {})
    skipped = [p for p in providers if p not in available]
    usable = [p for p in providers if p in available] or ["CPUExecutionProvider"]
    if skipped:
        log.info("onnxruntime providers not available here, skipped: %s", ", ".join(skipped))
    intra = int(settings.get("intra_op_num_threads") or threads or 0)
    for p in skipped:  # a skipped provider's own thread pool goes to onnxruntime's
        intra = max(intra, int(options.get(p, {}).get("intra_op_num_threads", 0) or 0))
    if intra:
        opts.intra_op_num_threads = intra
        opts.inter_op_num_threads = int(settings.get("inter_op_num_threads") or 1)
    chosen = [(p, options[p]) if options.get(p) else p for p in usable]
    try:
        return ort.InferenceSession(str(model_path), opts, providers=chosen)
    except Exception as exc:  # onnxruntime raises its own exception classes
        raise SessionError(f"onnxruntime cannot load {model_path}: {exc}") from None
