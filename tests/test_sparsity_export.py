"""Export: exact zeros in the ONNX file, the pattern verified on its initializers, manifest, stage and CLI."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from edgecompress.compress.checkpoint import ModelBundle, load_checkpoint
from edgecompress.compress.sparsity.api import apply_nm_sparsity
from edgecompress.compress.sparsity.config import NMSparsityConfig
from edgecompress.compress.sparsity.export import (
    NMVerificationError,
    export_sparse_onnx,
    verify_artifact_nm,
    verify_onnx_nm,
)


def _sparse(name: str, pattern: str) -> ModelBundle:
    from edgecompress.compress.models import create_model

    torch.manual_seed(0)
    bundle = ModelBundle(create_model(name), name, (1, 28, 28), {}, 10, {})
    return apply_nm_sparsity(bundle, NMSparsityConfig(pattern=pattern, method="oneshot"))[0]


@pytest.mark.parametrize(("name", "pattern"), [("cnn", "2:4"), ("vit", "1:8")])
def test_exported_onnx_follows_the_pattern_layer_by_layer(name: str, pattern: str, tmp_path) -> None:
    sparse = _sparse(name, pattern)
    art = export_sparse_onnx(sparse, tmp_path / "art")
    info = art.manifest.metrics["nm_sparsity"]
    record = sparse.metadata["nm_sparsity"]
    assert info["verified"] and set(info["layers"]) == set(record["layers"])
    n, m = record["n"], record["m"]
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(art.model_path)).graph.initializer}
    for layer, entry in info["layers"].items():
        arr = inits[entry["initializer"]]
        assert entry["violations"] == 0
        if record["layers"][layer]["padded"]:
            continue
        assert entry["sparsity"] == pytest.approx(1 - n / m, abs=1e-6)  # exact zeros survived export
        assert (arr == 0).mean() == pytest.approx(1 - n / m, abs=1e-6)
    size = info["compressed_size_fp32"]
    assert size["compressed_bytes"] < size["dense_bytes"]
    assert verify_artifact_nm(art)["verified"]


def test_verifier_catches_a_broken_group_in_the_file(tmp_path) -> None:
    sparse = _sparse("cnn", "2:4")
    art = export_sparse_onnx(sparse, tmp_path / "art")
    info = art.manifest.metrics["nm_sparsity"]
    target = info["layers"]["classifier.1"]["initializer"]
    model = onnx.load(str(art.model_path))
    for init in model.graph.initializer:
        if init.name == target:
            arr = numpy_helper.to_array(init).copy()
            arr[0, :4] = 1.0  # four non-zeros in one group of 4
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    mapping = {k: v["initializer"] for k, v in info["layers"].items()}
    with pytest.raises(NMVerificationError, match="classifier.1"):
        verify_onnx_nm(broken, sparse.metadata["nm_sparsity"], mapping=mapping)
    # Without a mapping it finds the layers by content (BatchNorm-folded convs by zero positions).
    weights = {k: dict(sparse.module.named_modules())[k].weight.detach().numpy() for k in info["layers"]}
    found = verify_onnx_nm(art.model_path, sparse.metadata["nm_sparsity"], weights=weights)
    assert {k: v["initializer"] for k, v in found["layers"].items()} == mapping


def test_verifier_reads_quantized_weights_through_dequantize_linear(tmp_path) -> None:
    """A QDQ graph (int8 weights -> DequantizeLinear -> Gemm) is checked on the int8 initializer."""
    from onnx import TensorProto, helper

    w = np.zeros((4, 8), dtype=np.int8)
    w[:, ::4] = 5
    w[:, 1::4] = -3
    nodes = [
        helper.make_node("DequantizeLinear", ["w_q", "s", "z"], ["w"]),
        helper.make_node("Gemm", ["x", "w"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(w, "w_q"), numpy_helper.from_array(np.array(0.1, np.float32), "s"),
         numpy_helper.from_array(np.array(0, np.int8), "z")],
    )  # fmt: skip
    path = tmp_path / "q.onnx"
    onnx.save(helper.make_model(graph), str(path))
    record = {"n": 2, "m": 4, "layers": {"fc": {}}}
    ok = verify_onnx_nm(path, record, weights={"fc": w.astype(np.float32)})
    assert ok["layers"]["fc"] == {**ok["layers"]["fc"], "initializer": "w_q", "violations": 0}
    with pytest.raises(NMVerificationError, match="1:4"):
        verify_onnx_nm(path, {"n": 1, "m": 4, "layers": {"fc": {}}}, mapping={"fc": "w_q"})


def test_sparsify_stage_round_trip_keeps_the_pattern(tmp_path, mnist_splits) -> None:
    from edgecompress.compress.stages import StageContext, get_stage

    spec = get_stage("sparsify")
    cfg = spec.config_cls(pattern="1:4", method="oneshot")
    from edgecompress.compress.models import create_model

    torch.manual_seed(0)
    bundle = ModelBundle(create_model("cnn"), "cnn", (1, 28, 28), {}, 10, {})
    out = spec.run(bundle, cfg, StageContext(out_dir=tmp_path, splits=mnist_splits))
    assert out.bundle is not None and out.bundle.metadata["nm_sparsity"]["pattern"] == "1:4"
    reloaded = spec.load(tmp_path, bundle, cfg)
    assert reloaded.bundle is not None
    for k, v in out.bundle.module.state_dict().items():
        assert torch.equal(reloaded.bundle.module.state_dict()[k], v)
    assert reloaded.bundle.metadata["nm_sparsity"]["layers"] == out.bundle.metadata["nm_sparsity"]["layers"]
    assert "test_accuracy" in reloaded.metrics


@pytest.fixture(scope="module")
def cnn_file(tmp_path_factory: pytest.TempPathFactory):
    """An (untrained) example CNN checkpoint: the CLI tests check mechanics, not accuracy."""
    from edgecompress.compress.checkpoint import save_checkpoint
    from edgecompress.compress.models import create_model

    torch.manual_seed(0)
    bundle = ModelBundle(create_model("cnn"), "cnn", (1, 28, 28), {}, 10, {})
    return save_checkpoint(
        bundle, tmp_path_factory.mktemp("nmcnn") / "cnn.pt", model_kwargs={"num_classes": 10}
    )


def test_cli_sparsify_writes_checkpoint_and_verified_artifact(cli, cnn_file, tmp_path) -> None:
    out = tmp_path / "nm"
    code, stdout, err = cli("sparsify", cnn_file, "--data", "mnist", "--pattern", "2:4", "--method", "sdgf",
                            "--sdgf", "geometric", "--max-steps", "3", "-o", out, "--json")  # fmt: skip
    assert code == 0, err
    result = json.loads(stdout)
    assert result["pattern_verified_on_onnx"] is True
    assert result["config"]["sdgf_schedule"] == "geometric" and result["metrics"]["train_steps"] == 3
    assert 0 < result["metrics"]["onnx_test_accuracy"] <= 100
    sparse = load_checkpoint(out / "sparse.pt")
    assert sparse.metadata["nm_sparsity"]["pattern"] == "2:4"
    w = sparse.module.classifier[1].weight.detach()
    assert torch.all((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2)
    from edgecompress.export import load_artifact

    assert load_artifact(out / "onnx").manifest.metrics["nm_sparsity"]["verified"]


def test_cli_sparsify_bad_inputs_exit_2(cli, cnn_file, tmp_path) -> None:
    code, _, err = cli("sparsify", cnn_file, "--pattern", "4:2", "--method", "oneshot", "-o", tmp_path / "x")
    assert code == 2 and "4:2" in err
    code, _, err = cli("sparsify", cnn_file, "--pattern", "2:4", "--method", "srste", "-o", tmp_path / "y")
    assert code == 2 and "--data" in err
    code, _, err = cli("sparsify", cnn_file, "--method", "magic", "-o", tmp_path / "z")
    assert code == 2 and "magic" in err


def test_generic_export_of_a_sparse_model_verifies_the_pattern(tmp_path) -> None:
    """Recipes and ``compress export`` go through export_model: a marked sparse model is checked there too."""
    from edgecompress.compress.exporting import export_model
    from edgecompress.export.errors import ExportError

    sparse = _sparse("cnn", "2:4")
    art = export_model(sparse, "onnx", None, tmp_path / "ok")
    assert any(s.config.get("exporter") == "nm-sparse" for s in art.manifest.stages)
    with torch.no_grad():
        sparse.module.classifier[1].weight[0, :4] = 1.0  # break one group after sparsifying
    with pytest.raises(ExportError, match="classifier.1"):
        export_model(sparse, "onnx", None, tmp_path / "broken")


def test_gpu_target_gets_the_tensorrt_sparsity_hint_and_no_speed_claim(tmp_path) -> None:
    from edgecompress.targets import get_target

    art = export_sparse_onnx(_sparse("cnn", "2:4"), tmp_path / "gpu", target=get_target("cuda-sm80"))
    hint = art.manifest.metrics["nm_sparsity"]["runtime_hint"]
    assert (
        hint["TensorrtExecutionProvider"] == {"trt_sparsity_enable": True} and "not measured" in hint["note"]
    )
    cpu = export_sparse_onnx(_sparse("cnn", "2:4"), tmp_path / "cpu", target=get_target("x86-64"))
    assert "runtime_hint" not in cpu.manifest.metrics["nm_sparsity"]


def test_cli_refuses_a_target_without_nm_sparse_support(cli, cnn_file, tmp_path) -> None:
    code, _, err = cli(
        "sparsify", cnn_file, "--method", "oneshot", "--target", "opencl-mali", "-o", tmp_path / "m"
    )
    assert code == 3 and "nm-sparse" in err
