"""The emulated ARM64 device: `make device-emu` builds a Debian arm64 root, `compress device-server
--emulate arm64` serves it under qemu, and `compress profile/check --rpc` run ARM64 code on it.

The fast tests cover the parts that need no qemu (the clear error without a root, the build's
stamp and atomic rename, the wrapper that makes the RPC worker start through qemu). The slow tests
run the real thing end to end and compare the ARM64 outputs with onnxruntime's on this machine: the
fp32 CNN through the CLI, and the int8 CNN on integer kernels in the ARM dot-product layouts.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgecompress.runtimes.emulator import SITE, STAMP, WRAPPER, EmulatedDevice, emulator_root

REPO = Path(__file__).resolve().parents[1]
KEY = "emu-test"
# Read at import, before conftest points $EDGECOMPRESS_CACHE at a per-session folder: the slow test
# uses the root that `make device-emu` built (and built once, reuses across sessions).
BUILT_ROOT = emulator_root("arm64")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _build_module():
    spec = importlib.util.spec_from_file_location("device_emu_build", REPO / "tools/device_emu/build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_qemu(folder: Path) -> Path:
    """A stand-in for qemu-aarch64-static: drops ``-L ROOT ROOT/usr/bin/python3`` and runs this
    machine's python, so the wrapper and sitecustomize written by the build run for real."""
    qemu = folder / "fake-qemu"
    qemu.write_text(f'#!/bin/sh\nshift 3\nexec "{sys.executable}" "$@"\n')
    qemu.chmod(0o755)
    return qemu


@pytest.fixture()
def fake_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> EmulatedDevice:
    """A root with the build's helpers (wrapper, sitecustomize, cpuinfo) and its stamp, run by a fake qemu."""
    build = _build_module()
    root = tmp_path / "arm64"
    (root / SITE).mkdir(parents=True)
    build.write_helpers(root)
    (root / STAMP).write_text(json.dumps({"machine": "aarch64"}))
    monkeypatch.setenv("EDGECOMPRESS_DEVICE_EMU", str(root))
    monkeypatch.setenv("EDGECOMPRESS_QEMU", str(_fake_qemu(tmp_path)))
    return EmulatedDevice.find("arm64")


def test_missing_root_is_a_clear_error(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGECOMPRESS_DEVICE_EMU", str(tmp_path / "not-built"))
    code, out, err = cli("device-server", "--emulate", "arm64", "--port", str(_free_port()), "--key", KEY)
    assert code == 3, out + err
    assert "run `make device-emu` first" in err and str(tmp_path / "not-built") in err


def test_unknown_architecture_lists_the_known_ones(cli) -> None:
    code, out, err = cli("device-server", "--emulate", "riscv64", "--port", str(_free_port()), "--key", KEY)
    assert code == 3, out + err
    assert "cannot emulate 'riscv64'; known: arm64" in err


def test_half_built_root_is_not_built(tmp_path: Path) -> None:
    """Without the stamp (written last) a root folder is not usable, whatever else it holds."""
    root = tmp_path / "arm64"
    (root / WRAPPER).parent.mkdir(parents=True)
    (root / WRAPPER).write_text("#!/bin/sh\n")
    dev = EmulatedDevice(root)
    assert not dev.is_built()
    (root / STAMP).write_text("{}")
    assert dev.is_built()


def test_wrapper_runs_python_through_qemu_and_is_sys_executable(fake_root: EmulatedDevice) -> None:
    """TVM's RPC server starts its worker with sys.executable: inside the root it must be the wrapper
    (a host program that starts qemu), never the arm64 binary the host cannot execute."""
    out = subprocess.run(fake_root.command("-c", "import os, sys; print(sys.executable); print(os.environ['PYTHONPATH'])"),
                         capture_output=True, text=True, timeout=60, check=True).stdout.split()  # fmt: skip
    assert out == [str(fake_root.python), str(fake_root.site)]
    cpuinfo = (fake_root.root / "proc/cpuinfo").read_text()
    assert "asimd" in cpuinfo and "CPU implementer\t: 0x41" in cpuinfo


def test_server_starts_through_the_wrapper(fake_root: EmulatedDevice) -> None:
    from edgecompress.runtimes.tvm_rpc import connect

    server = fake_root.server(_free_port(), key=KEY)
    assert server.python == str(fake_root.python) and server.host == "127.0.0.1"
    assert server.start_timeout >= 300 and server.env and server.env["TVM_NUM_THREADS"] == "1"
    assert "EMULATED arm64" in fake_root.warning() and "meaningless" in fake_root.warning()
    with server:
        sess, where = connect(rpc=server.address, key=KEY, timeout=60)
        assert where == f"rpc {server.address}" and sess.device("cpu", 0).exist


def test_run_onnx_round_trip(fake_root: EmulatedDevice, tmp_path: Path) -> None:
    """run_onnx's plumbing (input/output files, the script run by the root's python) with this
    machine's onnxruntime behind the fake qemu; the slow test runs the arm64 build."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["y"])], "double",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])])  # fmt: skip
    model = tmp_path / "double.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    (fake_root.root / STAMP).write_text(json.dumps({"machine": "aarch64", "onnxruntime": "1.32.0"}))
    np.testing.assert_array_equal(fake_root.run_onnx(model, x), 2 * x)


def test_run_onnx_without_onnxruntime_is_a_clear_error(fake_root: EmulatedDevice, tmp_path: Path) -> None:
    from edgecompress.runtimes.errors import RuntimeUnavailableError

    (fake_root.root / STAMP).write_text(json.dumps({"machine": "aarch64", "onnxruntime": ""}))
    with pytest.raises(RuntimeUnavailableError, match="no working onnxruntime"):
        fake_root.run_onnx(tmp_path / "m.onnx", np.zeros((1, 3), np.float32))


def test_build_is_a_no_op_once_stamped(fake_root: EmulatedDevice, monkeypatch: pytest.MonkeyPatch) -> None:
    build = _build_module()

    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("a built root must not be rebuilt")

    monkeypatch.setattr(build, "build", must_not_run)
    monkeypatch.setattr(build, "ensure_host_tools", lambda: None)
    assert build.main([]) == 0


def test_interrupted_build_leaves_nothing_that_looks_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build = _build_module()
    root = tmp_path / "arm64"
    monkeypatch.setenv("EDGECOMPRESS_DEVICE_EMU", str(root))
    monkeypatch.setattr(build, "ensure_host_tools", lambda: None)
    monkeypatch.setattr(build, "install_wheels", lambda *a, **k: a[0].mkdir(parents=True, exist_ok=True))

    def fake_bootstrap(tmp: Path) -> None:
        (tmp / "usr/bin").mkdir(parents=True)

    def failing_check(tmp: Path) -> dict[str, str]:
        raise build.BuildError("self-check: platform.machine() is 'x86_64', expected 'aarch64'")

    monkeypatch.setattr(build, "bootstrap", fake_bootstrap)
    monkeypatch.setattr(build, "self_check", failing_check)
    assert build.main([]) == 1
    assert not root.exists() and not EmulatedDevice(root).is_built()
    leftover = tmp_path / ".arm64.building"
    assert leftover.is_dir()  # the next build removes it first
    monkeypatch.setattr(build, "self_check", lambda tmp: {"machine": "aarch64"})
    assert build.main([]) == 0
    assert EmulatedDevice(root).is_built() and not leftover.exists()


# ---------------------------------------------------------------------------------------------------


def _emulator_or_skip() -> EmulatedDevice:
    """The root `make device-emu` built; built here when the tools are installed; else skip."""
    dev = EmulatedDevice(BUILT_ROOT)
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("no aarch64 cross compiler to link the ARM64 .so (run `make device-emu`, which installs it)")
    if not dev.is_built():
        tools = ("qemu-aarch64-static", "debootstrap", "dpkg-deb")
        missing = [t for t in tools if shutil.which(t) is None]
        if missing or os.geteuid() != 0:
            pytest.skip(f"emulated ARM64 root not built at {BUILT_ROOT} and cannot be built here "
                        f"(missing {missing or 'root'}): run `make device-emu`")  # fmt: skip
        env = {**os.environ, "EDGECOMPRESS_DEVICE_EMU": str(BUILT_ROOT)}
        done = subprocess.run([sys.executable, str(REPO / "tools/device_emu/build.py")], env=env, capture_output=True,
                              text=True, timeout=1800, check=False)  # fmt: skip
        assert done.returncode == 0, f"building the emulated root failed:\n{done.stdout}\n{done.stderr}"
    if shutil.which("qemu-aarch64-static") is None:
        pytest.skip("qemu-aarch64-static is not installed (run `make device-emu`)")
    return dev


@pytest.mark.slow
@pytest.mark.device
@pytest.mark.timeout(2400)  # may build the root first (about 2 minutes plus downloads), then ~3 minutes
def test_emulated_arm64_end_to_end(cli, untrained_cnn_checkpoint, tmp_path: Path) -> None:
    """A cross-compiled ARM64 .so runs under qemu behind `compress device-server --emulate arm64`:
    profile says its latency is meaningless, check's table comes from it, and its outputs match
    onnxruntime's on this machine (and so do onnxruntime's arm64 kernels on the ONNX export)."""
    from edgecompress.compress.checkpoint import load_checkpoint
    from edgecompress.compress.exporting import export_model
    from edgecompress.runtimes import runtime_for
    from edgecompress.runtimes.tvm_rpc import remote_session
    from edgecompress.targets import get_target

    dev = _emulator_or_skip()
    bundle = load_checkpoint(untrained_cnn_checkpoint)
    arm = export_model(bundle, "tvm", get_target("arm64-linux"), tmp_path / "arm64")
    lib = Path(arm.model_path)
    assert lib.suffix == ".so" and lib.read_bytes()[18:20] == (183).to_bytes(2, "little")  # ELF e_machine: AArch64
    onnx = export_model(load_checkpoint(untrained_cnn_checkpoint), "onnx", get_target("x86-64"), tmp_path / "onnx")

    port = _free_port()
    address = f"127.0.0.1:{port}"
    log = (tmp_path / "server.log").open("w+")
    env = {**os.environ, "EDGECOMPRESS_DEVICE_EMU": str(dev.root)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgecompress.compress.cli.app", "device-server", "--emulate", "arm64", "--port", str(port),
         "--key", KEY], stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while "listening" not in Path(log.name).read_text():
            assert proc.poll() is None, f"device-server exited: {Path(log.name).read_text()}"
            assert time.monotonic() < deadline, "the emulated device server did not listen within 600 s"
            time.sleep(1)
        banner = Path(log.name).read_text()
        assert "EMULATED arm64 device" in banner and "latency is meaningless" in banner

        code, out, err = cli("profile", arm.path, "--rpc", address, "--key", KEY, "--min-runs", "3",
                             "--min-seconds", "0.1", "--timeout", "300")  # fmt: skip
        assert code == 0, out + err
        assert "under emulation" in out and "meaningless" in out

        code, out, err = cli("check", arm.path, "--data", "mnist", "--split", "test", "--rpc", address, "--key", KEY,
                             "--json")  # fmt: skip
        assert code == 0, out + err
        rows = {r["where"]: r for r in json.loads(out)["rows"]}
        device_row = rows[f"rpc {address}"]
        assert device_row["top1_agreement"] == 100.0 and device_row["sqnr_db"] > 60, device_row

        x = np.random.default_rng(1).standard_normal((8, 1, 28, 28)).astype(np.float32)
        remote = remote_session(arm, address, key=KEY, target=get_target("arm64-linux"), timeout=300)
        try:
            on_arm64 = remote.run(x)
        finally:
            remote.close()
        on_x86 = runtime_for(onnx).prepare(onnx).run(x)
        np.testing.assert_allclose(on_arm64, on_x86, rtol=1e-4, atol=1e-4)
        assert np.abs(on_x86).max() > 1e-3  # not trivially equal zeros
        if dev.info().get("onnxruntime"):  # onnxruntime's own arm64 kernels, when the root has it
            np.testing.assert_allclose(dev.run_onnx(onnx.model_path, x), on_x86, rtol=1e-4, atol=1e-4)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _sdot_database(qdq: Any, root: Path, trials: int = 4) -> int:
    """A throwaway arm64-linux database in ``root`` whose records schedule every blocked int8 kernel
    of ``qdq`` with a sampled MetaSchedule candidate that tensorizes with sdot (compiled, not timed:
    the records' times are a constant). Returns how many kernels got one."""
    import onnx
    from tvm.s_tir import meta_schedule as ms

    from edgecompress.export.tvm import compile as tc
    from edgecompress.export.tvm import records
    from edgecompress.export.tvm.int8 import Int8Kernels
    from edgecompress.export.tvm.int8_arm import sample_candidates
    from edgecompress.targets import get_target

    arm = get_target("arm64-linux")
    tgt = tc.tvm_target(arm)
    shape = {i.name: [1, *i.shape[1:]] for i in qdq.manifest.inputs}
    mod, _ = tc.import_onnx(onnx.load(str(qdq.model_path)), shape, arm.name,
                            graph_rewrite=Int8Kernels.for_target(tgt, enabled=True).rewrite)  # fmt: skip
    db = records.open_json_database(records.sources(dict(arm.tvm), root)[0].folder, create=True, target_spec=dict(arm.tvm))
    applied = 0
    for task in ms.relax_integration.extract_tasks(tc.fuse_for_cpu(mod, tgt), tgt):
        if "nchwc_int8" not in task.task_name and "matmul_blocked_int8" not in task.task_name:
            continue
        chosen = next(c for c in sample_candidates(task.dispatched[0], tgt, trials=trials) if c.tensorized and c.sdot > 0)
        args = ms.arg_info.ArgInfo.from_prim_func(next(iter(task.dispatched[0].functions.values())))
        db.commit_tuning_record(ms.database.TuningRecord(chosen.trace, db.commit_workload(task.dispatched[0]), [1.0],
                                                         tgt, args))  # fmt: skip
        applied += 1
    return applied


@pytest.mark.slow
@pytest.mark.device
@pytest.mark.timeout(2400)  # may build the root first; then about 2 minutes
def test_int8_cnn_on_emulated_arm64_matches_onnxruntime(cnn_onnx: Path, mnist_splits, tmp_path: Path) -> None:
    """The trained example CNN's int8 QDQ graph cross-compiled for arm64-linux with integer kernels in
    the ARM dot-product layouts runs on the emulated ARM64 device and computes what onnxruntime
    computes on this machine (SQNR >= 30 dB, top-1 agreement >= 99 % on 64 MNIST test digits): the
    untuned build, and a build whose blocked kernels are scheduled with ``sdot`` (so the dot-product
    instructions themselves run, on qemu's implementation of them)."""
    import onnx
    import onnxruntime as ort

    from edgecompress.compress.ptq.config import PTQConfig
    from edgecompress.compress.ptq.ort_backend import prepare_model, quantize_to_file
    from edgecompress.export import write_onnx_artifact
    from edgecompress.export.artifact import TensorSpec
    from edgecompress.export.tvm import export_tvm_from_onnx
    from edgecompress.export.verify import sqnr_db
    from edgecompress.runtimes.measure import run_batched
    from edgecompress.runtimes.tvm_rpc import remote_session
    from edgecompress.targets import get_target

    dev = _emulator_or_skip()
    prepared = prepare_model(cnn_onnx, tmp_path / "prep")
    quantize_to_file(prepared, PTQConfig(calibration="minmax", calib_size=16, per_channel=True),
                     {"input": mnist_splits.calib.x[:16]}, tmp_path / "int8.onnx", tmp_path / "calib")  # fmt: skip
    model = onnx.load(str(tmp_path / "int8.onnx"))
    qdq = write_onnx_artifact(model, tmp_path / "qdq", fmt="onnx-qdq", model_name="cnn-int8",
                              inputs=[TensorSpec(name="input", shape=["batch", 1, 28, 28], dtype="float32")])  # fmt: skip
    arm = get_target("arm64-linux")
    untuned = export_tvm_from_onnx(qdq, arm, tmp_path / "arm64", use_database=False)
    info = untuned.manifest.extra["int8_kernels"]
    assert info["float"] == 0 and info["integer"] == info["requantized"] == info["dotprod_layout"] == 4, info
    assert _sdot_database(qdq, tmp_path / "db") == 4
    with_sdot = export_tvm_from_onnx(qdq, arm, tmp_path / "arm64-sdot", database_dir=tmp_path / "db")
    assert with_sdot.manifest.extra["tuned_tasks"] == 4
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    if objdump:
        dump = subprocess.run([objdump, "-d", str(with_sdot.model_path)], capture_output=True, text=True, check=True).stdout
        assert "\tsdot\t" in dump

    x = mnist_splits.test.x[:64].astype(np.float32)
    sess = ort.InferenceSession(str(tmp_path / "int8.onnx"), providers=["CPUExecutionProvider"])
    ref = np.concatenate([sess.run(None, {"input": x[i : i + 1]})[0] for i in range(len(x))])
    with dev.server(_free_port(), key=KEY) as server:
        for art in (untuned, with_sdot):
            remote = remote_session(art, server.address, key=KEY, target=arm, timeout=600)
            try:
                out = run_batched(remote, x, batch_size=1)
            finally:
                remote.close()
                del remote
                gc.collect()  # the RPC session ends with its last reference; the server serves one at a time
            assert sqnr_db(ref, out) >= 30.0, art.path
            assert float(np.mean(out.argmax(1) == ref.argmax(1))) >= 0.99, art.path
