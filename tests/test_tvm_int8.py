"""Integer kernels for QDQ graphs on TVM (export/tvm/int8.py): exact against onnxruntime, really integer.

The models are tiny convolution nets written with onnx.helper (a stem conv with 3 input channels, a
depthwise conv, a 1x1 conv with 24 output channels, global pooling and a Gemm) quantized by
onnxruntime's ``quantize_static``: per channel and per tensor, uint8 (asymmetric) and int8
(symmetric) activations. TVM's outputs are compared with onnxruntime's on random inputs.

The blocked layouts of the ARM64 dot-product form (export/tvm/int8_arm.py: int8 activations shifted
from uint8, 4x4 blocks) are compiled for this machine here, which checks their arithmetic; the
``sdot`` code itself runs on the emulated ARM64 device (tests/test_device_emu.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

SHAPE = (1, 3, 12, 12)


def _float_model(seed: int = 0) -> Any:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def init(name: str, *shape: int, scale: float = 0.3) -> Any:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [init("w1", 16, 3, 3, 3), init("b1", 16, scale=0.1), init("w2", 16, 1, 3, 3), init("b2", 16, scale=0.1),
             init("w3", 24, 16, 1, 1), init("b3", 24, scale=0.1), init("wfc", 10, 24), init("bfc", 10, scale=0.1)]  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[0, 0, 1, 1], strides=[2, 2], group=16),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"]),
        helper.make_node("GlobalAveragePool", ["c3"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "wfc", "bfc"], ["output"], transB=1),
    ]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *SHAPE[1:]])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 10])], inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _inputs(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *SHAPE[1:])).astype(np.float32)


def _quantize(folder: Path, *, per_channel: bool = True, symmetric_activations: bool = False,
              uint8_weights: bool = False) -> Path:  # fmt: skip
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    src, dst = folder / "float.onnx", folder / "qdq.onnx"
    onnx.save(_float_model(), str(src))
    calib = _inputs(16, seed=1)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"input": calib[i : i + 1]} for i in range(len(calib))])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=QuantType.QInt8 if symmetric_activations else QuantType.QUInt8,
                    weight_type=QuantType.QUInt8 if uint8_weights else QuantType.QInt8,
                    extra_options={"ActivationSymmetric": symmetric_activations, "WeightSymmetric": not uint8_weights})  # fmt: skip
    return dst


def _tvm_outputs(path: Path, x: np.ndarray, **lowering: Any) -> tuple[np.ndarray, Any]:
    """TVM's outputs for every sample of ``x`` (the QDQ graph lowered with ``lowering``), and the report."""
    import onnx
    import tvm

    from edgecompress.export.tvm import compile as tc
    from edgecompress.export.tvm.int8 import lower_qdq_to_integer

    reports = []

    def rewrite(mod: Any, params: list[Any]) -> tuple[Any, list[Any]]:
        mod, params, report = lower_qdq_to_integer(mod, params, **lowering)
        reports.append(report)
        return mod, params

    shape = [1, *x.shape[1:]]
    mod, params = tc.import_onnx(onnx.load(str(path)), {"input": shape}, "x86-64", graph_rewrite=rewrite)
    tgt = tvm.target.Target({"kind": "llvm", "num-cores": 1})
    vm = tvm.relax.VirtualMachine(tc.build(tc.fuse_for_cpu(mod, tgt), tgt), tvm.cpu())
    weights = [tvm.runtime.tensor(p.numpy()) for p in params]
    out = np.concatenate([vm["main"](tvm.runtime.tensor(x[i : i + 1]), *weights).numpy() for i in range(len(x))])
    return out, reports[0]


def _ort_outputs(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"input": x[i : i + 1]})[0] for i in range(len(x))])


def _sqnr_db(out: np.ndarray, ref: np.ndarray) -> float:
    noise = float(np.sum((out.astype(np.float64) - ref) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(float(np.sum(ref.astype(np.float64) ** 2)) / noise)


CASES = {
    "per-channel uint8": {"per_channel": True},
    "per-tensor uint8": {"per_channel": False},
    "per-channel int8 symmetric": {"per_channel": True, "symmetric_activations": True},
}


#: The layouts of the integer kernels: plain NCHW, x86 VNNI's blocks, ARM64 dot product's blocks.
LAYOUTS: dict[str, dict[str, bool]] = {"nchw": {}, "vnni-layout": {"vnni_layout": True},
                                       "dotprod-layout": {"dotprod_layout": True}}  # fmt: skip


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", list(CASES))
def test_integer_kernels_match_onnxruntime(case: str, layout: str, tmp_path: Path) -> None:
    """Every conv (stem, depthwise, 1x1) and the Gemm run as int8 x int8 -> int32 kernels with the
    requantization folded, and the outputs are onnxruntime's."""
    path = _quantize(tmp_path, **CASES[case])
    x = _inputs(24, seed=2)
    ref = _ort_outputs(path, x)
    out, report = _tvm_outputs(path, x, **LAYOUTS[layout])
    assert (report.integer, report.requantized, report.float_ops) == (4, 4, 0), report
    # VNNI blocks the stem and the 1x1 conv, ARM dot product those and the Gemm; depthwise stays NCHW
    assert report.blocked == {"nchw": 0, "vnni-layout": 2, "dotprod-layout": 3}[layout]
    assert report.layout == {"nchw": "nchw", "vnni-layout": "x86-vnni", "dotprod-layout": "arm-dotprod"}[layout]
    assert _sqnr_db(out, ref) >= 30.0
    assert float(np.mean(out.argmax(1) == ref.argmax(1))) >= 0.99


def test_integer_kernels_are_int8_ops(tmp_path: Path) -> None:
    """The lowered module convolves 8-bit tensors into int32 and no longer dequantizes any weight."""
    import onnx
    from tvm import relax

    from edgecompress.export.tvm import compile as tc
    from edgecompress.export.tvm.int8 import count_kernels, lower_qdq_to_integer

    path = _quantize(tmp_path)
    mod, params = tc.import_onnx(onnx.load(str(path)), {"input": list(SHAPE)}, "x86-64",
                                 graph_rewrite=lambda m, p: (m, p))  # the float path, as imported  # fmt: skip
    assert count_kernels(mod["main"]) == (0, 4)
    calls: list[tuple[str, list[str], str]] = []
    seen: dict[str, Any] = {}

    def rewrite(m: Any, p: list[Any]) -> tuple[Any, list[Any]]:
        lowered, weights, seen["report"] = lower_qdq_to_integer(m, p)
        return lowered, weights

    lowered, _ = tc.import_onnx(onnx.load(str(path)), {"input": list(SHAPE)}, "x86-64", graph_rewrite=rewrite)

    def visit(expr: Any) -> None:
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") in ("relax.nn.conv2d", "relax.matmul",
                                                                              "relax.dequantize"):  # fmt: skip
            calls.append((expr.op.name, [str(a.ty.dtype.dtype) for a in expr.args[:2]], str(expr.ty.dtype.dtype)))

    relax.analysis.post_order_visit(lowered["main"].body, visit)
    kernels = [c for c in calls if c[0] != "relax.dequantize"]
    assert len(kernels) == 4 and seen["report"].requantized == 4
    assert all(c[1][0] == "uint8" and c[1][1] == "int8" and c[2] == "int32" for c in kernels), kernels
    assert sum(c[0] == "relax.nn.conv2d" for c in kernels) == 3
    # no weight (int8) or bias (int32) is dequantized any more: what is left dequantizes activations
    # for the float operators (pooling) and the graph's output
    assert {c[1][0] for c in calls if c[0] == "relax.dequantize"} == {"uint8"}


def test_asymmetric_weights_stay_float_with_a_reason(tmp_path: Path) -> None:
    """uint8 weights with nonzero zero points are not lowered: the float path still compiles and
    matches onnxruntime as the float path does, and the report says why."""
    path = _quantize(tmp_path, uint8_weights=True)
    x = _inputs(8, seed=3)
    out, report = _tvm_outputs(path, x)
    assert report.integer == 0 and report.float_ops == 4
    assert report.reasons == {"weight type uint8": 4}
    assert _sqnr_db(out, _ort_outputs(path, x)) >= 15.0  # the float path's own threshold in the exporter


def _hand_written_qdq(path: Path) -> Path:
    """DQ -> Conv (+ int32 bias) -> Sigmoid -> Q written with onnx.helper: the Sigmoid between the
    convolution and its quantize keeps the requantization in float."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(4)
    sx, sw = np.float32(0.05), (rng.uniform(0.002, 0.02, 8)).astype(np.float32)
    inits = [
        numpy_helper.from_array(np.array(sx, np.float32), "sx"), numpy_helper.from_array(np.array(10, np.uint8), "zx"),
        numpy_helper.from_array(rng.integers(-127, 128, (8, 4, 3, 3)).astype(np.int8), "wq"),
        numpy_helper.from_array(sw, "sw"), numpy_helper.from_array(np.zeros(8, np.int8), "zw"),
        numpy_helper.from_array(rng.integers(-500, 500, 8).astype(np.int32), "bq"),
        numpy_helper.from_array((sx * sw).astype(np.float32), "sb"), numpy_helper.from_array(np.zeros(8, np.int32), "zb"),
        numpy_helper.from_array(np.array(1 / 255, np.float32), "sy"), numpy_helper.from_array(np.array(0, np.uint8), "zy"),
    ]  # fmt: skip
    nodes = [
        helper.make_node("QuantizeLinear", ["input", "sx", "zx"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["x"]),
        helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["w"], axis=0),
        helper.make_node("DequantizeLinear", ["bq", "sb", "zb"], ["b"], axis=0),
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c"], ["s"]),
        helper.make_node("QuantizeLinear", ["s", "sy", "zy"], ["sq"]),
        helper.make_node("DequantizeLinear", ["sq", "sy", "zy"], ["output"]),
    ]
    graph = helper.make_graph(nodes, "handwritten", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4, 6, 6])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 8, 6, 6])], inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_integer_conv_with_float_requantization(layout: str, tmp_path: Path) -> None:
    """A convolution whose result passes through an activation before its quantize is still an
    integer kernel (zero point 10 padded and corrected; -118 after the shift into int8 of the ARM
    dot-product layout), with the scale applied in float."""
    path = _hand_written_qdq(tmp_path / "hand.onnx")
    x = np.random.default_rng(5).standard_normal((6, 4, 6, 6)).astype(np.float32) * 3
    out, report = _tvm_outputs(path, x, **LAYOUTS[layout])
    assert (report.integer, report.requantized, report.float_ops) == (1, 0, 0), report
    ref = _ort_outputs(path, x)
    assert _sqnr_db(out, ref) >= 30.0
    assert float(np.mean(np.abs(out - ref) <= 1 / 255 + 1e-6)) == 1.0  # at most one step of the output's scale


def _artifact(path: Path, folder: Path) -> Any:
    import onnx

    from edgecompress.export import write_onnx_artifact
    from edgecompress.export.artifact import TensorSpec

    return write_onnx_artifact(onnx.load(str(path)), folder, fmt="onnx-qdq", model_name="tiny",
                               inputs=[TensorSpec(name="input", shape=["batch", *SHAPE[1:]], dtype="float32")])  # fmt: skip


def test_export_records_integer_kernels_and_can_turn_them_off(tmp_path: Path) -> None:
    """``export_tvm_from_onnx`` lowers QDQ graphs by default, verifies against onnxruntime at the
    integer threshold and says so in the manifest; ``int8_kernels=False`` keeps the float path."""
    from edgecompress.export.tvm import export_tvm_from_onnx
    from edgecompress.export.tvm.exporter import MIN_SQNR_DB
    from edgecompress.targets import get_target

    src = _artifact(_quantize(tmp_path), tmp_path / "onnx")
    art = export_tvm_from_onnx(src, get_target("x86-64"), tmp_path / "tvm", use_database=False)
    info = art.manifest.extra["int8_kernels"]
    assert info["enabled"] and (info["integer"], info["requantized"], info["float"]) == (4, 4, 0)
    check = art.manifest.metrics["export_check"]
    assert check["sqnr_db"] is None or check["sqnr_db"] >= MIN_SQNR_DB["int8-kernels"]
    assert any(n.startswith("int8 kernels: 4 of 4") for n in art.manifest.extra["notes"])

    off = export_tvm_from_onnx(src, get_target("x86-64"), tmp_path / "tvm-off", use_database=False, int8_kernels=False)
    assert off.manifest.extra["int8_kernels"] == {"enabled": False, "reason": "int8_kernels=False"}


def test_export_falls_back_to_the_float_path_when_integer_build_disagrees(tmp_path: Path, monkeypatch: Any) -> None:
    """A wrong integer build (here: the Gemm's output zero point moved by 40 steps) fails the
    verification, and the export builds the float path instead of failing, with a note."""
    import tvm

    from edgecompress.export.tvm import export_tvm_from_onnx
    from edgecompress.export.tvm.int8 import Int8Kernels
    from edgecompress.targets import get_target

    original = Int8Kernels.rewrite

    def broken(self: Int8Kernels, mod: Any, params: list[Any]) -> tuple[Any, list[Any]]:
        mod, params = original(self, mod, params)
        last = params[-1].numpy()  # the last value added: the Gemm's output zero point
        assert last.shape == () and last.dtype == np.float32
        return mod, [*params[:-1], tvm.runtime.tensor(np.array(last + 40, np.float32))]

    monkeypatch.setattr(Int8Kernels, "rewrite", broken)
    src = _artifact(_quantize(tmp_path), tmp_path / "onnx")
    art = export_tvm_from_onnx(src, get_target("x86-64"), tmp_path / "tvm", use_database=False)
    info = art.manifest.extra["int8_kernels"]
    assert not info["enabled"] and "disagreed with onnxruntime" in info["reason"]
    assert any(n.startswith("int8 kernels off: the integer build disagreed") for n in art.manifest.extra["notes"])


def test_cli_no_int8_kernels(tmp_path: Path, cli: Any) -> None:
    import json

    path = _quantize(tmp_path)
    code, out, err = cli("export", path, "--format", "tvm", "--target", "x86-64", "--no-tuned-records",
                         "--no-int8-kernels", "-o", tmp_path / "art", "--json")  # fmt: skip
    assert code == 0, err
    assert not json.loads((tmp_path / "art" / "manifest.json").read_text())["extra"]["int8_kernels"]["enabled"]


def test_fixed_vnni_intrinsic_builds_and_computes() -> None:
    """TVM 0.27's ``dot_16x4_vnni`` does not pass its own LLVM's verifier; the re-registered one
    tensorizes the blocked convolution, compiles, and (on a VNNI CPU) computes the convolution."""
    import tvm

    from edgecompress.export.tvm.int8_x86 import IC_BLOCK, OC_BLOCK, VNNI_INTRIN, conv2d_nchwc_int8
    from edgecompress.export.tvm.intrinsics import import_tensor_intrinsics
    from edgecompress.targets.host import detect_host

    import_tensor_intrinsics()
    x_shape, w_shape, out_shape = [1, 2, 3, 3, IC_BLOCK], [2, 2, 1, 1, OC_BLOCK, IC_BLOCK], [1, 2, 3, 3, OC_BLOCK]
    func = conv2d_nchwc_int8(x_shape, w_shape, out_shape, [1, 1], [1, 1])
    sch = tvm.s_tir.Schedule(func)
    block = sch.get_sblock("conv2d_nchwc_int8")
    n, o, h, w, ob, ic, kh, kw, ib = sch.get_loops(block)
    sch.reorder(n, o, h, w, ic, kh, kw, ob, ib)
    sch.decompose_reduction(block, ic)
    sch.tensorize(ob, VNNI_INTRIN)
    assert "vpdpbusd" in sch.mod.script()
    lib = tvm.compile(sch.mod, target=tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake"}))
    if not detect_host().has_vnni:
        pytest.skip("this CPU has no VNNI: compiled, not run")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, x_shape).astype(np.uint8)
    wt = rng.integers(-128, 128, w_shape).astype(np.int8)
    out = tvm.runtime.tensor(np.zeros(out_shape, np.int32))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(wt), out)
    expected = np.einsum("nchwi,ocabki->nohwk", x.astype(np.int64), wt.astype(np.int64))
    np.testing.assert_array_equal(out.numpy(), expected)


def _hand_written_matmul_qdq(path: Path) -> Path:
    """DQ -> MatMul -> Q on a [1, 5, 10] uint8 activation (zero point 131) and a [10, 6] int8 weight
    per output column: leading dimensions, and K and N that are not multiples of the 4x4 blocks."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(6)
    inits = [
        numpy_helper.from_array(np.array(0.04, np.float32), "sx"), numpy_helper.from_array(np.array(131, np.uint8), "zx"),
        numpy_helper.from_array(rng.integers(-127, 128, (10, 6)).astype(np.int8), "wq"),
        numpy_helper.from_array(rng.uniform(0.002, 0.02, 6).astype(np.float32), "sw"),
        numpy_helper.from_array(np.zeros(6, np.int8), "zw"),
        numpy_helper.from_array(np.array(0.05, np.float32), "sy"), numpy_helper.from_array(np.array(120, np.uint8), "zy"),
    ]  # fmt: skip
    nodes = [
        helper.make_node("QuantizeLinear", ["input", "sx", "zx"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["x"]),
        helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["w"], axis=1),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
        helper.make_node("QuantizeLinear", ["y", "sy", "zy"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["output"]),
    ]
    graph = helper.make_graph(nodes, "matmul", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 5, 10])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 5, 6])], inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_dotprod_layout_computes_what_nchw_integer_kernels_compute(tmp_path: Path) -> None:
    """The ARM dot-product form (uint8 activations shifted into int8, zero point moved with them;
    blocks padded with the zero point and zero weights) is the same integer arithmetic as the plain
    kernels: equal outputs, element for element, on the tiny CNN and on a 3-D MatMul whose K and N
    are not multiples of 4."""
    x = _inputs(8, seed=7)
    path = _quantize(tmp_path)
    out, report = _tvm_outputs(path, x, dotprod_layout=True)
    plain, _ = _tvm_outputs(path, x)
    assert report.blocked == 3
    np.testing.assert_array_equal(out, plain)

    matmul = _hand_written_matmul_qdq(tmp_path / "matmul.onnx")
    xm = np.random.default_rng(8).standard_normal((6, 5, 10)).astype(np.float32) * 2
    out, report = _tvm_outputs(matmul, xm, dotprod_layout=True)
    plain, _ = _tvm_outputs(matmul, xm)
    assert (report.integer, report.requantized, report.blocked) == (1, 1, 1), report
    np.testing.assert_array_equal(out, plain)
    ref = _ort_outputs(matmul, xm)
    assert _sqnr_db(out, ref) >= 30.0 and np.abs(out - ref).max() <= 0.05 + 1e-6  # at most one output step


def test_dotprod_layout_follows_the_target() -> None:
    """ARM64 targets whose CPU has the dot-product extension (``+dotprod``, or an ``mcpu`` such as
    cortex-a76 that implies it) get the blocked layouts; a Cortex-A53 and x86 do not."""
    import tvm

    from edgecompress.export.tvm import compile as tc
    from edgecompress.export.tvm.int8 import Int8Kernels
    from edgecompress.targets import get_target

    def kernels(spec: dict[str, Any], enabled: bool = True) -> Int8Kernels:
        return Int8Kernels.for_target(tvm.target.Target(spec), enabled=enabled)

    for name in ("arm64-linux", "arm64-android"):  # cortex-a76 without and with +dotprod in mattr
        k = Int8Kernels.for_target(tc.tvm_target(get_target(name)), enabled=True)
        assert k.dotprod_layout and not k.vnni_layout, name
    a53 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a53", "mattr": ["+neon"]}
    assert not kernels(a53).dotprod_layout
    assert kernels({**a53, "mattr": ["+neon", "+v8.2a", "+dotprod"]}).dotprod_layout
    assert not kernels({"kind": "llvm", "mcpu": "cascadelake"}).dotprod_layout
    assert not kernels({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76"}, enabled=False).dotprod_layout


def test_arm64_sdot_intrinsic_builds_and_tensorizes_the_blocked_conv() -> None:
    """TVM 0.27's ``dot_4x4_i8i8s32_sdot`` compiles to ``sdot`` with the bundled LLVM, and every
    MetaSchedule candidate of a blocked int8 convolution for arm64-linux tensorizes with it; for a
    Cortex-A53 (no dot product) no candidate contains ``sdot``."""
    import tvm

    from edgecompress.export.tvm import compile as tc
    from edgecompress.export.tvm.int8_arm import (
        IC_BLOCK,
        OC_BLOCK,
        dotprod_intrinsic_builds,
        sample_candidates,
    )
    from edgecompress.export.tvm.int8_blocked import conv2d_nchwc_int8
    from edgecompress.targets import get_target

    conv = conv2d_nchwc_int8([1, 4, 6, 6, IC_BLOCK], [4, 4, 3, 3, OC_BLOCK, IC_BLOCK], [1, 4, 4, 4, OC_BLOCK],
                             [1, 1], [1, 1], x_dtype="int8")  # fmt: skip
    candidates = sample_candidates(conv, tc.tvm_target(get_target("arm64-linux")), trials=3)
    assert dotprod_intrinsic_builds()
    assert len(candidates) == 3 and all(c.error is None for c in candidates), candidates
    assert all(c.tensorized and c.sdot > 0 for c in candidates), candidates
    a53 = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a53", "mattr": ["+neon"],
                             "num-cores": 4})  # MetaSchedule needs the core count
    assert all(c.sdot == 0 and c.error is None for c in sample_candidates(conv, a53, trials=2))


def test_arm64_export_writes_the_dotprod_layout(tmp_path: Path) -> None:
    """``export_tvm_from_onnx`` for arm64-linux lowers the QDQ graph into the dot-product layouts
    and says so in the manifest (the code runs on the device: tests/test_device_emu.py)."""
    from edgecompress.export.tvm import export_tvm_from_onnx
    from edgecompress.targets import get_target

    src = _artifact(_quantize(tmp_path), tmp_path / "onnx")
    art = export_tvm_from_onnx(src, get_target("arm64-linux"), tmp_path / "arm64", use_database=False)
    info = art.manifest.extra["int8_kernels"]
    assert (info["integer"], info["requantized"], info["float"], info["dotprod_layout"], info["vnni_layout"]) == (4, 4, 0, 3, 0)
    assert any("3 in ARM dot-product layouts" in n for n in art.manifest.extra["notes"])
    assert art.model_path.suffix in (".so", ".tar")


def test_example_cnn_int8_matches_onnxruntime(cnn_onnx: Path, mnist_splits: Any, tmp_path: Path) -> None:
    """The trained example CNN quantized by the Quantune backend (MinMax, per channel) on real MNIST
    digits: every conv and Gemm an integer kernel, outputs onnxruntime's."""
    from edgecompress.compress.ptq.config import PTQConfig
    from edgecompress.compress.ptq.ort_backend import prepare_model, quantize_to_file

    prepared = prepare_model(cnn_onnx, tmp_path / "prep")
    quantize_to_file(prepared, PTQConfig(calibration="minmax", calib_size=16, per_channel=True),
                     {"input": mnist_splits.calib.x[:16]}, tmp_path / "int8.onnx", tmp_path / "calib")  # fmt: skip
    x = mnist_splits.test.x[:64]
    out, report = _tvm_outputs(tmp_path / "int8.onnx", x, vnni_layout=True)
    ref = _ort_outputs(tmp_path / "int8.onnx", x)
    assert report.float_ops == 0 and report.integer == report.requantized == 4
    assert _sqnr_db(out, ref) >= 30.0
    assert float(np.mean(out.argmax(1) == ref.argmax(1))) >= 0.99


@pytest.mark.slow
def test_efficientnet_lite1_int8_matches_onnxruntime(tmp_path: Path) -> None:
    """EfficientNet-Lite1 quantized by the Quantune backend (MinMax, 16 photo crops, per channel):
    TVM's integer kernels agree with onnxruntime (SQNR >= 30 dB, top-1 agreement >= 99 %)."""
    from edgecompress.compress.checkpoint import load_checkpoint
    from edgecompress.compress.data import _normalize
    from edgecompress.compress.examples import example_checkpoint
    from edgecompress.compress.exporting import export_torch_onnx
    from edgecompress.compress.ptq.config import PTQConfig
    from edgecompress.compress.ptq.ort_backend import prepare_model, quantize_to_file
    from edgecompress.compress.realdata import photo_crops
    from edgecompress.targets import get_target

    bundle = load_checkpoint(example_checkpoint("efficientnet-lite1"))
    art = export_torch_onnx(bundle, tmp_path / "onnx", target=get_target("x86-64"))
    x = _normalize(photo_crops(bundle.input_shape[-1], 48, seed=0), bundle.preprocessing)
    prepared = prepare_model(art.model_path, tmp_path / "prep")
    quantize_to_file(prepared, PTQConfig(calibration="minmax", calib_size=16, per_channel=True), {"input": x[:16]},
                     tmp_path / "int8.onnx", tmp_path / "calib")  # fmt: skip
    out, report = _tvm_outputs(tmp_path / "int8.onnx", x[16:], vnni_layout=True)
    ref = _ort_outputs(tmp_path / "int8.onnx", x[16:])
    assert report.float_ops == 0 and report.integer == report.requantized == 65
    assert _sqnr_db(out, ref) >= 30.0
    assert float(np.mean(out.argmax(1) == ref.argmax(1))) >= 0.99
