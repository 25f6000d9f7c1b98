"""A recipe run killed mid-stage resumes where it stopped, reuses finished stages, corrupts nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from edgecompress.export import load_artifact


def _recipe(tmp_path, ckpt) -> str:
    p = tmp_path / "r.yaml"
    p.write_text(f"""
version: 1
model: {{checkpoint: {ckpt}}}
data: mnist
targets: [x86-64]
profile: {{min_runs: 30, min_seconds: 0.1}}
stages:
  - sparsify: {{pattern: "2:4", method: mdgf, max_steps: 300, checkpoint_every: 10, eval_every: 50, batch_size: 32}}
export: [{{format: onnx, target: x86-64}}]
gates: {{x86-64: {{max_accuracy_drop: 5.0}}}}
""")
    return str(p)


def test_kill_mid_stage_then_resume(cnn_checkpoint, tmp_path):
    recipe, out = _recipe(tmp_path, cnn_checkpoint), tmp_path / "run"
    cmd = [sys.executable, "-m", "edgecompress.compress.cli.app", "run", recipe, "-o", str(out), "--json"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    state = out / "stages" / "00-sparsify" / "train" / "train_state.pt"
    deadline = time.time() + 300
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert state.exists(), "the stage never wrote a training checkpoint"
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "stages" / "00-sparsify" / "done.json").exists()
    assert not (out / "summary.json").exists()

    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["passed"] and summary["stages"][0]["reused"] is False
    log = [json.loads(ln) for ln in (out / "stages" / "00-sparsify" / "train" / "train_log.jsonl").read_text().splitlines()]
    resumed = [r["step"] for r in log if r.get("event") == "resumed"]
    assert len(resumed) == 1 and resumed[0] > 0, "the second run did not resume from the checkpoint"
    steps = [r["step"] for r in log if "event" not in r]
    assert steps == sorted(steps) and len(steps) == len(set(steps)) and steps[-1] == 300
    art = load_artifact(summary["results"][0]["artifact"])  # hashes verified: nothing corrupted
    assert art.manifest.metrics["accuracy"] > 80

    # A third run reuses the finished stage instead of training again.
    t = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["stages"][0]["reused"] is True
    assert time.perf_counter() - t < 120
