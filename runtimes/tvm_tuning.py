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

:func:`open_tuning_device` connects (refusing emulated devices) and returns a
:class:`TuningDevice`, the plain runner object :func:`edgecompress.export.tvm.tuning.tune` takes
(``export/`` knows it only by the :class:`edgecompress.export.tvm.workers.CandidateRunner` protocol).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgecompress.runtimes.errors import DeviceConnectionError, RuntimeUnavailableError
from edgecompress.runtimes.tvm_rpc import connect, emulated_device_reason, shares_this_machine, with_deadline

log = logging.getLogger(__name__)

PING_SECONDS = 10.0
#: What a remote step raises when the device cannot be reached or does not answer in time.
DEVICE_ERRORS: tuple[type[BaseException], ...] = (DeviceConnectionError, RuntimeUnavailableError)


class TuningDevice:
    """The device that times tuning candidates over TVM RPC: MetaSchedule's builder and runner for
    it (:meth:`workers`), whether it was lost (:attr:`lost`), and :meth:`close` to release its session.

    Attributes:
        where: ``"rpc host:port"`` or ``"tracker host:port key"``, for messages and the manifest.
        timeout: seconds one candidate (upload, load, time) may take on the device.
    """

    def __init__(self, *, where: str, connect: Callable[[], Any], release: Callable[[], None] = lambda: None,
                 timeout: float = 60.0) -> None:  # fmt: skip
        self.where = where
        self.connect = connect
        self.release = release
        self.timeout = timeout
        self.link = DeviceLink(self)

    @property
    def lost(self) -> str | None:
        """Why the device stopped answering (None while it answers)."""
        return self.link.lost

    def close(self) -> None:
        self.link.close()

    def workers(self, plan: Any, device_type: str) -> tuple[Any, Any]:
        """A MetaSchedule builder (candidates packaged per ``plan``: a cross-linked ``.so`` or a
        ``.tar`` the device links) and runner (timing on ``device_type``: cpu, cuda or opencl)."""
        from tvm.ir.utils import derived_object
        from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, PyRunner
        from tvm.s_tir.meta_schedule.runner.utils import run_evaluator_common

        from edgecompress.export.tvm.rpc_measure import candidate_packager
        from edgecompress.export.tvm.workers import (
            EVALUATOR,
            done_future,
            in_process_builder,
            measurement_arguments,
        )

        device = self
        link = self.link
        config = EvaluatorConfig(enable_cpu_cache_flush=False, **EVALUATOR)

        def measure(sess: Any, ri: Any) -> list[float]:
            name = f"edgecompress-ms-{uuid.uuid4().hex[:12]}{Path(str(ri.artifact_path)).suffix}"
            sess.upload(str(ri.artifact_path), name)
            try:
                lib = sess.load_module(name)
                dev = sess.device(device_type, 0)
                args = measurement_arguments(ri.args_info, dev)
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
                        costs = with_deadline(functools.partial(measure, link.open(), ri), device.timeout, what)
                        futures.append(done_future(costs, None))
                    except DEVICE_ERRORS as exc:
                        failure = str(exc)  # handled outside: the exception's frames still hold the session
                    if not failure:
                        continue
                    if link.recover(failure):
                        futures.append(done_future(None, f"candidate failed on the device: {failure}"))
                    else:
                        log.warning("device %s lost while tuning: %s", device.where, link.lost)
                        futures.append(done_future(None, f"device lost: {link.lost}"))
                return futures

        return in_process_builder(candidate_packager(plan)), DeviceRunner()


class DeviceLink:
    """One RPC session to the device, reopened after a candidate ends it; records a lost device."""

    def __init__(self, device: TuningDevice):
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
            with_deadline(lambda: tvm.runtime.empty((1,), "float32", sess.cpu(0)).numpy(), PING_SECONDS,
                             f"checking that {self.device.where} answers")  # fmt: skip
            return True
        except DEVICE_ERRORS:
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
        except DEVICE_ERRORS as exc:
            self.lost = f"{failure}; reconnecting failed: {exc}"
        self.session = None
        return False

    def close(self) -> None:
        """Release the session (and the device's pending one), so the server can serve the next client."""
        self.session = None
        self.device.release()
        gc.collect()  # remote modules and devices from failed steps hold the session in reference cycles


def open_tuning_device(
    target: Any, *, rpc: str | None = None, tracker: str | None = None, key: str | None = None, timeout: float = 60.0
) -> Any:
    """Connect to the device that will time tuning candidates: a :class:`TuningDevice` for
    :func:`edgecompress.export.tvm.tuning.tune`.

    Connects once now, so a dead server, a wrong key or a busy tracker fails before any compiling.

    Raises:
        DeviceConnectionError: the device cannot be reached or refuses the key; the device is an
            emulator (emulated timings say nothing about the real device, so tuning on one is refused);
            the device has no ``cuda``/``opencl`` device the target needs.
    """
    from edgecompress.export.tvm.compile import device_kind

    first, where = connect(rpc=rpc, tracker=tracker, key=key, timeout=timeout)
    try:
        reason = emulated_device_reason(where, target, shares_this_machine(first, min(timeout, 10.0)))
        if reason:
            raise DeviceConnectionError(
                f"refusing to tune on {where}: {reason}. Emulated timings are thousands of times slower than the real "
                "device and rank schedules differently, so the records would be wrong for it; tune on the real device "
                "(--rpc HOST:PORT or --tracker HOST:PORT --key K) and use the emulator only to check outputs"
            )
        kind = device_kind(target)
        probe = first.device(kind, 0)
        if not with_deadline(lambda: bool(probe.exist), timeout, f"looking for a {kind} device on {where}"):
            raise DeviceConnectionError(f"the device at {where} has no {kind} device, which target {target.name!r} runs on")
    except DeviceConnectionError:
        first = probe = None  # a device server serves one session at a time: free it for the next client
        raise
    pending = [first]

    def open_session() -> Any:
        if pending:
            return pending.pop()
        return connect(rpc=rpc, tracker=tracker, key=key, timeout=timeout)[0]

    return TuningDevice(where=where, connect=open_session, release=pending.clear, timeout=timeout)
