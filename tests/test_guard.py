"""The accuracy guard: every command that writes a model checks it against fp32 on the runtime,
exits 4 with the worst layers and remedies when it broke, marks what it wrote, and the commands
that take models refuse a failed one unless --allow-failed. Also: one behaviour per technique
(the N:M pattern survives the CLI's codebook and QAT as it does the recipe's stages)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from edgecompress.compress.guard import judge, layer_sensitivity


def _manifest(art: Path) -> dict:
    return json.loads((art / "manifest.json").read_text())


def _meta(ckpt: Path) -> dict:
    return json.loads(torch.load(ckpt, map_location="cpu", weights_only=True)["metadata_json"])


def test_judge_drop_floor_and_missing_reference() -> None:
    class Budgets:
        max_accuracy_drop = 0.5

    class Target:
        name, budgets = "t", Budgets()

    base = {"metric": "top1", "accuracy": 90.0, "reference_accuracy": 91.0, "accuracy_drop": 1.0, "samples": 10}
    assert judge(base)["status"] == "passed"  # the default: 1 point
    assert judge(base, target=Target())["status"] == "failed"  # the target's budget
    v = judge(base, target=Target(), max_drop=2.0)  # the flag wins
    assert v["status"] == "passed" and v["limit"] == 2.0
    no_ref = {"metric": "top1", "accuracy": 90.0, "samples": 10}
    assert judge(no_ref)["status"] == "failed"  # nothing to compare with is not a pass
    sq = {"metric": "sqnr", "accuracy": 18.0, "samples": 10}
    assert judge(sq)["status"] == "failed" and judge(sq, min_sqnr_db=15)["status"] == "passed"
    assert judge({**sq, "accuracy": math.nan})["status"] == "failed"


def test_layer_sensitivity_names_the_broken_layer() -> None:
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
    bad = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
    bad.load_state_dict(ref.state_dict())
    with torch.no_grad():
        bad[2].weight.mul_(-1.0)  # the last layer is broken, the first exact
    rows = layer_sensitivity(bad, ref, torch.randn(16, 8))
    assert rows[0]["layer"] == "2" and rows[0]["sqnr_db"] < 0
    assert rows[1]["layer"] == "0" and rows[1]["sqnr_db"] == math.inf


def test_sparsify_collapse_exits_4_marks_outputs_and_export_refuses(cnn_checkpoint: Path, tmp_path: Path,
                                                                     cli) -> None:  # fmt: skip
    out = tmp_path / "sp"
    code, stdout, err = cli("sparsify", cnn_checkpoint, "--data", "mnist", "--pattern", "1:16", "--method", "oneshot",
                            "-o", out)  # fmt: skip
    assert code == 4, err
    assert "sparsify broke the model" in err and "Layers that lose most" in err and "try:" in err
    assert _manifest(out / "onnx")["extra"]["guard"] == "failed"
    assert _meta(out / "sparse.pt")["guard"] == "failed"
    code, _, err = cli("export", out / "sparse.pt", "-o", tmp_path / "exp")
    assert code == 2 and "--allow-failed" in err and not (tmp_path / "exp").exists()
    code, _, err = cli("export", out / "sparse.pt", "-o", tmp_path / "exp", "--allow-failed")
    assert code == 0, err
    code, _, err = cli("export", out / "onnx" / "model.onnx", "-o", tmp_path / "exp2")
    assert code == 2 and "guard" in err
    recipe = {"version": 1, "model": {"checkpoint": str(out / "sparse.pt")}, "data": "mnist", "targets": ["x86-64"]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    code, _, err = cli("run", tmp_path / "r.yaml", "-o", tmp_path / "run")
    assert code == 2 and "--allow-failed" in err


def test_codebook_one_bit_collapse_exits_4_json_still_written(cnn_checkpoint: Path, tmp_path: Path, cli) -> None:
    code, stdout, err = cli("codebook", cnn_checkpoint, "--data", "mnist", "--bits", "1", "--groups", "1",
                            "--steps", "5", "--no-memory", "-o", tmp_path / "cb", "--json")  # fmt: skip
    assert code == 4, err
    res = json.loads(stdout)
    assert res["guard"]["status"] == "failed" and res["guard"]["drop"] > 1.0
    assert res["worst_layers"] and "codebook broke the model" in err
    assert all(r["sqnr_db"] < 30 for r in res["worst_layers"])  # 1-bit layers, each against its fp32 layer
    assert _meta(tmp_path / "cb" / "model.pt")["guard"] == "failed"


def test_codebook_guard_passes_and_records(cnn_checkpoint: Path, tmp_path: Path, cli) -> None:
    code, stdout, err = cli("codebook", cnn_checkpoint, "--data", "mnist", "--bits", "4", "--groups", "2",
                            "--steps", "30", "--no-memory", "--max-drop", "3", "-o", tmp_path / "cb", "--json")  # fmt: skip
    assert code == 0, err
    res = json.loads(stdout)
    assert res["guard"]["status"] == "passed" and res["guard"]["limit"] == 3.0
    assert _manifest(tmp_path / "cb" / "onnx")["extra"]["guard"] == "passed"


def test_quantize_guard_on_sqnr_floor(cnn_checkpoint: Path, tmp_path: Path, cli) -> None:
    code, stdout, err = cli("quantize", cnn_checkpoint, "--data", "mnist", "--search", "none", "--metric", "sqnr",
                            "--min-sqnr", "300", "--no-sensitivity", "-o", tmp_path / "q", "--json")  # fmt: skip
    assert code == 4, err
    res = json.loads(stdout)
    assert res["guard"]["status"] == "failed" and res["guard"]["metric"] == "sqnr" and res["test_samples"] > 0
    assert _manifest(tmp_path / "q")["extra"]["guard"] == "failed"
    code, _, err = cli("quantize", cnn_checkpoint, "--data", "mnist", "--search", "none", "--no-sensitivity",
                       "--max-drop", "5", "-o", tmp_path / "q2", "--json")  # fmt: skip
    assert code == 0, err


def test_qat_guard_is_measured_against_fp32_on_onnxruntime(cnn_checkpoint: Path, tmp_path: Path, cli) -> None:
    code, stdout, err = cli("qat", cnn_checkpoint, "--data", "mnist", "--bits", "8", "--method", "qat",
                            "--max-steps", "4", "--eval-every", "100", "--metric", "agreement", "--max-drop", "5",
                            "-o", tmp_path / "qat", "--json")  # fmt: skip
    assert code == 0, err
    res = json.loads(stdout)
    g = res["guard"]
    assert g["status"] == "passed" and g["metric"] == "agreement" and g["runtime"].startswith("onnxruntime")
    assert res["metrics"]["onnxruntime_score"] == g["value"]


def test_codebook_cli_keeps_the_nm_pattern_like_the_recipe(cnn_checkpoint: Path, tmp_path: Path, cli) -> None:
    """sparsify then codebook: the CLI keeps the 2:4 zeros exactly and gives the recipe's weights, bit for bit."""
    from edgecompress.compress.codebook.api import load_codebook_checkpoint

    code, _, err = cli("sparsify", cnn_checkpoint, "--data", "mnist", "--pattern", "2:4", "--method", "oneshot",
                       "--max-drop", "100", "-o", tmp_path / "sp")  # fmt: skip
    assert code == 0, err
    cb = ["--bits", "3", "--groups", "2", "--steps", "10", "--calib-samples", "64"]
    code, stdout, err = cli("codebook", tmp_path / "sp" / "sparse.pt", "--data", "mnist", *cb, "--no-memory",
                            "--max-drop", "100", "-o", tmp_path / "cb", "--json")  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "cb" / "codebook_report.json").read_text())
    assert report["nm_violations"] and not any(report["nm_violations"].values())
    recipe = {"version": 1, "model": {"checkpoint": str(cnn_checkpoint)}, "data": "mnist", "targets": ["x86-64"],
              "stages": [{"sparsify": {"pattern": "2:4", "method": "oneshot"}},
                         {"codebook": {"bits": 3, "groups": 2, "steps": 10, "calib_samples": 64}}],
              "gates": {"x86-64": {"max_accuracy_drop": None, "max_latency_ms": None, "max_size_mb": None}},
              "profile": {"batch": 1, "min_runs": 3, "min_seconds": 0.05}}  # fmt: skip
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    code, _, err = cli("run", tmp_path / "r.yaml", "-o", tmp_path / "run")
    assert code == 0, err
    from edgecompress.compress.checkpoint import load_checkpoint

    base = load_checkpoint(cnn_checkpoint).module
    import copy

    a = load_codebook_checkpoint(tmp_path / "cb" / "model.pt", base_module=copy.deepcopy(base)).module.state_dict()
    b = load_codebook_checkpoint(tmp_path / "run" / "stages" / "01-codebook" / "model.pt",
                                 base_module=copy.deepcopy(base)).module.state_dict()  # fmt: skip
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("metric", ["top1", "agreement", "cosine", "sqnr"])
def test_evaluate_accuracy_honours_the_metric(metric: str, mnist_splits) -> None:
    from edgecompress.compress.models import create_model
    from edgecompress.compress.training import evaluate_accuracy

    torch.manual_seed(0)
    model = create_model("cnn", num_classes=10, in_chans=1).eval()
    test = mnist_splits.test.head(64)
    got = evaluate_accuracy(model, test, teacher=model, metric=metric)
    if metric == "top1":
        assert 0 <= got <= 100
    elif metric == "sqnr":
        assert got == math.inf  # the model against itself
    else:
        assert got == pytest.approx(100.0)


def test_every_technique_checkpoint_loads_and_exports(cnn_checkpoint: Path, tmp_path: Path, cli) -> None:
    """sparsify, qat and codebook checkpoints load through load_checkpoint (codebook layers, LSQ
    quantizers and the N:M marker rebuilt) and export with their own exporter."""
    from edgecompress.compress.checkpoint import load_checkpoint
    from edgecompress.compress.sparsity.export import MARKER

    code, _, err = cli("sparsify", cnn_checkpoint, "--data", "mnist", "--pattern", "2:4", "--method", "oneshot",
                       "--max-drop", "100", "-o", tmp_path / "sp")  # fmt: skip
    assert code == 0, err
    assert getattr(load_checkpoint(tmp_path / "sp" / "sparse.pt").module, MARKER)["pattern"] == "2:4"
    code, _, err = cli("qat", tmp_path / "sp" / "sparse.pt", "--data", "mnist", "--bits", "8", "--method", "qat",
                       "--max-steps", "3", "--eval-every", "100", "--max-drop", "100", "-o", tmp_path / "qat")  # fmt: skip
    assert code == 0, err
    code, _, err = cli("codebook", cnn_checkpoint, "--data", "mnist", "--bits", "4", "--groups", "2", "--steps", "5",
                       "--no-memory", "--max-drop", "100", "-o", tmp_path / "cb")  # fmt: skip
    assert code == 0, err
    formats = {"sp/sparse.pt": "onnx", "qat/model.pt": "onnx-qdq", "cb/model.pt": "onnx-codebook"}
    for ckpt, fmt in formats.items():
        code, out, err = cli("export", tmp_path / ckpt, "-o", tmp_path / f"exp-{fmt}", "--json")
        assert code == 0, f"{ckpt}: {err}"
        res = json.loads(out)
        chk = res["metrics"]["export_check"]
        assert res["format"] == fmt and (chk["max_abs_error"] == 0 or chk["sqnr_db"] > 30), ckpt
    sparse_export = _manifest(tmp_path / "exp-onnx")
    assert sparse_export["stages"][0]["config"]["exporter"] == "nm-sparse"  # the reloaded marker re-verifies the pattern
