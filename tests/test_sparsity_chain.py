"""The N:M pattern survives the stages that follow ``sparsify``: ``ptq`` (int8 QDQ ONNX) and ``qat``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgecompress.compress.checkpoint import ModelBundle
from edgecompress.compress.data import Splits
from edgecompress.compress.sparsity.api import check_module_pattern
from edgecompress.compress.stages import StageContext, get_stage


@pytest.fixture(scope="module")
def small_splits(mnist_splits: Splits) -> Splits:
    idx = np.arange(128)
    return Splits(mnist_splits.train.subset(idx), mnist_splits.calib.subset(idx[:32]), mnist_splits.val.subset(idx[:64]),
                  mnist_splits.test.subset(idx[:64]))  # fmt: skip


def _sparse_cnn(tmp_path, splits: Splits, pattern: str = "2:4", lock: bool = False) -> ModelBundle:
    from edgecompress.compress.models import create_model

    torch.manual_seed(0)
    bundle = ModelBundle(create_model("cnn"), "cnn", (1, 28, 28), {}, 10, {})
    spec = get_stage("sparsify")
    out = spec.run(bundle, spec.config_cls(pattern=pattern, method="oneshot", lock_pattern=lock),
                   StageContext(out_dir=tmp_path / "sparsify", splits=splits))  # fmt: skip
    assert out.bundle is not None
    return out.bundle


def test_pattern_survives_ptq_int8_qdq(tmp_path, small_splits: Splits) -> None:
    """sparsify -> ptq: the int8 weights of the QDQ ONNX graph keep N:M zeros (checked on the file)."""
    from edgecompress.compress.sparsity.export import verify_onnx_nm

    sparse = _sparse_cnn(tmp_path, small_splits)
    spec = get_stage("ptq")
    cfg = spec.config_cls(search="none", sensitivity=False, use_seed_database=False,
                          database=str(tmp_path / "db.sqlite"), val_samples=32)  # fmt: skip
    out = spec.run(sparse, cfg, StageContext(out_dir=tmp_path / "ptq", splits=small_splits))
    record = sparse.metadata["nm_sparsity"]
    mods = dict(sparse.module.named_modules())
    weights = {k: mods[k].weight.detach().numpy() for k in record["layers"]}
    check = verify_onnx_nm(out.artifact.model_path, record, weights=weights)
    assert check["verified"]
    import onnx
    from onnx import numpy_helper

    inits = {i.name: i for i in onnx.load(str(out.artifact.model_path)).graph.initializer}
    dtypes = {numpy_helper.to_array(inits[v["initializer"]]).dtype for v in check["layers"].values()}
    assert dtypes & {np.dtype(np.int8), np.dtype(np.uint8)}  # it checked integer weights, not float ones
    assert check["layers"]["classifier.1"]["sparsity"] >= 0.5


def _quantized_weights(model) -> dict[str, torch.Tensor]:
    from edgecompress.compress.qat.quantizers import quant_wrappers

    with torch.no_grad():
        return {name: w.weight_quant(w.layer.weight) for name, w in quant_wrappers(model)}


@pytest.mark.parametrize("locked", [True, False])
def test_pattern_survives_qat(locked: bool, tmp_path, small_splits: Splits) -> None:
    """sparsify -> qat: the fake-quantized weights keep N:M zeros after QAT training.

    The qat stage locks the pattern it finds in the model's metadata, so the zeros hold whether or
    not the sparsify stage was told to lock it (``lock_pattern``).
    """
    from torch.nn.utils import parametrize

    sparse = _sparse_cnn(tmp_path, small_splits, lock=locked)
    record = sparse.metadata["nm_sparsity"]
    assert parametrize.is_parametrized(sparse.module.classifier[1], "weight") == locked
    spec = get_stage("qat")
    cfg = spec.config_cls(bits=8, method="qat", max_steps=4, batch_size=16, warmup_steps=0, eval_every=4,
                          checkpoint_every=4)  # fmt: skip
    out = spec.run(sparse, cfg, StageContext(out_dir=tmp_path / "qat", splits=small_splits))
    assert out.bundle is not None
    violations = check_module_pattern(
        out.bundle.module, record, weights=_quantized_weights(out.bundle.module)
    )
    assert all(v == 0 for v in violations.values()), violations
    # The finished stage reloads (resume/caching) with the same pattern.
    again = spec.load(tmp_path / "qat", sparse, cfg)
    violations = check_module_pattern(again.bundle.module, record, weights=_quantized_weights(again.bundle.module))
    assert all(v == 0 for v in violations.values()), violations


def test_pattern_survives_codebook(tmp_path, small_splits: Splits) -> None:
    """sparsify -> codebook: the pruned weights map to a reserved exact-zero codeword, in torch and in ONNX."""
    import json

    import onnxruntime as ort

    from edgecompress.compress.codebook.artifact import export_codebook_artifact
    from edgecompress.compress.codebook.layers import CODEBOOK_LAYERS

    sparse = _sparse_cnn(tmp_path, small_splits)
    record = sparse.metadata["nm_sparsity"]
    spec = get_stage("codebook")
    cfg = spec.config_cls(bits=3, groups=4, steps=6, calib_samples=32, batch_size=16)
    out = spec.run(sparse, cfg, StageContext(out_dir=tmp_path / "codebook", splits=small_splits))
    assert out.bundle is not None
    module = out.bundle.module
    mods = dict(module.named_modules())
    assert all(isinstance(mods[name], CODEBOOK_LAYERS) for name in record["layers"])
    weights = {name: mods[name].weight_store() for name in record["layers"]}
    violations = check_module_pattern(module, record, weights=weights)
    assert all(v == 0 for v in violations.values()), violations
    for name in record["layers"]:  # exactly the input's zeros are kept (as zeros)
        dense = dict(sparse.module.named_modules())[name].weight.detach()
        assert bool((weights[name][dense == 0] == 0).all()), name
    report = json.loads((tmp_path / "codebook" / "codebook_report.json").read_text())
    assert report["nm_violations"] == {name: 0 for name in record["layers"]}
    # the zero codeword is an ordinary codebook entry: no mask is stored
    assert report["accounting"]["bits_per_weight"] < 3.5

    x = torch.from_numpy(small_splits.val.x[:8]).float()
    art = export_codebook_artifact(out.bundle, tmp_path / "art", report, measure_memory=False)
    assert art.manifest.format == "onnx-codebook"
    assert art.manifest.metrics["export_check"]["sqnr_db"] >= 40.0
    sess = ort.InferenceSession(str(art.model_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = module(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
