"""GPU check (not run yet): 2:4 semi-structured sparse matmul vs dense on a sparse-tensor-core GPU.

Needs an NVIDIA GPU with sparse tensor cores (Ampere sm80 or newer) and a CUDA build of torch.
Measures ``torch.sparse.to_sparse_semi_structured`` (PyTorch 2:4 semi-structured sparsity) against
the dense matmul of the same 2:4-pruned fp16 weight, in the same process, for a few linear-layer
shapes, and checks that both give the same result. Writes ``bench/results/gpu_nm_check.{json,md}``.

    python bench/gpu_nm_check.py [--shapes 4096x4096x4096,...] [--repeats 50]

The ONNX path (onnxruntime's TensorRT execution provider with ``trt_sparsity_enable``) is the other
route named in the README; it needs onnxruntime-gpu with TensorRT and is not scripted here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def time_ms(fn, repeats: int) -> float:
    """Median milliseconds of ``fn`` with CUDA events (after 10 warm-up calls)."""
    import statistics

    import torch

    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="64x3072x768,64x768x3072,4096x4096x4096,8192x8192x8192",
                    help="Comma-separated BATCHxOUTxIN linear shapes.")  # fmt: skip
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="Folder for the results.")
    args = ap.parse_args(argv)

    import torch

    from edgecompress.compress.sparsity.masks import nm_mask

    if not torch.cuda.is_available():
        print("no CUDA device: nothing measured")
        return 3
    major, minor = torch.cuda.get_device_capability()
    device = torch.cuda.get_device_name()
    if major < 8:
        print(f"{device} (sm{major}{minor}) has no sparse tensor cores (needs sm80+): nothing measured")
        return 3
    from torch.sparse import to_sparse_semi_structured

    rows = []
    for spec in args.shapes.split(","):
        batch, out_f, in_f = (int(v) for v in spec.split("x"))
        g = torch.Generator(device="cuda").manual_seed(0)
        w = torch.randn(out_f, in_f, device="cuda", dtype=torch.float16, generator=g)
        w = w * nm_mask(w, 2, 4)
        x = torch.randn(batch, in_f, device="cuda", dtype=torch.float16, generator=g)
        w_sparse = to_sparse_semi_structured(w)
        dense_out = torch.nn.functional.linear(x, w)
        sparse_out = torch.nn.functional.linear(x, w_sparse)
        max_err = float((dense_out - sparse_out).abs().max())
        dense_ms = time_ms(lambda x=x, w=w: torch.nn.functional.linear(x, w), args.repeats)
        sparse_ms = time_ms(lambda x=x, ws=w_sparse: torch.nn.functional.linear(x, ws), args.repeats)
        rows.append({"shape": spec, "dense_ms": dense_ms, "sparse_2of4_ms": sparse_ms,
                     "speedup": dense_ms / sparse_ms, "max_abs_diff": max_err})  # fmt: skip
    result = {"device": device, "capability": f"sm{major}{minor}", "torch": torch.__version__, "rows": rows,
              "repeats": args.repeats, "dtype": "float16"}  # fmt: skip
    lines = [f"2:4 semi-structured vs dense fp16 linear on {device} (median of {args.repeats}, CUDA events)", "",
             "| batch x out x in | dense ms | 2:4 ms | speed-up | max abs diff |", "|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['shape']} | {r['dense_ms']:.3f} | {r['sparse_2of4_ms']:.3f} | {r['speedup']:.2f}x | "
              f"{r['max_abs_diff']:.3g} |" for r in rows]  # fmt: skip
    md = "\n".join(lines) + "\n"
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_nm_check.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "gpu_nm_check.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
