"""Runtimes side by side on this host, batch 1: torch eager, onnxruntime fp32/int8, TVM untuned/tuned.

For every example model: torch eager fp32, onnxruntime fp32 and int8 (static QDQ from
onnxruntime.quantization, per-channel weights, 32 MNIST calibration digits), TVM fp32 untuned
(no tuning records applied), TVM fp32 tuned (records from the shipped database; only when they
cover the model's operators), TVM int8 (the QDQ graph, untuned), and the TVM artifact
profiled through a `compress device-server` RPC server on loopback (device-side clock). All in
one process run, measured in interleaved rounds (every runtime of a model gets a slice of each
round, so a load change on a shared machine hits them alike); ratios are against torch eager and
onnxruntime fp32 of the same run. The summary table puts untuned TVM, tuned TVM, onnxruntime fp32
and torch eager side by side with tuned TVM / onnxruntime fp32.

Tuned TVM reads only the tuning databases shipped in the package (`export/tvm/tuned/`, made by
`bench/tune_examples.py`), not the user's own, unless `--tune N` is given.

Default (fits well under 15 minutes on a busy 2-core machine):
    python bench/runtimes.py                       # all example models, >= 30 runs and >= 1 s each
Options:
    python bench/runtimes.py --models cnn --min-seconds 2 --threads 2 --no-rpc --tune 64
    python bench/runtimes.py --no-rpc --no-int8 --rounds 10 --output runtimes_fp32
    python bench/runtimes.py --models efficientnet-lite1,efficientnet-lite2 --threads 2 --no-rpc --output runtimes_lite

``efficientnet-lite1``/``-lite2`` are the ImageNet-pretrained models of the ``examples`` extra (3x240x240
and 3x260x260), their int8 graphs calibrated on 32 crops of scikit-image's photographs.

Checkpoints are the cached built-in examples when present (trained weights); otherwise the
model is randomly initialised (latency does not depend on the weights) and the table says so.
GPU targets are not measured here (no GPU on this machine).
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine_info, markdown_table, write_results  # noqa: E402

MODELS = ["cnn", "mobilenetv2", "resnet", "squeezenet", "shufflenet", "vit"]


PRETRAINED = ("efficientnet-lite1", "efficientnet-lite2")


def _bundle(name: str) -> tuple[Any, str]:
    from edgecompress.compress.cache import cache_dir
    from edgecompress.compress.checkpoint import ModelBundle, load_checkpoint
    from edgecompress.compress.models import create_model

    if name in PRETRAINED:  # ImageNet weights from the 'examples' extra
        from edgecompress.compress.examples import pretrained_example

        return load_checkpoint(pretrained_example(name, cache_dir("examples", "pretrained"))), "ImageNet pretrained"

    path = cache_dir("examples", "seed0") / f"{name}.pt"
    if path.is_file():
        return load_checkpoint(path), "trained example"
    import torch

    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_chans=1).eval()
    return ModelBundle(model, name, (1, 28, 28), {}, 10, {}), "random init"


def _qdq(onnx_art: Any, calib: Any, folder: Path) -> Any:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from edgecompress.export import write_onnx_artifact

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"input": calib.x[i : i + 1]} for i in range(32)])

        def get_next(self) -> dict[str, Any] | None:
            return next(self.it, None)

    quantize_static(str(onnx_art.model_path), str(folder / "q.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)  # fmt: skip
    return write_onnx_artifact(onnx.load(str(folder / "q.onnx")), folder / "qdq", fmt="onnx-qdq",
                               model_name=onnx_art.manifest.model_name, inputs=onnx_art.manifest.inputs)  # fmt: skip


def _photos(bundle: Any) -> Any:
    """32 calibration crops of scikit-image's photographs at the model's input size (ImageNet models)."""
    from edgecompress.compress.data import load_splits

    return load_splits("photos", input_shape=tuple(bundle.input_shape), preprocessing=bundle.preprocessing or None).calib


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(models: list[str], min_seconds: float, rpc: bool, tune: int | None, threads: int, *, int8: bool = True,
        rounds: int = 5) -> dict[str, Any]:
    import os

    os.environ["TVM_NUM_THREADS"] = str(threads)  # TVM's thread pool reads it once, at first use
    import numpy as np
    import torch

    from edgecompress.compress.data import load_splits
    from edgecompress.compress.exporting import export_model
    from edgecompress.export.errors import ExportError, UnsupportedExportError
    from edgecompress.export.tvm import export_tvm_from_onnx
    from edgecompress.runtimes import measure_interleaved, runtime_for
    from edgecompress.runtimes.torch_runtime import TorchSession
    from edgecompress.runtimes.tvm_rpc import DeviceServer, profile_remote
    from edgecompress.targets import get_target

    torch.set_num_threads(threads)
    host = get_target("x86-64")
    calib = load_splits("mnist").calib
    server = DeviceServer(_free_port(), key="bench").start() if rpc else None
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-runtimes-") as tmp_s:
            tmp = Path(tmp_s)
            for name in models:
                bundle, weights = _bundle(name)
                x = np.random.default_rng(0).standard_normal((1, *bundle.input_shape)).astype(np.float32)
                t0 = time.perf_counter()
                onnx_art = export_model(bundle, "onnx", host, tmp / name / "onnx")
                qdq = _qdq(onnx_art, calib if name not in PRETRAINED else _photos(bundle), tmp / name) if int8 else None
                # Without --tune: the shipped databases only (an empty user database), so the numbers
                # do not depend on what this machine's user cache happens to hold.
                db = None if tune else tmp / "no-user-database"
                builds = [("tvm fp32 untuned", onnx_art, "tvm-u", {"use_database": False}),
                          ("tvm fp32 tuned", onnx_art, "tvm-t", {"tune": tune, "database_dir": db})]
                if qdq is not None:
                    builds.append(("tvm int8 (QDQ) untuned", qdq, "tvm-q", {"use_database": False}))
                arts = {}
                for label, src, folder, options in builds:  # a failing build is a row saying so; the rest are measured
                    try:
                        arts[label] = export_tvm_from_onnx(src, host, tmp / name / folder, **options)
                    except (ExportError, UnsupportedExportError) as exc:
                        rows.append({"model": name, "runtime": label, "p50_ms": None, "note": f"export failed: {exc}"[:160]})
                compile_s = time.perf_counter() - t0
                sessions: list[tuple[str, Any, str]] = [
                    ("torch eager fp32", TorchSession(bundle.module.eval(), threads=threads), ""),
                    ("onnxruntime fp32", runtime_for(onnx_art).prepare(onnx_art, host, threads=threads), ""),
                ]
                if qdq is not None:
                    sessions.append(("onnxruntime int8 (QDQ)", runtime_for(qdq).prepare(qdq, host, threads=threads), ""))
                for label, art in arts.items():
                    extra = art.manifest.extra
                    if label == "tvm fp32 tuned" and not extra.get("tuned_tasks"):
                        skipped.append({"model": name, "runtime": label, "p50_ms": None,
                                        "note": "no tuning records for this model's operators"})  # fmt: skip
                        continue
                    note = f"{extra.get('tuned_tasks', 0)}/{extra.get('tasks', '?')} ops tuned" if label == "tvm fp32 tuned" else ""
                    sessions.append((label, runtime_for(art).prepare(art, host, threads=threads), note))
                stats = measure_interleaved([sess for _, sess, _ in sessions], x, min_seconds=min_seconds, rounds=rounds)
                base = stats[0].p50_ms
                ort = next((st.p50_ms for (label, _, _), st in zip(sessions, stats, strict=True)
                            if label == "onnxruntime fp32"), None)  # fmt: skip
                for (label, sess, note), st in zip(sessions, stats, strict=True):
                    rows.append({"model": name, "runtime": label, "where": "local", "p50_ms": st.p50_ms,
                                 "p90_ms": st.p90_ms, "runs": st.runs, "threads": sess.threads,
                                 "vs_torch": base / st.p50_ms, "vs_ort_fp32": st.p50_ms / ort if ort else None,
                                 "note": note})  # fmt: skip
                if server is not None and arts:
                    art = arts["tvm fp32 tuned"] if arts["tvm fp32 tuned"].manifest.extra.get("tuned_tasks") else (
                        arts["tvm fp32 untuned"])  # fmt: skip
                    st = profile_remote(art, rpc=server.address, key="bench", target=host, min_runs=30,
                                        min_seconds=min_seconds, timeout=120)  # fmt: skip
                    local_label = "tvm fp32 tuned" if art is arts["tvm fp32 tuned"] else "tvm fp32 untuned"
                    rows.append({"model": name, "runtime": f"{local_label} via RPC (loopback)", "where": st.where,
                                 "p50_ms": st.p50_ms, "p90_ms": st.p90_ms, "runs": st.runs,
                                 "vs_torch": base / st.p50_ms, "vs_ort_fp32": st.p50_ms / ort if ort else None,
                                 "note": "device clock"})  # fmt: skip
                rows += [r for r in skipped if r["model"] == name]
                for r in rows:
                    if r["model"] == name:
                        r["weights"] = weights
                print(f"{name}: done ({compile_s:.0f} s export+compile)", file=sys.stderr, flush=True)
    finally:
        if server is not None:
            server.stop()
    return {"rows": rows}


def summary(rows: list[dict[str, Any]], models: list[str]) -> tuple[list[str], list[list[Any]]]:
    """One line per model: torch eager, onnxruntime fp32, TVM untuned and tuned (median ms), tuned / ort."""
    cols = ["model", "torch eager", "onnxruntime fp32", "tvm untuned", "tvm tuned (ops tuned)", "tuned tvm / ort fp32",
            "untuned tvm / ort fp32"]  # fmt: skip
    table = []
    for name in models:
        by = {r["runtime"]: r for r in rows if r["model"] == name and r.get("p50_ms") is not None}
        ort = by.get("onnxruntime fp32", {}).get("p50_ms")

        def ms(label: str, by: dict[str, Any] = by) -> Any:
            return by[label]["p50_ms"] if label in by else "-"

        tuned = by.get("tvm fp32 tuned")
        untuned = by.get("tvm fp32 untuned")
        table.append([
            name, ms("torch eager fp32"), ms("onnxruntime fp32"), ms("tvm fp32 untuned"),
            f"{tuned['p50_ms']:.3f} ({tuned['note'].split()[0]})" if tuned else "- (no records)",
            f"{tuned['p50_ms'] / ort:.2f}x" if tuned and ort else "-",
            f"{untuned['p50_ms'] / ort:.1f}x" if untuned and ort else "-",
        ])  # fmt: skip
    return cols, table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated example models")
    ap.add_argument("--min-seconds", type=float, default=1.0, help="timing per runtime (>= 30 runs too)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved measurement rounds per model")
    ap.add_argument("--no-rpc", action="store_true", help="skip the RPC loopback measurement")
    ap.add_argument("--no-int8", action="store_true", help="skip the int8 (QDQ) rows")
    ap.add_argument("--threads", type=int, default=1, help="threads for every runtime (1: stable on a busy machine)")
    ap.add_argument("--tune", type=int, default=None, help="MetaSchedule trials to spend per model before measuring")
    ap.add_argument("--output", default="runtimes", help="results name: bench/results/NAME.json|md")
    args = ap.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    t0 = time.perf_counter()
    data = run(models, args.min_seconds, not args.no_rpc, args.tune, args.threads, int8=not args.no_int8,
               rounds=max(1, args.rounds))  # fmt: skip
    data["machine"] = machine_info()
    data["protocol"] = {"models": models, "batch": 1, "threads": args.threads, "min_runs": 30, "min_seconds": args.min_seconds,
                        "rounds": args.rounds, "rpc": not args.no_rpc, "int8": not args.no_int8, "tune_trials": args.tune,
                        "databases": "shipped only" if args.tune is None else "shipped + user",
                        "wall_seconds": round(time.perf_counter() - t0)}  # fmt: skip

    def cell(r: dict[str, Any], key: str) -> Any:
        return r.get(key) if r.get(key) is not None else "-"

    cols = ["model", "runtime", "p50 ms", "p90 ms", "x vs torch eager", "/ ort fp32", "note"]
    table = [[r["model"], r["runtime"], cell(r, "p50_ms"), cell(r, "p90_ms"), cell(r, "vs_torch"), cell(r, "vs_ort_fp32"),
              r.get("note", "")] for r in data["rows"]]  # fmt: skip
    scols, stable = summary(data["rows"], models)
    data["summary"] = [dict(zip(scols, r, strict=True)) for r in stable]
    m = data["machine"]
    md = (
        f"Runtimes at batch 1, {args.threads} thread(s) for every runtime (onnxruntime intra-op threads, "
        f"TVM_NUM_THREADS, torch.set_num_threads), on {m['cpu']} ({m['cores']} cores, load {m['load_average']:.1f}), "
        f"{args.rounds} interleaved rounds, {data['protocol']['wall_seconds']} s, models: {', '.join(models)}; "
        f"`python bench/runtimes.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`\n\n"
        "Median ms (tuned TVM with the shipped databases only):\n\n"
        + markdown_table(scols, stable)
        + "\n\nAll rows:\n\n"
        + markdown_table(cols, table)
        + "\n\nx vs torch eager > 1 means faster than torch; / ort fp32 < 1 means faster than onnxruntime fp32. "
        "GPU (CUDA) numbers: bench/gpu_check.py on a GPU machine (bench/results/gpu_check.md)."
    )
    write_results(args.output, data, md)


if __name__ == "__main__":
    main()
