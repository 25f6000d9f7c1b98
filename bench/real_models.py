"""Real pretrained models through the whole CLI: export, check, profile and Quantune int8.

Models: ImageNet EfficientNet-Lite1 and Lite2 (weights from the ``examples`` extra) on 320 random
crops of scikit-image's photographs (no labels: the metric is top-1 agreement with fp32), and the
byte-level text encoder trained by ``compress example train text-encoder`` on the standard library's
sources (two int64 inputs; the metric is cosine similarity of the embeddings with fp32).

Each step is the ``compress`` command a user would type (run as a subprocess, ``--json``); latency
is onnxruntime at batch 1 with the target's threads, fp32 and int8 measured in the same run.

    python bench/real_models.py [--models efficientnet-lite1,text-encoder] [--trials 6] [--techniques]

Writes ``bench/results/real_models.json`` and ``.md``; ``--techniques`` also runs TVM export and
check, ``codebook``, ``sparsify`` (one-shot 2:4), ``qat`` (W8A8) and a recipe with reduced budgets
(``--budget``), into ``bench/results/real_models_techniques.json`` and ``.md``. A technique whose
accuracy guard fails (exit 4) is reported with its score, not hidden.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
DATA = {"efficientnet-lite1": "photos", "efficientnet-lite2": "photos", "text-encoder": "text"}


def compress(*args: str) -> tuple[dict, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([str(Path(sys.executable).parent / "compress"), *map(str, args), "--json"], capture_output=True,
                          text=True, check=False)  # fmt: skip
    if proc.returncode == 4 and proc.stdout.strip():  # the accuracy guard failed: the result is still reported
        return {**json.loads(proc.stdout), "exit_code": 4}, time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"compress {' '.join(map(str, args))} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout), time.perf_counter() - t0


def run_model(name: str, work: Path, trials: int) -> dict:
    ckpt = work / f"{name}.pt"
    row: dict = {"model": name, "data": DATA[name]}
    if not ckpt.exists():
        _, row["example_seconds"] = compress("example", "train", name, "-o", work)
    art, row["export_seconds"] = compress("export", ckpt, "--format", "onnx", "-o", work / f"{name}-onnx")
    row["export_sqnr_db"] = art["metrics"]["export_check"]["sqnr_db"]
    chk, _ = compress("check", work / f"{name}-onnx", "--data", DATA[name])
    row.update(metric=chk["metric"], fp32_samples=chk["samples"])
    q, row["quantize_seconds"] = compress("quantize", ckpt, "--data", DATA[name], "--budget-trials", trials,
                                          "--space", "tiny", "--no-sensitivity", "--objective", "accuracy",
                                          "-o", work / f"{name}-int8")  # fmt: skip
    row.update(int8_config=q["config"], int8_val=q["val_accuracy"], trials=q["trials"],
               calib_samples=q["calib_samples"], val_samples=q["val_samples"])
    qchk, _ = compress("check", work / f"{name}-int8", "--data", DATA[name], "--reference", ckpt)
    row.update(int8_test=qchk["accuracy"], int8_drop=qchk.get("accuracy_drop"), test_samples=qchk["samples"])
    fp, _ = compress("profile", work / f"{name}-onnx")
    i8, _ = compress("profile", work / f"{name}-int8")
    row.update(fp32_p50_ms=fp["p50_ms"], int8_p50_ms=i8["p50_ms"], threads=fp["threads"],
               int8_speedup=fp["p50_ms"] / i8["p50_ms"])  # fmt: skip
    return row


def guard_cell(res: dict) -> str:
    g = res.get("guard") or {}
    return g.get("status", "-")


def run_techniques(name: str, work: Path, steps: int) -> list[dict]:
    """TVM, codebook, sparsify, qat and a recipe on one model; one row per command."""
    ckpt, data = work / f"{name}.pt", DATA[name]
    rows: list[dict] = []

    def row(technique: str, command: str, res: dict, seconds: float, score: float | None, metric: str, **more) -> None:
        rows.append({"model": name, "technique": technique, "command": command, "score": score, "metric": metric,
                     "guard": guard_cell(res), "exit_code": res.get("exit_code", 0), "seconds": round(seconds, 1),
                     **more})  # fmt: skip

    art, t = compress("export", ckpt, "--format", "tvm", "-o", work / f"{name}-tvm")
    chk, t2 = compress("check", work / f"{name}-tvm", "--data", data)
    row("tvm export + check", f"compress export {name}.pt --format tvm; compress check --data {data}", {}, t + t2,
        chk["accuracy"], chk["metric"], sqnr_db=art["metrics"]["export_check"]["sqnr_db"])  # fmt: skip
    prof, _ = compress("profile", work / f"{name}-tvm")
    rows[-1]["p50_ms"] = prof["p50_ms"]
    cb_args = ["--bits", "4", "--groups", "4", "--steps", str(steps), "--calib-samples", "32", "--no-memory"]
    cb, t = compress("codebook", ckpt, "--data", data, *cb_args, "-o", work / f"{name}-cb")
    row("codebook 4-bit", f"compress codebook {name}.pt --data {data} {' '.join(cb_args)}", cb, t,
        cb["onnxruntime_accuracy"], cb["metric"], bits_per_weight=cb["bits_per_weight"])  # fmt: skip
    sp, t = compress("sparsify", ckpt, "--data", data, "--pattern", "2:4", "--method", "oneshot", "-o", work / f"{name}-sp")
    row("2:4 one-shot", f"compress sparsify {name}.pt --data {data} --pattern 2:4 --method oneshot", sp, t,
        sp["metrics"].get("onnx_test_accuracy"), sp["metrics"].get("metric", "-"))  # fmt: skip
    qat_args = ["--bits", "8", "--method", "qat", "--max-steps", str(steps), "--batch-size", "16", "--lr", "1e-5",
                "--eval-every", str(max(steps // 2, 1))]  # fmt: skip
    q, t = compress("qat", ckpt, "--data", data, *qat_args, "-o", work / f"{name}-qat")
    row("QAT W8A8", f"compress qat {name}.pt --data {data} {' '.join(qat_args)}", q, t,
        q["metrics"].get("onnxruntime_score"), q["metrics"].get("metric", "-"))  # fmt: skip
    recipe = work / f"{name}-recipe.yaml"
    recipe.write_text(f"version: 1\nname: {name}\nmodel: {{checkpoint: {ckpt}}}\ndata: {data}\n"
                      "targets: [x86-64]\nstages:\n  - ptq: {search: random, budget_trials: 2, sensitivity: false}\n"
                      "gates:\n  x86-64: {max_latency_ms: null}\n")  # fmt: skip
    run, t = compress("run", recipe, "-o", work / f"{name}-run")
    res = run["results"][0]["metrics"]
    row("recipe (ptq, 2 trials) + gates", f"compress run {recipe.name}", {"guard": {"status": "passed" if run["passed"]
        else "failed"}}, t, res["accuracy"], res["metric"], p50_ms=res.get("latency_p50_ms"))  # fmt: skip
    return rows


def write_techniques(rows: list[dict]) -> None:
    (RESULTS / "real_models_techniques.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| model | technique | score (metric) | guard | seconds | command |", "|---|---|---|---|---|---|"]
    for r in rows:
        score = "-" if r["score"] is None else f"{r['score']:.2f}"
        extra = f", {r['bits_per_weight']:.2f} bits/w" if r.get("bits_per_weight") else ""
        extra += f", p50 {r['p50_ms']:.2f} ms" if r.get("p50_ms") else ""
        lines.append(f"| {r['model']} | {r['technique']} | {score} ({r['metric']}{extra}) | {r['guard']} | "
                     f"{r['seconds']} | `{r['command']}` |")  # fmt: skip
    (RESULTS / "real_models_techniques.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="efficientnet-lite1,efficientnet-lite2,text-encoder")
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--work", type=Path, default=Path("bench-work/real"))
    parser.add_argument("--techniques", action="store_true", help="Also TVM, codebook, sparsify, qat and a recipe.")
    parser.add_argument("--budget", type=int, default=20, help="Steps of codebook (per layer) and QAT.")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(exist_ok=True)
    rows = [run_model(m, args.work, args.trials) for m in args.models.split(",")]
    write_main(rows)
    if args.techniques:
        write_techniques([r for m in args.models.split(",") for r in run_techniques(m, args.work, args.budget)])


def write_main(rows: list[dict]) -> None:
    (RESULTS / "real_models.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| model | data (metric) | export SQNR dB | int8 config (trials) | int8 test score | drop | "
             "fp32 p50 ms | int8 p50 ms | int8 vs fp32 |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['model']} | {r['data']}: {r['test_samples']} samples ({r['metric']}) | "
                     f"{r['export_sqnr_db']:.1f} | {r['int8_config']} ({r['trials']}) | {r['int8_test']:.2f} | "
                     f"{(r['int8_drop'] or 0):.2f} | {r['fp32_p50_ms']:.2f} | {r['int8_p50_ms']:.2f} | "
                     f"{r['int8_speedup']:.2f}x |")  # fmt: skip
    (RESULTS / "real_models.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
