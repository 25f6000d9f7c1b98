"""Brevitas' post-training algorithms inside Quantune: QCDQ graphs onnxruntime runs, scored like the rest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgecompress.compress.ptq.config import PTQConfig


def _sqnr(ref: np.ndarray, out: np.ndarray) -> float:
    return float(10 * np.log10((ref**2).sum() / max(((ref - out) ** 2).sum(), 1e-30)))


def _trial_model(bundle, config, calib, val, tmp_path: Path):  # noqa: ANN001, ANN202
    """The int8 model a Quantune trial builds for ``config`` (through the evaluator's own task)."""
    from edgecompress.compress.exporting import export_torch_onnx
    from edgecompress.compress.ptq.evaluator import Evaluator, quantize_trial_model
    from edgecompress.compress.ptq.ort_backend import prepare_model

    art = export_torch_onnx(bundle, tmp_path / "fp32")
    ev = Evaluator(prepare_model(art.model_path, tmp_path / "models"), calib, val, None, metric="agreement",
                   database=None, workdir=tmp_path / "ev", module=bundle.module)  # fmt: skip
    out = tmp_path / "q.onnx"
    quantize_trial_model(ev.task(config), calib, out)
    return out


@pytest.mark.parametrize("algorithms", ["equalize+bias_correction", "gptq"])
def test_a_brevitas_config_exports_qdq_that_onnxruntime_runs_like_brevitas(algorithms: str, cnn_checkpoint: Path,
                                                                            mnist_splits, tmp_path: Path) -> None:  # fmt: skip
    """The QDQ graph holds brevitas' int8 weights exactly, and onnxruntime (activations int8 as well)
    computes what the brevitas-quantized torch model computes (>= 30 dB)."""
    import onnx
    import torch
    from onnx import numpy_helper

    from edgecompress.compress.checkpoint import load_checkpoint
    from edgecompress.compress.ptq import brevitas_backend as bb
    from edgecompress.compress.ptq.ort_backend import model_outputs

    bundle = load_checkpoint(cnn_checkpoint)
    names = tuple(bundle.spec.input_names)
    calib = mnist_splits.calib.feeds(list(bundle.spec.inputs))
    val = mnist_splits.val.head(64).feeds(list(bundle.spec.inputs))
    config = PTQConfig(brevitas=algorithms, calibration="percentile", percentile=99.999, calib_size=64, per_channel=True)
    out = _trial_model(bundle, config, calib, val, tmp_path)
    with torch.no_grad():  # the brevitas model, rebuilt here: float graph, then rounded weights
        model = bb.float_model(bundle.module, set(algorithms.split("+")))
        scales = bb.quantize_weights(model, config, calib, names)
        ref = model(*(torch.from_numpy(val[n]) for n in names)).numpy()
    ort_out = model_outputs(out, val)[0]
    assert _sqnr(ref, ort_out) >= 30.0  # onnxruntime computes what brevitas simulated
    graph = onnx.load(str(out))
    ops = {n.op_type for n in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # a standard QDQ graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    int8 = [v for k, v in inits.items() if k.endswith("_quantized") and v.dtype == np.int8 and v.ndim == 4]
    rounded = [model.get_submodule(name).weight.detach().numpy() / s.reshape(-1, 1, 1, 1) for name, s in scales.items()
               if model.get_submodule(name).weight.ndim == 4]  # fmt: skip
    assert rounded and len(int8) == len(rounded)
    for q in int8:  # every int8 conv weight in the graph is one of brevitas' rounded weights, exactly
        assert any(q.shape == r.shape and np.array_equal(q, np.round(r)) for r in rounded)
    with torch.no_grad():
        fp32 = bundle.module(torch.from_numpy(val[names[0]])).numpy()
    assert (fp32.argmax(1) == ort_out.argmax(1)).mean() >= 0.95


def test_convs_called_inside_a_padding_subclass_are_quantized(tmp_path: Path) -> None:
    """A conv subclass that pads in its own forward (TensorFlow "same", EfficientNet-Lite) traces into a
    functional call: it must become a module, or brevitas leaves its weights in float (the bug seen on
    EfficientNet-Lite: only the classifier was quantized)."""
    import torch
    import torch.nn.functional as F  # noqa: N812
    from torch import nn

    from edgecompress.compress.ptq import brevitas_backend as bb

    class SameConv(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.conv2d(F.pad(x, [0, 1, 0, 1]), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)

    torch.manual_seed(0)
    net = nn.Sequential(SameConv(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU6(), SameConv(8, 8, 3, groups=8),
                        nn.ReLU6(), nn.Flatten(), nn.LazyLinear(4)).eval()  # fmt: skip
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        ref = net(x)
        model = bb.float_model(net, {"gptq"})
        assert torch.allclose(model(x), ref, atol=1e-5)  # the same function, batch norm merged
        assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        scales = bb.quantize_weights(model, PTQConfig(brevitas="gptq", calib_size=4), {"x": x.numpy()}, ("x",))
    assert len(scales) == 3  # both padded convs and the linear layer were quantized
    for name, s in scales.items():
        w = model.get_submodule(name).weight.detach().numpy()
        k = w / s.reshape(-1, *([1] * (w.ndim - 1)))
        assert np.allclose(k, np.round(k), atol=1e-3) and np.abs(k).max() <= 127.0001  # on the int8 grid


def test_checkpoint_search_measures_brevitas_configs_and_onnx_input_has_none(cnn_checkpoint: Path, mnist_splits,
                                                                             tmp_path: Path) -> None:  # fmt: skip
    from edgecompress.compress.checkpoint import load_checkpoint
    from edgecompress.compress.exporting import export_model
    from edgecompress.compress.ptq.config import QuantuneSearchConfig, SearchSpace
    from edgecompress.compress.ptq.search import quantize_artifact
    from edgecompress.compress.ptq.space import enumerate_space

    space = SearchSpace(calibration=("minmax",), calib_size=(32,), per_channel=(True,), activation_symmetric=(False,),
                        weight_symmetric=(True,), keep_float=("none",), brevitas=("equalize", "gptq"))  # fmt: skip
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


def test_a_diverged_rounding_is_a_named_failed_trial(monkeypatch: pytest.MonkeyPatch) -> None:
    """An algorithm whose weights blow up (brevitas' GPFQ did, 0.23 -> 893, on the CNN's classifier) fails
    the trial with the layer named instead of being measured as a model."""
    import torch
    from torch import nn

    from edgecompress.compress.ptq import brevitas_backend as bb

    def blow_up(model, name, calib, names, n) -> None:  # noqa: ANN001
        for layer in model.modules():
            if hasattr(layer, "weight_orig") or isinstance(layer, nn.Linear):
                layer.weight.data *= 100.0

    monkeypatch.setattr(bb, "_round_weights", blow_up)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    with torch.no_grad():
        model = bb.float_model(net, {"gpfq"})
        with pytest.raises(bb.BrevitasError, match="diverged on layer"):
            bb.quantize_weights(model, PTQConfig(brevitas="gpfq", calib_size=4), {"x": np.ones((4, 8), np.float32)}, ("x",))
