"""torch eager vs onnxruntime fp32 latency for every built-in example model, batch 1 and 32.

Both runtimes are measured in the same process, one after the other, with the same thread count
and the same input; the speed-up is the ratio of the medians. Latency does not depend on the
weights' values for these models, so freshly initialised models are used (no training needed).

    python bench/latency.py [--threads 2] [--min-seconds 2] [--batches 1 32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine_info, markdown_table, write_results  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-seconds", type=float, default=2.0)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--models", nargs="+", default=None)
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from edgecompress.compress.models import create_model, list_models
    from edgecompress.export import export_onnx
    from edgecompress.runtimes import measure_latency, runtime_for
    from edgecompress.runtimes.torch_runtime import TorchSession

    torch.manual_seed(0)
    rows, records = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models or list_models():
            model = create_model(name).eval()
            art = export_onnx(model, (1, 28, 28), Path(tmp) / name, model_name=name)
            ort_sess = runtime_for(art).prepare(art, threads=args.threads)
            torch_sess = TorchSession(model, threads=args.threads)
            for batch in args.batches:
                x = np.random.default_rng(0).standard_normal((batch, 1, 28, 28)).astype(np.float32)
                t = measure_latency(torch_sess, x, min_seconds=args.min_seconds)
                o = measure_latency(ort_sess, x, min_seconds=args.min_seconds)
                ratio = t.p50_ms / o.p50_ms
                rows.append([name, batch, t.p50_ms, o.p50_ms, ratio, t.p90_ms, o.p90_ms])
                records.append({"model": name, "batch": batch, "torch": t.to_dict(), "onnxruntime": o.to_dict(),
                                "speedup_ort_vs_torch": ratio})  # fmt: skip
    info = machine_info()
    md = (
        f"torch eager vs onnxruntime fp32, {args.threads} threads, medians of >= 30 runs and >= {args.min_seconds} s "
        f"each ({info['cpu']}, {info['cores']} cores, load {info['load_average']:.2f}).\n\n"
        + markdown_table(
            ["model", "batch", "torch p50 ms", "onnxruntime p50 ms", "speed-up (torch/ort)", "torch p90 ms", "ort p90 ms"],
            rows,
        )
    )
    write_results("latency", {"machine": info, "threads": args.threads, "results": records}, md)


if __name__ == "__main__":
    main()
