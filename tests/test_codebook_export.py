"""The onnx-codebook export: in-graph reconstruction matches torch, the file holds what the accounting says."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from edgecompress.compress.checkpoint import ModelBundle
from edgecompress.compress.codebook.api import apply_jlcm
from edgecompress.compress.codebook.artifact import export_codebook_artifact, session_memory
from edgecompress.compress.codebook.config import JLCMConfig
from edgecompress.compress.codebook.layers import model_accounting


def _mlp_bundle(bits: int, variant: str) -> tuple[ModelBundle, dict]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 10)).eval()  # fmt: skip
    calib = torch.randn(32, 1, 8, 8)
    cfg = JLCMConfig(bits=bits, groups=4, variant=variant, steps=0, calib_samples=32)  # type: ignore[arg-type]
    small, report = apply_jlcm(model, calib, cfg)
    return ModelBundle(small, "mlp", (1, 8, 8), {}, 10, {}), report


@pytest.mark.parametrize(("bits", "variant"), [(2, "scales"), (3, "codebooks"), (4, "scales")])
def test_file_size_matches_accounting_and_ort_matches_torch(tmp_path: Path, bits: int, variant: str) -> None:
    bundle, report = _mlp_bundle(bits, variant)
    art = export_codebook_artifact(bundle, tmp_path / "art", report, measure_memory=False)
    m = art.manifest.metrics
    assert art.manifest.format == "onnx-codebook"
    assert m["export_check"]["sqnr_db"] >= 40.0
    size = m["size_check"]
    assert size["tensor_difference_bytes"] == 0  # every stored tensor byte is accounted, nothing else stored
    acct = model_accounting(bundle.module)
    # the file = accounted tensors + the graph container (operators, names, shapes), within 2 %
    assert abs(size["relative_difference"]) < 0.02
    assert size["graph_bytes"] < 6000  # the container is small and does not grow with the weights
    assert size["file_bytes"] < acct["fp32_bytes"] / 6  # no dense float copy of the weights in the file
    assert bits <= acct["bits_per_weight"] < bits + 0.2
    graph = onnx.load(str(art.model_path))
    assert not any(t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2 and t.dims[0] >= 256
                   for t in graph.graph.initializer)  # fmt: skip
    assert {f.name for f in graph.functions} >= {n.op_type for n in graph.graph.node if n.domain}


def test_inlined_graph_runs_without_functions(tmp_path: Path) -> None:
    import onnx.inliner
    import onnxruntime as ort

    bundle, report = _mlp_bundle(3, "scales")
    art = export_codebook_artifact(bundle, tmp_path / "art", report, measure_memory=False)
    flat = onnx.inliner.inline_local_functions(onnx.load(str(art.model_path)))
    assert not flat.functions
    x = np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32)
    out = ort.InferenceSession(flat.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    with torch.no_grad():
        ref = bundle.module(torch.from_numpy(x)).numpy()
    assert np.allclose(out, ref, atol=1e-4)


def test_cnn_at_two_bits_exports_small(tmp_path: Path, mnist_splits) -> None:
    from edgecompress.compress.models import create_model

    torch.manual_seed(0)
    model = create_model("cnn").eval()
    for m in model.modules():  # distinct BatchNorm tensors (identical ones are deduplicated by the exporter)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    base = ModelBundle(model, "cnn", (1, 28, 28), {}, 10, {})
    calib = torch.from_numpy(mnist_splits.calib.x[:64])
    small, report = apply_jlcm(base.module, calib, JLCMConfig(bits=2, groups=4, steps=5, calib_samples=64))
    bundle = ModelBundle(small, "cnn", base.input_shape, base.preprocessing, 10, {})
    art = export_codebook_artifact(bundle, tmp_path / "cnn", report, verify_inputs=mnist_splits.test.x[:8],
                                   measure_memory=False)  # fmt: skip
    m = art.manifest.metrics
    assert m["bits_per_weight"] < 2.5
    assert m["size_check"]["tensor_difference_bytes"] == 0
    assert m["size_check"]["file_bytes"] < m["size_check"]["fp32_payload_bytes"] / 8
    assert m["export_check"]["sqnr_db"] >= 40.0


@pytest.mark.slow
def test_session_memory_is_measured(tmp_path: Path) -> None:
    bundle, report = _mlp_bundle(2, "scales")
    art = export_codebook_artifact(bundle, tmp_path / "art", report, measure_memory=True)
    mem = art.manifest.metrics["memory"]
    assert mem["fp32_file_bytes"] > art.manifest.metrics["size_check"]["file_bytes"] * 6
    assert mem["codebook_none"]["peak_bytes"] > 0 and mem["fp32_all"]["peak_bytes"] > 0
    assert session_memory(art.model_path)["rss_after_load"] > 0
