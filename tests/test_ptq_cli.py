"""``compress quantize`` and the ``ptq`` stage end to end on the briefly trained CNN."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_cli_quantize_onnx_with_search_writes_artifact_log_and_sensitivity(cli, cnn_onnx: Path, tmp_path: Path) -> None:
    from edgecompress.export import load_artifact

    out = tmp_path / "q"
    code, stdout, err = cli("quantize", cnn_onnx, "--data", "mnist", "--search", "random", "--space", "tiny", "--objective", "accuracy",
                            "--budget-trials", "3", "--val-samples", "100", "--database", tmp_path / "db.sqlite",
                            "-o", out, "--json")  # fmt: skip
    assert code == 0, err
    summary = json.loads(stdout)
    art = load_artifact(out)  # hashes of the model, trial log and sensitivity table verified
    assert art.manifest.format == "onnx-qdq"
    assert {"trials.json", "sensitivity.json", "sensitivity.md"} <= set(art.manifest.files)
    log = json.loads((out / "trials.json").read_text())
    assert len(log["trials"]) == 3 == summary["trials"] and log["stopped_by"] == "trial budget"
    assert log["best"]["accuracy"] == max(t["accuracy"] or 0 for t in log["trials"])
    sens = json.loads((out / "sensitivity.json").read_text())
    assert len(sens) >= 3 and all(r["node"] for r in sens)
    assert sens[0]["accuracy_drop"] >= sens[-1]["accuracy_drop"]
    import onnx

    ops = {n.op_type for n in onnx.load(str(art.model_path)).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert summary["val_accuracy"] > summary["fp32_val_accuracy"] - 5


def test_cli_quantize_checkpoint_with_fixed_config_file(cli, cnn_checkpoint: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "ptq.yaml"
    cfg.write_text("calibration: percentile\npercentile: 99.99\ncalib_size: 32\nper_channel: true\n")
    out = tmp_path / "q"
    code, stdout, err = cli("quantize", cnn_checkpoint, "--data", "mnist", "--config", cfg, "--val-samples", "100",
                            "--no-sensitivity", "--database", tmp_path / "db.sqlite", "-o", out, "--json")  # fmt: skip
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["trials"] == 1 and summary["config"].startswith("percentile99.99/n32/pc")


def test_cli_bad_inputs_exit_2_with_clear_messages(cli, tmp_path: Path) -> None:
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"garbage bytes, not an onnx protobuf \x00\xff")
    code, _, err = cli("quantize", bad, "--data", "mnist", "-o", tmp_path / "q")
    assert code == 2 and "not a valid ONNX model" in err
    code, _, err = cli("quantize", bad, "--data", "mnist", "--search", "annealing", "-o", tmp_path / "q")
    assert code == 2 and "annealing" in err
    code, _, err = cli("quantize", bad, "--data", "mnist", "--budget-time", "soon", "-o", tmp_path / "q")
    assert code == 2 and "soon" in err


def test_ptq_stage_is_registered_and_runs_on_a_module(cnn_checkpoint: Path, mnist_splits, tmp_path: Path) -> None:
    from edgecompress.compress.checkpoint import load_checkpoint
    from edgecompress.compress.ptq.config import QuantuneSearchConfig
    from edgecompress.compress.stages import StageContext, get_stage

    spec = get_stage("ptq")
    assert spec.consumes == "module" and spec.produces == "onnx" and spec.config_cls is QuantuneSearchConfig
    cfg = QuantuneSearchConfig(search="grid", space="tiny", budget_trials=1, sensitivity=False, val_samples=100, objective="accuracy",
                               database=str(tmp_path / "db.sqlite"))  # fmt: skip
    out = spec.run(load_checkpoint(cnn_checkpoint), cfg, StageContext(out_dir=tmp_path / "stage", splits=mnist_splits))
    assert out.artifact is not None and out.artifact.manifest.format == "onnx-qdq"
    assert out.metrics["trials"] == 1
    assert [s.stage for s in out.artifact.manifest.stages][-2:] == ["export-onnx", "ptq"]
    again = spec.load(tmp_path / "stage", None, cfg)
    assert again.artifact.hash == out.artifact.hash


@pytest.mark.slow
def test_process_pool_executor_gives_the_same_results(cnn_onnx: Path, mnist_splits, tmp_path: Path) -> None:
    from edgecompress.compress.exporting import import_onnx_file
    from edgecompress.compress.ptq.config import QuantuneSearchConfig
    from edgecompress.compress.ptq.search import quantize_artifact

    src = import_onnx_file(cnn_onnx, tmp_path / "src")
    common = {"search": "grid", "space": "tiny", "budget_trials": 4, "sensitivity": False, "val_samples": 100,
              "objective": "accuracy"}
    a = quantize_artifact(src, mnist_splits, QuantuneSearchConfig(**common, database=str(tmp_path / "a.sqlite")), tmp_path / "a")
    b = quantize_artifact(src, mnist_splits, QuantuneSearchConfig(**common, workers=2, database=str(tmp_path / "b.sqlite")),
                          tmp_path / "b")  # fmt: skip
    assert [t.accuracy for t in a.search.trials] == [t.accuracy for t in b.search.trials]
    assert b.search.extra["measured_now"] == 4
