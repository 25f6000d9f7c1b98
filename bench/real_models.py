"""Real pretrained models through the whole CLI: export, check, profile and Quantune int8.

Models: ImageNet EfficientNet-Lite1 and Lite2 (weights from the ``examples`` extra) on 320 random
crops of scikit-image's photographs (no labels: the metric is top-1 agreement with fp32), and the
byte-level text encoder trained by ``compress example train text-encoder`` on the standard library's
sources (two int64 inputs; the metric is cosine similarity of the embeddings with fp32).

Each step is the ``compress`` command a user would type (run as a subprocess, ``--json``); latency
is onnxruntime at batch 1 with the target's threads, fp32 and int8 measured in the same run.

    python bench/real_models.py [--models efficientnet-lite1,text-encoder] [--trials 6]

Writes ``bench/results/real_models.json`` and ``.md``.
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
                                          "--space", "tiny", "--no-sensitivity", "-o", work / f"{name}-int8")  # fmt: skip
    row.update(int8_config=q["config"], int8_val=q["val_accuracy"], trials=q["trials"],
               calib_samples=q["calib_samples"], val_samples=q["val_samples"])
    qchk, _ = compress("check", work / f"{name}-int8", "--data", DATA[name], "--reference", ckpt)
    row.update(int8_test=qchk["accuracy"], int8_drop=qchk.get("accuracy_drop"), test_samples=qchk["samples"])
    fp, _ = compress("profile", work / f"{name}-onnx")
    i8, _ = compress("profile", work / f"{name}-int8")
    row.update(fp32_p50_ms=fp["p50_ms"], int8_p50_ms=i8["p50_ms"], threads=fp["threads"],
               int8_speedup=fp["p50_ms"] / i8["p50_ms"])  # fmt: skip
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="efficientnet-lite1,efficientnet-lite2,text-encoder")
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--work", type=Path, default=Path("bench-work/real"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = [run_model(m, args.work, args.trials) for m in args.models.split(",")]
    RESULTS.mkdir(exist_ok=True)
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
