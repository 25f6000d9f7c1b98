"""MetaSchedule's workers in this process: the builder that compiles candidates and the runner that
times them here (the device's runner over TVM RPC, :mod:`edgecompress.export.tvm.rpc_measure`, uses
the same pieces). A leaf module: tuning and the RPC runner both import it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Protocol

#: How a candidate is timed, on this machine or on a device: 3 calls per measurement and at least
#: 20 ms, enough to rank schedules (the artifact's latency is measured later by `compress profile`).
EVALUATOR = {"number": 3, "repeat": 1, "min_repeat_ms": 20}


class CandidateRunner(Protocol):
    """Where tuning times its candidates when not in this process: a device over TVM RPC
    (:class:`edgecompress.runtimes.tvm_tuning.TuningDevice` is the one the toolchain makes).

    Attributes:
        where: for messages and the manifest (``"rpc host:port"``).
        lost: why the device stopped answering, None while it answers.
    """

    where: str

    @property
    def lost(self) -> str | None: ...

    def workers(self, plan: Any, device_type: str) -> tuple[Any, Any]:
        """MetaSchedule's builder and runner for this device (candidates packaged per ``plan``)."""
        ...

    def close(self) -> None:
        """Release the device's session (a TVM device server serves one client at a time)."""
        ...


def done_future(res: list[float] | None, error: str | None) -> Any:
    """A MetaSchedule runner future that is already finished (these runners measure synchronously)."""
    return _done_future_class()(res, error)


@functools.cache
def _done_future_class() -> Any:
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.runner import PyRunnerFuture, RunnerResult

    @derived_object
    class DoneFuture(PyRunnerFuture):
        def __init__(self, res: list[float] | None, error: str | None) -> None:
            super().__init__()
            self.res = res
            self.error = error

        def done(self) -> bool:
            return True

        def result(self) -> Any:
            return RunnerResult(self.res, self.error)

    return DoneFuture


def in_process_builder(export: Callable[[Any], str] | None = None) -> Any:
    """A MetaSchedule builder that compiles candidates in this process (no worker pool).

    ``export`` packages a compiled candidate and returns its path (default: MetaSchedule's ``.tar``,
    which ``tvm.runtime.load_module`` links on load).
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build, default_export

    package = export or default_export

    @derived_object
    class InProcessBuilder(PyBuilder):
        def build(self, build_inputs: list[Any]) -> list[Any]:
            results = []
            for bi in build_inputs:
                try:
                    results.append(BuilderResult(package(default_build(bi.mod, bi.target, None)), None))
                except Exception as exc:  # a candidate schedule that does not compile: a failed trial
                    results.append(BuilderResult(None, f"in-process build failed: {exc}"))
            return results

    return InProcessBuilder()


def measurement_arguments(args_info: Any, dev: Any) -> list[list[Any]]:
    """One set of a candidate's arguments on ``dev`` (here or over RPC), in the shape MetaSchedule's
    evaluators take: random floats and zero integers (:func:`export.tvm.records.safe_arguments`; its
    own random integers index a gather out of bounds and crash the process that runs it)."""
    import tvm

    from edgecompress.export.tvm.records import safe_arguments

    return [[tvm.runtime.tensor(a, dev) for a in safe_arguments([info.as_json() for info in args_info])]]


def in_process_workers() -> tuple[Any, Any]:
    """A MetaSchedule builder and runner that work in this process (no worker pools)."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, PyRunner
    from tvm.s_tir.meta_schedule.runner.local_runner import default_run_evaluator

    config = EvaluatorConfig(enable_cpu_cache_flush=False, **EVALUATOR)

    @derived_object
    class InProcessRunner(PyRunner):
        def run(self, runner_inputs: list[Any]) -> list[Any]:
            import tvm

            futures = []
            for ri in runner_inputs:
                try:
                    lib = tvm.runtime.load_module(str(ri.artifact_path))
                    dev = tvm.runtime.device(str(ri.device_type), 0)
                    args = measurement_arguments(ri.args_info, dev)
                    futures.append(done_future(list(default_run_evaluator(lib, dev, config, args)), None))
                except Exception as exc:  # a candidate that crashes at run time: a failed trial
                    futures.append(done_future(None, f"in-process run failed: {exc}"))
            return futures

    return in_process_builder(), InProcessRunner()
