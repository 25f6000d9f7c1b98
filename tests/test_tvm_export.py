"""TVM export: host compile + run for fp32 and QDQ graphs, cross-compiled targets, errors, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="module")
def inputs() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((64, 1, 28, 28)).astype(np.float32)


@pytest.fixture(scope="module")
def cnn_onnx(untrained_cnn_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    from edgecompress.compress.checkpoint import load_checkpoint
    from edgecompress.compress.exporting import export_model
    from edgecompress.targets import get_target

    bundle = load_checkpoint(untrained_cnn_checkpoint)
    return export_model(bundle, "onnx", get_target("x86-64"), tmp_path_factory.mktemp("onnx") / "cnn")


@pytest.fixture(scope="module")
def cnn_qdq(cnn_onnx, inputs, tmp_path_factory: pytest.TempPathFactory):
    """The CNN quantized by onnxruntime (static QDQ, per-channel int8 weights, 32 calibration inputs)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from edgecompress.export import write_onnx_artifact

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"input": inputs[i : i + 1]} for i in range(32)])

        def get_next(self):
            return next(self.it, None)

    folder = tmp_path_factory.mktemp("qdq")
    quantize_static(str(cnn_onnx.model_path), str(folder / "q.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)  # fmt: skip
    return write_onnx_artifact(onnx.load(str(folder / "q.onnx")), folder / "art", fmt="onnx-qdq", model_name="cnn",
                               inputs=cnn_onnx.manifest.inputs, preprocessing=cnn_onnx.manifest.preprocessing)  # fmt: skip


def _ort(artifact, x: np.ndarray) -> np.ndarray:
    from edgecompress.runtimes import runtime_for

    return runtime_for(artifact).prepare(artifact).run(x)


def test_host_fp32_matches_onnxruntime(cnn_onnx, inputs, tmp_path: Path, shipped_tuned) -> None:
    from edgecompress.export import load_artifact
    from edgecompress.export.tvm import export_tvm_from_onnx
    from edgecompress.export.verify import compare_outputs
    from edgecompress.runtimes import runtime_for
    from edgecompress.targets import get_target

    art = export_tvm_from_onnx(cnn_onnx, get_target("x86-64"), tmp_path / "tvm")
    m = load_artifact(art.path).manifest  # hashes verified
    assert m.format == "tvm" and m.model_file == "model.so"
    assert {"model.so", "params.bin"} <= set(m.files)
    assert m.extra["device"] == "cpu" and m.extra["tuned"] == shipped_tuned  # the example CNN's records are shipped
    assert m.extra["tuned_tasks"] == m.extra["tasks"] and not m.extra["refused_records"]
    assert m.metrics["export_check"]["sqnr_db"] > 40
    assert any("tuning records applied" in n for n in m.extra["notes"])
    x = inputs[:37]  # not a multiple of anything: exercises chunking
    sess = runtime_for(art).prepare(art, get_target("x86-64"))
    assert sess.runtime == "tvm"
    got = sess.run(x)
    assert got.shape == (37, 10)
    cmp = compare_outputs(_ort(cnn_onnx, x), got)
    assert cmp["sqnr_db"] > 40 and cmp["top1_agreement"] == 100.0


def test_host_qdq_matches_onnxruntime(cnn_qdq, inputs, tmp_path: Path) -> None:
    from edgecompress.export.tvm import export_tvm_from_onnx
    from edgecompress.export.verify import compare_outputs
    from edgecompress.runtimes import runtime_for
    from edgecompress.targets import get_target

    art = export_tvm_from_onnx(cnn_qdq, get_target("x86-64"), tmp_path / "tvm-qdq")
    assert art.manifest.extra["precision"] == "int8" and art.manifest.extra["source_format"] == "onnx-qdq"
    x = inputs[32:]  # not the calibration inputs
    cmp = compare_outputs(_ort(cnn_qdq, x), runtime_for(art).prepare(art).run(x))
    assert cmp["top1_agreement"] >= 90.0 and cmp["sqnr_db"] > 15


@pytest.mark.parametrize("target_name", ["arm64-android", "arm64-linux", "cuda-sm80", "opencl-mali"])
def test_cross_compile_without_hardware(cnn_onnx, target_name: str, tmp_path: Path) -> None:
    from edgecompress.export.tvm import export_tvm_from_onnx
    from edgecompress.export.tvm.compile import library_plan
    from edgecompress.runtimes.errors import RuntimeUnavailableError
    from edgecompress.runtimes.tvm_runtime import TvmRuntime
    from edgecompress.targets import get_target

    tgt = get_target(target_name)
    art = export_tvm_from_onnx(cnn_onnx, tgt, tmp_path / target_name)
    plan = library_plan(tgt)
    assert art.manifest.model_file == f"model.{plan.suffix}" and art.model_path.stat().st_size > 1000
    assert art.manifest.target["name"] == target_name
    assert art.manifest.extra["tuned"] is False
    assert any("not verified here" in n for n in art.manifest.extra["notes"])
    if plan.suffix == "tar":
        assert any(".tar" in n for n in art.manifest.extra["notes"])
    rt = TvmRuntime()
    if not rt.supports(art, tgt):
        with pytest.raises(RuntimeUnavailableError, match="--rpc"):
            rt.prepare(art, tgt)


def test_cuda_library_holds_kernels(cnn_onnx, tmp_path: Path) -> None:
    from edgecompress.export.tvm import export_tvm_from_onnx
    from edgecompress.targets import get_target

    art = export_tvm_from_onnx(cnn_onnx, get_target("cuda-sm80"), tmp_path / "cuda")
    assert art.manifest.extra["device"] == "cuda"
    assert b"__global__" in art.model_path.read_bytes() or b"sm_80" in art.model_path.read_bytes()


def _onnx_with(op_type: str, domain: str, path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node(op_type, ["input"], ["output"], domain=domain)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4])],
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    return path


def test_unsupported_operator_names_op_and_target(tmp_path: Path) -> None:
    import onnx

    from edgecompress.export import TensorSpec, write_onnx_artifact
    from edgecompress.export.errors import UnsupportedExportError
    from edgecompress.export.tvm import export_tvm_from_onnx
    from edgecompress.targets import get_target

    model = onnx.load(str(_onnx_with("MyCustomOp", "com.example", tmp_path / "bad.onnx")))
    bad = write_onnx_artifact(model, tmp_path / "bad", fmt="onnx", inputs=[TensorSpec(name="input", shape=[1, 4])])
    with pytest.raises(UnsupportedExportError, match=r"MyCustomOp.*arm64-android"):
        export_tvm_from_onnx(bad, get_target("arm64-android"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _tfidf_model(path: Path) -> Path:
    """A valid ONNX graph (the checker accepts it) of a standard operator TVM's frontend lacks."""
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("TfIdfVectorizer", ["input"], ["output"], mode="TF", min_gram_length=2, max_gram_length=2,
                            max_skip_count=0, ngram_counts=[0, 4], ngram_indexes=[0, 1, 2, 3, 4, 5, 6],
                            pool_int64s=[2, 3, 5, 4, 5, 6, 7, 8, 6, 7])  # fmt: skip
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("input", TensorProto.INT64, [1, 12])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 7])])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def test_cli_unsupported_operator_exit_3(cli, tmp_path: Path) -> None:
    code, _, err = cli("export", _tfidf_model(tmp_path / "tfidf.onnx"), "--format", "tvm", "--target", "x86-64",
                       "-o", tmp_path / "out")  # fmt: skip
    assert code == 3, err
    assert "TfIdfVectorizer" in err and "x86-64" in err
    assert not (tmp_path / "out").exists()


def test_cli_export_and_profile(cli, untrained_cnn_checkpoint: Path, tmp_path: Path, shipped_tuned) -> None:
    import json

    out = tmp_path / "art"
    code, stdout, err = cli("export", untrained_cnn_checkpoint, "--format", "tvm", "--target", "x86-64", "-o", out, "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["format"] == "tvm" and "model.so" in result["files"]
    code, stdout, err = cli("profile", out, "--min-runs", "5", "--min-seconds", "0.2", "--json")
    assert code == 0, err
    prof = json.loads(stdout)
    assert prof["runtime"] == "tvm" and prof["p50_ms"] > 0 and prof["tuned"] == shipped_tuned


def test_tune_budget_parsing() -> None:
    from edgecompress.export.tvm import TuneBudget, TuneBudgetError

    assert TuneBudget.parse("10m").seconds == 600 and TuneBudget.parse("10m").trials is None
    assert TuneBudget.parse("90s").seconds == 90
    assert TuneBudget.parse("200").trials == 200
    assert TuneBudget.parse(4).trials_per_task == 4
    assert TuneBudget.parse(None) is None and TuneBudget.parse("0") is None
    with pytest.raises(TuneBudgetError, match="10m"):
        TuneBudget.parse("ten minutes")


def test_database_key_separates_targets() -> None:
    from edgecompress.export.tvm import database_key
    from edgecompress.targets import get_target

    keys = {database_key(get_target(n).tvm) for n in ("x86-64", "arm64-linux", "arm64-android", "cuda-sm80")}
    assert len(keys) == 4
