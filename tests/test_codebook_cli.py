"""``compress codebook`` and the ``codebook`` recipe stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def cnn_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained, seeded example CNN (the CLI and stage mechanics need no trained weights)."""
    from edgecompress.compress.checkpoint import ModelBundle, save_checkpoint
    from edgecompress.compress.models import create_model

    torch.manual_seed(0)
    bundle = ModelBundle(create_model("cnn").eval(), "cnn", (1, 28, 28), {}, 10, {})
    return save_checkpoint(bundle, tmp_path_factory.mktemp("cbcnn") / "cnn.pt", model_kwargs={"num_classes": 10})


def test_cli_compresses_exports_and_reports(cli, cnn_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "cb"
    code, stdout, err = cli("codebook", cnn_checkpoint, "--data", "mnist", "--bits", "3", "--groups", "4",
                            "--steps", "5", "--calib-samples", "64", "--no-memory", "-o", out, "--json")  # fmt: skip
    assert code == 0, err
    res = json.loads(stdout)
    assert res["config"]["bits"] == 3 and res["config"]["update"] == "proximal"
    assert 3.0 <= res["bits_per_weight"] < 3.5
    assert res["sqnr_db"] >= 40.0
    assert abs(res["onnxruntime_accuracy"] - res["accuracy"]) <= 1.0
    assert (out / "model.pt").is_file() and (out / "onnx" / "manifest.json").is_file()
    from edgecompress.compress.codebook.api import load_codebook_checkpoint

    loaded = load_codebook_checkpoint(out / "model.pt")
    from edgecompress.compress.codebook.layers import model_accounting

    assert abs(model_accounting(loaded.module)["bits_per_weight"] - res["bits_per_weight"]) < 1e-9


def test_cli_rejects_a_bad_variant(cli, cnn_checkpoint: Path, tmp_path: Path) -> None:
    code, _, err = cli("codebook", cnn_checkpoint, "--data", "mnist", "--variant", "per-row", "-o", tmp_path / "x")
    assert code == 2
    assert "variant" in err and "scales" in err


def test_stage_runs_and_reloads(mnist_splits, cnn_checkpoint: Path, tmp_path: Path) -> None:
    from edgecompress.compress.checkpoint import load_checkpoint
    from edgecompress.compress.stages import StageContext, get_stage

    spec = get_stage("codebook")
    cfg = spec.config_cls.model_validate({"bits": 2, "groups": 2, "steps": 3, "calib_samples": 32})
    bundle = load_checkpoint(cnn_checkpoint)
    out = spec.run(bundle, cfg, StageContext(out_dir=tmp_path / "s", splits=mnist_splits))
    assert out.metrics["bits_per_weight"] < 2.5
    again = spec.load(tmp_path / "s", bundle, cfg)
    x = torch.from_numpy(mnist_splits.test.x[:4])
    with torch.no_grad():
        assert torch.equal(out.bundle.module(x), again.bundle.module(x))
