"""Quantune on real models, against its baselines and peers: exhaustive once, then each strategy replayed.

Models: ImageNet EfficientNet-Lite1 / Lite2 (no labels: top-1 agreement with fp32 on random crops of
scikit-image's photographs), the byte-level text encoder (100 x cosine of its embeddings with fp32 on
standard-library snippets) and the four fragile MNIST examples (top-1 on MNIST). Per model:

1. Data: calibration, validation (scores trials) and evaluation (reports the final models) never
   overlap: 128 / 300 / 500 photo crops drawn with separate seeds, text snippets with calibration
   from the training files and the rest from held-out files, MNIST's own splits.
2. Exhaustive: every configuration of a 240-point space (:func:`bench_space`: onnxruntime's calibrations,
   sizes, weight granularity, activation scheme, float layers none / first+last / those timed slower in
   int8, operator sets, 4-bit MatMuls where they apply, and brevitas' bias correction, equalization and
   GPTQ), each trial scored on the validation data and timed on onnxruntime (batch 1, ``--threads``, the
   evaluator's timer), cached in the bench tuning database (a rerun only pays new trials).
3. Strategies replayed through that cache (so they cost only their own overhead): Quantune with the
   leave-one-model-out prior (the other models' trials, latency in this runtime context; for one
   EfficientNet-Lite that includes its sibling), Quantune without a prior (``quantune-cold``), random
   (``--random-seeds``), grid and genetic (``--genetic-seeds``). For each objective, the trials
   until a configuration as good as the exhaustive pick is measured: ``accuracy`` = within
   ``--tolerance`` points of the best score; ``latency`` = within ``--max-drop`` points of fp32
   (``--max-drop-agreement`` for the agreement metric) and at most 5 % slower than the fastest such configuration.
4. Peers on the same calibration data, scored on the evaluation data and timed side by side with
   fp32 in one interleaved run: onnxruntime's ``quantize_static`` (defaults: MinMax per-tensor QDQ;
   and ``per_channel=True``), NNCF's ``nncf.quantize`` (defaults and ``fast_bias_correction=False``,
   run by ``bench/peers/nncf_quantize.py`` in a benchmark-only venv, ``--peers-python``), and
   Quantune's picks after ``--budget`` trials with the latency and accuracy objectives.

    .venv/bin/python bench/quantune_real.py [--models efficientnet-lite1 ...] [--peers-python PATH]

Writes ``bench/results/quantune_real.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench.quantune_real")
MODELS = ("efficientnet-lite1", "efficientnet-lite2", "text-encoder", "mobilenetv2", "squeezenet", "shufflenet", "resnet")
PHOTO_SPLIT = {"calib": (128, 11), "val": (300, 12), "eval": (500, 13)}  # samples, seed
TEXT_SPLIT = {"calib": (128, 11, "train"), "val": (300, 12, "eval"), "eval": (500, 13, "eval")}
LATENCY_SLACK = 1.05  # a configuration within 5 % of the fastest accepted one counts as found (timer noise)


def bench_space(prepared: Any, brevitas: bool) -> list[Any]:
    """The benchmark's space for one model: 192 onnxruntime configurations (4 calibrations x 2 sizes x
    weight granularity x activation scheme x 3 float-layer choices x 2 operator sets; x2 with 4-bit MatMuls
    where the model has MatMul weights) plus 48 brevitas ones (bias correction, equalization + bias
    correction, GPTQ; per-channel, 128 samples; each calibration, activation scheme and operator set)."""
    from edgecompress.compress.ptq.config import SearchSpace
    from edgecompress.compress.ptq.space import applies_to, enumerate_space

    calibrations = ("minmax", "entropy", "percentile99.99", "percentile99.999")
    space = SearchSpace(calibration=calibrations, calib_size=(32, 128), per_channel=(False, True),
                        activation_symmetric=(False, True), weight_symmetric=(True,),
                        keep_float=("none", "first_last", "slow"), op_types=("all", "weighted"),
                        matmul_4bit=(False, True))  # fmt: skip
    configs = [c for c in enumerate_space(space) if applies_to(c, prepared)]
    if brevitas:
        algorithms = SearchSpace(calibration=calibrations, calib_size=(128,), per_channel=(True,),
                                 activation_symmetric=(False, True), op_types=("all", "weighted"),
                                 brevitas=("bias_correction", "equalize+bias_correction", "gptq"))  # fmt: skip
        configs += [c for c in enumerate_space(algorithms, brevitas=True) if c.brevitas != "none"]
    return configs


def model_data(name: str, bundle: Any, inputs: list[Any]) -> dict[str, Any]:
    """{role: (feeds, labels or None)} and the metric, with the three roles disjoint."""
    if name.startswith("efficientnet"):
        from edgecompress.compress.data import _normalize
        from edgecompress.compress.realdata import photo_crops

        size = int(bundle.input_shape[-1])
        roles = {role: ({inputs[0].name: _normalize(photo_crops(size, n, seed=seed), bundle.preprocessing)}, None)
                 for role, (n, seed) in PHOTO_SPLIT.items()}  # fmt: skip
        return {"roles": roles, "metric": "agreement"}
    if name == "text-encoder":
        from edgecompress.compress.realdata import text_tokens

        roles = {role: (text_tokens(n, seed=seed, split=split), None) for role, (n, seed, split) in TEXT_SPLIT.items()}
        return {"roles": roles, "metric": "cosine"}
    from edgecompress.compress.data import load_splits

    s = load_splits("mnist")
    key = inputs[0].name
    return {"roles": {"calib": ({key: s.calib.x[:128]}, None), "val": ({key: s.val.x[:500]}, s.val.y[:500]),
                      "eval": ({key: s.test.x[:1000]}, s.test.y[:1000])}, "metric": "top1"}  # fmt: skip


def score_model(path: Path, feeds: dict[str, np.ndarray], labels: Any, metric: str, ref: list[np.ndarray]) -> float:
    from edgecompress.compress.ptq.ort_backend import model_outputs
    from edgecompress.runtimes.measure import score

    return float(score(metric, model_outputs(path, feeds, 2), labels=labels, reference=ref))


def replay(strategy: Any, ev: Any, found: Any, limit: int) -> int | None:
    """Trials until ``found(trial)`` holds, every proposal served from the evaluator's cache."""
    for n in range(1, limit + 1):
        batch = strategy.propose(1)
        if not batch:
            return None
        strategy.claim(batch)
        r = ev.lookup(batch[0])
        if r is None:
            raise RuntimeError(f"{batch[0].label()} is not in the bench database: run the exhaustive pass first")
        strategy.observe([r])
        if found(r):
            return n
    return None


def run_peers(m: dict[str, Any], work: Path, peers_python: str | None) -> tuple[dict[str, Path], dict[str, str]]:
    """The peers' int8 models: onnxruntime quantize_static (defaults, per-channel) and NNCF (two settings),
    and {peer: the last line of its error} for those that failed."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    from edgecompress.compress.ptq.ort_backend import calibration_reader

    calib = m["roles"]["calib"][0]

    out: dict[str, Path] = {}
    failed: dict[str, str] = {}
    for label, kw in (("ort-default", {}), ("ort-per-channel", {"per_channel": True})):
        p = work / f"{m['name']}-{label}.onnx"
        if not p.exists():
            quantize_static(str(m["fp32"]), str(p), calibration_reader(calib), quant_format=QuantFormat.QDQ, **kw)
        out[label] = p
    if peers_python:
        np.savez(work / f"{m['name']}-calib.npz", **calib)  # type: ignore[arg-type]
        for label, fast in (("nncf-default", "true"), ("nncf-accurate-bias", "false")):
            p = work / f"{m['name']}-{label}.onnx"
            if not p.exists():
                proc = subprocess.run([peers_python, str(ROOT / "bench" / "peers" / "nncf_quantize.py"), str(m["fp32"]),
                                       str(work / f"{m['name']}-calib.npz"), str(p), "--fast-bias-correction", fast],
                                      capture_output=True, text=True, check=False)  # fmt: skip
                if proc.returncode != 0:
                    log.warning("%s %s failed: %s", m["name"], label, proc.stderr[-1500:])
                    failed[label] = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
                    continue
            out[label] = p
    return out, failed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--random-seeds", type=int, default=20)
    ap.add_argument("--genetic-seeds", type=int, default=5)
    ap.add_argument("--quantune-seeds", type=int, default=5)
    ap.add_argument("--tolerance", type=float, default=1.0, help="points below the exhaustive best that count as found")
    ap.add_argument("--max-drop", type=float, default=1.0, help="the latency objective's accepted drop (points)")
    ap.add_argument("--max-drop-agreement", type=float, default=5.0,
                    help="the accepted drop for the label-free top-1 agreement metric (no int8 configuration of the "
                         "EfficientNet-Lites keeps 99 %% agreement, so 1 pt would leave nothing to find)")
    ap.add_argument("--budget", type=int, default=20, help="trials of the Quantune runs whose picks are reported")
    ap.add_argument("--peers-python", default=None, help="python of a venv with nncf (the NNCF peer rows)")
    ap.add_argument("--database", default=None)
    ap.add_argument("--exhaustive-only", action="store_true")
    ap.add_argument("--space-limit", type=int, default=None, help="the first N configurations only (a smoke run)")
    ap.add_argument("--no-brevitas", action="store_true", help="leave brevitas' configurations out of the space")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.ERROR)
    log.setLevel(logging.INFO)

    import torch

    torch.set_num_threads(args.threads)
    from edgecompress.compress.cache import cache_dir
    from edgecompress.compress.checkpoint import load_checkpoint
    from edgecompress.compress.examples import example_checkpoint
    from edgecompress.compress.exporting import export_torch_onnx
    from edgecompress.compress.ptq.database import TuningDatabase, load_prior
    from edgecompress.compress.ptq.descriptors import model_descriptors
    from edgecompress.compress.ptq.evaluator import Evaluator, LatencySpec, quantize_trial_model
    from edgecompress.compress.ptq.objective import choose
    from edgecompress.compress.ptq.ort_backend import model_outputs, prepare_model
    from edgecompress.compress.ptq.search import _sensitivity_ranking, _slow_layers, run_search
    from edgecompress.compress.ptq.strategies import GridSearch, make_strategy
    from edgecompress.runtimes.measure import measure_interleaved
    from edgecompress.runtimes.ort_runtime import OrtSession

    t_start = time.perf_counter()
    db = TuningDatabase(Path(args.database) if args.database else cache_dir("quantune") / "bench_real.sqlite")
    spec = LatencySpec.for_target(None, threads=args.threads, seconds=0.5)
    work = Path(tempfile.mkdtemp(prefix="quantune-real-"))
    models: dict[str, dict[str, Any]] = {}

    for name in args.models:  # 1-2: data and the exhaustive pass (cached)
        bundle = load_checkpoint(example_checkpoint(name))
        art = export_torch_onnx(bundle, work / f"{name}-fp32")
        inputs = list(art.manifest.inputs)
        m = {"name": name, "fp32": art.model_path, **model_data(name, bundle, inputs)}
        prepared = prepare_model(art.model_path, cache_dir("quantune", "models"))
        desc = model_descriptors(art.model_path)
        db.put_model(prepared.model_hash, name, desc)
        (calib, _), (val, val_y) = m["roles"]["calib"], m["roles"]["val"]
        ev = Evaluator(prepared, calib, val, val_y, metric=m["metric"], database=db, latency=spec, threads=args.threads,
                       workdir=cache_dir("quantune", "work-real", prepared.model_hash[:24]), module=bundle.module)  # fmt: skip
        ev.set_sensitivity_source(lambda ev=ev, c=calib, v=val, y=val_y: _sensitivity_ranking(ev, c, v, y))
        ev.set_slow_source(lambda ev=ev, c=calib: _slow_layers(ev, c))
        space = bench_space(prepared, brevitas=not args.no_brevitas)[: args.space_limit]
        t0 = time.perf_counter()
        full = run_search(GridSearch(space), ev)
        ok = [t for t in full.trials if t.ok]
        log.info("%s: exhaustive %d configs (%d measured now, %d failed) in %.0f s; fp32 %.2f, best %.2f", name,
                 len(full.trials), ev.measured, len(full.trials) - len(ok), time.perf_counter() - t0,
                 ev.fp32_accuracy, max((t.accuracy or 0.0) for t in ok) if ok else float("nan"))  # fmt: skip
        m.update(prepared=prepared, desc=desc, ev=ev, full=full, measured_now=ev.measured, space=space,
                 exhaustive_seconds=sum(t.seconds for t in full.trials if not t.cached))  # fmt: skip
        models[name] = m
    if args.exhaustive_only:
        return

    rows = []
    for name, m in models.items():  # 3: strategies replayed; 4: peers and picks on the evaluation data
        ev, trials, space = m["ev"], m["full"].trials, m["space"]
        ok = [t for t in trials if t.ok]
        best_acc = max(t.accuracy or 0.0 for t in ok)
        max_drop = args.max_drop_agreement if m["metric"] == "agreement" else args.max_drop
        lat_pick = choose(trials, objective="latency", fp32_accuracy=ev.fp32_accuracy,
                          fp32_latency_ms=ev.fp32_latency_ms, max_drop=max_drop)  # fmt: skip
        goals: dict[str, Any] = {"accuracy": lambda r, b=best_acc: r.ok and (r.accuracy or 0.0) >= b - args.tolerance}
        if lat_pick.trial is not None:
            floor, fastest = ev.fp32_accuracy - max_drop, float(lat_pick.trial.latency_ms or 0.0)
            goals["latency"] = lambda r, f=floor, t=fastest: (r.ok and (r.accuracy or 0.0) >= f
                                                              and float(r.latency_ms or 1e9) <= t * LATENCY_SLACK)  # fmt: skip
        prior = load_prior(db, use_seed=False, exclude_hashes={m["prepared"].model_hash}, exclude_names={name},
                           latency_context=spec.context)  # fmt: skip
        strategies = {"quantune": args.quantune_seeds, "quantune-cold": args.quantune_seeds, "random": args.random_seeds,
                      "grid": 1, "genetic": args.genetic_seeds}  # fmt: skip
        found: dict[str, dict[str, Any]] = {}
        for objective, goal in goals.items():
            for sname, seeds in strategies.items():
                counts, overhead = [], []
                for s in range(seeds):
                    st = make_strategy(sname.removesuffix("-cold"), space, seed=s, descriptors=m["desc"],
                                       fp32_accuracy=ev.fp32_accuracy, prior=None if sname.endswith("-cold") else prior,
                                       objective=objective, max_drop=max_drop,
                                       fp32_latency_ms=ev.fp32_latency_ms)  # fmt: skip
                    n = replay(st, ev, goal, len(space))
                    counts.append(n if n is not None else len(space))
                    overhead.append(st.overhead_seconds)
                found.setdefault(objective, {})[sname] = {"mean": statistics.mean(counts), "min": min(counts),
                                                          "max": max(counts), "runs": seeds,
                                                          "overhead_s": statistics.mean(overhead)}  # fmt: skip
        # Quantune as a user runs it: --budget trials, each objective; the pick quantized for the eval data.
        picks: dict[str, Any] = {}
        for objective in ("latency", "accuracy"):
            st = make_strategy("quantune", space, seed=0, descriptors=m["desc"], fp32_accuracy=ev.fp32_accuracy,
                               prior=prior, objective=objective, max_drop=max_drop,
                               fp32_latency_ms=ev.fp32_latency_ms)  # fmt: skip
            seen: list[Any] = []
            replay(st, ev, lambda r, seen=seen: bool(seen.append(r)), args.budget)
            ch = choose(seen, objective=objective, fp32_accuracy=ev.fp32_accuracy, fp32_latency_ms=ev.fp32_latency_ms,
                        max_drop=max_drop)  # fmt: skip
            picks[f"quantune-{objective}"] = (ch.trial, ch.reason)
        picks["exhaustive-accuracy"] = (max(ok, key=lambda t: (t.accuracy or 0.0, -(t.latency_ms or 0.0))), "")
        fast_enough = [t for t in ok if (t.latency_ms or 1e9) <= 0.7 * float(ev.fp32_latency_ms or 0.0)]
        if fast_enough:
            picks["exhaustive-best-at-0.7x"] = (max(fast_enough, key=lambda t: t.accuracy or 0.0), "")
        paths: dict[str, Path] = {"fp32": Path(m["fp32"])}
        labels: dict[str, str] = {"fp32": "fp32"}
        for key, (trial, reason) in picks.items():
            if trial is None:
                labels[key] = f"fp32 ({reason})"
                paths[key] = Path(m["fp32"])
                continue
            p = work / f"{name}-{key}.onnx"
            quantize_trial_model(ev.task(trial.config), m["roles"]["calib"][0], p)
            paths[key], labels[key] = p, trial.config.label()
        peers, peer_failures = run_peers(m, work, args.peers_python)
        for key, p in peers.items():
            paths[key], labels[key] = p, key
        eval_x, eval_y = m["roles"]["eval"]
        ref = model_outputs(m["fp32"], eval_x, args.threads)
        scores = {k: score_model(p, eval_x, eval_y, m["metric"], ref) for k, p in paths.items()}
        one = {k: v[:1] for k, v in eval_x.items()}
        keys = list(paths)
        sessions = [OrtSession(str(paths[k]), list(spec.providers), args.threads) for k in keys]
        stats = measure_interleaved(sessions, one, rounds=6, min_runs=60, min_seconds=3.0)
        lat = {k: s.p50_ms for k, s in zip(keys, stats, strict=True)}
        rows.append({
            "model": name, "metric": m["metric"], "space": len(space), "failed": len(trials) - len(ok),
            "fp32_val": ev.fp32_accuracy, "fp32_val_latency_ms": ev.fp32_latency_ms, "best_val": best_acc,
            "latency_pick": None if lat_pick.trial is None else lat_pick.trial.config.label(),
            "latency_pick_reason": lat_pick.reason, "max_drop": max_drop, "found": found, "exhaustive_seconds": m["exhaustive_seconds"],
            "measured_now": m["measured_now"],
            "eval": {k: {"label": labels[k], "score": scores[k], "p50_ms": lat[k], "vs_fp32": lat["fp32"] / lat[k]}
                     for k in keys},
            "peer_failures": peer_failures,
            "samples": {role: len(next(iter(x.values()))) for role, (x, _) in m["roles"].items()},
        })  # fmt: skip
        log.info("%s: %s", name, {o: {s: round(v["mean"], 1) for s, v in d.items()} for o, d in found.items()})
    write_results(rows, args, time.perf_counter() - t_start, Path(args.out))


def write_results(rows: list[dict[str, Any]], args: argparse.Namespace, wall: float, out: Path) -> None:
    strategies = ["quantune", "quantune-cold", "random", "grid", "genetic"]
    cmd = ".venv/bin/python bench/quantune_real.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(v) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if v not in (None, False) and k not in ("out", "database"))  # fmt: skip
    lines = ["# Quantune on real models: trials to the exhaustive pick, and the int8 models against the peers", "",
             f"Command: `{cmd}`  ", f"{wall / 60:.1f} min wall on this 2-core machine; onnxruntime batch 1, "
             f"{args.threads} threads; space of {rows[0]['space'] if rows else 0} configurations per model.", ""]  # fmt: skip
    for objective, what in (("accuracy", f"within {args.tolerance:g} pt of the exhaustive best score"),
                            ("latency", f"within `max drop` pt of fp32 and at most {LATENCY_SLACK:.2f}x the "
                                        "fastest such configuration")):  # fmt: skip
        lines += [f"## Trials until a configuration {what} (objective `{objective}`; mean [min-max] over seeds)", "",
                  "| model | max drop | fp32 | best | " + " | ".join(strategies)
                  + " | quantune/random | quantune/grid | cold/random |",
                  "|---|---|---|---|" + "---|" * (len(strategies) + 3)]  # fmt: skip
        ratios_r, ratios_g, ratios_c = [], [], []
        for r in rows:
            f = r["found"].get(objective)
            if f is None:
                lines.append(f"| {r['model']} | {r['max_drop']:g} | {r['fp32_val']:.2f} | {r['best_val']:.2f} | " + " | ".join(
                    "n/a" for _ in strategies) + f" | n/a: {r['latency_pick_reason']} | | |")  # fmt: skip
                continue
            ratios_r.append(f["quantune"]["mean"] / f["random"]["mean"])
            ratios_g.append(f["quantune"]["mean"] / f["grid"]["mean"])
            ratios_c.append(f["quantune-cold"]["mean"] / f["random"]["mean"])
            lines.append(f"| {r['model']} | {r['max_drop']:g} | {r['fp32_val']:.2f} | {r['best_val']:.2f} | " + " | ".join(
                f"{f[s]['mean']:.1f} [{f[s]['min']}-{f[s]['max']}]" for s in strategies)
                + f" | {ratios_r[-1]:.2f} | {ratios_g[-1]:.2f} | {ratios_c[-1]:.2f} |")  # fmt: skip
        if ratios_r:
            lines.append(f"| **mean ratio** | | | | | | | | | {statistics.mean(ratios_r):.2f} | {statistics.mean(ratios_g):.2f} "
                         f"| {statistics.mean(ratios_c):.2f} |")  # fmt: skip
        lines.append("")
    lines += ["## The models on the evaluation data (never seen by calibration or the search)", "",
              "Latency: p50 at batch 1, all of a model's rows interleaved in one run; `vs fp32` > 1 is faster.", ""]
    for r in rows:
        lines += [f"### {r['model']} ({r['metric']}; {r['samples']})", "", "| model | configuration | score | p50 ms | vs fp32 |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for k, e in r["eval"].items():
            lines.append(f"| {k} | `{e['label']}` | {e['score']:.2f} | {e['p50_ms']:.3f} | {e['vs_fp32']:.2f}x |")
        for k, err in r.get("peer_failures", {}).items():
            lines.append(f"| {k} | failed: `{err}` | | | |")
        lines.append("")
    md = "\n".join(lines) + "\n"
    print(md)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quantune_real.md").write_text(md)
    (out / "quantune_real.json").write_text(json.dumps({"args": vars(args), "wall_seconds": wall, "rows": rows},
                                                       indent=2, default=str) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
