"""TVM RPC: `compress device-server` on loopback with a key, remote profile/check, refusals, drops."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

KEY = "test-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def host_artifact(untrained_cnn_checkpoint, tmp_path_factory: pytest.TempPathFactory):
    from edgecompress.compress.checkpoint import load_checkpoint
    from edgecompress.compress.exporting import export_model
    from edgecompress.targets import get_target

    folder = tmp_path_factory.mktemp("rpc")
    return export_model(load_checkpoint(untrained_cnn_checkpoint), "tvm", get_target("x86-64"), folder / "tvm")


@pytest.fixture(scope="module")
def device_server():
    """`compress device-server` as a real process (its own process group), on a free port."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgecompress.compress.cli.app", "device-server", "--port", str(port), "--key", KEY],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), 1.0):
                break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"device-server exited: {proc.stdout.read().decode() if proc.stdout else ''}")
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("device-server did not listen within 120 s")
    yield proc, f"127.0.0.1:{port}"
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_profile_over_loopback(host_artifact, device_server) -> None:
    from edgecompress.runtimes.tvm_rpc import profile_remote
    from edgecompress.targets import get_target

    _, address = device_server
    stats = profile_remote(host_artifact, rpc=address, key=KEY, target=get_target("x86-64"), min_runs=10,
                           min_seconds=0.2, timeout=60)  # fmt: skip
    assert stats.where == f"rpc {address}" and stats.runtime == "tvm"
    assert stats.runs >= 10 and 0 < stats.p50_ms <= stats.p90_ms
    assert stats.note == ""  # the host target on loopback is not an emulator


def test_remote_outputs_match_local(host_artifact, device_server) -> None:
    from edgecompress.runtimes import runtime_for
    from edgecompress.runtimes.tvm_rpc import remote_session

    _, address = device_server
    x = np.random.default_rng(0).standard_normal((6, 1, 28, 28)).astype(np.float32)
    remote = remote_session(host_artifact, address, key=KEY, timeout=60)
    try:
        assert remote.where == f"rpc {address}"
        np.testing.assert_allclose(remote.run(x), runtime_for(host_artifact).prepare(host_artifact).run(x), atol=1e-5)
    finally:
        remote.close()


def test_cli_profile_rpc(cli, host_artifact, device_server) -> None:
    _, address = device_server
    code, out, err = cli("profile", host_artifact.path, "--rpc", address, "--key", KEY, "--min-runs", "5",
                         "--min-seconds", "0.1", "--timeout", "60", "--json")  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    assert result["where"] == f"rpc {address}" and result["runs"] >= 5


def test_cli_check_rpc_table(cli, host_artifact, device_server) -> None:
    """torch, the local TVM run and the device's run of the same inputs in one table."""
    _, address = device_server
    code, out, err = cli("check", host_artifact.path, "--data", "digits", "--rpc", address, "--key", KEY, "--json")
    assert code == 0, err
    result = json.loads(out)
    wheres = [r["where"] for r in result["rows"]]
    assert wheres[0] == "local" and f"rpc {address}" in wheres and len(wheres) == 3
    remote = next(r for r in result["rows"] if r["where"] == f"rpc {address}")
    assert remote["top1_agreement"] == 100.0 and remote["sqnr_db"] > 60
    assert "notes" not in result  # a loopback x86 device serving an x86 artifact is no emulator


def test_wrong_key_is_refused(host_artifact, device_server) -> None:
    from edgecompress.runtimes.errors import DeviceConnectionError
    from edgecompress.runtimes.tvm_rpc import remote_session

    _, address = device_server
    t0 = time.monotonic()
    with pytest.raises(DeviceConnectionError, match="refused key 'not-the-key'|no answer"):
        remote_session(host_artifact, address, key="not-the-key", timeout=20)
    assert time.monotonic() - t0 < 30


def test_no_server_is_a_clear_error(cli, host_artifact) -> None:
    code, _, err = cli("profile", host_artifact.path, "--rpc", f"127.0.0.1:{_free_port()}", "--key", KEY)
    assert code == 3 and "no device server" in err


def test_server_killed_mid_profile(host_artifact, device_server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopping the device server while it times the model: a clear error well within the timeout,
    and the server leaves no worker processes behind. (Runs last: it ends the module's server.)"""
    import psutil

    from edgecompress.runtimes import tvm_rpc
    from edgecompress.runtimes.errors import DeviceConnectionError
    from edgecompress.runtimes.tvm_rpc import profile_remote

    monkeypatch.setattr(tvm_rpc, "MAX_REPEATS", 10**8)  # so the timing lasts min_seconds (120 s)
    proc, address = device_server
    children = psutil.Process(proc.pid).children(recursive=True)
    assert children, "the device server should run the TVM RPC server as a child process"
    timer = threading.Timer(3.0, lambda: proc.send_signal(signal.SIGTERM))
    timer.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(DeviceConnectionError):
            profile_remote(host_artifact, rpc=address, key=KEY, min_runs=10, min_seconds=120.0, timeout=30)
    finally:
        timer.cancel()
    assert time.monotonic() - t0 < 60
    proc.wait(timeout=30)
    time.sleep(0.5)
    alive = [c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"device-server left processes behind: {alive}"


@pytest.mark.slow
def test_profile_through_a_tracker(host_artifact) -> None:
    """A TVM RPC tracker in front of a device server: one address for a farm of devices."""
    from edgecompress.runtimes.tvm_rpc import DeviceServer, profile_remote

    port = _free_port()
    tracker = subprocess.Popen(
        [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port),
         "--port-end", str(port + 1)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), 1.0).close()
                break
            except OSError:
                time.sleep(0.5)
        with DeviceServer(_free_port(), key="farm", tracker=f"127.0.0.1:{port}"):
            time.sleep(3)  # the server registers with the tracker after it listens
            stats = profile_remote(host_artifact, tracker=f"127.0.0.1:{port}", key="farm", min_runs=5,
                                   min_seconds=0.1, timeout=60)  # fmt: skip
        assert stats.where == f"tracker 127.0.0.1:{port} farm" and stats.runs >= 5
    finally:
        os.killpg(tracker.pid, signal.SIGKILL)
