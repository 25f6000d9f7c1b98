"""TVM compile details that make small models fast: weight transforms done once, cheap session I/O."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def _mlp_onnx(path: Path, *, quantized: bool = False) -> tuple[Path, np.ndarray]:
    """A two-layer MLP as ONNX (Gemm with transB=1, as torch exports nn.Linear); optionally QDQ."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    x = torch.randn(1, 1, 8, 8)
    src = path / "mlp.onnx"
    torch.onnx.export(model.eval(), (x,), str(src), input_names=["input"], output_names=["output"], dynamo=False)
    if not quantized:
        return src, x.numpy()
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"input": np.random.default_rng(i).standard_normal((1, 1, 8, 8)).astype(np.float32)}
                            for i in range(8)])  # fmt: skip

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    dst = path / "mlp_qdq.onnx"
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)  # fmt: skip
    return dst, x.numpy()


def _ops(mod) -> set[str]:
    """Names of the Relax operators ``main`` calls."""
    import tvm
    from tvm import relax

    names: set[str] = set()

    def visit(expr) -> None:
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
            names.add(expr.op.name)

    relax.analysis.post_order_visit(mod["main"].body, visit)
    return names


def test_gemm_weight_transpose_is_done_at_compile_time(tmp_path: Path) -> None:
    """Gemm imports as matmul(x, permute_dims(W)): the transpose must not stay in ``main``."""
    import onnx
    import onnxruntime as ort
    import tvm
    from tvm import relax

    from edgecompress.export.tvm import compile as tc

    path, x = _mlp_onnx(tmp_path)
    mod, params = tc.import_onnx(onnx.load(str(path)), {"input": [1, 1, 8, 8]}, "x86-64")
    assert "relax.permute_dims" not in _ops(mod)
    assert sorted(tuple(p.shape) for p in params if len(p.shape) == 2) == [(32, 10), (64, 32)]  # (in, out)
    assert [gv.name_hint for gv in mod.functions] == ["main"]
    ex = tvm.compile(mod, target=tvm.target.Target("llvm"))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x), *params).numpy()
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_quantized_weights_are_not_expanded(tmp_path: Path) -> None:
    """Pre-dequantizing int8 weights would make the artifact 4x larger: the graph is left as is."""
    import onnx

    from edgecompress.export.tvm import compile as tc

    path, _ = _mlp_onnx(tmp_path, quantized=True)
    model = onnx.load(str(path))
    mod, params = tc.import_onnx(model, {"input": [1, 1, 8, 8]}, "x86-64")
    assert any(str(p.dtype) == "int8" for p in params)
    assert sum(p.numpy().nbytes for p in params) < 4 * 64 * 32  # still int8-sized, not fp32


def test_local_session_reuses_buffers_and_copies_outputs(tmp_path: Path) -> None:
    """The fast path (numpy views of the VM tensors) must not hand out memory the VM reuses."""
    import torch

    from edgecompress.compress.checkpoint import ModelBundle
    from edgecompress.compress.models import create_model
    from edgecompress.export.tvm import export_tvm_format
    from edgecompress.runtimes import runtime_for
    from edgecompress.targets import get_target

    torch.manual_seed(0)
    bundle = ModelBundle(create_model("cnn", num_classes=10, in_chans=1).eval(), "cnn", (1, 28, 28), {}, 10, {})
    art = export_tvm_format(bundle, get_target("x86-64"), tmp_path / "tvm", use_database=False)
    sess = runtime_for(art).prepare(art, threads=1)
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((1, 1, 28, 28)).astype(np.float32) for _ in range(2))
    out_a = sess.run(a)
    out_b = sess.run(b)
    assert sess._host_views[0] is not None  # the local CPU fast path is taken
    with torch.no_grad():
        ref_a, ref_b = (bundle.module(torch.from_numpy(v)).numpy() for v in (a, b))
    np.testing.assert_allclose(out_a, ref_a, rtol=1e-4, atol=1e-4)  # not overwritten by the second run
    np.testing.assert_allclose(out_b, ref_b, rtol=1e-4, atol=1e-4)
    batch = np.concatenate([a, b, a])  # chunked path (static batch 1) still right
    np.testing.assert_allclose(sess.run(batch), np.concatenate([ref_a, ref_b, ref_a]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["cnn"])
def test_shipped_database_covers_example(name: str, tmp_path: Path, shipped_tuned) -> None:
    """The example's artifact is fully tuned from the shipped database alone (no user records), on
    the shipped CPU and on any newer x86-64 CPU or other core count (transferred, verified here)."""
    import torch

    from edgecompress.compress.checkpoint import ModelBundle
    from edgecompress.compress.models import create_model
    from edgecompress.export.tvm import export_tvm_format
    from edgecompress.targets import get_target

    host = get_target("x86-64")
    torch.manual_seed(0)
    bundle = ModelBundle(create_model(name, num_classes=10, in_chans=1).eval(), name, (1, 28, 28), {}, 10, {})
    art = export_tvm_format(bundle, host, tmp_path / "tvm", database_dir=tmp_path / "empty-db")
    extra = art.manifest.extra
    assert extra["tuned"] == shipped_tuned and extra["tuned_tasks"] == extra["tasks"]


def test_qdq_pad_with_a_dequantized_value_compiles(tmp_path: Path) -> None:
    """onnxruntime's quantizer gives a Pad its constant through QuantizeLinear -> DequantizeLinear
    (EfficientNet-Lite's int8 graph); TVM's frontend failed on it with an AttributeError. The value
    is folded to a constant first."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgecompress.export import TensorSpec, write_onnx_artifact
    from edgecompress.export.tvm import export_tvm_from_onnx
    from edgecompress.targets import get_target

    inits = [numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"),
             numpy_helper.from_array(np.array(1.0, np.float32), "value"), numpy_helper.from_array(np.array(0.5, np.float32), "s"),
             numpy_helper.from_array(np.array(1, np.uint8), "zp")]  # fmt: skip
    nodes = [helper.make_node("QuantizeLinear", ["value", "s", "zp"], ["q"]),  # 1.0 -> 3
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["pad_value"]),  # 3 -> 1.0
             helper.make_node("Pad", ["input", "pads", "pad_value"], ["output"], mode="constant")]  # fmt: skip
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 2, 4, 4])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 2, 6, 6])], inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    src = write_onnx_artifact(model, tmp_path / "src", fmt="onnx", inputs=[TensorSpec(name="input", shape=["batch", 2, 4, 4])])
    art = export_tvm_from_onnx(src, get_target("x86-64"), tmp_path / "tvm")
    assert art.manifest.metrics["export_check"]["max_abs_error"] == 0.0  # the border is (3 - 1) * 0.5 = 1.0 exactly
