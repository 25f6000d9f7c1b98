"""Benchmark: N:M sparsity arms (one-shot, SR-STE, MDGF exp/linear, SDGF stepwise/geometric) on MNIST.

Starts from a dense model trained on the built-in MNIST, applies every arm at every pattern, and
reports test accuracy (torch) next to the dense model. Every exported weight pattern is checked
on the torch weights (``check_module_pattern``); the ONNX-level check is in the tests and the CLI.

Full protocol (ALGORITHMS.md section 3, issue 6):
    python bench/nm_sparsity.py --models cnn,vit --patterns 2:4,1:4,1:8,1:16 --seeds 0,1,2 \
        --steps 1000 --vit-steps 1000 --base-steps 600 --vit-base-steps 900
The default (one seed; CNN 4 patterns x 60 steps, ViT 2 patterns x 40 steps from a 300-step base)
is a reduced scale meant to finish in about 15 minutes on a 2-core machine shared with other jobs;
the scale that ran is written into the results. A control arm trains the dense model for the same
steps, so gains from extra training are not credited to sparsity.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"
ARMS = {
    "oneshot": {"method": "oneshot"},
    "srste": {"method": "srste"},
    "mdgf-exp": {"method": "mdgf", "decay": "exp"},
    "mdgf-linear": {"method": "mdgf", "decay": "linear"},
    "sdgf-stepwise": {"method": "sdgf", "sdgf_schedule": "stepwise"},
    "sdgf-geometric": {"method": "sdgf", "sdgf_schedule": "geometric"},
}


def base_model(name: str, steps: int, seed: int, folder: Path):
    """A dense model trained for ``steps`` (cached in ``folder``)."""
    from edgecompress.compress.checkpoint import load_checkpoint
    from edgecompress.compress.examples import DEFAULT_STEPS, example_checkpoint, train_example

    if steps == DEFAULT_STEPS.get(name):
        return load_checkpoint(example_checkpoint(name, seed=seed))  # the shared, cached example
    path = folder / f"seed{seed}-{steps}" / f"{name}.pt"
    if not path.exists():
        train_example(name, path.parent, steps=steps, seed=seed)
    return load_checkpoint(path)


def run_arm(bundle, splits, arm: str, pattern: str, steps: int, seed: int, lr: float,
            overrides: dict | None = None) -> dict:  # fmt: skip
    from edgecompress.compress.sparsity import NMSparsityConfig
    from edgecompress.compress.sparsity.api import apply_nm_sparsity, check_module_pattern

    cfg = NMSparsityConfig(pattern=pattern, max_steps=steps, lr=lr, seed=seed, eval_every=10**6,
                           checkpoint_every=10**6, **{**ARMS[arm], **(overrides or {})})  # fmt: skip
    t0 = time.perf_counter()
    sparse, metrics = apply_nm_sparsity(bundle, cfg, splits)
    violations = sum(check_module_pattern(sparse.module, sparse.metadata["nm_sparsity"]).values())
    return {"test_accuracy": metrics["test_accuracy"], "sparsity_in_scope": metrics["sparsity_in_scope"],
            "violations": violations, "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip


def dense_finetune(bundle, splits, steps: int, seed: int, lr: float) -> float:
    """Control arm: the dense model trained for the same steps and learning rate, no sparsity."""
    import copy

    from edgecompress.compress.training import TrainConfig, Trainer, evaluate_accuracy

    model = copy.deepcopy(bundle.module)
    cfg = TrainConfig(max_steps=steps, batch_size=64, lr=lr, optimizer="adamw", seed=seed, eval_every=10**6,
                      checkpoint_every=10**6, early_stop_patience=None, lr_schedule="cosine", log_every=10)  # fmt: skip
    Trainer(model, splits.train, None, cfg).fit()
    return evaluate_accuracy(model, splits.test)


def summarise(rows: list[dict]) -> dict:
    """(model, pattern, arm) -> mean/std over seeds."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["pattern"], r["arm"]), []).append(r["test_accuracy"])
    return {
        k: {"mean": statistics.mean(v), "std": statistics.pstdev(v) if len(v) > 1 else 0.0, "n": len(v)}
        for k, v in groups.items()
    }


def markdown(result: dict) -> str:
    summary = summarise(result["rows"])
    arms = result["scale"]["arms"]
    lines = [f"N:M sparsity on MNIST (test accuracy %, mean ± std over seeds {result['scale']['seeds']}; "
             f"scale: {json.dumps(result['scale'])})", ""]  # fmt: skip
    lines.append(
        "| model | dense | dense + same fine-tuning | pattern | "
        + " | ".join(arms)
        + " | best trained − SR-STE |"
    )
    lines.append("|---|---|---|---|" + "---|" * len(arms) + "---|")
    controls = result.get("dense_finetuned_per_seed", {})
    for model, dense in result["dense"].items():
        ft = controls.get(model)
        ft_cell = f"{statistics.mean(ft.values()):.2f}" if ft else "-"
        for pattern in result["scale"]["vit_patterns" if model == "vit" else "patterns"]:
            cells, best = [], None
            for arm in arms:
                s = summary.get((model, pattern, arm))
                cells.append("-" if s is None else f"{s['mean']:.2f} ± {s['std']:.2f}")
                if s is not None and arm not in ("oneshot", "srste"):
                    best = s["mean"] if best is None else max(best, s["mean"])
            sr = summary.get((model, pattern, "srste"))
            gap = "-" if sr is None or best is None else f"{best - sr['mean']:+.2f}"
            lines.append(
                f"| {model} | {dense:.2f} | {ft_cell} | {pattern} | " + " | ".join(cells) + f" | {gap} |"
            )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarise(result["rows"])
    models = list(result["dense"])
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    patterns = result["scale"]["patterns"]
    for ax, model in zip(axes[0], models, strict=True):
        for arm in result["scale"]["arms"]:
            xs = [i for i, p in enumerate(patterns) if (model, p, arm) in summary]
            if not xs:
                continue
            ys = [summary[(model, patterns[i], arm)]["mean"] for i in xs]
            err = [summary[(model, patterns[i], arm)]["std"] for i in xs]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=arm)
        ax.axhline(result["dense"][model], color="k", linestyle="--", label="dense")
        ax.set_xticks(range(len(patterns)), patterns)
        ax.set_title(f"{model} on MNIST")
        ax.set_xlabel("N:M pattern")
        ax.set_ylabel("test accuracy %")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(result: dict, name: str = "nm_sparsity") -> str:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (RESULTS / f"{name}.md").write_text(md)
    if result["rows"]:
        plot(result, RESULTS / f"{name}.png")
    return md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="cnn,vit")
    ap.add_argument("--patterns", default="2:4,1:4,1:8,1:16")
    ap.add_argument(
        "--vit-patterns", default="2:4,1:8", help="Patterns for the ViT (slower); 'same' = --patterns."
    )
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", type=int, default=60, help="Sparse training steps per arm (CNN).")
    ap.add_argument("--vit-steps", type=int, default=40, help="Sparse training steps per arm (ViT).")
    ap.add_argument("--base-steps", type=int, default=600, help="Dense pre-training steps (CNN).")
    ap.add_argument("--vit-base-steps", type=int, default=300, help="Dense pre-training steps (ViT).")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                    help="Override an NMSparsityConfig field for every arm (ablations), e.g. dense_fraction=0.")  # fmt: skip
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--out-name", default="nm_sparsity", help="Result files: bench/results/<out-name>.{json,md,png}."
    )
    ap.add_argument(
        "--no-dense-control",
        dest="dense_control",
        action="store_false",
        help="Skip the control arm: the dense model fine-tuned for the same steps.",
    )
    ap.add_argument(
        "--cache", default=None, help="Folder for the dense base models (default: the toolchain cache)."
    )
    args = ap.parse_args(argv)

    import torch

    from edgecompress.compress.data import load_splits
    from edgecompress.compress.training import evaluate_accuracy

    torch.set_num_threads(args.threads)
    overrides: dict = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--set {item!r} must look like FIELD=VALUE")
        overrides[key] = json.loads(value) if value[:1] in "0123456789-[{tfn" else value
    models = args.models.split(",")
    patterns = args.patterns.split(",")
    vit_patterns = patterns if args.vit_patterns == "same" else args.vit_patterns.split(",")
    arms = args.arms.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        ap.error(f"unknown arms {unknown}; known: {', '.join(ARMS)}")
    scale = {"models": models, "patterns": patterns, "vit_patterns": vit_patterns, "arms": arms, "seeds": seeds,
             "steps": args.steps, "vit_steps": args.vit_steps, "base_steps": args.base_steps,
             "vit_base_steps": args.vit_base_steps, "lr": args.lr, "threads": args.threads,
             "dense_control": args.dense_control, "overrides": overrides}  # fmt: skip
    result: dict = {"scale": scale, "dense": {}, "rows": [], "command": " ".join(sys.argv)}
    from edgecompress.compress.cache import cache_dir

    cache = Path(args.cache) if args.cache else cache_dir("bench", "nm_sparsity")
    splits = load_splits("mnist")
    t_start = time.perf_counter()
    for model in models:
        is_vit = model == "vit"
        for seed in seeds:
            bundle = base_model(model, args.vit_base_steps if is_vit else args.base_steps, seed, cache)
            dense = evaluate_accuracy(bundle.module, splits.test)
            result["dense"].setdefault(model, dense)
            result.setdefault("dense_per_seed", {}).setdefault(model, {})[str(seed)] = dense
            if args.dense_control:
                steps = args.vit_steps if is_vit else args.steps
                acc = dense_finetune(bundle, splits, steps, seed, args.lr)
                result.setdefault("dense_finetuned_per_seed", {}).setdefault(model, {})[str(seed)] = acc
            for pattern in vit_patterns if is_vit else patterns:
                for arm in arms:
                    r = run_arm(
                        bundle,
                        splits,
                        arm,
                        pattern,
                        args.vit_steps if is_vit else args.steps,
                        seed,
                        args.lr,
                        overrides,
                    )
                    r.update(model=model, pattern=pattern, arm=arm, seed=seed)
                    result["rows"].append(r)
                    print(json.dumps(r), flush=True)
                    result["wall_seconds"] = round(time.perf_counter() - t_start, 1)
                    write(result, args.out_name)
        dense_seeds = result["dense_per_seed"][model].values()
        result["dense"][model] = statistics.mean(dense_seeds)
    result["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    print(write(result, args.out_name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
