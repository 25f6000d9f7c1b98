"""Codebook (JLCM) graphs compile with TVM: functions inlined, shape arithmetic folded, codes kept packed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn


def _codebook_bundle():
    from edgecompress.compress.checkpoint import ModelBundle
    from edgecompress.compress.codebook.api import apply_jlcm
    from edgecompress.compress.codebook.config import JLCMConfig

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    cfg = JLCMConfig(bits=3, groups=4, variant="scales", steps=0, calib_samples=32)  # type: ignore[arg-type]
    small, _ = apply_jlcm(model, torch.randn(32, 1, 8, 8), cfg)
    return ModelBundle(small, "mlp", (1, 8, 8), {}, 10, {})


def test_shape_arithmetic_is_folded_and_exact() -> None:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgecompress.export.tvm.onnx_prep import prepare_for_tvm

    shape = numpy_helper.from_array(np.array([2, 3], np.int64), "shape")
    nodes = [
        helper.make_node("ReduceProd", ["shape"], ["n"], keepdims=0),
        helper.make_node("Range", ["zero", "n", "one"], ["idx"]),
        helper.make_node("Reshape", ["idx", "shape"], ["grid"]),
        helper.make_node("Cast", ["grid"], ["gridf"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["input", "gridf"], ["output"]),
    ]
    consts = [numpy_helper.from_array(np.array(0, np.int64), "zero"), numpy_helper.from_array(np.array(1, np.int64), "one")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [2, 3])],
                              initializer=[shape, *consts])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    prepared = prepare_for_tvm(model)
    onnx.checker.check_model(prepared)
    ops = [n.op_type for n in prepared.graph.node]
    assert "Range" not in ops and "ReduceProd" not in ops and ops.count("Add") == 1
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]

    np.testing.assert_array_equal(run(prepared), run(model))


def test_codebook_model_compiles_and_keeps_codes_packed(tmp_path: Path) -> None:
    from edgecompress.compress.exporting import export_model
    from edgecompress.export.tvm.compile import load_params
    from edgecompress.runtimes.tvm_runtime import TvmRuntime
    from edgecompress.targets import get_target

    bundle = _codebook_bundle()
    art = export_model(bundle, "tvm", get_target("x86-64"), tmp_path / "tvm")
    assert art.manifest.metrics["export_check"]["max_abs_error"] < 1e-4  # checked against onnxruntime
    params = load_params(Path(art.path) / art.manifest.extra["params_file"])
    assert any(str(p.dtype) == "uint8" for p in params)  # the packed codes, not dense weights
    dense_bytes = (64 * 256 + 256 + 256 * 10 + 10) * 4  # the fp32 model's weights
    assert sum(p.numpy().nbytes for p in params) < dense_bytes / 4
    x = np.random.default_rng(1).standard_normal((3, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        ref = bundle.module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(TvmRuntime().prepare(art).run(x), ref, rtol=1e-4, atol=1e-4)
