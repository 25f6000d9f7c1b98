"""Quantune trials on Ray: the same search with 1, 2 and 4 Ray workers beside the local executors.

Each run is one ``compress quantize --json`` command (grid search over the ``tiny`` space, so every
executor measures the same configurations) with a fresh tuning database and a fresh cache, so no
trial or calibration is reused between runs. Rows: in-process (the default), a local pool of 2,
and a private Ray on this machine (127.0.0.1) with 1, 2 and 4 CPUs. Columns: the search's wall
time and per-trial time (``search_seconds`` / trials), the whole command's time (Ray's start-up
included), the speed-up over in-process, and Ray's overhead per trial against the in-process run
(``ray 1`` vs ``in-process``: the cost of shipping tasks, worker start-up and per-node data copies).
On a 2-core machine 4 workers oversubscribe the CPUs: the row says what that costs.

Run: ``.venv/bin/python bench/quantune_cluster.py [--models cnn,efficientnet-lite1]``; writes
``bench/results/quantune_cluster.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
DATA = {"cnn": "mnist", "efficientnet-lite1": "photos", "efficientnet-lite2": "photos", "text-encoder": "text"}
RUNS = [("in-process", "local", 1), ("local pool", "local", 2), ("ray", "ray", 1), ("ray", "ray", 2), ("ray", "ray", 4)]


def compress(*args: str, env: dict[str, str] | None = None) -> tuple[dict, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([str(Path(sys.executable).parent / "compress"), *map(str, args), "--json"], capture_output=True,
                          text=True, check=False, env=env)  # fmt: skip
    if proc.returncode not in (0, 4):
        raise SystemExit(f"compress {' '.join(map(str, args))} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout), time.perf_counter() - t0


def run_model(name: str, work: Path, trials: int) -> list[dict]:
    ckpt = work / f"{name}.pt"
    if not ckpt.exists():
        compress("example", "train", name, "-o", work)
    rows = []
    for label, executor, workers in RUNS:
        cache = Path(tempfile.mkdtemp(prefix="bench-cluster-cache-"))
        shutil.rmtree(Path(tempfile.gettempdir()) / "edgecompress-ray", ignore_errors=True)  # Ray nodes' data copies
        env = {**os.environ, "EDGECOMPRESS_CACHE": str(cache)}
        env.pop("RAY_ADDRESS", None)
        out = work / f"{name}-{executor}{workers}"
        q, seconds = compress("quantize", ckpt, "--data", DATA[name], "--search", "grid", "--space", "tiny",
                              "--budget-trials", trials, "--no-sensitivity", "--no-seed-database", "--executor", executor,
                              "--workers", workers, "--database", cache / "trials.sqlite", "-o", out, env=env)  # fmt: skip
        shutil.rmtree(cache, ignore_errors=True)
        rows.append({"model": name, "executor": label, "workers": workers, "where": q["executor"]["where"],
                     "trials": q["trials"], "measured_now": q["measured_now"], "search_seconds": q["search_seconds"],
                     "command_seconds": round(seconds, 2), "per_trial_seconds": round(q["search_seconds"] / q["trials"], 3),
                     "config": q["config"], "val_accuracy": q["val_accuracy"], "val_samples": q["val_samples"],
                     "lost_trials": q["lost_trials"]})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]
    ray1 = next(r for r in rows if r["executor"] == "ray" and r["workers"] == 1)
    for r in rows:
        r["speedup"] = round(base["search_seconds"] / r["search_seconds"], 2)
    for r in rows:
        r["ray_overhead_per_trial_s"] = round((ray1["search_seconds"] - base["search_seconds"]) / base["trials"], 3)
    return rows


def write(rows: list[dict]) -> str:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quantune_cluster.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| model | executor | workers | trials | search s | per trial s | speed-up vs in-process | command s "
             "(start-up incl.) | same best config |", "|---|---|---|---|---|---|---|---|---|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        group = [r for r in rows if r["model"] == model]
        for r in group:
            same = "yes" if r["config"] == group[0]["config"] else f"no ({r['config']})"
            lines.append(f"| {model} | {r['executor']} | {r['workers']} | {r['trials']} | {r['search_seconds']:.2f} | "
                         f"{r['per_trial_seconds']:.3f} | {r['speedup']:.2f}x | {r['command_seconds']:.1f} | {same} |")  # fmt: skip
        lines.append(f"| {model} | Ray overhead per trial (ray 1 - in-process) | | | | "
                     f"{group[0]['ray_overhead_per_trial_s']:+.3f} | | | |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    (RESULTS / "quantune_cluster.md").write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="cnn,efficientnet-lite1")
    ap.add_argument("--trials", type=int, default=8, help="configurations per run (the tiny space has 8)")
    ap.add_argument("--work", default=None, help="folder for checkpoints and artifacts (default: a temporary one)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-cluster-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for name in args.models.split(","):
        rows.extend(run_model(name, work, args.trials))
    print(write(rows))


if __name__ == "__main__":
    main()
