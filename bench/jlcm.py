"""Benchmark: JLCM codebooks vs baselines, accuracy (or perplexity) against bits per weight.

Models: the example CNN and ViT on the built-in MNIST, and (``--models`` with ``lm``) a tiny
causal byte-level language model trained here on the Python standard library's source text.
Methods at 2, 3 and 4 bit indices (Yvinec et al., ICLR 2024, ALGORITHMS.md section 2):

- ``rtn``: uniform symmetric per-channel round-to-nearest (a per-row scale, integer levels);
- ``kmeans``: one per-tensor k-means codebook (Deep Compression style, no fine-tuning);
- ``jlcm-nogroup``: JLCM learning (proximal) with one group;
- ``jlcm-ste``: JLCM with G groups and the plain straight-through mapping update;
- ``jlcm``: full JLCM (G groups, permutation folding, proximal mapping update).

Bits per weight count every overhead (indices incl. padding, codebooks, scales, group
boundaries, shapes, stored permutations) over all Linear/Conv2d weights. Every CNN/ViT model is
exported as an ``onnx-codebook`` artifact: file size, onnxruntime accuracy and SQNR vs torch.

Full protocol: python bench/jlcm.py --models cnn,vit,lm --steps 300 --vit-steps 200 --calib 512
The default is reduced to finish in about 15 minutes on a busy 2-core machine; the scale that
ran is printed and written into the results.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine_info, markdown_table, write_results  # noqa: E402

METHODS = ["rtn", "kmeans", "jlcm-nogroup", "jlcm-ste", "jlcm"]


def method_config(method: str, bits: int, groups: int, steps: int, calib: int, e2e: int) -> Any:
    from edgecompress.compress.codebook.config import JLCMConfig, kmeans_config, rtn_config

    if method == "rtn":
        return rtn_config(bits)
    if method == "kmeans":
        return kmeans_config(bits)
    common = {"bits": bits, "steps": steps, "calib_samples": calib, "e2e_steps": e2e}
    if method == "jlcm-nogroup":
        return JLCMConfig(groups=1, grouping="none", **common)
    if method == "jlcm-ste":
        return JLCMConfig(groups=groups, update="ste", **common)
    return JLCMConfig(groups=groups, **common)


# ---------------------------------------------------------------- tiny causal LM on stdlib text
def stdlib_bytes(limit: int) -> bytes:
    """Source of the standard library's ``.py`` files (sorted, deterministic), up to ``limit`` bytes."""
    import sysconfig

    parts: list[bytes] = []
    total = 0
    for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        data = p.read_bytes()
        parts.append(data)
        total += len(data)
        if total >= limit:
            break
    return b"".join(parts)[:limit]


def make_lm(vocab: int = 256, dim: int = 64, depth: int = 2, heads: int = 4, ctx: int = 64) -> Any:
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, d = x.shape
            q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
            return x + self.mlp(self.norm2(x))

    class TinyLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, dim)
            self.pos = nn.Parameter(torch.zeros(1, ctx, dim))
            self.blocks = nn.Sequential(*[Block() for _ in range(depth)])
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, vocab)

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return self.head(self.norm(self.blocks(self.embed(idx) + self.pos[:, : idx.shape[1]])))

    return TinyLM()


def lm_setup(steps: int, ctx: int = 64, seed: int = 0) -> tuple[Any, Any, Any, Any]:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    data = torch.tensor(list(stdlib_bytes(400_000)), dtype=torch.int64)
    cut = int(len(data) * 0.9)
    train, held = data[:cut], data[cut:]

    def batches(src: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
        starts = torch.randint(0, len(src) - ctx - 1, (n,), generator=gen)
        return torch.stack([src[s : s + ctx + 1] for s in starts.tolist()])

    model = make_lm(ctx=ctx)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        b = batches(train, 32, gen)
        loss = F.cross_entropy(model(b[:, :-1]).reshape(-1, 256), b[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    eval_gen = torch.Generator().manual_seed(1234)
    evalset = batches(held, 128, eval_gen)
    calib = batches(train, 128, torch.Generator().manual_seed(99))[:, :-1]
    return model, evalset, calib, None


def perplexity(model: Any, evalset: Any) -> float:
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        logits = model(evalset[:, :-1])
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), evalset[:, 1:].reshape(-1))
    return float(math.exp(float(nll)))


# ---------------------------------------------------------------- runs
def run_model(name: str, args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    import torch

    from edgecompress.compress.checkpoint import ModelBundle, load_checkpoint
    from edgecompress.compress.codebook.api import apply_jlcm
    from edgecompress.compress.codebook.artifact import export_codebook_artifact, fp32_onnx
    from edgecompress.compress.data import load_splits
    from edgecompress.compress.examples import example_checkpoint
    from edgecompress.compress.training import evaluate_accuracy

    t0 = time.perf_counter()
    if name == "lm":
        module, evalset, calib, _ = lm_setup(args.lm_steps)
        metric, score = "perplexity", lambda m: perplexity(m, evalset)
        bundle, splits = None, None
    else:
        if name == "vit" and args.vit_train_steps:
            from edgecompress.compress.cache import cache_dir
            from edgecompress.compress.examples import train_example

            path = cache_dir("bench-jlcm") / f"vit{args.vit_train_steps}" / "vit.pt"
            if not path.exists():
                train_example("vit", path.parent, steps=args.vit_train_steps)
            bundle = load_checkpoint(path)
        else:
            bundle = load_checkpoint(example_checkpoint(name))
        module = bundle.module.eval()
        splits = load_splits("mnist")
        calib = torch.from_numpy(splits.calib.x[: args.calib])
        metric, score = "accuracy", lambda m: evaluate_accuracy(m, splits.test)
    fp_score = score(module)
    fp_row: dict[str, Any] = {"model": name, "method": "fp32", "bits": 32, "bits_per_weight": 32.0, metric: fp_score,
                              "scale": {"steps": args.vit_steps if name in ("vit", "lm") else args.steps,
                                        "calib": args.calib, "groups": args.groups, "threads": args.threads,
                                        "lm_train_steps": args.lm_steps if name == "lm" else None,
                                        "vit_train_steps": (args.vit_train_steps or 900) if name == "vit" else None}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        if bundle is not None:
            fp_row["onnx_bytes"] = fp32_onnx(module, tuple(bundle.input_shape), Path(tmp) / "fp32.onnx").stat().st_size
        rows.append(fp_row)
        print(f"[{name}] fp32 {metric} {fp_score:.3f} (setup {time.perf_counter() - t0:.0f}s)", flush=True)
        steps = args.vit_steps if name in ("vit", "lm") else args.steps
        for bits in args.bits:
            for method in args.methods:
                cfg = method_config(method, bits, args.groups, steps, args.calib, args.e2e_steps)
                t1 = time.perf_counter()
                small, report = apply_jlcm(module, calib, cfg)
                seconds = time.perf_counter() - t1
                row: dict[str, Any] = {"model": name, "method": method, "bits": bits,
                                       "bits_per_weight": report["accounting"]["bits_per_weight"],
                                       metric: score(small), "seconds": round(seconds, 1),
                                       "stored_permutations": sum(1 for layer in report["layers"]
                                                                  if layer["permutation"] == "stored"),
                                       "folded_permutations": sum(1 for layer in report["layers"]
                                                                  if layer["permutation"] == "folded")}  # fmt: skip
                if bundle is not None and splits is not None and not args.no_export:
                    cb = ModelBundle(small, name, bundle.input_shape, bundle.preprocessing, 10, {})
                    art = export_codebook_artifact(cb, Path(tmp) / f"{method}{bits}", report,
                                                   verify_inputs=splits.test.x[:16], measure_memory=False)  # fmt: skip
                    row["onnx_bytes"] = art.manifest.metrics["size_check"]["file_bytes"]
                    row["file_bits_per_weight"] = art.manifest.metrics["file_bits_per_weight"]
                    row["sqnr_db"] = art.manifest.metrics["export_check"]["sqnr_db"]
                    row["ort_accuracy"] = _ort_accuracy(art.model_path, splits.test)
                rows.append(row)
                print(f"[{name}] {bits}b {method:13s} bpw {row['bits_per_weight']:.3f} {metric} {row[metric]:.3f} "
                      f"({seconds:.0f}s)", flush=True)  # fmt: skip


def _ort_accuracy(path: Path, ds: Any) -> float:
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    out = np.concatenate([sess.run(None, {"input": ds.x[i : i + 256]})[0] for i in range(0, len(ds.x), 256)])
    return float((out.argmax(1) == ds.y).mean() * 100)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        sub = [r for r in rows if r["model"] == model]
        metric = "perplexity" if "perplexity" in sub[0] else "accuracy"
        for method in METHODS:
            pts = sorted((r["bits_per_weight"], r[metric]) for r in sub if r["method"] == method)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=method)
        fp = next(r[metric] for r in sub if r["method"] == "fp32")
        ax.axhline(fp, color="k", ls="--", lw=1, label="fp32")
        ax.set_title(model)
        ax.set_xlabel("bits per weight (all overheads)")
        ax.set_ylabel(metric + (" (%)" if metric == "accuracy" else ""))
        if metric == "perplexity":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="cnn,vit,lm")
    p.add_argument("--bits", default="2,3,4")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--steps", type=int, default=150, help="layer-wise steps per layer (CNN)")
    p.add_argument("--vit-steps", type=int, default=60, help="layer-wise steps per layer (ViT and LM)")
    p.add_argument("--e2e-steps", type=int, default=0)
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--lm-steps", type=int, default=400, help="training steps of the tiny LM")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: a loaded machine makes 2 much slower)")
    p.add_argument("--vit-train-steps", type=int, default=0,
                   help="train the ViT for this many steps here (0: the cached example, 900 steps)")
    p.add_argument("--append", action="store_true", help="keep other models' rows of bench/results/jlcm.json")
    p.add_argument("--no-export", action="store_true")
    args = p.parse_args(argv)
    args.bits = [int(b) for b in args.bits.split(",")]
    args.methods = args.methods.split(",")
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    previous = ROOT / "bench" / "results" / "jlcm.json"
    if args.append and previous.exists():
        models = set(args.models.split(","))
        rows = [r for r in json.loads(previous.read_text())["rows"] if r["model"] not in models]
    for model in args.models.split(","):
        run_model(model, args, rows)
        report(rows, args, argv, t0)  # after every model, so partial results survive an interrupted run


def report(rows: list[dict[str, Any]], args: argparse.Namespace, argv: list[str] | None, t0: float) -> None:
    scale = dict(vars(args))
    cols = ["model", "method", "bits", "bits_per_weight", "accuracy", "perplexity", "ort_accuracy", "onnx_bytes",
            "file_bits_per_weight", "sqnr_db", "seconds"]  # fmt: skip
    table = markdown_table(cols, [[r.get(c, "") for c in cols] for r in rows])
    cmd = "python bench/jlcm.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = (f"# JLCM benchmark\n\nCommand: `{cmd}`\n\nScale: {json.dumps(scale)}; wall time "
          f"{time.perf_counter() - t0:.0f} s.\n\n{table}\n")  # fmt: skip
    res = ROOT / "bench" / "results"
    res.mkdir(parents=True, exist_ok=True)
    plot(rows, res / "jlcm.png")
    write_results("jlcm", {"scale": scale, "machine": machine_info(), "rows": rows,
                           "wall_seconds": time.perf_counter() - t0}, md + "\n![accuracy vs bits](jlcm.png)\n")  # fmt: skip

if __name__ == "__main__":
    main()
