"""Measuring MetaSchedule candidates on the device over TVM RPC (tuning for ARM64 and GPU targets).

A schedule's speed on a phone, a board or a GPU can only be measured there, so tuning for those
targets builds each candidate here (cross-compiled into a library the device can load) and times
it on the device with ``time_evaluator`` (the device's clock). TVM ships an ``RPCRunner`` for this;
it starts a process pool and opens a new RPC session for every candidate, which on this two-core
machine costs more than the measurement and, like the local pools, times out under load. This
runner keeps one session, times candidates one by one, and puts every remote step under a
deadline:

* a candidate that fails on the device (a kernel error, a crash that ends the server's session)
  is a failed trial; the session is reopened and tuning goes on;
* a device that stops answering (and cannot be reached again) ends the tune with
  :class:`TuningDeviceError`; the records committed so far stay in the database and the ledger
  does not count the interrupted task, so the next run resumes with it.

``export/`` does not import ``runtimes/``: the caller says how to reach the device with a
:class:`MeasureDevice` (``runtimes.tvm_rpc.open_measure_device`` makes one from ``--rpc`` or
``--tracker`` and refuses emulated devices).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgecompress.export.errors import ExportError

log = logging.getLogger(__name__)

PING_SECONDS = 10.0


class TuningDeviceError(ExportError, ConnectionError):
    """The device measuring tuning candidates stopped answering (exit code 3); the work done so far is kept."""


class TuningNeedsDeviceError(ExportError, ValueError):
    """Tuning was asked for a target whose code runs on another device, and no device was given (exit code 2)."""


@dataclass(frozen=True)
class MeasureDevice:
    """How tuning reaches the device that times its candidates (over TVM RPC).

    Attributes:
        where: ``"rpc host:port"`` or ``"tracker host:port key"``, for messages and the manifest.
        connect: opens an RPC session to the device; raises one of ``errors`` when it cannot.
        call: ``call(fn, seconds, what)`` runs ``fn`` and raises one of ``errors`` when it takes
            longer than ``seconds`` or fails (TVM's RPC client blocks in calls Python cannot
            interrupt, so the caller supplies a deadline runner).
        errors: the exception types ``connect`` and ``call`` raise for an unreachable device.
        timeout: seconds one candidate (upload, load, time) may take on the device.
        release: drops any session the device object still holds (called when tuning ends, since a
            TVM device server serves one session at a time).
    """

    where: str
    connect: Callable[[], Any]
    call: Callable[[Callable[[], Any], float, str], Any]
    errors: tuple[type[BaseException], ...] = (ConnectionError,)
    timeout: float = 60.0
    release: Callable[[], None] = lambda: None


class DeviceLink:
    """One RPC session to the device, reopened after a candidate ends it; records a lost device."""

    def __init__(self, device: MeasureDevice):
        self.device = device
        self.session: Any = None
        self.lost: str | None = None

    def open(self) -> Any:
        if self.session is None:
            self.session = self.device.connect()
        return self.session

    def answers(self) -> bool:
        """A round trip to the device (a one-float allocation; ``Device.exist`` may answer from a cache)."""
        import tvm

        sess = self.session
        try:
            self.device.call(lambda: tvm.runtime.empty((1,), "float32", sess.cpu(0)).numpy(), PING_SECONDS,
                             f"checking that {self.device.where} answers")  # fmt: skip
            return True
        except self.device.errors:
            return False

    def recover(self, failure: str) -> bool:
        """After a failed step: True when the device still answers (the candidate failed, not the link).

        A candidate that raised on the device leaves the session usable. One that crashed the
        server's session process, or timed out, needs a new session; the old one is released first
        because a TVM device server serves one session at a time.
        """
        if self.session is not None and self.answers():
            return True
        self.close()
        try:
            self.open()
            if self.answers():
                return True
            self.lost = f"{failure}; the device does not answer on a new session either"
        except self.device.errors as exc:
            self.lost = f"{failure}; reconnecting failed: {exc}"
        self.session = None
        return False

    def close(self) -> None:
        """Release the session (and the device's pending one), so the server can serve the next client."""
        self.session = None
        self.device.release()
        gc.collect()  # remote modules and devices from failed steps hold the session in reference cycles


def rpc_workers(device: MeasureDevice, plan: Any, device_type: str) -> tuple[Any, Any, DeviceLink]:
    """A MetaSchedule builder (here, packaged per ``plan``) and runner (on ``device``) plus their link.

    Args:
        device: how to reach the device.
        plan: a :class:`export.tvm.compile.LibraryPlan`: ``.so`` linked by the host or cross compiler,
            or ``.tar`` (object files the device links when it loads them).
        device_type: ``cpu``, ``cuda`` or ``opencl``: where the candidates run on the device.
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, PyRunner
    from tvm.s_tir.meta_schedule.runner.rpc_runner import default_alloc_argument
    from tvm.s_tir.meta_schedule.runner.utils import run_evaluator_common

    from edgecompress.export.tvm.workers import EVALUATOR, done_future, in_process_builder

    link = DeviceLink(device)
    config = EvaluatorConfig(enable_cpu_cache_flush=False, **EVALUATOR)

    def measure(sess: Any, ri: Any) -> list[float]:
        name = f"edgecompress-ms-{uuid.uuid4().hex[:12]}{Path(str(ri.artifact_path)).suffix}"
        sess.upload(str(ri.artifact_path), name)
        try:
            lib = sess.load_module(name)
            dev = sess.device(device_type, 0)
            args = default_alloc_argument(sess, dev, tuple(a.as_json() for a in ri.args_info), 1)
            return [float(c) for c in run_evaluator_common(lib, dev, config, args)]
        finally:
            for leftover in (name, name + ".so"):  # a .tar is linked into NAME.so on the device
                with contextlib.suppress(Exception):  # already gone, or the session ended
                    sess.remove(leftover)

    @derived_object
    class DeviceRunner(PyRunner):
        def run(self, runner_inputs: list[Any]) -> list[Any]:
            futures = []
            for ri in runner_inputs:
                if link.lost is not None:
                    futures.append(done_future(None, f"device lost: {link.lost}"))
                    continue
                what = f"timing a candidate on {device.where}"
                failure = ""
                try:
                    costs = device.call(functools.partial(measure, link.open(), ri), device.timeout, what)
                    futures.append(done_future(costs, None))
                except device.errors as exc:
                    failure = str(exc)  # handled outside: the exception's frames still hold the session
                if not failure:
                    continue
                if link.recover(failure):
                    futures.append(done_future(None, f"candidate failed on the device: {failure}"))
                else:
                    log.warning("device %s lost while tuning: %s", device.where, link.lost)
                    futures.append(done_future(None, f"device lost: {link.lost}"))
            return futures

    return in_process_builder(candidate_packager(plan)), DeviceRunner(), link


def candidate_packager(plan: Any) -> Callable[[Any], str]:
    """How a compiled candidate becomes a file the device loads (per the target's library plan)."""
    return functools.partial(_package_candidate, plan)


def _package_candidate(plan: Any, rt_mod: Any) -> str:
    from edgecompress.export.tvm import compile as tc

    # a fresh folder per candidate: MetaSchedule removes the artifact's folder after the run
    return str(tc.export_library(rt_mod, Path(tempfile.mkdtemp(prefix="edgecompress-ms-")), plan))
