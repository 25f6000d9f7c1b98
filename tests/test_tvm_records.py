"""Tuning records that are right: verified before use, quarantined when wrong, transferred across CPUs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "tvm-wrong-records"


def _pad_model_artifact(folder: Path):
    """Conv 1x1 (40 -> 240, 28x28) + bias + ReLU6 (Clip with bound inputs) + zero Pad to 29x29 +
    MaxPool 3x3 (which reads the padded row and column): TVM fuses the first four into the task of the fixture's workload 1, whose wrong records
    (MetaSchedule, TVM 0.27) leave the padded row and column unwritten. The Pad feeds a MaxPool,
    so it is not folded into a convolution and the task keeps that shape."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgecompress.export import TensorSpec, write_onnx_artifact

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((240, 40, 1, 1)).astype(np.float32) * 0.2, "W"),
             numpy_helper.from_array(rng.standard_normal(240).astype(np.float32), "B"),
             numpy_helper.from_array(np.array(0.0, np.float32), "lo"), numpy_helper.from_array(np.array(6.0, np.float32), "hi"),
             numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64), "pads")]  # fmt: skip
    nodes = [helper.make_node("Conv", ["input", "W", "B"], ["c"]), helper.make_node("Clip", ["c", "lo", "hi"], ["r"]),
             helper.make_node("Pad", ["r", "pads"], ["p"]),
             helper.make_node("MaxPool", ["p"], ["output"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])]  # fmt: skip
    graph = helper.make_graph(nodes, "pad", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 40, 28, 28])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 240, 29, 29])],
                              initializer=inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return write_onnx_artifact(model, folder, fmt="onnx", model_name="padconv",
                               inputs=[TensorSpec(name="input", shape=["batch", 40, 28, 28])])  # fmt: skip


def _own_database_with_fixture(root: Path, target_spec: dict) -> Path:
    from edgecompress.export.tvm.records import RECORD_FILE, WORKLOAD_FILE, database_key

    own = root / database_key(target_spec)
    own.mkdir(parents=True)
    for name in (WORKLOAD_FILE, RECORD_FILE):
        shutil.copy(FIXTURE / name, own / name)
    return own


def test_fixture_records_are_refused_and_quarantined(tmp_path: Path) -> None:
    """The regression fixture: of each workload's fastest records, the wrong ones are refused with
    what differed, moved out of the database, and the task gets the fastest right record."""
    from types import SimpleNamespace

    from edgecompress.export.tvm import compile as tc
    from edgecompress.export.tvm.intrinsics import import_tensor_intrinsics
    from edgecompress.export.tvm.records import (
        QUARANTINE_FILE,
        open_json_database,
        record_id,
        select_records,
        workload_hash,
    )
    from edgecompress.targets import get_target

    import_tensor_intrinsics()
    host = get_target("x86-64")
    own = _own_database_with_fixture(tmp_path, dict(host.tvm))
    records = open_json_database(own).get_all_tuning_records()
    mods = {workload_hash(r.workload.mod): r.workload.mod for r in records}
    tasks = [SimpleNamespace(dispatched=[m], task_name=f"task{i}", weight=1) for i, m in enumerate(mods.values())]
    selection = select_records(tasks, tc.tvm_target(host), dict(host.tvm), tmp_path)
    summary = selection.summary()
    assert summary["applied"] == 2  # each workload has a right record among its 4 fastest
    refused = summary["refused_records"]
    assert {r["task"] for r in refused} == {"task0", "task1"} and len(refused) == 6
    assert all("values differ" in r["reason"] for r in refused)
    quarantined = json.loads((own / QUARANTINE_FILE).read_text())
    assert len(quarantined) == 6
    left = {record_id(r) for r in open_json_database(own).get_all_tuning_records()}
    assert len(left) == len(records) - 6 and not left & {q["record"] for q in quarantined}
    again = select_records(tasks, tc.tvm_target(host), dict(host.tvm), tmp_path)  # cached verdicts, same choice
    assert [record_id(c.record) for c in again.applied] == [record_id(c.record) for c in selection.applied]


def test_export_with_wrong_records_succeeds_without_them(tmp_path: Path) -> None:
    """An export whose database holds wrong records for one of its tasks is right: the wrong records
    are refused and named in the manifest, the task gets a right one."""
    from edgecompress.export.tvm import export_tvm_from_onnx
    from edgecompress.targets import get_target

    host = get_target("x86-64")
    _own_database_with_fixture(tmp_path / "db", dict(host.tvm))
    art = export_tvm_from_onnx(_pad_model_artifact(tmp_path / "onnx"), host, tmp_path / "tvm", database_dir=tmp_path / "db")
    extra = art.manifest.extra
    assert art.manifest.metrics["export_check"]["max_abs_error"] < 1e-3  # right (SQNR inf: None in JSON)
    refused = extra["refused_records"]
    assert refused and {r["task"] for r in refused} == {"fused_conv2d_add_maximum_minimum_pad"}
    assert extra["records"] == {"own": 1} and extra["tuned_tasks"] == 1
    assert any("computed wrong results and were not used" in n for n in extra["notes"])


def test_record_that_slips_past_its_check_is_found_by_bisection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the per-task check disabled, the wrong record is applied; the whole-model comparison
    fails, the untuned build passes, bisection names the record, quarantines it, and the export
    succeeds without it."""
    from edgecompress.export.tvm import export_tvm_from_onnx, records
    from edgecompress.targets import get_target

    host = get_target("x86-64")
    own = _own_database_with_fixture(tmp_path / "db", dict(host.tvm))
    monkeypatch.setattr(records, "check_record", lambda mod, rec, tgt, reference=None, **kw: (None, reference))
    art = export_tvm_from_onnx(_pad_model_artifact(tmp_path / "onnx"), host, tmp_path / "tvm", database_dir=tmp_path / "db")
    extra = art.manifest.extra
    assert art.manifest.metrics["export_check"]["max_abs_error"] < 1e-3  # right (SQNR inf: None in JSON)
    assert extra["tuned_tasks"] == 0 and extra["refused_records"][0]["task"] == "fused_conv2d_add_maximum_minimum_pad"
    assert any("made the model wrong although its task checked out" in n for n in extra["notes"])
    assert len(json.loads((own / records.QUARANTINE_FILE).read_text())) == 1


def test_pad_before_conv_is_folded_exactly(tmp_path: Path) -> None:
    """TF-style "same" padding (a zero Pad before a Conv) becomes the Conv's own asymmetric
    padding: same outputs in onnxruntime, no Pad left for TVM to fuse into the previous task."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgecompress.export.tvm.onnx_prep import fold_pad_into_conv

    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 1, 3, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64), "pads"),
             numpy_helper.from_array(np.array([0, 0, 1, 2, 0, 0, 0, 1], np.int64), "pads2")]  # fmt: skip
    nodes = [helper.make_node("Pad", ["input", "pads"], ["p"]),
             helper.make_node("Conv", ["p", "W"], ["c"], strides=[2, 2], group=1, pads=[1, 0, 0, 0]),
             helper.make_node("Pad", ["c", "pads2"], ["q"]), helper.make_node("Relu", ["q"], ["output"])]  # fmt: skip
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 9, 9])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)], initializer=inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folded = fold_pad_into_conv(model)
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Pad", "Relu"]  # the Pad before Relu stays
    conv = folded.graph.node[0]
    assert list(next(a for a in conv.attribute if a.name == "pads").ints) == [1, 0, 1, 1]
    assert [n.op_type for n in model.graph.node][0] == "Pad"  # the caller's model is untouched
    x = rng.standard_normal((1, 1, 9, 9)).astype(np.float32)

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]

    np.testing.assert_array_equal(run(model), run(folded))


def test_transfer_ranks_follow_cpu_features() -> None:
    """Records of an older x86-64 CPU apply to a newer one, never the other way, nor across triples."""
    from edgecompress.export.tvm.records import folder_target, transfer_rank

    def spec(mcpu: str, cores: int = 2, triple: str = "x86_64-linux-gnu") -> dict:
        return {"kind": "llvm", "mtriple": triple, "mcpu": mcpu, "num-cores": cores}

    assert transfer_rank(spec("haswell"), spec("haswell")) == 0
    assert transfer_rank(spec("haswell"), spec("sapphirerapids")) > transfer_rank(spec("cascadelake"), spec("sapphirerapids"))
    assert transfer_rank(spec("haswell"), spec("haswell", cores=4)) == 1
    assert transfer_rank(spec("cascadelake"), spec("haswell")) is None  # AVX-512 code on an AVX2 CPU
    assert transfer_rank(spec("haswell"), spec("haswell", triple="aarch64-linux-gnu")) is None
    assert transfer_rank({**spec("cortex-a76"), "mtriple": "aarch64-linux-gnu"},
                         {**spec("cortex-a55"), "mtriple": "aarch64-linux-gnu"}) is None  # fmt: skip
    assert folder_target(Path("llvm-x86_64-linux-gnu-skylake-avx512-4c")) == spec("skylake-avx512", 4)


def test_database_of_an_older_cpu_applies_and_tunes_on(tmp_path: Path) -> None:
    """Records tuned under an older CPU name apply under this host's (reported as transferred, with
    the source key), and --tune then times them here and tunes on into this CPU's own database."""
    import dataclasses

    from edgecompress.export.tvm import export_tvm_from_onnx
    from edgecompress.export.tvm.records import X86_LEVELS, database_key
    from edgecompress.targets import get_target

    host = get_target("x86-64")
    level = X86_LEVELS.index(host.tvm["mcpu"]) if host.tvm.get("mcpu") in X86_LEVELS else 0
    if level == 0:
        pytest.skip("this host is the oldest x86-64 level: there is no older CPU to transfer from")
    older = dataclasses.replace(host, tvm={**host.tvm, "mcpu": X86_LEVELS[level - 1]})
    db = tmp_path / "db"
    src = _gemm_artifact(tmp_path / "onnx")
    tuned_old = export_tvm_from_onnx(src, older, tmp_path / "old", tune=2, database_dir=db)
    assert tuned_old.manifest.extra["tuned"] is True
    art = export_tvm_from_onnx(src, host, tmp_path / "new", database_dir=db)
    extra = art.manifest.extra
    assert extra["tuned"] == "transferred" and extra["transferred_from"] == [database_key(dict(older.tvm))]
    assert any("applied on" in n and database_key(dict(older.tvm)) in n for n in extra["notes"])
    further = export_tvm_from_onnx(src, host, tmp_path / "further", tune=2, database_dir=db)
    assert further.manifest.extra["tuning"]["tasks_tuned"] == 1  # tuned on for this CPU
    assert further.manifest.extra["tuned"] is True and further.manifest.extra["records"] == {"own": 1}


def _gemm_artifact(folder: Path):
    from onnx import TensorProto, helper, numpy_helper

    from edgecompress.export import TensorSpec, write_onnx_artifact

    rng = np.random.default_rng(5)
    w = numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "W")
    graph = helper.make_graph([helper.make_node("Gemm", ["input", "W"], ["output"])], "gemm",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 16])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 8])], initializer=[w])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return write_onnx_artifact(model, folder, fmt="onnx", model_name="gemm", inputs=[TensorSpec(name="input", shape=["batch", 16])])


def test_cli_tuning_show_and_clear(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGECOMPRESS_CACHE", str(tmp_path))
    from edgecompress.export.tvm.records import database_key
    from edgecompress.targets import get_target

    host = get_target("x86-64")
    own = _own_database_with_fixture(tmp_path / "tvm-tuning", dict(host.tvm))
    code, out, err = cli("tuning", "show", "--json")
    assert code == 0, err
    rows = json.loads(out)["databases"]
    assert rows[0]["source"] == "own" and rows[0]["records"] == 32 and rows[0]["folder"].endswith(database_key(dict(host.tvm)))
    code, out, err = cli("tuning", "clear", "--json")
    assert code == 0, err and not own.exists()
    assert not own.exists()
