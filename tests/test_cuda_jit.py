"""CUDA artifacts without a GPU here: valid kernel argument names, the load-time JIT, the RPC server Python."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest


def _slashed_graph():
    """A small ONNX graph named the way torch's exporter names constants (``/blocks/.../Pow``)."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3) / 10, "/blocks/blocks.0/fc/weight")
    e = numpy_helper.from_array(np.array(2.0, np.float32), "/blocks/attn/Pow_output_0")
    e2 = numpy_helper.from_array(np.array(3.0, np.float32), "_blocks_attn_Pow_output_0")  # sanitizes alike
    nodes = [
        helper.make_node("MatMul", ["input", "/blocks/blocks.0/fc/weight"], ["/blocks/fc/MatMul_output_0"]),
        helper.make_node("Pow", ["/blocks/fc/MatMul_output_0", "/blocks/attn/Pow_output_0"], ["1st"]),
        helper.make_node("Mul", ["1st", "_blocks_attn_Pow_output_0"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3])], initializer=[w, e, e2],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _ort(model, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def test_sanitized_names_are_c_identifiers_and_compute_the_same() -> None:
    import re

    import onnx

    from edgecompress.export.tvm.onnx_prep import sanitize_onnx_names

    model = _slashed_graph()
    clean = sanitize_onnx_names(model)
    onnx.checker.check_model(clean)
    names = [i.name for i in clean.graph.initializer] + [o for n in clean.graph.node for o in n.output]
    assert all(re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", n) for n in names), names
    assert len(set(names)) == len(names)  # two names that sanitize alike stay distinct
    assert [v.name for v in clean.graph.input] == ["input"] and [v.name for v in clean.graph.output] == ["output"]
    assert model.graph.initializer[0].name == "/blocks/blocks.0/fc/weight"  # the input model is untouched
    x = np.random.default_rng(0).standard_normal((1, 4)).astype(np.float32)
    np.testing.assert_allclose(_ort(clean, x), _ort(model, x), rtol=1e-6)


def test_cuda_kernels_get_valid_argument_names() -> None:
    """The TVM import sanitizes names, so generated CUDA has no '/' in kernel signatures."""
    import re

    from edgecompress.export.tvm import compile as tc
    from edgecompress.targets import get_target

    target = get_target("cuda-sm90")
    mod, _ = tc.import_onnx(_slashed_graph(), {"input": [1, 4]}, target.name)
    source = tc.build(mod, tc.tvm_target(target)).mod.imports[0].imports[0].inspect_source("cuda")
    signatures = re.findall(r"__global__ void (?:__launch_bounds__\(\d+\) )?\w+\(([^)]*)\)", source)
    assert signatures and not any("/" in s or "." in s.replace("float* __restrict__", "") for s in signatures)


def test_jit_needs_a_cuda_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    from edgecompress.runtimes import cuda_jit
    from edgecompress.runtimes.errors import RuntimeUnavailableError

    monkeypatch.delenv("TVM_CUDA_COMPILE_MODE", raising=False)
    monkeypatch.setattr(cuda_jit.shutil, "which", lambda name: None)
    monkeypatch.setattr(cuda_jit.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeUnavailableError, match="neither NVRTC .* nor nvcc"):
        cuda_jit.compiler_mode()
    with pytest.raises(RuntimeUnavailableError, match="nvcc is not on PATH"):
        cuda_jit.compile_with_nvcc("__global__ void k() {}", "sm_90")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) is not installed on this machine")
def test_nvcc_compiles_for_the_artifact_arch_and_reports_errors() -> None:
    from edgecompress.runtimes.cuda_jit import compile_with_nvcc
    from edgecompress.runtimes.errors import RuntimeUnavailableError

    fatbin = compile_with_nvcc('extern "C" __global__ void k(float* a) { a[threadIdx.x] *= 2.0f; }', "sm_90")
    assert len(fatbin) > 100
    with pytest.raises(RuntimeUnavailableError, match=r"sm_90: .*error"):
        compile_with_nvcc('extern "C" __global__ void k(float* /bad/name) {}', "sm_90")


def test_server_python_serves_models(untrained_cnn_checkpoint: Path, tmp_path: Path) -> None:
    """The CUDA-JIT server Python runs TVM's RPC server with spawned sessions; a CPU model checks the path."""
    from edgecompress.compress.checkpoint import load_checkpoint
    from edgecompress.compress.exporting import export_model
    from edgecompress.runtimes.cuda_jit import write_server_python
    from edgecompress.runtimes.tvm_rpc import DeviceServer, remote_session
    from edgecompress.runtimes.tvm_runtime import TvmRuntime
    from edgecompress.targets import get_target

    art = export_model(load_checkpoint(untrained_cnn_checkpoint), "tvm", get_target("x86-64"), tmp_path / "a")
    python = write_server_python(tmp_path, sys.executable)
    assert "--no-fork" in python.read_text()
    x = np.random.default_rng(1).standard_normal((2, 1, 28, 28)).astype(np.float32)
    with DeviceServer(9377, key="k", python=str(python)) as srv:
        session = remote_session(art, srv.address, key="k", timeout=90)
        try:
            remote = session.run(x)
        finally:
            session.close()
    np.testing.assert_allclose(remote, TvmRuntime().prepare(art).run(x), rtol=1e-5, atol=1e-5)


def test_device_error_text_survives() -> None:
    """An error raised on the device reaches the user with the device's own message."""
    from edgecompress.runtimes.tvm_rpc import _first_line

    text = ("RPCError: Error caught from RPC call:\n  File \"/x/cuda_jit.py\", line 70, in compile_source\n"
            "    return compile_with_nvcc(code, target_arch)\n"
            "edgecompress.runtimes.errors.RuntimeUnavailableError: nvcc could not compile the kernels for sm_90: k.cu(3): error")  # fmt: skip
    line = _first_line(RuntimeError(text))
    assert line.startswith("RPCError") and "nvcc could not compile the kernels for sm_90" in line


def test_device_server_loads_cuda_artifacts_where_a_driver_is(monkeypatch: pytest.MonkeyPatch) -> None:
    from edgecompress.compress.cli import device_server_cmd

    monkeypatch.setattr("edgecompress.runtimes.cuda_jit.cuda_driver_present", lambda: True)
    server, note = device_server_cmd._native_server(9999, key="k", host="127.0.0.1", tracker=None)
    assert Path(server.python).name == "python-cuda-jit" and "CUDA driver found" in note
    monkeypatch.setattr("edgecompress.runtimes.cuda_jit.cuda_driver_present", lambda: False)
    server, note = device_server_cmd._native_server(9999, key="k", host="127.0.0.1", tracker=None)
    assert server.python == sys.executable and note == ""
