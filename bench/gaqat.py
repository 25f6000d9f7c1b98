"""GAQAT on DomainBed's Rotated-MNIST (leave one domain out): held-out-domain accuracy per arm.

Arms: fp32 ERM, fp32 SAGM, QAT (LSQ, Adam), QAT+SAGM, GAQAT with freeze = task | smooth | scale.
The QAT arms start from the fp32 ERM model of the same seed. Training and validation use the
five source domains only; the held-out domain is touched only for the reported accuracy.
Quantized accuracies are measured on onnxruntime (the exported QDQ graph), with the fake-quant
torch accuracy beside it. The conflict diagnostic is the per-quantizer sign-conflict rate between
the task and smoothness parts of each scale's SAGM gradient, logged in the QAT+SAGM arm.

Reduced default (fits ~15 minutes on a busy 2-core machine):
    python bench/gaqat.py                      # held-out 0deg and 75deg, W4A4, seed 0
Full protocol (hours on 2 cores):
    python bench/gaqat.py --full               # 6 held-out domains x W4A4, W3A3 x seeds 0,1,2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine_info, markdown_table, write_results  # noqa: E402

ARMS = ("fp32-erm", "fp32-sagm", "qat", "qat-sagm", "gaqat-task", "gaqat-smooth", "gaqat-scale")


def _split_sources(ds: Any, held_out: int, seed: int) -> tuple[Any, Any, Any]:
    import numpy as np

    src = np.flatnonzero(ds.domains != held_out)
    rng = np.random.default_rng([seed, held_out])
    src = rng.permutation(src)
    n_val = len(src) // 10
    return ds.subset(src[n_val:], "train"), ds.subset(src[:n_val], "val"), ds.domain(held_out)


class _Recorder:
    """Keeps the GAQAT log records of a run in memory (the bench writes no per-run folders)."""

    def __init__(self, hooks: Any):
        self.hooks = hooks
        self.records: list[dict[str, Any]] = []
        original = hooks.on_step_end

        def on_step_end(model: Any, step: int) -> dict[str, Any]:
            rec = original(model, step)
            if rec:
                self.records.append({"step": step, **rec})
            return rec

        hooks.on_step_end = on_step_end


def _summarise_conflict(records: list[dict[str, Any]]) -> dict[str, Any]:
    sums: dict[str, list[float]] = {}
    frozen: dict[str, int] = {}
    for r in records:
        for n, v in r.get("conflict", {}).items():
            sums.setdefault(n, []).append(v)
        for n in r.get("frozen", []):
            frozen[n] = r["step"]
    return {"mean_conflict": {n: sum(v) / len(v) for n, v in sums.items()}, "frozen_at": frozen}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from edgecompress.compress.data import load_dataset
    from edgecompress.compress.models import create_model
    from edgecompress.compress.qat import GAQATConfig
    from edgecompress.compress.qat.gaqat import QATHooks
    from edgecompress.compress.qat.onnx_qdq import export_qdq_onnx
    from edgecompress.compress.qat.train import onnx_agreement, quantize_model, train_quantized
    from edgecompress.compress.training import TrainConfig, Trainer, TrainingHooks, evaluate_accuracy

    torch.set_num_threads(args.threads)
    ds = load_dataset("rotated-mnist")
    runs: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for held_out in args.held_out:
        for seed in args.seeds:
            train, val, test = _split_sources(ds, held_out, seed)
            fp_cfg = TrainConfig(max_steps=args.fp_steps, batch_size=args.batch_size, lr=args.lr, seed=seed,
                                 log_every=10**9)  # fmt: skip
            fp_models: dict[str, Any] = {}
            for arm, hooks in (("fp32-erm", TrainingHooks()),
                               ("fp32-sagm", QATHooks(GAQATConfig(rho=args.rho, alpha=args.alpha), sharpness="sagm"))):  # fmt: skip
                if arm not in args.arms and arm != "fp32-erm":
                    continue
                torch.manual_seed(seed)
                model = create_model("cnn")
                t0 = time.perf_counter()
                Trainer(model, train, None, fp_cfg, None, hooks).fit()
                fp_models[arm] = model
                runs.append({"arm": arm, "held_out": held_out, "domain": ds.domain_names[held_out], "seed": seed,
                             "bits": None, "val_acc": evaluate_accuracy(model, val),
                             "heldout_acc": evaluate_accuracy(model, test), "seconds": time.perf_counter() - t0})  # fmt: skip
                print(f"[{time.perf_counter() - t_start:6.0f}s] {runs[-1]}", flush=True)
            for bits in args.bits:
                for arm in ARMS[2:]:
                    if arm not in args.arms:
                        continue
                    method = "gaqat" if arm.startswith("gaqat") else arm
                    freeze = arm.split("-", 1)[1] if arm.startswith("gaqat") else "task"
                    cfg = GAQATConfig(method=method, bits=bits, freeze=freeze, max_steps=args.qat_steps,
                                      batch_size=args.batch_size, lr=args.qat_lr, seed=seed, rho=args.rho,
                                      alpha=args.alpha, window=args.window, freeze_every=args.freeze_every,
                                      tau=args.tau, warmup_steps=args.warmup)  # fmt: skip
                    torch.manual_seed(seed)
                    model = quantize_model(fp_models["fp32-erm"], cfg, train.x)
                    hooks = QATHooks(cfg)
                    rec = _Recorder(hooks)
                    t0 = time.perf_counter()
                    train_quantized(model, train, None, cfg, None, hooks=hooks)
                    secs = time.perf_counter() - t0
                    with tempfile.TemporaryDirectory() as tmp:
                        path = Path(tmp) / "m.onnx"
                        export_qdq_onnx(model, torch.zeros(1, 1, 28, 28), path, 17)
                        check = onnx_agreement(model, path, test)
                    runs.append({"arm": arm, "held_out": held_out, "domain": ds.domain_names[held_out], "seed": seed,
                                 "bits": bits, "val_acc": evaluate_accuracy(model, val),
                                 "heldout_acc": check["onnxruntime_accuracy"], "heldout_acc_torch": check["torch_accuracy"],
                                 "ort_top1_agreement": check["top1_agreement"], "ort_sqnr_db": check["sqnr_db"],
                                 "seconds": secs, **_summarise_conflict(rec.records)})  # fmt: skip
                    print(f"[{time.perf_counter() - t_start:6.0f}s] {arm} W{bits} {ds.domain_names[held_out]} seed {seed}: "
                          f"held-out {check['onnxruntime_accuracy']:.2f}% (torch {check['torch_accuracy']:.2f}%)", flush=True)  # fmt: skip
            _write(args, runs, time.perf_counter() - t_start, ds.domain_names, partial=True)
    return _write(args, runs, time.perf_counter() - t_start, ds.domain_names, partial=False)


def _fmt(vals: list[float]) -> str:
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}"


def _write(
    args: argparse.Namespace,
    runs: list[dict[str, Any]],
    wall: float,
    names: tuple[str, ...],
    *,
    partial: bool,
) -> dict[str, Any]:
    domains = [d for d in args.held_out if any(r["held_out"] == d for r in runs)]
    settings = [(a, None) for a in ARMS[:2]] + [(a, b) for b in args.bits for a in ARMS[2:]]
    rows = []
    for arm, bits in settings:
        sel = [r for r in runs if r["arm"] == arm and r["bits"] == bits]
        if not sel:
            continue
        row: list[Any] = [arm, "fp32" if bits is None else f"W{bits}A{bits}"]
        for d in domains:
            row.append(_fmt([r["heldout_acc"] for r in sel if r["held_out"] == d]))
        seeds = sorted({r["seed"] for r in sel})
        per_seed = [statistics.mean(r["heldout_acc"] for r in sel if r["seed"] == s) for s in seeds]
        row += [_fmt(per_seed), _fmt([r["val_acc"] for r in sel])]
        rows.append(row)
    cols = [
        "arm",
        "precision",
        *[f"held-out {names[d]}" for d in domains],
        "mean (± std over seeds)",
        "source val (± std over runs)",
    ]
    paired_rows = []
    for bits in args.bits:
        base = {
            (r["held_out"], r["seed"]): r["heldout_acc"]
            for r in runs
            if r["arm"] == "qat-sagm" and r["bits"] == bits
        }
        for arm in ("gaqat-task", "gaqat-smooth", "gaqat-scale", "qat"):
            diffs = [r["heldout_acc"] - base[(r["held_out"], r["seed"])] for r in runs
                     if r["arm"] == arm and r["bits"] == bits and (r["held_out"], r["seed"]) in base]  # fmt: skip
            if diffs:
                wins = sum(d > 0 for d in diffs)
                ties = sum(d == 0 for d in diffs)
                paired_rows.append(
                    [f"W{bits}A{bits}", arm, _fmt(diffs), f"{wins}/{len(diffs)} (ties {ties})"]
                )
    conflict_rows = []
    for bits in args.bits:
        sagm = [r for r in runs if r["arm"] == "qat-sagm" and r["bits"] == bits and r.get("mean_conflict")]
        gaqat = [r for r in runs if r["arm"] == "gaqat-task" and r["bits"] == bits]
        layers = list(sagm[0]["mean_conflict"]) if sagm else []
        for layer in layers:
            rates = [r["mean_conflict"][layer] for r in sagm]
            frozen = [r["frozen_at"][layer] for r in gaqat if layer in r.get("frozen_at", {})]
            conflict_rows.append([f"W{bits}A{bits}", layer, statistics.mean(rates), f"{min(rates):.3f}-{max(rates):.3f}",
                                  f"{len(frozen)}/{len(gaqat)}" + (f" (step {min(frozen)}-{max(frozen)})" if frozen else "")])  # fmt: skip
    agreement = [r["ort_top1_agreement"] for r in runs if "ort_top1_agreement" in r]
    scale = (f"held-out domains {[names[d] for d in domains]}, bits {args.bits}, seeds {args.seeds}, "
             f"fp32 {args.fp_steps} steps, QAT {args.qat_steps} steps, batch {args.batch_size}, "
             f"threads {args.threads}; GAQAT n={args.window} K={args.freeze_every} tau={args.tau} "
             f"warm-up {args.warmup} (defaults, not tuned)")  # fmt: skip
    md = "\n\n".join([
        f"## GAQAT on Rotated-MNIST (leave one domain out){' (partial)' if partial else ''}",
        f"Command: `python bench/gaqat.py {' '.join(sys.argv[1:])}`".rstrip(),
        f"Scale that ran: {scale}. Wall time {wall:.0f} s. Quantized accuracies: onnxruntime on the QDQ "
        f"graph (min top-1 agreement with fake-quant torch {min(agreement) if agreement else float('nan'):.2f}%).",
        markdown_table(cols, rows),
        "### Paired difference to QAT+SAGM (same held-out domain and seed), held-out accuracy points",
        markdown_table(["bits", "arm", "minus QAT+SAGM (mean ± std)", "wins"], paired_rows),
        "### Conflict rate per quantizer scale (task vs smoothness gradient sign, mean over steps)",
        "Mean over the QAT+SAGM runs of the per-step fraction of scale channels whose task and smoothness "
        "gradients disagree in sign; last column: in how many GAQAT (freeze=task) runs the quantizer was frozen.",
        markdown_table(["bits", "quantizer", "conflict rate (QAT+SAGM)", "range over runs", "frozen by GAQAT"],
                       conflict_rows),
    ])  # fmt: skip
    data = {"scale": scale, "wall_seconds": wall, "partial": partial, "args": vars(args), "runs": runs,
            "machine": machine_info()}  # fmt: skip
    if partial:
        from bench.common import RESULTS

        RESULTS.mkdir(parents=True, exist_ok=True)
        import json

        (RESULTS / f"{args.name}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
        (RESULTS / f"{args.name}.md").write_text(md + "\n")
    else:
        write_results(args.name, data, md)
    return data


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--held-out", type=int, nargs="+", default=[0, 5], help="held-out domain indices (0..5)")
    ap.add_argument("--bits", type=int, nargs="+", default=[4])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--fp-steps", type=int, default=300)
    ap.add_argument("--qat-steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--qat-lr", type=float, default=5e-4)
    ap.add_argument("--rho", type=float, default=0.05)
    ap.add_argument("--alpha", type=float, default=0.001)
    ap.add_argument("--window", type=int, default=20)
    ap.add_argument("--freeze-every", type=int, default=20)
    ap.add_argument("--tau", type=float, default=0.3)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="gaqat", help="results file stem in bench/results/")
    ap.add_argument(
        "--merge", nargs="+", default=None, help="re-tabulate these finished result stems into --name"
    )
    ap.add_argument(
        "--full", action="store_true", help="the full protocol: 6 domains, W4A4+W3A3, 3 seeds, longer"
    )
    args = ap.parse_args(argv)
    if args.full:
        args.held_out, args.bits, args.seeds = [0, 1, 2, 3, 4, 5], [4, 3], [0, 1, 2]
        args.fp_steps, args.qat_steps, args.warmup = max(args.fp_steps, 2000), max(args.qat_steps, 1000), 200
    if args.merge:
        merge(args)
        return
    run(args)


def merge(args: argparse.Namespace) -> dict[str, Any]:
    """Tabulate several finished runs (e.g. W4A4 and W3A3, or extra seeds) together without retraining."""
    import json

    from bench.common import RESULTS

    runs: list[dict[str, Any]] = []
    wall = 0.0
    for stem in args.merge:
        data = json.loads((RESULTS / f"{stem}.json").read_text())
        if data.get("partial"):
            raise SystemExit(f"{stem} is a partial result; wait for it to finish")
        seen = {(r["arm"], r["bits"], r["held_out"], r["seed"]) for r in runs}
        # fp32 ERM is retrained (deterministically) by every run: keep one copy per seed and domain
        runs += [r for r in data["runs"] if (r["arm"], r["bits"], r["held_out"], r["seed"]) not in seen]
        wall += data["wall_seconds"]
        for key in ("fp_steps", "qat_steps", "batch_size", "window", "freeze_every", "tau", "warmup"):
            if data["args"][key] != getattr(args, key):
                raise SystemExit(
                    f"{stem} ran with {key}={data['args'][key]}, not {getattr(args, key)}: not comparable"
                )
    args.held_out = sorted({r["held_out"] for r in runs})
    args.bits = sorted({r["bits"] for r in runs if r["bits"] is not None}, reverse=True)
    args.seeds = sorted({r["seed"] for r in runs})
    names = ("0deg", "15deg", "30deg", "45deg", "60deg", "75deg")
    return _write(args, runs, wall, names, partial=False)


if __name__ == "__main__":
    main()
