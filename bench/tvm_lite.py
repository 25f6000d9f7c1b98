"""EfficientNet-Lite (or the text encoder) on TVM after a budgeted tune, fp32 and int8, against onnxruntime: side by side in one run.

For one pretrained example (default EfficientNet-Lite1): the fp32 ONNX model and its int8 QDQ model
(Quantune's backend: percentile 99.999 calibration on 128 photo crops, or standard-library text
snippets for the encoder, per-channel int8 weights, uint8 activations), then these artifacts, all built by ``compress export`` (the library calls it
makes), and timed interleaved at batch 1 (``runtimes.measure_interleaved``):

* onnxruntime fp32 and int8;
* TVM fp32 with the records shipped in the package only (transferred to this CPU where they apply);
* TVM fp32 after ``--tune BUDGET`` on this machine (starting from those records);
* TVM int8 on integer kernels (``export/tvm/int8.py``), untuned and after ``--tune BUDGET``.

Tuning goes to the database of ``EDGECOMPRESS_CACHE`` (set it to keep the bench's records apart from
yours); a rerun with the same budget reuses them and tunes nothing new. Pin the process to the cores
the threads should use (``taskset -c 1`` with ``--threads 1`` beside another job).

    EDGECOMPRESS_CACHE=/tmp/tvm-bench TVM_NUM_THREADS=1 taskset -c 1 python bench/tvm_lite.py --threads 1 --tune 20m

Writes ``bench/results/tvm_lite.md`` and ``.json`` (``--output`` names another stem).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine_info, markdown_table, write_results  # noqa: E402


def _onnx_models(name: str, folder: Path) -> tuple[Path, Path, dict[str, Any]]:
    """The fp32 ONNX file of the example, its int8 QDQ file and one calibration sample (the timing input)."""
    import shutil

    from edgecompress.compress.checkpoint import load_checkpoint
    from edgecompress.compress.data import _normalize
    from edgecompress.compress.examples import example_checkpoint
    from edgecompress.compress.exporting import export_torch_onnx
    from edgecompress.compress.ptq.config import PTQConfig
    from edgecompress.compress.ptq.ort_backend import prepare_model, quantize_to_file
    from edgecompress.compress.realdata import photo_crops, text_tokens

    bundle = load_checkpoint(example_checkpoint(name))
    art = export_torch_onnx(bundle, folder / "fp32")
    fp32 = folder / f"{name}-fp32.onnx"
    shutil.copy(art.model_path, fp32)
    if name == "text-encoder":
        calib = text_tokens(128, seed=11, split="train")
    else:
        size = int(bundle.input_shape[-1])
        calib = {"input": _normalize(photo_crops(size, 128, seed=11), bundle.preprocessing)}
    int8 = folder / f"{name}-int8.onnx"
    quantize_to_file(prepare_model(fp32, folder / "models"), PTQConfig(calibration="percentile", percentile=99.999,
                     calib_size=128), calib, int8, folder / "calibration")  # fmt: skip
    return fp32, int8, {k: v[:1] for k, v in calib.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="efficientnet-lite1")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tune", default="20m", help="the tuning budget of the tuned rows (e.g. 20m; 'none': no tuned rows)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-seconds", type=float, default=2.0)
    ap.add_argument("--output", default="tvm_lite")
    args = ap.parse_args()

    from edgecompress.compress.api import export
    from edgecompress.compress.exporting import import_onnx_file
    from edgecompress.runtimes import measure_interleaved, runtime_for
    from edgecompress.targets import get_target

    host = get_target("x86-64")
    work = Path(tempfile.mkdtemp(prefix="bench-tvm-lite-"))
    fp32, int8, x = _onnx_models(args.model, work)
    rows: list[tuple[str, Any, str]] = [
        ("onnxruntime fp32", import_onnx_file(fp32, work / "ort-fp32"), ""),
        ("onnxruntime int8", import_onnx_file(int8, work / "ort-int8"), ""),
    ]
    builds = [("TVM fp32, shipped records", fp32, None), (f"TVM fp32, tuned {args.tune} here", fp32, args.tune),
              ("TVM int8 (integer kernels), untuned", int8, None),
              (f"TVM int8 (integer kernels), tuned {args.tune} here", int8, args.tune)]  # fmt: skip
    if args.tune == "none":
        builds = [b for b in builds if b[2] is None]
    for i, (label, src, tune) in enumerate(builds):
        res = export(str(src), format="tvm", target="x86-64", workdir=work / f"tvm{i}", tune=tune,
                     use_tuned_records=not label.endswith("untuned"))  # fmt: skip
        notes = [n for n in res.summary.get("notes", []) if "records applied" in n or "int8 kernels" in n]
        rows.append((label, res.artifact, "; ".join(notes)))
    sessions = [runtime_for(a).prepare(a, host, threads=args.threads) for _, a, _ in rows]
    stats = measure_interleaved(sessions, x, min_seconds=args.min_seconds, rounds=args.rounds)
    base = stats[0].p50_ms
    table = [[label, f"{s.p50_ms:.2f}", f"{s.p90_ms:.2f}", f"{s.p50_ms / base:.2f}x", note]
             for (label, _, note), s in zip(rows, stats, strict=True)]  # fmt: skip
    cmd = f"python bench/tvm_lite.py --model {args.model} --threads {args.threads} --tune {args.tune}"
    info = machine_info()
    how = "with the shipped records only" if args.tune == "none" else f"after a {args.tune} tune"
    md = "\n".join([f"# {args.model} on TVM {how}, fp32 and int8, against onnxruntime", "",
                    f"CPU {info['cpu']} ({info['cores']} core(s) visible), {info['date']}; batch 1, {args.threads} "
                    f"thread(s), {args.rounds} interleaved rounds. Command: `{cmd}`", "",
                    markdown_table(["runtime", "p50 ms", "p90 ms", "vs onnxruntime fp32", "records / kernels"], table)])  # fmt: skip
    write_results(args.output, {"machine": info, "args": vars(args), "rows": [
        {"runtime": label, "p50_ms": s.p50_ms, "p90_ms": s.p90_ms, "note": note}
        for (label, _, note), s in zip(rows, stats, strict=True)]}, md)  # fmt: skip


if __name__ == "__main__":
    main()
