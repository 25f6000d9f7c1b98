"""Auto-selection on a tiny problem where the best candidate is known in advance."""

from __future__ import annotations

import json

from edgecompress.compress.auto import pareto_front


def test_pareto_front():
    pts = [
        {"accuracy": 97.0, "latency_p50_ms": 1.0, "size_bytes": 400},
        {"accuracy": 96.5, "latency_p50_ms": 0.5, "size_bytes": 100},
        {"accuracy": 96.0, "latency_p50_ms": 0.6, "size_bytes": 200},  # dominated by the second
    ]
    assert pareto_front(pts) == [True, True, False]


def test_auto_picks_the_smallest_candidate_meeting_budgets(cnn_checkpoint, tmp_path, cli):
    # fp32 (~426 kB) misses the 0.2 MB size budget; one-shot 2:4 sparsity keeps the dense size;
    # int8 PTQ (~110 kB) meets it: the known best.
    recipe = tmp_path / "auto.yaml"
    recipe.write_text(f"""
version: 1
model: {{checkpoint: {cnn_checkpoint}}}
data: mnist
targets: [x86-64]
profile: {{min_runs: 30, min_seconds: 0.1}}
gates:
  x86-64: {{max_accuracy_drop: 2.0, max_size_mb: 0.2, max_latency_ms: 100}}
auto:
  objective: size
  candidates:
    - {{name: fp32, stages: []}}
    - {{name: sparse-oneshot, stages: [{{sparsify: {{pattern: "2:4", method: oneshot}}}}]}}
    - {{name: int8, stages: [{{ptq: {{search: none, config: {{calibration: minmax, calib_size: 100}}}}}}]}}
""")
    code, out, err = cli("run", recipe, "-o", tmp_path / "run", "--auto", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["selection"]["x86-64"]["chosen"] == "int8"
    names = {c["name"]: c for c in summary["candidates"]}
    assert names["fp32"]["failed_gates"][0]["gate"] == "max_size_mb"
    assert names["int8"]["metrics"]["size_bytes"] < 0.2e6 and names["int8"]["pareto"]
    html = (tmp_path / "run" / "report.html").read_text()
    assert "Auto-selection" in html and "data:image/png;base64" in html


def test_auto_reports_unmeetable_budget(cnn_checkpoint, tmp_path, cli):
    recipe = tmp_path / "auto.yaml"
    recipe.write_text(f"""
version: 1
model: {{checkpoint: {cnn_checkpoint}}}
data: mnist
targets: [x86-64]
profile: {{min_runs: 30, min_seconds: 0.1}}
gates:
  x86-64: {{max_size_mb: 0.001}}
auto:
  candidates:
    - {{name: fp32, stages: []}}
""")
    code, _, err = cli("run", recipe, "-o", tmp_path / "run", "--auto")
    assert code == 4 and "max_size_mb" in err and "no candidate meets every budget" in err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["selection"]["x86-64"]["unmet"]["max_size_mb"]["candidate"] == "fp32"
