"""Running artifacts: onnxruntime, TVM (local and over RPC) and torch eager as the reference.

Heavy libraries are imported inside the runtime modules, never here.
"""

from edgecompress.runtimes.base import (
    Runtime,
    Session,
    get_runtime,
    list_runtimes,
    register_runtime,
    runtime_for,
)
from edgecompress.runtimes.errors import DeviceConnectionError, RuntimeExecutionError, RuntimeUnavailableError
from edgecompress.runtimes.measure import (
    LatencyStats,
    evaluate,
    measure_interleaved,
    measure_latency,
    run_all_batched,
    run_batched,
    top1_accuracy,
)

__all__ = [
    "DeviceConnectionError",
    "LatencyStats",
    "Runtime",
    "RuntimeExecutionError",
    "RuntimeUnavailableError",
    "Session",
    "evaluate",
    "get_runtime",
    "list_runtimes",
    "measure_interleaved",
    "measure_latency",
    "register_runtime",
    "run_all_batched",
    "run_batched",
    "runtime_for",
    "top1_accuracy",
]
