"""Run and time TVM artifacts on a remote device over TVM RPC (a server, or a tracker of devices).

``remote_session`` uploads the artifact's library to the device, loads it there with its
parameters and returns a session whose ``run`` executes on the device. ``profile_remote`` times
the model on the device with TVM's ``time_evaluator`` (the clock runs on the device, so network
transport is not counted): warm-up first, then at least ``min_runs`` runs and ``min_seconds``.

Every remote step runs under a deadline: a refused key, a silent device or a dropped
connection raises :class:`runtimes.errors.DeviceConnectionError`, never a hang.
:class:`DeviceServer` starts a local RPC server (``compress device-server``) and stops it with its
worker processes.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from edgecompress.runtimes.errors import DeviceConnectionError, RuntimeUnavailableError
from edgecompress.runtimes.measure import LatencyStats

log = logging.getLogger(__name__)
T = TypeVar("T")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
MAX_REPEATS = 10_000
#: The least per-call deadline for a device that is an emulator on this machine (runtimes.emulator):
#: long enough for qemu to load a model and run a batch of a check, short enough to end a hang.
EMULATED_TIMEOUT_S = 300.0


def parse_address(address: str) -> tuple[str, int]:
    """``"host:port"`` -> (host, port).

    Raises:
        DeviceConnectionError: not of that form (the message shows the expected form).
    """
    host, sep, port = str(address).rpartition(":")
    if not sep or not host or not port.isdigit():
        raise DeviceConnectionError(f"device address {address!r} is not host:port (e.g. 127.0.0.1:9090)")
    return host, int(port)


def with_deadline(fn: Callable[[], T], timeout: float, what: str) -> T:
    """Run ``fn`` in a worker thread; raise :class:`DeviceConnectionError` if it takes over ``timeout`` s.

    TVM's RPC client blocks in C++ socket calls that Python cannot interrupt, so the call runs
    in a daemon thread that is abandoned when the deadline passes.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread below
            box["error"] = exc

    t = threading.Thread(target=target, name=f"tvm-rpc: {what}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise DeviceConnectionError(f"{what}: no answer from the device within {timeout:g} s")
    if "error" in box:
        exc = box["error"]
        if isinstance(exc, DeviceConnectionError | RuntimeUnavailableError):
            raise exc
        raise DeviceConnectionError(f"{what} failed: {_first_line(exc)}") from None
    return box["value"]


def _first_line(exc: BaseException) -> str:
    """The telling line of an error; for an error raised on the device, the device's own message
    (TVM puts it on the lines after ``Error caught from RPC call:``)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if ln.endswith("RPC call:") and i + 1 < len(lines):
            remote = [x for x in lines[i + 1 :] if not x.startswith(("File ", "^", "~"))]
            errors = [x for x in remote if "rror" in x] or remote
            return f"{ln} {errors[-1]}"[:500]
    useful = [ln for ln in lines if "Error" in ln or "error" in ln] or lines
    return (useful[-1] if useful else type(exc).__name__)[:300]


def connect(
    *, rpc: str | None = None, tracker: str | None = None, key: str | None = None, timeout: float = 60.0
) -> tuple[Any, str]:
    """Open an RPC session to a device server (``rpc``) or a device from a tracker (``tracker``).

    Returns:
        (session, where) where ``where`` is ``"rpc host:port"`` or ``"tracker host:port key"``.

    Raises:
        DeviceConnectionError: no address, nothing listening, a refused key, or a timeout.
    """
    from tvm import rpc as tvm_rpc

    if bool(rpc) == bool(tracker):
        raise DeviceConnectionError("give exactly one of --rpc host:port or --tracker host:port")
    if tracker:
        if not key:
            raise DeviceConnectionError(f"a tracker hands out devices by key: pass --key (tracker {tracker})")
        host, port = parse_address(tracker)

        def via_tracker() -> Any:
            return tvm_rpc.connect_tracker(host, port).request(key, priority=1, session_timeout=0)

        return with_deadline(via_tracker, timeout, f"requesting a {key!r} device from tracker {tracker}"), (
            f"tracker {host}:{port} {key}"
        )
    host, port = parse_address(str(rpc))
    try:
        with socket.create_connection((host, port), timeout=min(timeout, 10.0)):
            pass
    except OSError as exc:
        raise DeviceConnectionError(
            f"no device server at {host}:{port} ({exc.strerror or exc}); start one with "
            f"'compress device-server --port {port} --key K' on the device"
        ) from None

    def direct() -> Any:
        try:
            return tvm_rpc.connect(host, port, key=key or "")
        except Exception as exc:  # TVM raises a generic error on a key mismatch
            text = str(exc)
            if "mismatch" in text.lower() or "key" in text.lower():
                raise DeviceConnectionError(
                    f"the device server at {host}:{port} refused key {key!r} (wrong key?)"
                ) from None
            raise

    return with_deadline(direct, timeout, f"connecting to {host}:{port}"), f"rpc {host}:{port}"


def remote_session(
    artifact: Any,
    address: str | None = None,
    *,
    key: str | None = None,
    target: Any = None,
    tracker: str | None = None,
    timeout: float = 60.0,
) -> Any:
    """Upload a TVM artifact to a device and load it there: a session whose ``run`` runs on the device.

    Raises:
        RuntimeUnavailableError: the artifact is not a TVM artifact.
        DeviceConnectionError: the device cannot be reached, refuses the key, or fails to load it.
    """
    import tvm

    from edgecompress.export.tvm.compile import load_params
    from edgecompress.runtimes.tvm_runtime import TvmSession, open_vm

    if not artifact.manifest.format.startswith("tvm"):
        raise RuntimeUnavailableError(
            f"remote profiling runs TVM artifacts; {artifact.path} has format {artifact.manifest.format!r} "
            "(export it with --format tvm)"
        )
    sess, where = connect(rpc=address, tracker=tracker, key=key, timeout=timeout)
    if emulation_note(where, target):  # qemu starts, loads and runs ARM64 code slowly
        timeout = max(timeout, EMULATED_TIMEOUT_S)
    extra = artifact.manifest.extra
    lib_file = Path(artifact.model_path)
    params_host = load_params(Path(artifact.path) / extra["params_file"])

    def load() -> tuple[Any, Any, list[Any]]:
        sess.upload(str(lib_file))
        lib = sess.load_module(lib_file.name)
        dev = sess.device(extra.get("device", "cpu"), 0)
        vm = open_vm(lib, dev)
        params = [tvm.runtime.tensor(p.numpy(), dev) for p in params_host]
        return vm, dev, params

    vm, dev, params = with_deadline(load, timeout + 10 * lib_file.stat().st_size / 1e6, f"loading the model on {where}")
    threads = int(getattr(target, "num_threads", 0) or 0) if target is not None else 0
    session = TvmSession(vm, dev, params, batch=int(extra.get("batch", 1)), threads=threads, where=where, keepalive=sess,
                         inputs=list(artifact.manifest.inputs))
    return _GuardedSession(session, timeout)


class _GuardedSession:
    """A remote session whose every call has a deadline (a dropped device never hangs a check)."""

    runtime = "tvm"

    def __init__(self, inner: Any, timeout: float):
        self._inner = inner
        self.timeout = timeout
        self.where = inner.where
        self.threads = inner.threads
        self.batch = inner.batch
        self.inputs = inner.inputs
        self.input_names = inner.input_names

    def run_all(self, x: Any) -> list[np.ndarray]:
        return with_deadline(lambda: self._inner.run_all(x), self.timeout, f"running on {self.where}")

    def run(self, x: Any) -> np.ndarray:
        return self.run_all(x)[0]

    def time_evaluator(self, x: Any, *, number: int, repeat: int, deadline: float) -> list[float]:
        return with_deadline(
            lambda: self._inner.time_evaluator(x, number=number, repeat=repeat), deadline, f"timing on {self.where}"
        )

    def close(self) -> None:
        self._inner.close()


def _foreign_triple(target: Any) -> str:
    """The target's LLVM triple when its CPU code is for another architecture than this machine's, else ""."""
    from edgecompress.targets import detect_host

    triple = str(getattr(target, "mtriple", "") or "")
    return triple if triple and not triple.startswith(detect_host().arch) else ""


def emulation_note(where: str, target: Any) -> str:
    """A warning when an ARM64 target is served from this x86 machine: that device is an emulator."""
    host = where.split()[1].rsplit(":", 1)[0] if len(where.split()) > 1 else ""
    triple = _foreign_triple(target)
    if host in LOOPBACK and triple:
        from edgecompress.targets import detect_host

        arch = detect_host().arch
        return (
            f"the {triple} device at {host} runs on this {arch} machine, i.e. under emulation: "
            "its latency is meaningless (outputs are still verified)"
        )
    return ""


def shares_this_machine(sess: Any, timeout: float = 10.0) -> bool | None:
    """Whether the RPC server behind ``sess`` runs on this machine: it writes a probe file into its
    work folder and we look for that file here. None when the server cannot say (no work folder).

    A port forwarded to a phone (``adb forward``) is on loopback too, so the address alone does not
    tell an emulator from a real device; a shared file system does.
    """
    import secrets

    token = secrets.token_hex(16)
    name = f"edgecompress-probe-{token[:12]}"

    def probe() -> bool:
        sess.upload(bytearray(token.encode()), name)
        try:
            path = Path(str(sess.get_function("tvm.rpc.server.workpath")(name)))
            return path.is_file() and path.read_text(errors="replace") == token
        finally:
            sess.remove(name)

    try:
        return bool(with_deadline(probe, timeout, "probing where the device server runs"))
    except DeviceConnectionError:
        return None


def emulated_device_reason(where: str, target: Any, same_machine: bool | None) -> str:
    """Why the device is an emulator ("" when it is not): code for another CPU served from this machine.

    Args:
        where: ``"rpc host:port"`` / ``"tracker host:port key"`` (from :func:`connect`).
        target: the target whose code the device runs.
        same_machine: :func:`shares_this_machine`'s answer; None falls back to the loopback address.
    """
    from edgecompress.targets import detect_host

    triple, arch = _foreign_triple(target), detect_host().arch
    if not triple:
        return ""
    if same_machine is True:
        return (f"the {triple} device behind {where} runs on this {arch} machine, i.e. under emulation "
                f"(or it is no {triple} device at all)")  # fmt: skip
    if same_machine is None:
        note = emulation_note(where, target)
        return note.split(":", 1)[0] if note else ""
    return ""


def profile_remote(
    artifact: Any,
    *,
    rpc: str | None = None,
    tracker: str | None = None,
    key: str | None = None,
    target: Any = None,
    batch: int = 1,
    min_runs: int = 30,
    min_seconds: float = 2.0,
    timeout: float = 60.0,
) -> LatencyStats:
    """Latency of a TVM artifact measured on the device (``time_evaluator``: the device's clock).

    Raises:
        RuntimeUnavailableError: ``batch`` differs from the batch compiled into the artifact.
        DeviceConnectionError: as :func:`remote_session`, or the device drops during timing.
    """
    compiled = int(artifact.manifest.extra.get("batch", 1)) if artifact.manifest.format.startswith("tvm") else batch
    if batch != compiled:
        raise RuntimeUnavailableError(f"{artifact.path} was compiled for batch {compiled}; profile it with --batch {compiled}")
    session = remote_session(artifact, rpc, key=key, target=target, tracker=tracker, timeout=timeout)
    try:
        from edgecompress.export.spec import ModelSpec

        x = ModelSpec(list(artifact.manifest.inputs)).example_feeds(compiled)
        # Warm-up and calibration: three untimed-for-the-result calls give the per-call cost.
        first = session.time_evaluator(x, number=1, repeat=3, deadline=timeout)
        per_call = max(min(first), 1e-7)
        repeats = int(min(MAX_REPEATS, max(min_runs, math.ceil(min_seconds / per_call))))
        samples = session.time_evaluator(x, number=1, repeat=repeats, deadline=timeout + 2.0 * repeats * per_call)
    finally:
        session.close()
    note = emulation_note(session.where, target)
    return LatencyStats.from_samples(
        [s * 1e3 for s in samples], runtime="tvm", threads=session.threads, batch=compiled, where=session.where, note=note
    )


class DeviceServer:
    """A TVM RPC server process (with its worker processes) on this machine.

    Binds ``host`` (loopback by default) on exactly ``port``, requires ``key`` and optionally
    registers with a tracker. ``stop()`` ends the whole process group, including the
    ``popen_worker`` process the server leaves behind otherwise.

    Example:
        >>> with DeviceServer(9090, key="k") as srv:  # doctest: +SKIP
        ...     stats = profile_remote(art, rpc=srv.address, key="k")
    """

    def __init__(self, port: int, *, key: str, host: str = "127.0.0.1", tracker: str | None = None,
                 python: str | None = None, env: dict[str, str] | None = None,
                 start_timeout: float = 60.0):  # fmt: skip
        if not key:
            raise DeviceConnectionError("a device server needs a key (--key): clients must name it to connect")
        self.host, self.port, self.key, self.tracker = host, int(port), key, tracker
        self.python = python or sys.executable
        self.env = env
        self.start_timeout = start_timeout  # an emulated device (runtimes.emulator) needs minutes
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the server)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, wait: float | None = None) -> DeviceServer:
        """Start the server and wait until it accepts connections.

        Raises:
            DeviceConnectionError: the port is taken or the server exits or does not listen in time.
        """
        cmd = [self.python, "-m", "tvm.exec.rpc_server", "--host", self.host, "--port", str(self.port),
               "--port-end", str(self.port + 1), "--key", self.key]  # fmt: skip
        if self.tracker:
            cmd += ["--tracker", self.tracker]
        env = {**os.environ, **(self.env or {})}
        wait = self.start_timeout if wait is None else wait
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DeviceConnectionError(f"the device server exited (code {self.proc.returncode}): {self.output()}")
            try:
                with socket.create_connection((self.host if self.host != "0.0.0.0" else "127.0.0.1", self.port), 1.0):
                    return self
            except OSError:
                time.sleep(0.25)
        self.stop()
        raise DeviceConnectionError(f"the device server did not listen on {self.address} within {wait:g} s")

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-2000:]

    def wait(self) -> int:
        """Block until the server process ends; returns its exit code."""
        if self.proc is None:
            raise DeviceConnectionError("the device server is not running")
        return self.proc.wait()

    def stop(self) -> None:
        """End the server's process group (server and workers); idempotent."""
        if self.proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=5)
                # the group may outlive its leader: sweep the rest
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                continue
            break
        self.proc = None

    def __enter__(self) -> DeviceServer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
