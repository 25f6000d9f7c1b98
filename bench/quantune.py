"""Quantune benchmark: trials and wall time to the best PTQ configuration, per strategy, per model.

Protocol (ALGORITHMS.md section 4, Lee et al. 2022):
1. For each example model (trained on the built-in MNIST, cached), measure the whole search space
   once (exhaustive) on onnxruntime: best validation accuracy = the reference.
2. Run each strategy until it measures a configuration within 0.1 points of that best: Quantune
   with a leave-one-model-out prior (the other models' trials), Quantune cold (no prior), grid,
   random (>= 20 seeds), genetic (>= 5 seeds). Every trial after the exhaustive run is an evaluator
   cache hit, so strategies cost only their own overhead; their wall time to best is estimated as
   the measured cost of their trials (quantize + evaluate, each distinct calibration pass counted
   once) plus the strategy's own overhead (cost-model fits), measured now.
3. On the test split: fp32 vs onnxruntime's default (MinMax, per-tensor) vs the best configuration,
   and int8 vs fp32 onnxruntime latency (batch 1, same process).
4. Write the tuning database of these trials as the shipped seed database (compress/ptq/seed_trials.sqlite).

Run: ``.venv/bin/python bench/quantune.py`` (the trimmed 80-configuration space; ``--space full``
for the whole space of ALGORITHMS.md, 2592 configurations per model).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench.quantune")
LOOSE_TOLERANCE = 0.5  # points: 2-3 of the 500 validation samples, above the noise of a single sample


def replay_seconds(trials: list) -> float:
    """Estimated wall time of measuring ``trials`` in order from scratch (each calibration paid once)."""
    seen: set[str] = set()
    total = 0.0
    for t in trials:
        own = t.seconds - (t.calibration_seconds if t.calibrated else 0.0)
        total += max(own, 0.0)
        k = t.config.calibration_key()
        if k not in seen:
            seen.add(k)
            total += t.calibration_seconds
    return total


def trials_to(trials: list, threshold: float) -> int | None:
    for i, t in enumerate(trials, 1):
        if t.accuracy is not None and t.accuracy >= threshold:
            return i
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mobilenetv2", "squeezenet", "shufflenet", "resnet"])
    ap.add_argument("--space", default="bench", help="tiny, bench (80 configs), default (240) or full (2592)")
    ap.add_argument("--random-seeds", type=int, default=20)
    ap.add_argument("--genetic-seeds", type=int, default=5)
    ap.add_argument("--quantune-seeds", type=int, default=5)
    ap.add_argument("--val-samples", type=int, default=500)
    ap.add_argument("--tolerance", type=float, default=0.1, help="points below the exhaustive best that count as found")
    ap.add_argument("--database", default=None, help="bench tuning database (default: user cache quantune/bench.sqlite)")
    ap.add_argument("--seed-db-out", default=str(ROOT / "compress" / "ptq" / "seed_trials.sqlite"))
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # onnxruntime's quantizer warns through the root logger on every call; keep the bench's own progress.
    logging.getLogger().setLevel(logging.ERROR)
    log.setLevel(logging.INFO)

    import torch

    torch.set_num_threads(1)
    from edgecompress.compress.cache import cache_dir
    from edgecompress.compress.checkpoint import load_checkpoint
    from edgecompress.compress.data import load_splits
    from edgecompress.compress.examples import example_checkpoint
    from edgecompress.compress.ptq.config import ORT_DEFAULT, space_preset
    from edgecompress.compress.ptq.database import TuningDatabase, load_prior
    from edgecompress.compress.ptq.descriptors import model_descriptors
    from edgecompress.compress.ptq.evaluator import Evaluator
    from edgecompress.compress.ptq.ort_backend import model_outputs, prepare_model, quantize_to_file
    from edgecompress.compress.ptq.search import run_search
    from edgecompress.compress.ptq.space import enumerate_space
    from edgecompress.compress.ptq.strategies import GeneticSearch, GridSearch, QuantuneSearch, RandomSearch
    from edgecompress.export import export_onnx
    from edgecompress.runtimes.measure import measure_latency
    from edgecompress.runtimes.ort_runtime import OrtSession

    t_start = time.perf_counter()
    splits = load_splits("mnist")
    space = enumerate_space(space_preset(args.space))
    db_path = Path(args.database) if args.database else cache_dir("quantune") / "bench.sqlite"
    db = TuningDatabase(db_path)
    work = Path(tempfile.mkdtemp(prefix="quantune-bench-"))
    models: dict[str, dict] = {}

    # 1. Exhaustive pass per model (cached in the bench database: a rerun only pays new trials).
    for name in args.models:
        ckpt = example_checkpoint(name)
        bundle = load_checkpoint(ckpt)
        art = export_onnx(bundle.module, bundle.input_shape, work / f"{name}-fp32", model_name=name,
                          preprocessing=bundle.preprocessing)  # fmt: skip
        prepared = prepare_model(art.model_path, cache_dir("quantune", "models"))
        desc = model_descriptors(art.model_path)
        db.put_model(prepared.model_hash, name, desc)
        nval = min(args.val_samples, len(splits.val))
        ev = Evaluator(prepared, splits.calib.x, splits.val.x[:nval], splits.val.y[:nval], database=db,
                       workdir=cache_dir("quantune", "work", prepared.model_hash[:24]))  # fmt: skip
        t0 = time.perf_counter()
        full = run_search(GridSearch(space), ev)
        best = max(t.accuracy for t in full.trials if t.accuracy is not None)
        failed = sum(1 for t in full.trials if not t.ok)
        log.info("%s: exhaustive %d configs (%d measured now, %d failed) in %.0fs; fp32 %.2f, best %.2f", name,
                 len(full.trials), ev.measured, failed, time.perf_counter() - t0, ev.fp32_accuracy, best)  # fmt: skip
        models[name] = {"art": art, "prepared": prepared, "desc": desc, "ev": ev, "full": full, "best": best,
                        "failed": failed, "measured_now": ev.measured}  # fmt: skip

    # 2. Strategies, replayed through the evaluator cache.
    rows = []
    for name, m in models.items():
        ev, best = m["ev"], m["best"]
        thr = best - args.tolerance
        res: dict[str, list[tuple[int, float, int]]] = {}

        def record(key: str, strategy, ev=ev, thr=thr, res=res, best=best) -> None:
            r = run_search(strategy, ev, target_accuracy=thr)
            n = trials_to(r.trials, thr)
            loose = trials_to(r.trials, best - LOOSE_TOLERANCE)
            res.setdefault(key, []).append((n or len(r.trials), replay_seconds(r.trials) + r.overhead_seconds,
                                            loose or len(r.trials)))  # fmt: skip

        prior = load_prior(db, use_seed=False, exclude_hashes={m["prepared"].model_hash}, exclude_names={name})
        for s in range(args.quantune_seeds):
            record("quantune", QuantuneSearch(space, descriptors=m["desc"], fp32_accuracy=ev.fp32_accuracy, prior=prior, seed=s))
        for s in range(max(1, args.quantune_seeds // 2)):
            record("quantune-cold", QuantuneSearch(space, descriptors=m["desc"], fp32_accuracy=ev.fp32_accuracy, seed=s))
        record("grid", GridSearch(space))
        for s in range(args.random_seeds):
            record("random", RandomSearch(space, seed=s))
        for s in range(args.genetic_seeds):
            record("genetic", GeneticSearch(space, seed=s))
        summary = {k: {"trials_mean": statistics.mean(n for n, _, _ in v), "trials_min": min(n for n, _, _ in v),
                       "trials_max": max(n for n, _, _ in v), "seconds_mean": statistics.mean(s for _, s, _ in v),
                       "loose_trials_mean": statistics.mean(n for _, _, n in v), "runs": len(v)}
                   for k, v in res.items()}  # fmt: skip

        # 3. Test-split accuracy and latency: fp32, onnxruntime default, best config.
        best_cfg = next(t.config for t in m["full"].trials if t.accuracy == best)
        test_x, test_y = splits.test.x, splits.test.y
        acc = {}
        paths = {"fp32": m["prepared"].path}
        for label, cfg in (("ort_default", ORT_DEFAULT), ("best", best_cfg)):
            p = work / f"{name}-{label}.onnx"
            quantize_to_file(m["prepared"], cfg, splits.calib.x, p, ev.calib_cache, nodes_to_exclude=list(ev.task(cfg).exclude))
            paths[label] = p
        for label, p in paths.items():
            acc[label] = float(100 * np.mean(model_outputs(p, test_x)[0].argmax(1) == test_y))
        lat = {}
        if not args.no_latency:
            x1 = test_x[:1]
            for label in ("fp32", "best", "fp32", "best"):  # interleaved; the second pass is kept
                stats = measure_latency(OrtSession(str(paths[label]), ["CPUExecutionProvider"], 1), x1)
                lat[label], lat[f"{label}_p90"] = stats.p50_ms, stats.p90_ms
        rows.append({"model": name, "space": len(space), "failed_configs": m["failed"], "fp32_val": ev.fp32_accuracy,
                     "best_val": best, "best_config": best_cfg.label(), "strategies": summary,
                     "test_accuracy": acc, "latency_ms_b1_t1": lat})  # fmt: skip
        log.info("%s: %s", name, {k: round(v["trials_mean"], 1) for k, v in summary.items()})

    # 4. Seed database: the bench models' trials (a prior for first-time users).
    seed_path = Path(args.seed_db_out)
    tmp_seed = seed_path.with_suffix(".tmp")
    tmp_seed.unlink(missing_ok=True)
    seed = TuningDatabase(tmp_seed)
    for name, m in models.items():
        h = m["prepared"].model_hash
        seed.put_model(h, name, m["desc"])
        for t in db.trials(h):
            if t.data_hash == m["ev"].data_hash:
                seed.put_trial(t)
    tmp_seed.replace(seed_path)

    wall = time.perf_counter() - t_start
    write_results(rows, args, wall, Path(args.out), sum(m["measured_now"] for m in models.values()))


def write_results(rows: list[dict], args: argparse.Namespace, wall: float, out: Path, measured_now: int) -> None:
    strategies = ["quantune", "quantune-cold", "grid", "random", "genetic"]
    lines = [
        "# Quantune: trials to the best PTQ configuration",
        "",
        f"Command: `.venv/bin/python bench/quantune.py --space {args.space} --random-seeds {args.random_seeds} "
        f"--genetic-seeds {args.genetic_seeds} --quantune-seeds {args.quantune_seeds}`  ",
        f"Scale that ran: {len(rows)} models, space `{args.space}` ({rows[0]['space'] if rows else 0} configurations per model), "
        f"{args.val_samples} val samples per trial, {measured_now} trials measured in this run (the rest were cache hits "
        f"from the tuning database), {wall / 60:.1f} min wall on a shared 2-core machine. 'Found' = a measured config "
        f"within {args.tolerance} pt of the exhaustive best (val split).",
        "",
        "## Trials until within 0.1 pt of the exhaustive best (mean over seeds; [min-max])",
        "",
        "| model | best val % | " + " | ".join(strategies) + " | quantune / random | quantune / grid |",
        "|---|---|" + "---|" * len(strategies) + "---|---|",
    ]
    tot = {s: 0.0 for s in strategies}
    for r in rows:
        st = r["strategies"]
        for s in strategies:
            tot[s] += st[s]["trials_mean"]
        cells = [f"{st[s]['trials_mean']:.1f} [{st[s]['trials_min']}-{st[s]['trials_max']}]" for s in strategies]
        lines.append(f"| {r['model']} | {r['best_val']:.2f} | " + " | ".join(cells) +
                     f" | {st['quantune']['trials_mean'] / st['random']['trials_mean']:.2f} | "
                     f"{st['quantune']['trials_mean'] / st['grid']['trials_mean']:.2f} |")  # fmt: skip
    if rows:
        n = len(rows)
        lines.append("| **mean** | | " + " | ".join(f"{tot[s] / n:.1f}" for s in strategies) +
                     f" | {tot['quantune'] / tot['random']:.2f} | {tot['quantune'] / tot['grid']:.2f} |")  # fmt: skip
    lines += ["", f"## Trials until within {LOOSE_TOLERANCE} pt of the exhaustive best (mean over seeds)", "",
              "(0.1 pt is less than one of the 500 validation samples: the 0.1-pt best is partly luck.)", "",
              "| model | " + " | ".join(strategies) + " |", "|---|" + "---|" * len(strategies)]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['model']} | " + " | ".join(f"{r['strategies'][s]['loose_trials_mean']:.1f}" for s in strategies) + " |")
    if rows:
        lines.append("| **mean** | " + " | ".join(
            f"{statistics.mean(r['strategies'][s]['loose_trials_mean'] for r in rows):.1f}" for s in strategies) + " |")
    lines += ["", "## Estimated wall time to best (s): trial costs as measured + strategy overhead measured now", "",
              "| model | " + " | ".join(strategies) + " |", "|---|" + "---|" * len(strategies)]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['model']} | " + " | ".join(f"{r['strategies'][s]['seconds_mean']:.1f}" for s in strategies) + " |")
    lines += ["", "## Test-split accuracy (1000 samples) and onnxruntime latency (batch 1, 1 thread)", "",
              "| model | fp32 % | ORT default int8 % | best config int8 % | best config | failed configs | "
              "fp32 p50 ms | int8 p50 ms | int8/fp32 latency |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        a, lat = r["test_accuracy"], r["latency_ms_b1_t1"]
        ratio = f"{lat['best'] / lat['fp32']:.2f}" if lat else "-"
        lines.append(f"| {r['model']} | {a['fp32']:.2f} | {a['ort_default']:.2f} | {a['best']:.2f} | `{r['best_config']}` | "
                     f"{r['failed_configs']} | {lat.get('fp32', float('nan')):.3f} | {lat.get('best', float('nan')):.3f} | {ratio} |")  # fmt: skip
    md = "\n".join(lines) + "\n"
    print(md)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quantune.md").write_text(md)
    (out / "quantune.json").write_text(json.dumps({"args": vars(args), "wall_seconds": wall, "measured_now": measured_now,
                                                   "rows": rows}, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
