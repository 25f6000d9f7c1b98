"""Brevitas' post-training algorithms inside Quantune: QCDQ graphs onnxruntime runs, scored like the rest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgecompress.compress.ptq.config import PTQConfig


def _sqnr(ref: np.ndarray, out: np.ndarray) -> float:
    return float(10 * np.log10((ref**2).sum() / max(((ref - out) ** 2).sum(), 1e-30)))


@pytest.mark.parametrize("algorithms", ["equalize+bias_correction", "gptq"])
def test_a_brevitas_config_exports_qdq_that_onnxruntime_runs_like_brevitas(algorithms: str, cnn_checkpoint: Path,
                                                                            mnist_splits, tmp_path: Path) -> None:  # fmt: skip
    import torch

    from edgecompress.compress.checkpoint import load_checkpoint
    from edgecompress.compress.ptq.brevitas_backend import quantize_to_onnx
    from edgecompress.compress.ptq.ort_backend import model_outputs

    bundle = load_checkpoint(cnn_checkpoint)
    names = tuple(bundle.spec.input_names) if hasattr(bundle.spec, "input_names") else ("x",)
    calib = mnist_splits.calib.feeds(list(bundle.spec.inputs))
    val = mnist_splits.val.head(64).feeds(list(bundle.spec.inputs))
    config = PTQConfig(brevitas=algorithms, calibration="percentile", percentile=99.999, calib_size=64,
                       per_channel=True, activation_symmetric=True)  # fmt: skip
    out = tmp_path / "q.onnx"
    fake_quant = quantize_to_onnx(bundle.module, config, calib, names, out)
    with torch.no_grad():
        ref = fake_quant(*(torch.from_numpy(val[n]) for n in names))
    ref = np.asarray(getattr(ref, "value", ref))
    ort_out = model_outputs(out, val)[0]
    assert _sqnr(ref, ort_out) >= 30.0  # onnxruntime computes what brevitas simulated
    import onnx

    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # a standard QDQ graph
    with torch.no_grad():
        fp32 = bundle.module(torch.from_numpy(val[names[0]])).numpy()
    assert (fp32.argmax(1) == ort_out.argmax(1)).mean() >= 0.95


def test_checkpoint_search_measures_brevitas_configs_and_onnx_input_has_none(cnn_checkpoint: Path, mnist_splits,
                                                                             tmp_path: Path) -> None:  # fmt: skip
    from edgecompress.compress.checkpoint import load_checkpoint
    from edgecompress.compress.exporting import export_model
    from edgecompress.compress.ptq.config import QuantuneSearchConfig, SearchSpace
    from edgecompress.compress.ptq.search import quantize_artifact
    from edgecompress.compress.ptq.space import enumerate_space

    space = SearchSpace(calibration=("minmax",), calib_size=(32,), per_channel=(True,), activation_symmetric=(False,),
                        weight_symmetric=(True,), keep_float=("none",), brevitas=("equalize", "gpfq"))  # fmt: skip
    assert len(enumerate_space(space)) == 1 and len(enumerate_space(space, brevitas=True)) == 3
    bundle = load_checkpoint(cnn_checkpoint)
    src = export_model(bundle, "onnx", None, tmp_path / "src")
    cfg = QuantuneSearchConfig(search="grid", space=space, budget_trials=3, sensitivity=False, val_samples=100,
                               objective="accuracy", database=str(tmp_path / "db.sqlite"))  # fmt: skip
    res = quantize_artifact(src, mnist_splits, cfg, tmp_path / "q", module=bundle.module)
    labels = [t.config.label() for t in res.search.trials]
    assert sum(lab.startswith("brevitas:") for lab in labels) == 2, labels
    assert all(t.ok for t in res.search.trials), [t.error for t in res.search.trials]
    assert all(t.latency_ms for t in res.search.trials)
    onnx_only = quantize_artifact(src, mnist_splits, cfg.model_copy(update={"database": str(tmp_path / "db2.sqlite")}),
                                  tmp_path / "q2")  # fmt: skip
    assert [t.config.brevitas for t in onnx_only.search.trials] == ["none"]


def test_a_graph_built_for_batch_1_runs_any_batch_in_slices(tmp_path: Path) -> None:
    """brevitas graphs that onnxruntime cannot run with a symbolic batch stay at batch 1; sessions slice."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgecompress.runtimes.ort_runtime import OrtSession

    w = numpy_helper.from_array(np.arange(32, dtype=np.float32).reshape(8, 4) / 10, "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], initializer=[w])  # fmt: skip
    path = tmp_path / "b1.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    sess = OrtSession(str(path), ["CPUExecutionProvider"], 1)
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    assert sess.fixed_batch == 1
    np.testing.assert_allclose(sess.run(x), x @ numpy_helper.to_array(w), rtol=1e-5)
