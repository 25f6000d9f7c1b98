"""MetaSchedule tuning: a persistent per-target database reused across runs and models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def _gemm_artifact(folder: Path, seed: int):
    """A one-operator model (Gemm 8 -> 4): one tuning task, so a tiny budget covers it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgecompress.export import TensorSpec, write_onnx_artifact

    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "B")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["input", "W", "B"], ["output"])], "gemm",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4])], initializer=[w, b],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return write_onnx_artifact(model, folder, fmt="onnx", model_name=f"gemm{seed}",
                               inputs=[TensorSpec(name="input", shape=["batch", 8])])  # fmt: skip


def test_database_reused_across_runs_and_models(tmp_path: Path) -> None:
    from edgecompress.export.tvm import export_tvm_from_onnx
    from edgecompress.targets import get_target

    host = get_target("x86-64")
    db = tmp_path / "db"
    first = export_tvm_from_onnx(_gemm_artifact(tmp_path / "a", 0), host, tmp_path / "t1", tune=2, database_dir=db)
    report = first.manifest.extra["tuning"]
    assert report["trials"] == 2 and report["tasks_tuned"] == 1 and report["complete"]
    assert first.manifest.extra["tuned"] is True and first.manifest.extra["tuned_tasks"] == 1
    records = next(db.glob("*/database_tuning_record.json"))
    assert records.stat().st_size > 0  # committed as the task ended

    again = export_tvm_from_onnx(_gemm_artifact(tmp_path / "a2", 0), host, tmp_path / "t2", tune=2, database_dir=db)
    assert again.manifest.extra["tuning"]["trials"] == 0  # second run: no new trials
    assert again.manifest.extra["tuning"]["tasks_from_database"] == 1 and again.manifest.extra["tuned"] is True

    # another model with the same operator shape (other weights) reuses the workload
    other = export_tvm_from_onnx(_gemm_artifact(tmp_path / "b", 1), host, tmp_path / "t3", tune=2, database_dir=db)
    assert other.manifest.extra["tuning"]["trials"] == 0 and other.manifest.extra["tuned"] is True


def test_exhausted_budget_is_resumable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A time budget already spent tunes nothing, says so, and the next run tunes the rest."""
    from edgecompress.export.tvm import TuneBudget, export_tvm_from_onnx
    from edgecompress.targets import get_target

    host = get_target("x86-64")
    db = tmp_path / "db"
    src = _gemm_artifact(tmp_path / "a", 2)
    spent = TuneBudget(trials=0, trials_per_task=2)
    art = export_tvm_from_onnx(src, host, tmp_path / "t0", tune=spent, database_dir=db)
    assert art.manifest.extra["tuning"]["tasks_left"] == 1 and art.manifest.extra["tuned"] is False
    assert any("rerun to resume" in n for n in art.manifest.extra["notes"])
    art = export_tvm_from_onnx(src, host, tmp_path / "t1", tune=2, database_dir=db)
    assert art.manifest.extra["tuning"]["tasks_tuned"] == 1 and art.manifest.extra["tuned"] is True


def test_cross_targets_are_not_tuned_here(tmp_path: Path) -> None:
    """Tuning ARM64 code on this machine would pick schedules for the wrong CPU: it needs the device
    (tests/test_tvm_tuning_rpc.py), and without one it is an error, not a silent skip."""
    from edgecompress.export.tvm import export_tvm_from_onnx
    from edgecompress.export.tvm.rpc_measure import TuningNeedsDeviceError
    from edgecompress.targets import get_target

    with pytest.raises(TuningNeedsDeviceError, match="--rpc HOST:PORT"):
        export_tvm_from_onnx(_gemm_artifact(tmp_path / "a", 3), get_target("arm64-linux"), tmp_path / "arm",
                             tune=2, database_dir=tmp_path / "db")  # fmt: skip
    assert not list((tmp_path / "db").glob("*/database_tuning_record.json"))
    untuned = export_tvm_from_onnx(_gemm_artifact(tmp_path / "b", 3), get_target("arm64-linux"), tmp_path / "arm",
                                   database_dir=tmp_path / "db")  # fmt: skip
    assert untuned.manifest.extra["tuned"] is False and "tuning" not in untuned.manifest.extra


def test_default_database_root_respects_cache_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgecompress.export.tvm import default_database_root

    monkeypatch.setenv("EDGECOMPRESS_CACHE", str(tmp_path))
    assert default_database_root() == tmp_path / "tvm-tuning"


def test_a_gather_of_token_ids_is_tuned_without_crashing(tmp_path: Path) -> None:
    """MetaSchedule's random int64 arguments index a token embedding out of bounds and TVM's take
    segfaulted the whole tune (the text encoder); candidates now run on zero indices."""
    from onnx import TensorProto, helper, numpy_helper

    from edgecompress.export import TensorSpec, write_onnx_artifact
    from edgecompress.export.tvm import TuneBudget, export_tvm_from_onnx
    from edgecompress.export.tvm.records import safe_arguments
    from edgecompress.targets import get_target

    table = numpy_helper.from_array(np.random.default_rng(0).standard_normal((260, 16)).astype(np.float32), "E")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["E", "ids"], ["output"], axis=0)], "embed",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 8, 16])], initializer=[table],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    src = write_onnx_artifact(model, tmp_path / "src", fmt="onnx", model_name="embed",
                              inputs=[TensorSpec(name="ids", shape=["batch", 8], dtype="int64", range=[0, 260])])  # fmt: skip
    art = export_tvm_from_onnx(src, get_target("x86-64"), tmp_path / "t", tune=TuneBudget(trials=8, trials_per_task=4),
                               database_dir=tmp_path / "db")  # fmt: skip
    report = art.manifest.extra["tuning"]
    assert report["trials"] > 0 and report["tasks_tuned"] == report["tasks"] >= 1, report
    ints, floats = safe_arguments([["TENSOR", "int64", [1, 8]], ["TENSOR", "float32", [4]]], seed=1)
    assert not ints.any() and floats.std() > 0
