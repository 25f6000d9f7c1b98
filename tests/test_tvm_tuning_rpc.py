"""MetaSchedule tuning that measures on the device over TVM RPC (ARM64 and GPU targets; issue 7).

This machine has no ARM64 board or GPU, so the RPC path is exercised with the host CPU target
served by a loopback device server: the builder, the upload, ``time_evaluator`` on the server and
the database are the same code a phone or a GPU box goes through.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest

KEY = "tune-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _onnx_model(seed: int, two_tasks: bool = False):
    """Gemm 8 -> 4 (one tuning task), or Gemm 8 -> 4 then Gemm 4 -> 3 (two tasks)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "B")]  # fmt: skip
    nodes = [helper.make_node("Gemm", ["input", "W", "B"], ["h" if two_tasks else "output"])]
    out_dim = 4
    if two_tasks:
        inits += [numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W2"),
                  numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "B2")]  # fmt: skip
        nodes.append(helper.make_node("Gemm", ["h", "W2", "B2"], ["output"]))
        out_dim = 3
    graph = helper.make_graph(
        nodes, "gemm", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", out_dim])], initializer=inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _artifact(folder: Path, seed: int, two_tasks: bool = False):
    from edgecompress.export import TensorSpec, write_onnx_artifact

    return write_onnx_artifact(_onnx_model(seed, two_tasks), folder, fmt="onnx", model_name=f"gemm{seed}",
                               inputs=[TensorSpec(name="input", shape=["batch", 8])])  # fmt: skip


def _records(db: Path) -> list[dict]:
    rows = []
    for f in db.glob("*/database_tuning_record.json"):
        rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return rows


@pytest.fixture(scope="module")
def server():
    from edgecompress.runtimes.tvm_rpc import DeviceServer

    with DeviceServer(_free_port(), key=KEY) as srv:
        yield srv


def test_tune_on_device_over_rpc_then_reuse(tmp_path: Path, server) -> None:
    """Candidates are timed on the device server; records land in the target's database; a second run does no trials."""
    from edgecompress.compress.exporting import export_model
    from edgecompress.targets import get_target

    host, db = get_target("x86-64"), tmp_path / "db"
    art = export_model(_artifact(tmp_path / "a", 0), "tvm", host, tmp_path / "t1", tune=2, database_dir=db,
                       rpc=server.address, key=KEY)  # fmt: skip
    report = art.manifest.extra["tuning"]
    assert report["trials"] == 2 and report["tasks_tuned"] == 1 and report["complete"]
    assert report["measured_on"] == f"rpc {server.address}"
    assert art.manifest.extra["tuned"] is True
    rows = _records(db)
    assert rows, "no tuning records committed"
    # a record measured on the device carries its run time (seconds), not a failure
    run_secs = [r[1][1] for r in rows if r[1][1]]
    assert run_secs and all(0 < float(s[0]) < 1.0 for s in run_secs)
    again = export_model(_artifact(tmp_path / "b", 0), "tvm", host, tmp_path / "t2", tune=2, database_dir=db,
                         rpc=server.address, key=KEY)  # fmt: skip
    assert again.manifest.extra["tuning"]["trials"] == 0 and again.manifest.extra["tuned"] is True


def test_cross_target_tune_without_device_is_an_error(tmp_path: Path, cli) -> None:
    import onnx

    path = tmp_path / "gemm.onnx"
    onnx.save(_onnx_model(1), str(path))
    t0 = time.monotonic()
    code, _, err = cli("export", path, "--format", "tvm", "--target", "arm64-linux", "--tune", "2",
                       "-o", tmp_path / "arm")  # fmt: skip
    assert code == 2, err
    assert "measures every candidate on the device" in err and "--rpc HOST:PORT" in err and "--tracker" in err
    assert not (tmp_path / "arm").exists() and time.monotonic() - t0 < 20

    from edgecompress.export.tvm import export_tvm_from_onnx
    from edgecompress.export.tvm.rpc_measure import TuningNeedsDeviceError
    from edgecompress.targets import get_target

    with pytest.raises(TuningNeedsDeviceError, match="cuda-sm80"):
        export_tvm_from_onnx(_artifact(tmp_path / "c", 1), get_target("cuda-sm80"), tmp_path / "gpu", tune=2)


def test_emulated_device_is_refused(tmp_path: Path, server) -> None:
    """An ARM64 target served from this x86 machine is an emulator: tuning there is refused before any trial."""
    import platform

    from edgecompress.compress.exporting import export_model
    from edgecompress.runtimes.errors import DeviceConnectionError
    from edgecompress.targets import get_target

    if platform.machine().lower() in ("aarch64", "arm64"):
        pytest.skip("on an ARM64 host a local ARM64 server is not an emulator")
    db = tmp_path / "db"
    with pytest.raises(DeviceConnectionError, match="under emulation") as info:
        export_model(_artifact(tmp_path / "a", 2), "tvm", get_target("arm64-linux"), tmp_path / "arm", tune=2,
                     database_dir=db, rpc=server.address, key=KEY)  # fmt: skip
    assert "Emulated timings" in str(info.value)
    assert not _records(db) and not (tmp_path / "arm").exists()


def test_emulation_decision() -> None:
    """Same machine + another CPU's code = emulator; a forwarded port to a real phone is not."""
    from edgecompress.runtimes.tvm_rpc import emulated_device_reason
    from edgecompress.targets import get_target

    arm, host = get_target("arm64-android"), get_target("x86-64")
    assert "emulation" in emulated_device_reason("rpc 10.0.0.9:9090", arm, True)
    assert emulated_device_reason("rpc 127.0.0.1:9090", arm, False) == ""  # adb forward to a phone
    assert "emulation" in emulated_device_reason("rpc 127.0.0.1:9090", arm, None)  # no probe: the address decides
    assert emulated_device_reason("rpc 127.0.0.1:9090", host, True) == ""


def test_wrong_key_and_dead_server_fail_fast(tmp_path: Path, server, cli) -> None:
    from edgecompress.compress.exporting import export_model
    from edgecompress.runtimes.errors import DeviceConnectionError
    from edgecompress.targets import get_target

    src, host = _artifact(tmp_path / "a", 3), get_target("x86-64")
    t0 = time.monotonic()
    with pytest.raises(DeviceConnectionError, match="refused key 'wrong'"):
        export_model(src, "tvm", host, tmp_path / "t", tune=2, database_dir=tmp_path / "db", rpc=server.address,
                     key="wrong", timeout=10)  # fmt: skip
    code, _, err = cli("export", src.model_path, "--format", "tvm", "--target", "x86-64", "--tune", "2", "--rpc",
                       f"127.0.0.1:{_free_port()}", "--key", KEY, "-o", tmp_path / "t2")  # fmt: skip
    assert code == 3 and "no device server at 127.0.0.1" in err
    assert time.monotonic() - t0 < 25
    code, _, err = cli("export", src.model_path, "--format", "tvm", "--target", "x86-64", "--rpc", server.address,
                       "-o", tmp_path / "t3")  # fmt: skip
    assert code == 2 and "add a tuning budget" in err


def test_recipe_export_entry_device_fields() -> None:
    from edgecompress.compress.errors import ConfigError
    from edgecompress.compress.recipe import parse_recipe

    base = {"model": {"example": "cnn"}, "targets": ["arm64-linux"]}
    entry = {"format": "tvm", "target": "arm64-linux", "rpc": "10.0.0.9:9090", "key": "pi", "options": {"tune": "10m"}}
    recipe = parse_recipe({**base, "export": [entry]})
    assert recipe.export[0].export_options() == {"tune": "10m", "rpc": "10.0.0.9:9090", "key": "pi", "timeout": 60.0}
    with pytest.raises(ConfigError, match="unknown key 'device'"):
        parse_recipe({**base, "export": [{**entry, "device": "x"}]})
    with pytest.raises(ConfigError, match="options: {tune: 10m}"):
        parse_recipe({**base, "export": [{**entry, "options": {}}]})
    with pytest.raises(ConfigError, match="tuning for arm64-linux measures on the device"):
        parse_recipe({**base, "export": [{"format": "tvm", "target": "arm64-linux", "options": {"tune": "10m"}}]})
    with pytest.raises(ConfigError, match="not to its options"):
        parse_recipe({**base, "export": [{"format": "tvm", "target": "arm64-linux", "options": {"rpc": "h:1"}}]})


def test_dropped_device_keeps_finished_work_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server) -> None:
    """The device dies after the first task: a clear error, not a hang; the first task's records and ledger
    entry stay, and the next run (a new device) tunes only the task that was interrupted."""
    from edgecompress.compress.exporting import export_model
    from edgecompress.export.tvm import tuning
    from edgecompress.export.tvm.rpc_measure import TuningDeviceError
    from edgecompress.runtimes.tvm_rpc import DeviceServer
    from edgecompress.targets import get_target

    host, db = get_target("x86-64"), tmp_path / "db"
    src = _artifact(tmp_path / "a", 4, two_tasks=True)
    srv = DeviceServer(_free_port(), key=KEY).start()
    save_ledger = tuning._save_ledger

    def save_then_drop(folder: Path, ledger: dict[str, int]) -> None:
        save_ledger(folder, ledger)
        srv.stop()  # the device goes away right after the first task is committed

    monkeypatch.setattr(tuning, "_save_ledger", save_then_drop)
    t0 = time.monotonic()
    try:
        with pytest.raises(TuningDeviceError, match="stopped answering.*rerun the same command to resume"):
            export_model(src, "tvm", host, tmp_path / "t1", tune=4, trials_per_task=2, database_dir=db,
                         rpc=srv.address, key=KEY, timeout=10)  # fmt: skip
    finally:
        srv.stop()
    assert time.monotonic() - t0 < 40
    ledger = json.loads(next(db.glob("*/attempted.json")).read_text())
    assert len(ledger) == 1 and _records(db)  # the finished task is kept
    monkeypatch.setattr(tuning, "_save_ledger", save_ledger)
    art = export_model(src, "tvm", host, tmp_path / "t2", tune=4, trials_per_task=2, database_dir=db,
                       rpc=server.address, key=KEY)  # the device is back (here: another server)  # fmt: skip
    report = art.manifest.extra["tuning"]
    assert report["tasks_from_database"] == 1 and report["tasks_tuned"] == 1 and report["trials"] == 2
    assert art.manifest.extra["tuned"] is True


def test_device_without_the_targets_gpu_is_refused(tmp_path: Path, server) -> None:
    """A CUDA target tuned on a device server that has no CUDA GPU: a clear error before any compiling."""
    import tvm

    from edgecompress.compress.exporting import export_model
    from edgecompress.runtimes.errors import DeviceConnectionError
    from edgecompress.targets import get_target

    if tvm.cuda(0).exist:
        pytest.skip("this machine has a CUDA GPU: the loopback server is a real CUDA device")
    with pytest.raises(DeviceConnectionError, match="has no cuda device"):
        export_model(_artifact(tmp_path / "a", 5), "tvm", get_target("cuda-sm80"), tmp_path / "gpu", tune=2,
                     database_dir=tmp_path / "db", rpc=server.address, key=KEY)  # fmt: skip


def test_gpu_records_are_applied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Records in a CUDA target's database (tuned on a GPU; here written with a stand-in runner, as
    this machine has none) are applied when exporting for that target, and the result compiles."""
    import onnx
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.runner import PyRunner

    from edgecompress.export.tvm import compile as tc
    from edgecompress.export.tvm import export_tvm_from_onnx, tuning, workers
    from edgecompress.targets import get_target

    @derived_object
    class StandInRunner(PyRunner):
        def run(self, inputs: list) -> list:
            return [workers.done_future([1e-5 * (i + 1)], None) for i, _ in enumerate(inputs)]

    gpu, db = get_target("cuda-sm80"), tmp_path / "db"
    src = _artifact(tmp_path / "a", 6)
    untuned = export_tvm_from_onnx(src, gpu, tmp_path / "before", database_dir=db)
    assert untuned.manifest.extra["tuned"] is False and "tasks" not in untuned.manifest.extra
    monkeypatch.setattr(tuning, "in_process_workers", lambda: (workers.in_process_builder(), StandInRunner()))
    mod, _ = tc.import_onnx(onnx.load(str(src.model_path)), {"input": [1, 8]}, gpu.name)
    tgt = tc.tvm_target(gpu)
    report = tuning.tune(tc.fuse_for_cpu(mod, tgt), tgt, dict(gpu.tvm), tuning.TuneBudget(trials=2, trials_per_task=2),
                         root=db)  # fmt: skip
    assert report.trials == 2 and Path(report.database).name == "cuda-sm_80"
    tuned = export_tvm_from_onnx(src, gpu, tmp_path / "after", database_dir=db)
    assert tuned.manifest.extra["tuned"] is True and tuned.manifest.extra["tuned_tasks"] == 1
    assert tuned.manifest.model_file == "model.so"
