"""TVM integer kernels for QDQ int8 graphs: EfficientNet-Lite on onnxruntime and TVM, untuned, side by side.

For each model: the ImageNet-pretrained checkpoint exported to ONNX (fp32), quantized by the Quantune
backend (onnxruntime static QDQ: MinMax calibration on 16 crops of scikit-image's photographs,
per-channel int8 weights, uint8 activations), then

* onnxruntime fp32 and int8 (the QDQ graph; onnxruntime fuses it into QLinearConv etc.);
* TVM fp32, TVM int8 as the graph is written (``int8_kernels=False``: dequantize -> float conv ->
  quantize) and TVM int8 with integer kernels (the default, ``export/tvm/int8.py``; on a VNNI CPU
  the 1x1 and stem convolutions in the blocked VNNI layouts), all untuned (``--no-tuned-records``).

Latency: batch 1, medians of interleaved rounds in one process (``runtimes.measure_interleaved``).
Accuracy on further photo crops: SQNR and top-1 agreement of each runtime against onnxruntime int8
(the reference the TVM int8 artifact is verified against) and top-1 agreement with onnxruntime fp32.

``--conv-trials N`` also tunes one convolution (the 1x1 head conv, 320 -> 1280 channels at 8x8 in
Lite1) N MetaSchedule trials in the int8 (VNNI layout) and the fp32 model and reports the best times
and whether the int8 schedule uses ``vpdpbusd``; that takes about a minute per 32 trials.

    python bench/tvm_int8.py                                    # efficientnet-lite1, 1 thread
    python bench/tvm_int8.py --models efficientnet-lite1,efficientnet-lite2 --threads 2 --eval 64
    python bench/tvm_int8.py --conv-trials 32                   # plus the one-conv tuning comparison

Writes ``bench/results/tvm_int8.md`` and ``.json`` (``--output`` names another stem).

``--arm64 HOST:PORT --key K`` instead cross-compiles each model's int8 graph for ``arm64-linux``
(integer kernels in the ARM dot-product layouts, ``export/tvm/int8_arm.py``), runs it on the ARM64
device served there (``compress device-server [--emulate arm64] --port PORT --key K``) and compares
its outputs with onnxruntime int8 on this machine; ``--models cnn`` is the example CNN on MNIST.
``--arm64-trials N`` also samples N MetaSchedule candidates of every blocked kernel for arm64-linux
(compiled, not timed), counts those that use ``sdot``, builds the model with the first tensorized
candidate of each and runs that on the device too (the untuned build has no ``sdot``: the default
pipeline does not tensorize). No latency is reported for the device: on an emulated one it is
meaningless. Results go to ``tvm_int8_arm64``.

    python bench/tvm_int8.py --models cnn,efficientnet-lite1 --arm64 127.0.0.1:9090 --key emu --arm64-trials 8
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine_info, markdown_table, write_results  # noqa: E402

CALIB = 16


def _models(name: str, folder: Path, n_eval: int) -> tuple[Any, Any, Any]:
    """(fp32 ONNX artifact, QDQ ONNX artifact, evaluation images) for a pretrained example."""
    import onnx

    from edgecompress.compress.checkpoint import load_checkpoint
    from edgecompress.compress.data import _normalize
    from edgecompress.compress.examples import example_checkpoint
    from edgecompress.compress.exporting import export_torch_onnx
    from edgecompress.compress.ptq.config import PTQConfig
    from edgecompress.compress.ptq.ort_backend import prepare_model, quantize_to_file
    from edgecompress.compress.realdata import photo_crops
    from edgecompress.export import write_onnx_artifact
    from edgecompress.targets import get_target

    bundle = load_checkpoint(example_checkpoint(name))
    fp32 = export_torch_onnx(bundle, folder / "onnx", target=get_target("x86-64"))
    if name == "cnn":  # the example CNN: real MNIST digits, calibration and test apart
        import numpy as np

        from edgecompress.compress.data import load_splits

        splits = load_splits("mnist")
        images = np.concatenate([splits.calib.x[:CALIB], splits.test.x[:n_eval]]).astype(np.float32)
    else:
        images = _normalize(photo_crops(bundle.input_shape[-1], CALIB + n_eval, seed=0), bundle.preprocessing)
    input_name = fp32.manifest.inputs[0].name
    prepared = prepare_model(fp32.model_path, folder / "prep")
    quantize_to_file(prepared, PTQConfig(calibration="minmax", calib_size=CALIB, per_channel=True),
                     {input_name: images[:CALIB]}, folder / "int8.onnx", folder / "calib")  # fmt: skip
    qdq = write_onnx_artifact(onnx.load(str(folder / "int8.onnx")), folder / "qdq", fmt="onnx-qdq", model_name=name,
                              inputs=fp32.manifest.inputs, preprocessing=fp32.manifest.preprocessing)  # fmt: skip
    return fp32, qdq, images[CALIB:]


def run_model(name: str, folder: Path, *, threads: int, n_eval: int, min_seconds: float, rounds: int) -> list[dict[str, Any]]:
    import numpy as np

    from edgecompress.export.tvm import export_tvm_from_onnx
    from edgecompress.export.verify import sqnr_db
    from edgecompress.runtimes import measure_interleaved, runtime_for
    from edgecompress.runtimes.measure import run_batched
    from edgecompress.targets import get_target

    host = get_target("x86-64")
    t0 = time.perf_counter()
    fp32, qdq, x_eval = _models(name, folder, n_eval)
    builds = [("tvm fp32", fp32, {}), ("tvm int8, float path (--no-int8-kernels)", qdq, {"int8_kernels": False}),
              ("tvm int8, integer kernels", qdq, {})]  # fmt: skip
    arts = {label: export_tvm_from_onnx(src, host, folder / f"tvm{i}", use_database=False, **opts)
            for i, (label, src, opts) in enumerate(builds)}  # fmt: skip
    print(f"{name}: exported and compiled in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    sessions = [("onnxruntime fp32", runtime_for(fp32).prepare(fp32, host, threads=threads)),
                ("onnxruntime int8 (QDQ)", runtime_for(qdq).prepare(qdq, host, threads=threads))]  # fmt: skip
    sessions += [(label, runtime_for(art).prepare(art, host, threads=threads)) for label, art in arts.items()]
    outputs = {label: run_batched(sess, x_eval, batch_size=1) for label, sess in sessions}
    ref_int8, ref_fp32 = outputs["onnxruntime int8 (QDQ)"], outputs["onnxruntime fp32"]
    stats = measure_interleaved([s for _, s in sessions], x_eval[:1], min_seconds=min_seconds, rounds=rounds)
    by = dict(zip([label for label, _ in sessions], stats, strict=True))
    rows = []
    for label, sess in sessions:
        st, out = by[label], outputs[label]
        art = arts.get(label)
        kernels = art.manifest.extra.get("int8_kernels") if art is not None else None
        sqnr = sqnr_db(ref_int8, out)
        rows.append({
            "model": name, "runtime": label, "p50_ms": st.p50_ms, "p90_ms": st.p90_ms, "runs": st.runs,
            "threads": sess.threads, "vs_ort_fp32": st.p50_ms / by["onnxruntime fp32"].p50_ms,
            "vs_tvm_fp32": st.p50_ms / by["tvm fp32"].p50_ms,
            "sqnr_vs_ort_int8_db": None if sqnr == float("inf") else sqnr,
            "max_abs_vs_ort_int8": float(np.max(np.abs(out - ref_int8))),
            "top1_vs_ort_int8": float(np.mean(out.argmax(1) == ref_int8.argmax(1))) * 100,
            "top1_vs_ort_fp32": float(np.mean(out.argmax(1) == ref_fp32.argmax(1))) * 100,
            "int8_kernels": kernels, "eval_images": len(x_eval),
        })  # fmt: skip
    return rows


def tune_one_conv(folder: Path, name: str, trials: int) -> list[dict[str, Any]]:
    """The head 1x1 conv tuned ``trials`` MetaSchedule trials in the int8 (VNNI layout) and fp32 models."""
    import onnx
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from edgecompress.export.tvm import compile as tc
    from edgecompress.export.tvm import records
    from edgecompress.export.tvm.int8 import lower_qdq_to_integer
    from edgecompress.export.tvm.intrinsics import import_tensor_intrinsics
    from edgecompress.export.tvm.tuning import (
        TuneBudget,
        _best_seconds,
        _Clock,
        _flops,
        _tune_task,
    )
    from edgecompress.export.tvm.workers import in_process_workers
    from edgecompress.targets import get_target

    import_tensor_intrinsics()
    spec = dict(get_target("x86-64").tvm)
    tgt = tvm.target.Target(spec)
    graph_input = onnx.load(str(folder / "onnx" / "model.onnx")).graph.input[0]
    shape = {graph_input.name: [1] + [int(d.dim_value) for d in list(graph_input.type.tensor_type.shape.dim)[1:]]}
    rows = []
    for label, path, rewrite in (("int8, integer kernels (VNNI layout)", folder / "int8.onnx",
                                  lambda m, p: lower_qdq_to_integer(m, p, vnni_layout=True)[:2]),
                                 ("fp32", folder / "onnx" / "model.onnx", None)):  # fmt: skip
        mod, _ = tc.import_onnx(onnx.load(str(path)), shape, "x86-64", graph_rewrite=rewrite)
        tasks = ms.relax_integration.extract_tasks(tc.fuse_for_cpu(mod, tgt), tgt)
        convs = [t for t in tasks if "conv2d" in t.task_name]
        task = min(convs, key=lambda t: abs(_flops(t.dispatched[0]) - 52.8e6))  # Lite1's head conv; the nearest elsewhere
        with tempfile.TemporaryDirectory() as tmp:
            db = records.open_json_database(Path(tmp), create=True, target_spec=spec)
            t0 = time.perf_counter()
            _tune_task(task, db, in_process_workers(), spec, trials, None, _Clock(TuneBudget(trials=trials, trials_per_task=trials)),
                       task.task_name, lambda line: print(line, file=sys.stderr, flush=True), 0)  # fmt: skip
            best = _best_seconds(db, task.dispatched[0])
            top = db.get_top_k(db.commit_workload(task.dispatched[0]), 1)
            vnni = False
            if top:
                sch = tvm.s_tir.Schedule(task.dispatched[0])
                top[0].trace.apply_to_schedule(sch, remove_postproc=False)
                vnni = "vpdpbusd" in sch.mod.script()
        rows.append({"model": name, "model_precision": label, "task": task.task_name,
                     "mflop": _flops(task.dispatched[0]) / 1e6, "trials": trials,
                     "best_ms": None if best is None else best * 1e3, "uses_vpdpbusd": vnni,
                     "tune_seconds": time.perf_counter() - t0})  # fmt: skip
    return rows


def run_arm64(name: str, folder: Path, *, address: str, key: str, n_eval: int, threads: int) -> dict[str, Any]:
    """The model's int8 graph cross-compiled for arm64-linux, run on the device at ``address``,
    against onnxruntime int8 (and fp32) on this machine."""
    import shutil
    import subprocess

    import numpy as np

    from edgecompress.export.tvm import export_tvm_from_onnx
    from edgecompress.export.verify import sqnr_db
    from edgecompress.runtimes import runtime_for
    from edgecompress.runtimes.measure import run_batched
    from edgecompress.runtimes.tvm_rpc import remote_session
    from edgecompress.targets import get_target

    host, arm = get_target("x86-64"), get_target("arm64-linux")
    fp32, qdq, x_eval = _models(name, folder, n_eval)
    np.save(folder / "x_eval.npy", x_eval)
    t0 = time.perf_counter()
    art = export_tvm_from_onnx(qdq, arm, folder / "tvm-arm64", use_database=False)
    compile_s = time.perf_counter() - t0
    sdot = None
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    if objdump and art.model_path.suffix == ".so":
        dump = subprocess.run([objdump, "-d", str(art.model_path)], capture_output=True, text=True, check=True).stdout
        sdot = sum(1 for line in dump.splitlines() if "\tsdot\t" in line)
    ref_int8 = run_batched(runtime_for(qdq).prepare(qdq, host, threads=threads), x_eval, batch_size=1)
    ref_fp32 = run_batched(runtime_for(fp32).prepare(fp32, host, threads=threads), x_eval, batch_size=1)
    t0 = time.perf_counter()
    remote = remote_session(art, address, key=key, target=arm, timeout=600)
    try:
        out = run_batched(remote, x_eval, batch_size=1)
        where = remote.where
    finally:
        remote.close()
        del remote
        gc.collect()  # the RPC session ends when its last reference goes: the server serves one at a time
    device_s = time.perf_counter() - t0
    sqnr = sqnr_db(ref_int8, out)
    print(f"{name}: arm64 int8 on {where}: SQNR {sqnr:.1f} dB vs onnxruntime int8 (x86), "
          f"{device_s:.0f} s on the device for {len(x_eval)} inputs", file=sys.stderr, flush=True)  # fmt: skip
    return {"model": name, "target": arm.name, "where": where, "library": art.model_path.name,
            "int8_kernels": art.manifest.extra.get("int8_kernels"), "sdot_in_library": sdot,
            "sqnr_vs_ort_int8_db": None if sqnr == float("inf") else sqnr,
            "max_abs_vs_ort_int8": float(np.max(np.abs(out - ref_int8))),
            "top1_vs_ort_int8": float(np.mean(out.argmax(1) == ref_int8.argmax(1))) * 100,
            "top1_vs_ort_fp32": float(np.mean(out.argmax(1) == ref_fp32.argmax(1))) * 100,
            "ort_int8_top1_vs_fp32": float(np.mean(ref_int8.argmax(1) == ref_fp32.argmax(1))) * 100,
            "eval_inputs": len(x_eval), "compile_seconds": compile_s}  # fmt: skip


def arm64_tensorized(folder: Path, name: str, trials: int, *, address: str, key: str) -> dict[str, Any]:
    """Every blocked kernel of the model's arm64-linux int8 graph scheduled with a sampled MetaSchedule
    candidate that tensorizes with sdot, the whole model built with those schedules and run on the
    device against onnxruntime int8 here.

    For each blocked task, ``trials`` candidates are sampled and compiled (not timed: an emulator's
    timings are meaningless); the first tensorized one that compiles goes into a throwaway database
    for arm64-linux (its ``run_secs`` is a constant, as nothing was measured), which the export then
    applies as it applies tuned records. This runs the sdot code itself, which the untuned build
    (the default pipeline does not tensorize) does not.
    """
    import shutil
    import subprocess

    import numpy as np
    import onnx
    from tvm.s_tir import meta_schedule as ms

    from edgecompress.export import load_artifact
    from edgecompress.export.tvm import compile as tc
    from edgecompress.export.tvm import export_tvm_from_onnx, records
    from edgecompress.export.tvm.int8 import Int8Kernels
    from edgecompress.export.tvm.int8_arm import dotprod_intrinsic_builds, sample_candidates
    from edgecompress.export.tvm.intrinsics import import_tensor_intrinsics
    from edgecompress.export.tvm.tuning import _flops
    from edgecompress.export.verify import sqnr_db
    from edgecompress.runtimes import runtime_for
    from edgecompress.runtimes.measure import run_batched
    from edgecompress.runtimes.tvm_rpc import remote_session
    from edgecompress.targets import get_target

    import_tensor_intrinsics()
    arm = get_target("arm64-linux")
    tgt = tc.tvm_target(arm)
    qdq = load_artifact(folder / "qdq")
    model = onnx.load(str(qdq.model_path))
    shape = {i.name: [1, *i.shape[1:]] for i in qdq.manifest.inputs}
    kernels = Int8Kernels.for_target(tgt, enabled=True)
    mod, _ = tc.import_onnx(model, shape, arm.name, graph_rewrite=kernels.rewrite)
    tasks = ms.relax_integration.extract_tasks(tc.fuse_for_cpu(mod, tgt), tgt)
    blocked = [t for t in tasks if "nchwc_int8" in t.task_name or "matmul_blocked_int8" in t.task_name]
    db_root = folder / "arm64-db"
    db = records.open_json_database(records.sources(dict(arm.tvm), db_root)[0].folder, create=True,
                                    target_spec=dict(arm.tvm))  # fmt: skip
    t0 = time.perf_counter()
    rows = []
    for task in blocked:
        candidates = sample_candidates(task.dispatched[0], tgt, trials=trials)
        chosen = next((c for c in candidates if c.tensorized and c.error is None), None)
        rows.append({"task": task.task_name, "mflop": _flops(task.dispatched[0]) / 1e6, "candidates": len(candidates),
                     "tensorized": sum(c.tensorized for c in candidates), "with_sdot": sum(c.sdot > 0 for c in candidates),
                     "failed": sum(c.error is not None for c in candidates), "applied": chosen is not None})  # fmt: skip
        if chosen is not None:
            workload = db.commit_workload(task.dispatched[0])
            args = ms.arg_info.ArgInfo.from_prim_func(next(iter(task.dispatched[0].functions.values())))
            db.commit_tuning_record(ms.database.TuningRecord(chosen.trace, workload, [1.0], tgt, args))
    sample_s = time.perf_counter() - t0
    art = export_tvm_from_onnx(qdq, arm, folder / "tvm-arm64-sdot", database_dir=db_root)
    sdot = None
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    if objdump and art.model_path.suffix == ".so":
        dump = subprocess.run([objdump, "-d", str(art.model_path)], capture_output=True, text=True, check=True).stdout
        sdot = sum(1 for line in dump.splitlines() if "\tsdot\t" in line)
    x_eval = np.load(folder / "x_eval.npy")
    ref = run_batched(runtime_for(qdq).prepare(qdq, get_target("x86-64"), threads=1), x_eval, batch_size=1)
    remote = remote_session(art, address, key=key, target=arm, timeout=600)
    try:
        out = run_batched(remote, x_eval, batch_size=1)
    finally:
        remote.close()
        del remote
        gc.collect()  # the RPC session ends when its last reference goes: the server serves one at a time
    sqnr = sqnr_db(ref, out)
    print(f"{name}: arm64 int8 with sdot schedules: {sdot} sdot in the library, SQNR {sqnr:.1f} dB vs onnxruntime int8",
          file=sys.stderr, flush=True)  # fmt: skip
    return {"model": name, "trials": trials, "intrinsic_builds": dotprod_intrinsic_builds(), "tasks": rows,
            "blocked_tasks": len(blocked), "tuned_tasks": art.manifest.extra.get("tuned_tasks"),
            "tuned": art.manifest.extra.get("tuned"), "sdot_in_library": sdot,
            "sqnr_vs_ort_int8_db": None if sqnr == float("inf") else sqnr,
            "max_abs_vs_ort_int8": float(np.max(np.abs(out - ref))),
            "top1_vs_ort_int8": float(np.mean(out.argmax(1) == ref.argmax(1))) * 100, "eval_inputs": len(x_eval),
            "sample_seconds": sample_s}  # fmt: skip


def main_arm64(args: Any, models: list[str]) -> None:
    rows, candidate_rows = [], []
    with tempfile.TemporaryDirectory(prefix="bench-tvm-int8-arm64-") as tmp:
        for name in models:
            folder = Path(tmp) / name
            rows.append(run_arm64(name, folder, address=args.arm64, key=args.key, n_eval=args.eval, threads=args.threads))
            if args.arm64_trials > 0:
                candidate_rows.append(arm64_tensorized(folder, name, args.arm64_trials, address=args.arm64, key=args.key))
    info = machine_info()
    table = markdown_table(
        ["model", "ran on", "int8 kernels (integer/float, dot-product layout)", "sdot in .so",
         "SQNR vs ort int8 x86 (dB)", "max abs", "top-1 = ort int8 %", "top-1 = ort fp32 %", "inputs"],
        [[r["model"], r["where"],
          f"{r['int8_kernels']['integer']}/{r['int8_kernels']['float']}, {r['int8_kernels']['dotprod_layout']}",
          "-" if r["sdot_in_library"] is None else r["sdot_in_library"],
          "exact" if r["max_abs_vs_ort_int8"] == 0 else f"{r['sqnr_vs_ort_int8_db']:.1f}", f"{r['max_abs_vs_ort_int8']:.3g}",
          r["top1_vs_ort_int8"], r["top1_vs_ort_fp32"], r["eval_inputs"]] for r in rows],
    )  # fmt: skip
    md = ["# TVM int8 kernels on ARM64 (arm64-linux, dot-product layouts, untuned), against onnxruntime on x86", "",
          f"Host: {info['cpu']}, {info['cores']} cores; {info['date']}. Command: `python bench/tvm_int8.py --models "
          f"{args.models} --arm64 {args.arm64} --key {args.key} --eval {args.eval}"
          f"{f' --arm64-trials {args.arm64_trials}' if args.arm64_trials else ''}`. Device latency is not reported "
          "(an emulated device's is meaningless).", "", table]  # fmt: skip
    if candidate_rows:
        md += ["", f"Blocked kernels scheduled with sampled MetaSchedule candidates ({args.arm64_trials} per kernel, "
               "compiled, not timed; the first that tensorizes with sdot applied), the model run on the device:", "",
               markdown_table(["model", "blocked kernels", "with an sdot schedule", "candidates using sdot",
                               "candidates failing to build", "sdot in .so", "SQNR vs ort int8 x86 (dB)",
                               "top-1 = ort int8 %", "inputs"],
                              [[r["model"], r["blocked_tasks"], sum(t["applied"] for t in r["tasks"]),
                                f"{sum(t['with_sdot'] for t in r['tasks'])}/{sum(t['candidates'] for t in r['tasks'])}",
                                sum(t["failed"] for t in r["tasks"]), r["sdot_in_library"],
                                "exact" if r["max_abs_vs_ort_int8"] == 0 else f"{r['sqnr_vs_ort_int8_db']:.1f}",
                                r["top1_vs_ort_int8"], r["eval_inputs"]] for r in candidate_rows])]  # fmt: skip
    write_results(args.output, {"machine": info, "args": vars(args), "rows": rows, "candidates": candidate_rows},
                  "\n".join(md))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="efficientnet-lite1")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval", type=int, default=64, help="photo crops scored (after the 16 calibration crops)")
    parser.add_argument("--min-seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--conv-trials", type=int, default=0, help="also tune the head conv N trials, int8 and fp32")
    parser.add_argument("--output", default=None, help="results stem (default tvm_int8, or tvm_int8_arm64)")
    parser.add_argument("--arm64", metavar="HOST:PORT", help="verify on this ARM64 device server instead")
    parser.add_argument("--key", default="emu", help="the device server's key (with --arm64)")
    parser.add_argument("--arm64-trials", type=int, default=0,
                        help="with --arm64: also run the model with sampled sdot schedules (N candidates per kernel)")
    args = parser.parse_args()
    args.output = args.output or ("tvm_int8_arm64" if args.arm64 else "tvm_int8")

    import os

    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # TVM's thread pool reads it once, at first use
    import torch

    torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.arm64:
        main_arm64(args, models)
        return
    rows: list[dict[str, Any]] = []
    conv_rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-tvm-int8-") as tmp:
        for name in models:
            folder = Path(tmp) / name
            rows += run_model(name, folder, threads=args.threads, n_eval=args.eval, min_seconds=args.min_seconds,
                              rounds=args.rounds)  # fmt: skip
            if args.conv_trials > 0:
                conv_rows += tune_one_conv(folder, name, args.conv_trials)
    info = machine_info()

    def cell(v: Any, fmt: str = "{:.1f}") -> str:
        return "-" if v is None else fmt.format(v)

    table = markdown_table(
        ["model", "runtime", "p50 ms", "p90 ms", "x ort fp32", "x tvm fp32", "SQNR vs ort int8 (dB)",
         "top-1 = ort int8 %", "top-1 = fp32 %", "int8 kernels (integer/float)"],
        [[r["model"], r["runtime"], r["p50_ms"], r["p90_ms"], r["vs_ort_fp32"], r["vs_tvm_fp32"],
          cell(r["sqnr_vs_ort_int8_db"]) if r["max_abs_vs_ort_int8"] > 0 else "exact", r["top1_vs_ort_int8"],
          r["top1_vs_ort_fp32"],
          f"{r['int8_kernels']['integer']}/{r['int8_kernels']['float']}" if r["int8_kernels"] and r["int8_kernels"]["enabled"]
          else ("off" if r["int8_kernels"] else "-")] for r in rows],
    )  # fmt: skip
    md = [f"# TVM integer kernels for QDQ int8 graphs (untuned, batch 1, {args.threads} thread(s))", "",
          f"Machine: {info['cpu']} ({', '.join(info['cpu_features'])}), {info['cores']} cores, "
          f"load {info['load_average']}; {info['date']}. Command: `python bench/tvm_int8.py --models {args.models} "
          f"--threads {args.threads} --eval {args.eval}{f' --conv-trials {args.conv_trials}' if args.conv_trials else ''}`.",
          "", f"Accuracy on {args.eval} photo crops not used for calibration; 'exact' = bit-identical to onnxruntime int8.",
          "", table]  # fmt: skip
    if conv_rows:
        md += ["", f"One convolution tuned ({args.conv_trials} MetaSchedule trials each, in-process, 1 task):", "",
               markdown_table(["model", "precision", "task", "MFLOP", "best ms", "uses vpdpbusd"],
                              [[r["model"], r["model_precision"], r["task"][:60], r["mflop"], cell(r["best_ms"], "{:.3f}"),
                                r["uses_vpdpbusd"]] for r in conv_rows])]  # fmt: skip
    write_results(args.output, {"machine": info, "args": vars(args), "rows": rows, "tuned_conv": conv_rows}, "\n".join(md))


if __name__ == "__main__":
    main()
