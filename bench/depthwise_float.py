"""Does leaving depthwise convolutions in float make an int8 model faster on onnxruntime?

For each model: fp32, int8 QDQ with every weighted layer quantized, and int8 with the depthwise
convs left in float (Quantune's ``keep_float: depthwise``), per-channel minmax calibration on the
model's example data, timed side by side (interleaved rounds, batch 1, the given threads), with
top-1 agreement against fp32 on the evaluation samples.

    python bench/depthwise_float.py --models efficientnet-lite1,efficientnet-lite2,mobilenetv2 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"


def run(models: list[str], threads: int, rounds: int) -> list[dict]:

    from edgecompress.compress.cache import cache_dir
    from edgecompress.compress.checkpoint import load_checkpoint
    from edgecompress.compress.data import image_shape, load_splits
    from edgecompress.compress.examples import example_checkpoint, pretrained_example
    from edgecompress.compress.exporting import export_model
    from edgecompress.compress.ptq.config import PTQConfig
    from edgecompress.compress.ptq.ort_backend import excluded_nodes, prepare_model, quantize_to_file
    from edgecompress.export import load_artifact, write_onnx_artifact
    from edgecompress.export.verify import top1_agreement
    from edgecompress.runtimes import measure_interleaved, run_batched, runtime_for
    from edgecompress.targets import get_target

    host = get_target("x86-64")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-dw-") as tmp_s:
        tmp = Path(tmp_s)
        for name in models:
            if name.startswith("efficientnet"):  # ImageNet weights from the 'examples' extra
                bundle = load_checkpoint(pretrained_example(name, cache_dir("examples", "pretrained")))
            else:
                bundle = load_checkpoint(example_checkpoint(name))
            data = "photos" if name.startswith("efficientnet") else "mnist"
            splits = load_splits(data, preprocessing=bundle.preprocessing or None,
                                 input_shape=image_shape(bundle.spec.inputs)).for_model(bundle.spec)  # fmt: skip
            fp32 = export_model(bundle, "onnx", host, tmp / name / "fp32")
            prepared = prepare_model(fp32.model_path, tmp / name / "cache")
            calib = splits.calib.feeds(bundle.spec)
            arts = {"fp32": fp32}
            for label, keep in (("int8 all layers", "none"), ("int8, depthwise in float", "depthwise")):
                cfg = PTQConfig(calibration="minmax", calib_size=min(32, len(splits.calib)), per_channel=True,
                                keep_float=keep)  # fmt: skip
                out = tmp / name / f"{keep}.onnx"
                quantize_to_file(prepared, cfg, calib, out, tmp / name / "calib",
                                 nodes_to_exclude=excluded_nodes(prepared, cfg, None))  # fmt: skip
                import onnx

                arts[label] = write_onnx_artifact(onnx.load(str(out)), tmp / name / keep, fmt="onnx-qdq",
                                                  inputs=fp32.manifest.inputs)  # fmt: skip
            sessions = [runtime_for(a).prepare(load_artifact(a.path), host, threads=threads) for a in arts.values()]
            x = {k: v[:1] for k, v in splits.test.feeds(bundle.spec).items()}
            stats = measure_interleaved(sessions, x, min_seconds=0.5, rounds=rounds)
            test = splits.test.feeds(bundle.spec)
            ref = run_batched(sessions[0], test)
            for (label, _), sess, st in zip(arts.items(), sessions, stats, strict=True):
                rows.append({"model": name, "variant": label, "p50_ms": st.p50_ms, "vs_fp32": st.p50_ms / stats[0].p50_ms,
                             "agreement": top1_agreement(ref, run_batched(sess, test)),
                             "depthwise_convs": len(prepared.depthwise_nodes), "eval_samples": len(splits.test)})  # fmt: skip
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="efficientnet-lite1,efficientnet-lite2,mobilenetv2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    rows = run(args.models.split(","), args.threads, args.rounds)
    cmd = "python bench/depthwise_float.py " + " ".join(sys.argv[1:])
    lines = [f"onnxruntime, batch 1, {args.threads} threads, {args.rounds} interleaved rounds; `{cmd}`", "",
             "| model | variant | p50 ms | / fp32 | top-1 agreement with fp32 % | depthwise convs | eval samples |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['model']} | {r['variant']} | {r['p50_ms']:.3f} | {r['vs_fp32']:.2f}x | {r['agreement']:.1f} | "
              f"{r['depthwise_convs']} | {r['eval_samples']} |" for r in rows]  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "depthwise_float.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "depthwise_float.json").write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
