"""End to end through the CLI: example train -> export -> check -> profile -> run with gates."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from edgecompress.compress.cli.app import main

    out = tmp_path_factory.mktemp("ex")
    assert main(["example", "train", "cnn", "-o", str(out), "--steps", "300", "--json"]) == 0
    return out / "cnn.pt"


def test_example_train_writes_metadata(trained):
    from edgecompress.compress.checkpoint import load_checkpoint

    meta = load_checkpoint(trained).metadata
    assert meta["test_accuracy"] > 90 and meta["steps"] <= 300 and meta["trained_on"] == "mnist"


def test_export_check_profile(trained, tmp_path, cli):
    art = tmp_path / "art"
    code, out, err = cli("export", trained, "--format", "onnx", "--target", "x86-64", "-o", art, "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["format"] == "onnx" and res["metrics"]["export_check"]["sqnr_db"] > 80

    code, out, err = cli("check", art, "--data", "mnist", "--json")
    assert code == 0, err
    res = json.loads(out)
    torch_row, ort_row = res["rows"]
    assert torch_row["runtime"] == "torch (reference)" and ort_row["runtime"] == "onnxruntime"
    assert ort_row["top1_agreement"] >= 99.9 and abs(res["accuracy_drop"]) < 0.2 and res["samples"] == 1000

    code, out, err = cli("profile", art, "--min-runs", "30", "--min-seconds", "0.2", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["runs"] >= 30 and 0 < res["p50_ms"] <= res["p90_ms"] <= res["p99_ms"] and res["threads"] >= 1

    # A latency gate that cannot pass exits 4.
    code, _, err = cli("profile", art, "--min-seconds", "0.1", "--max-latency-ms", "0.000001")
    assert code == 4 and "max_latency_ms" in err


def _recipe(tmp_path, trained, gates: str) -> str:
    p = tmp_path / "r.yaml"
    p.write_text(
        f"version: 1\nname: t\nmodel: {{checkpoint: {trained}}}\ndata: mnist\ntargets: [x86-64]\n"
        f"export:\n  - {{format: onnx, target: x86-64}}\nprofile: {{min_runs: 30, min_seconds: 0.2}}\n"
        f"gates:\n  x86-64: {gates}\n"
    )
    return str(p)


def test_run_recipe_gates_pass_and_fail(trained, tmp_path, cli):
    ok = _recipe(tmp_path, trained, "{max_accuracy_drop: 0.5, max_latency_ms: 100, max_size_mb: 5}")
    code, out, err = cli("run", ok, "-o", tmp_path / "run-ok", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["passed"] and summary["results"][0]["metrics"]["size_bytes"] > 0
    assert (tmp_path / "run-ok" / "report.md").read_text().count("All gates passed") == 1
    assert (tmp_path / "run-ok" / "recipe.resolved.yaml").exists()

    bad = _recipe(tmp_path, trained, "{max_size_mb: 0.001}")
    code, out, err = cli("run", bad, "-o", tmp_path / "run-bad")
    assert code == 4
    assert "max_size_mb" in err and "Failed gates" in err
    summary = json.loads((tmp_path / "run-bad" / "summary.json").read_text())
    assert not summary["passed"] and summary["failures"][0]["gate"] == "max_size_mb"
    # With --json the summary is printed on a failed gate too (CI reads it), and the exit code is still 4.
    code, out, err = cli("run", bad, "-o", tmp_path / "run-bad", "--json")
    assert code == 4 and json.loads(out)["failures"][0]["gate"] == "max_size_mb"


def test_dry_run_prints_resolved_recipe(trained, tmp_path, cli):
    r = _recipe(tmp_path, trained, "{max_size_mb: 5}")
    code, out, _ = cli("run", r, "-o", tmp_path / "x", "--dry-run")
    assert code == 0 and "version: 1" in out and "max_size_mb: 5" in out
    assert not (tmp_path / "x").exists()


def test_targets_and_list_json(cli):
    code, out, _ = cli("targets", "--json")
    assert code == 0 and {t["name"] for t in json.loads(out)["targets"]} >= {"x86-64", "arm64-android"}
    code, out, _ = cli("list", "models", "--json")
    assert code == 0 and "vit" in {m["name"] for m in json.loads(out)["models"]}


def test_import_is_lean():
    code = (
        "import sys, compress, compress.cli.app, targets, export, runtimes\n"
        "heavy = [m for m in ('tvm', 'onnxruntime', 'brevitas', 'torch', 'xgboost', 'onnx') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"heavy modules imported at import time: {out}"


def test_help_is_fast():
    exe = [sys.executable, "-m", "edgecompress.compress.cli.app", "--help"]
    subprocess.run(exe, capture_output=True, check=True)  # warm the file cache
    t = time.perf_counter()
    res = subprocess.run(exe, capture_output=True, text=True, check=True)
    assert time.perf_counter() - t < 1.0
    assert "export" in res.stdout and "profile" in res.stdout
