"""How often the baseline comparison flags noise, and how often it catches a real slowdown.

For each model, an fp32 ONNX artifact and a byte-identical copy are timed as a baseline and a "new"
run would time them, ``--trials`` times, and judged by :func:`compress.regression.compare_runs` with a
10 % latency gate:

- **across runs**: each side profiled on its own, one after the other (what comparing the latencies
  two runs recorded amounts to);
- **side by side**: both profiled in interleaved rounds in one call (what ``compress run --baseline``
  does when the baseline's artifact is at hand).

A flag on the identical copy is a false positive. The real slowdown is the same model fed batch 2
against batch 1 (a true, known ratio well above 1.1), timed side by side: a miss is a false negative.

    python bench/regression_noise.py [--models cnn resnet] [--trials 10] [--min-seconds 1]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine_info, markdown_table, write_results  # noqa: E402

GATE = 10.0


def _summary(stats: Any, digest: str) -> dict[str, Any]:
    return {"results": [{"target": "x86-64", "format": "onnx", "artifact": "-", "artifact_hash": digest,
                         "gates": {"max_latency_regression": GATE},
                         "metrics": {"latency_p50_ms": stats.p50_ms, "latency_p90_ms": stats.p90_ms,
                                     "latency_samples_ms": stats.samples_ms}}]}  # fmt: skip


def _judge(base: Any, new: Any) -> tuple[bool, float]:
    from edgecompress.compress.regression import compare_runs

    res = compare_runs(_summary(base, "a"), _summary(new, "b"))
    return bool(res["failures"]), new.p50_ms / base.p50_ms


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["cnn", "resnet"])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--min-seconds", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import torch

    from edgecompress.compress.models import create_model
    from edgecompress.export import export_onnx, load_artifact
    from edgecompress.export.spec import ModelSpec
    from edgecompress.runtimes import measure_interleaved, runtime_for

    torch.manual_seed(0)
    rows, records = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            art = export_onnx(create_model(name).eval(), (1, 28, 28), Path(tmp) / name, model_name=name)
            shutil.copytree(art.path, Path(tmp) / f"{name}-copy")
            copy = load_artifact(Path(tmp) / f"{name}-copy")
            a, b = (runtime_for(x).prepare(x, threads=args.threads) for x in (art, copy))
            spec = ModelSpec(list(art.manifest.inputs))
            x1, x2 = spec.example_feeds(1), spec.example_feeds(2)
            flags: dict[str, list[bool]] = {"across runs": [], "side by side": [], "batch 2 vs 1, side by side": []}
            ratios: dict[str, list[float]] = {k: [] for k in flags}
            for _ in range(args.trials):
                kw = {"rounds": 5, "min_runs": 30, "min_seconds": args.min_seconds}
                old = measure_interleaved([a], x1, **kw)[0]
                new = measure_interleaved([b], x1, **kw)[0]
                for key, (base, cur) in (("across runs", (old, new)),
                                         ("side by side", tuple(measure_interleaved([a, b], x1, **kw))),
                                         ("batch 2 vs 1, side by side",
                                          tuple(measure_interleaved([a, b], [x1, x2], **kw)))):  # fmt: skip
                    flagged, ratio = _judge(base, cur)
                    flags[key].append(flagged)
                    ratios[key].append(ratio)
            for key in flags:
                r = sorted(ratios[key])
                rows.append([name, key, f"{sum(flags[key])}/{args.trials}", r[0], r[len(r) // 2], r[-1]])
                records.append({"model": name, "comparison": key, "flagged": flags[key], "ratios": ratios[key]})
    info = machine_info()
    md = (
        f"Latency regressions flagged at a {GATE:.0f} % gate (ratio above the gate and its noise band excluding "
        f"1.0), {args.trials} trials, >= 30 runs and >= {args.min_seconds} s per side in 5 rounds, "
        f"{args.threads} threads ({info['cpu']}, {info['cores']} cores, load {info['load_average']:.2f}). "
        "Identical artifacts: every flag is a false positive. Batch 2 vs 1: every miss is a false negative.\n\n"
        + markdown_table(["model", "comparison", "flagged", "min ratio", "median ratio", "max ratio"], rows)
    )
    write_results("regression_noise", {"machine": info, "gate_percent": GATE, "results": records}, md)


if __name__ == "__main__":
    main()
