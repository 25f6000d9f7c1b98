"""Regenerate the shipped TVM tuning database for the built-in example models on this host's target.

The database under ``export/tvm/tuned/<key>/`` (``key`` from
:func:`export.tvm.tuning.database_key` of the ``x86-64`` host target, e.g.
``llvm-x86_64-linux-gnu-haswell-2c``) makes the examples' TVM CPU artifacts fast without a tune.
This script is the one command that produces it:

1. for every example model, export ONNX, import it into Relax exactly as ``compress export
   --format tvm`` does (weights pre-transformed, legalized, fused) and extract its tuning tasks;
2. tune the tasks with :func:`export.tvm.tuning.tune` (MetaSchedule, in process, fixed seed) into a
   work database, then (``--refine N``) give the tasks that dominate a model N more random samples (default ``bench/results/.tune-work/``, not committed);
3. write the shipped database anew: for each task of the example models, the best record among
   the work database and the current shipped one (when both have one, both are timed again here,
   side by side) (one record per workload, minified IR: a few
   MB). Workloads already shipped for models not named in this run are kept unless
   ``--from-scratch``.

Latency does not depend on the weights, so a model whose trained example checkpoint is not
cached is tuned from a random initialisation (same operators, same workloads).

    python bench/tune_examples.py                          # extend: tune what the shipped database lacks
    python bench/tune_examples.py --from-scratch           # ignore the shipped records, tune everything
    python bench/tune_examples.py --models resnet,vit --trials-per-task 32
    python bench/tune_examples.py --refine 128             # then 128 random samples per dominant task
    python bench/tune_examples.py --demo                   # and the demo's int8 (Quantune QDQ) CNN
    python bench/tune_examples.py --prune-only             # rewrite the shipped folder from the work database

Tuning on a busy 2-core machine takes about 1 to 2 s per trial; run it with ``nice -n 10`` in
the background for the full set.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODELS = ["cnn", "squeezenet", "mobilenetv2", "resnet", "shufflenet", "vit"]


def _default_work_dir() -> Path:
    from edgecompress.export.tvm.tuning import default_database_root

    return default_database_root().parent / "tune-examples"


log = logging.getLogger("tune_examples")


def fused_module(name: str, host: Any, tmp: Path) -> Any:
    """The fused Relax module of example ``name``, as the TVM exporter builds it for ``host``."""
    from bench.runtimes import _bundle
    from edgecompress.compress.exporting import export_model

    bundle, _ = _bundle(name)
    return fused_module_from_onnx(export_model(bundle, "onnx", host, tmp / name), host)


def fused_module_from_onnx(artifact: Any, host: Any) -> Any:
    """The fused Relax module of an ONNX artifact (fp32 or QDQ), as the TVM exporter builds it."""
    import onnx

    from edgecompress.export import load_artifact
    from edgecompress.export.spec import ModelSpec
    from edgecompress.export.tvm import compile as tc

    art = load_artifact(artifact) if isinstance(artifact, (str, Path)) else artifact
    spec = ModelSpec(list(art.manifest.inputs))  # every input at batch 1 with its dtype (token ids are int64)
    mod, _params = tc.import_onnx(onnx.load(str(art.model_path)), spec.shape_dict(1), host.name,
                                  {i.name: i.dtype for i in spec.inputs})  # fmt: skip
    return tc.fuse_for_cpu(mod, tc.tvm_target(host))


def _model_name(artifact: str) -> str:
    from edgecompress.export import load_artifact

    return load_artifact(artifact).manifest.model_name or Path(artifact).name


def demo_onnx_artifacts(work: Path) -> list[Path]:
    """The ONNX artifacts ``make demo`` compiles with TVM (runs ``examples/demo.yaml`` once, cached in ``work``).

    The demo's TVM artifact is the Quantune int8 (QDQ) CNN, whose fused operators (dequantize,
    conv, requantize) are workloads of their own: without them the demo's artifact is untuned.
    """
    import subprocess

    out = work / "demo-run"
    if not (out / "summary.json").is_file():
        recipe = Path(__file__).resolve().parent.parent / "examples" / "demo.yaml"
        cli = Path(sys.executable).parent / "compress"
        log.info("running %s into %s for its ONNX artifacts", recipe, out)
        subprocess.run([str(cli), "run", str(recipe), "-o", str(out)], check=True, stdout=subprocess.DEVNULL)
    return sorted(p for p in (out / "artifacts").glob("*-onnx") if (p / "manifest.json").is_file())


@contextmanager
def _without_shipped(enabled: bool) -> Any:
    """Hide the shipped database from :func:`tune` so that every task is tuned anew."""
    from edgecompress.export.tvm import records

    if not enabled:
        yield
        return
    saved = records.SHIPPED_DIR
    with tempfile.TemporaryDirectory() as empty:
        records.SHIPPED_DIR = Path(empty)
        try:
            yield
        finally:
            records.SHIPPED_DIR = saved


def refine(modules: dict[str, Any], tgt: Any, target_spec: dict[str, Any], root: Path, *, trials: int,
           min_share: float, seed: int) -> None:
    """Give the tasks that dominate a model many more randomly sampled schedules.

    :func:`export.tvm.tuning.tune` gives each task a fixed small number of trials and never
    revisits a task that has a record. Here each task that holds at least ``min_share`` of some
    model's FLOPs gets ``trials`` more. Random sampling (``ReplayTrace``) is used on purpose:
    measured here, 64 random samples of a 1x1 conv took 25 s and halved its time, while 48
    evolutionary trials (xgb model, population 256) took 4 minutes and found nothing better than
    the 16 random ones already shipped. A ledger (``refined.json``) makes a rerun resume.
    """
    import json

    from tvm.s_tir import meta_schedule as ms

    from edgecompress.export.tvm import records, tuning
    from edgecompress.export.tvm.intrinsics import import_tensor_intrinsics

    import_tensor_intrinsics()
    folder = root / records.database_key(target_spec)
    user = records.open_json_database(folder, create=True, target_spec=target_spec)
    ledger_path = folder / "refined.json"
    ledger: dict[str, int] = json.loads(ledger_path.read_text()) if ledger_path.is_file() else {}
    chosen: dict[str, tuple[Any, float]] = {}
    for mod in modules.values():
        tasks = ms.relax_integration.extract_tasks(mod, tgt)
        cost = {id(t): float(t.weight) * tuning._flops(t.dispatched[0]) for t in tasks}
        total = sum(cost.values()) or 1.0
        for t in tasks:
            share = cost[id(t)] / total
            key = tuning.workload_hash(t.dispatched[0])
            if share >= min_share and share > chosen.get(key, (None, 0.0))[1]:
                chosen[key] = (t, share)
    from edgecompress.export.tvm.workers import in_process_workers

    builder, runner = in_process_workers()
    order = sorted(chosen.items(), key=lambda kv: -kv[1][1])
    log.info("refining %d tasks with %d random trials each", len(order), trials)
    for i, (key, (task, share)) in enumerate(order):
        if ledger.get(f"random:{key}", 0) >= trials:
            continue
        t0 = time.perf_counter()
        ctx = ms.TuneContext(
            mod=task.dispatched[0], target=task.target, space_generator="post-order-apply",
            search_strategy=ms.search_strategy.ReplayTrace(), task_name=task.task_name,
            logger=logging.getLogger("tune_examples.metaschedule"), rand_state=seed + 1,
            num_threads=int(target_spec.get("num-cores") or 1),
        ).clone()  # fmt: skip
        ms.tune_tasks(tasks=[ctx], task_weights=[1.0], work_dir=str(folder / "logs"), max_trials_global=trials,
                      max_trials_per_task=trials, num_trials_per_iter=16, database=user, builder=builder,
                      runner=runner, cost_model="random")  # fmt: skip
        ledger[f"random:{key}"] = trials
        ledger_path.write_text(json.dumps(ledger, indent=1, sort_keys=True))
        log.info("refined %d/%d %s (%.0f%% of a model) in %.0f s", i + 1, len(order), task.task_name, 100 * share,
                 time.perf_counter() - t0)  # fmt: skip


def kernel_microseconds(task_mod: Any, record: Any, tgt: Any, *, repeats: int = 15, number: int = 50) -> float:
    """Median time of one task built with ``record``'s schedule, measured here and now."""
    import statistics

    import tvm
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build, default_export
    from tvm.s_tir.meta_schedule.runner.local_runner import default_alloc_argument

    sch = tvm.s_tir.Schedule(task_mod)
    record.trace.apply_to_schedule(sch, remove_postproc=False)
    lib = tvm.runtime.load_module(default_export(default_build(sch.mod, tgt, None)))
    infos = tuple(a.as_json() for a in ArgInfo.from_prim_func(sch.mod["main"]))
    args = default_alloc_argument(tvm.cpu(), infos, 1)[0]
    f = lib[lib.entry_name] if hasattr(lib, "entry_name") else lib["main"]
    for _ in range(number):
        f(*args)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(number):
            f(*args)
        times.append((time.perf_counter() - t0) / number * 1e6)
    return statistics.median(times)


def best_records(modules: dict[str, Any], tgt: Any, folders: list[Path], *, keep: Path | None = None) -> list[tuple[Any, Any]]:
    """(task module, best tuning record) for every task of ``modules`` found in ``folders``.

    ``keep``: a database folder whose other workloads are kept as well (their best record), so a
    run for some models does not drop the records of others.
    """
    from tvm.s_tir import meta_schedule as ms

    from edgecompress.export.tvm.records import RECORD_FILE, WORKLOAD_FILE, check_record, workload_hash

    def open_db(f: Path) -> Any:
        return ms.database.JSONDatabase(path_workload=str(f / WORKLOAD_FILE), path_tuning_record=str(f / RECORD_FILE),
                                        allow_missing=False)  # fmt: skip

    def mean_secs(rec: Any) -> float:
        return sum(float(s) for s in rec.run_secs) / len(rec.run_secs)

    dbs = [open_db(f) for f in folders if (f / RECORD_FILE).is_file()]
    out: dict[str, tuple[Any, Any, float]] = {}
    for name, mod in modules.items():
        for task in ms.relax_integration.extract_tasks(mod, tgt):
            task_mod = task.dispatched[0]
            key = workload_hash(task_mod)
            if key in out:
                continue
            found = [r for r in (db.query_tuning_record(task_mod, tgt, task.task_name) for db in dbs)
                     if r is not None and r.run_secs and _right(task_mod, r, tgt, check_record)]  # fmt: skip
            if not found:
                log.warning("%s: task %s has no record (untunable or not tuned yet)", name, task.task_name)
                continue
            if len(found) == 1:
                out[key] = (task_mod, found[0], mean_secs(found[0]))
                continue
            # The databases' run times were measured under different load and thread counts: time
            # each database's best again, side by side, and keep the faster.
            timed = [(min(kernel_microseconds(task_mod, r, tgt) for _ in range(2)), i) for i, r in enumerate(found)]
            best_us, best_i = min(timed)
            log.info("%s: %s %s us -> keep %d", name, task.task_name, [round(t, 1) for t, _ in timed], best_i)
            out[key] = (task_mod, found[best_i], best_us)
    if keep is not None and (keep / RECORD_FILE).is_file():
        kept: dict[str, tuple[Any, Any, float]] = {}
        for rec in open_db(keep).get_all_tuning_records():
            key = workload_hash(rec.workload.mod)
            if key in out or not rec.run_secs:
                continue
            if key not in kept or mean_secs(rec) < kept[key][2]:
                kept[key] = (rec.workload.mod, rec, mean_secs(rec))
        out.update(kept)
    return [(m, r) for m, r, _ in out.values()]


def _right(task_mod: Any, rec: Any, tgt: Any, check: Any) -> bool:
    """Whether a record computes its task right (never ship one that does not)."""
    reason, _ = check(task_mod, rec, tgt)
    if reason:
        log.warning("record of a %s task computes a wrong result (%s): not shipped", task_mod.get_global_vars()[0], reason)
    return reason is None


MODELS_FILE = "models.json"  # what a shipped folder was tuned for (tests expect its models tuned on its CPUs)


def write_database(records: list[tuple[Any, Any]], tgt: Any, dest: Path, target_spec: dict[str, Any],
                   models: list[str]) -> int:  # fmt: skip
    """Write ``records`` as a fresh JSON database in ``dest`` (replacing its files, with ``target.json``
    and ``models.json``: the models it covers, those tuned now plus those it covered before)."""
    import json
    import os

    from tvm.s_tir import meta_schedule as ms

    from edgecompress.export.tvm.records import (
        CHECKS_FILE,
        RECORD_FILE,
        TARGET_FILE,
        WORKLOAD_FILE,
        record_id,
        workload_hash,
    )

    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp_s:
        tmp = Path(tmp_s)
        db = ms.database.JSONDatabase(path_workload=str(tmp / WORKLOAD_FILE), path_tuning_record=str(tmp / RECORD_FILE),
                                      allow_missing=True)  # fmt: skip
        for task_mod, rec in records:
            workload = db.commit_workload(task_mod)
            db.commit_tuning_record(ms.database.TuningRecord(rec.trace, workload, rec.run_secs, tgt, rec.args_info))
        _compact_workloads(tmp / WORKLOAD_FILE)
        (tmp / TARGET_FILE).write_text(json.dumps(target_spec, sort_keys=True))
        # Every record passed check_record (best_records): ship the verdicts for this key.
        reloaded = ms.database.JSONDatabase(path_workload=str(tmp / WORKLOAD_FILE),
                                            path_tuning_record=str(tmp / RECORD_FILE), allow_missing=False)  # fmt: skip
        verdicts = {f"{workload_hash(r.workload.mod)}:{record_id(r)}": {"ok": True, "source": "shipped"}
                    for r in reloaded.get_all_tuning_records()}  # fmt: skip
        (tmp / CHECKS_FILE).write_text(json.dumps(verdicts, indent=1, sort_keys=True))
        before = json.loads((dest / MODELS_FILE).read_text()) if (dest / MODELS_FILE).is_file() else []
        (tmp / MODELS_FILE).write_text(json.dumps(sorted({*before, *models}), indent=1) + "\n")
        for f in (WORKLOAD_FILE, RECORD_FILE, TARGET_FILE, CHECKS_FILE, MODELS_FILE):
            os.replace(tmp / f, dest / f)
    return len(records)


def _compact_workloads(path: Path) -> None:
    """Rewrite a workload file with the IR JSON minified: half the size, the same modules.

    Each line is ``[structural hash, base64(uint64 length + IR JSON)]``; TVM writes the JSON with
    two-space indentation, which is half of the shipped folder's bytes.
    """
    import base64
    import json
    import struct

    lines = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        shash, blob = json.loads(line)
        raw = base64.b64decode(blob)
        (n,) = struct.unpack("<Q", raw[:8])
        ir = json.dumps(json.loads(raw[8 : 8 + n].decode()), separators=(",", ":")).encode()
        lines.append(json.dumps([shash, base64.b64encode(struct.pack("<Q", len(ir)) + ir).decode()]))
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated example models")
    ap.add_argument("--trials-per-task", type=int, default=16, help="MetaSchedule trials per task (>= 32: evolutionary)")
    ap.add_argument("--work", type=Path, default=None, help="work database root (resumable; default: the user cache)")
    ap.add_argument("--from-scratch", action="store_true", help="tune every task, ignoring the shipped records")
    ap.add_argument("--prune-only", action="store_true", help="no tuning: rewrite the shipped folder only")
    ap.add_argument("--refine", type=int, default=0,
                    help="then give each dominant task this many more random samples")
    ap.add_argument("--refine-share", type=float, default=0.1,
                    help="a task is dominant when it holds at least this share of a model's FLOPs")
    ap.add_argument("--threads", type=int, default=1,
                    help="TVM threads while measuring candidates (1: what bench/runtimes.py measures by default)")
    ap.add_argument("--onnx", type=Path, action="append", default=[],
                    help="also tune this ONNX artifact folder (fp32 or QDQ); repeatable")
    ap.add_argument("--demo", action="store_true",
                    help="also tune the ONNX artifacts of examples/demo.yaml (runs the demo once into the work folder)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", default=None,
                    help="a time budget per model ('20m'): spread over its tasks by FLOPs, early stopping "
                         "(default: --trials-per-task for every task)")
    ap.add_argument("--mcpu", default="haswell",
                    help="LLVM CPU the records are tuned for (default haswell: they transfer to every AVX2 CPU); "
                         "'' for this host's own")
    args = ap.parse_args()
    args.work = args.work or _default_work_dir()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("edgecompress.export.tvm.tuning.metaschedule", "tune_examples.metaschedule", "tvm.s_tir.meta_schedule"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import os

    # Read once, when TVM's thread pool starts: candidates are timed with the thread count the
    # benchmark uses (a 2-thread spinning pool on a busy 2-core machine times noise).
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    from edgecompress.export.tvm import compile as tc
    from edgecompress.export.tvm.records import SHIPPED_DIR, database_key
    from edgecompress.export.tvm.tuning import TuneBudget, tune
    from edgecompress.targets import get_target

    host = get_target("x86-64")
    host = dataclasses.replace(host, tvm={**host.tvm, "mcpu": args.mcpu}) if args.mcpu else host
    tgt = tc.tvm_target(host)
    key = database_key(dict(host.tvm))
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    modules: dict[str, Any] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tune-examples-") as tmp_s:
        for name in models:
            modules[name] = fused_module(name, host, Path(tmp_s))
        for path in [*args.onnx, *(demo_onnx_artifacts(args.work) if args.demo else [])]:
            modules[f"onnx:{path}"] = fused_module_from_onnx(path, host)
    if not args.prune_only:
        budget = (TuneBudget.parse(args.budget) if args.budget
                  else TuneBudget(trials=None, trials_per_task=args.trials_per_task))  # fmt: skip
        for name, mod in modules.items():
            with _without_shipped(args.from_scratch):
                report = tune(mod, tgt, dict(host.tvm), budget, root=args.work, seed=args.seed)
            log.info("%s: %d tasks, %d from databases, %d tuned, %d trials, %.0f s", name, report.tasks,
                     report.tasks_from_database, report.tasks_tuned, report.trials, report.seconds)  # fmt: skip
        if args.refine:
            refine(modules, tgt, dict(host.tvm), args.work, trials=args.refine, min_share=args.refine_share,
                   seed=args.seed)  # fmt: skip
    shipped = SHIPPED_DIR / key
    # Without --from-scratch the shipped workloads of models not given here are kept; with it, the
    # folder holds exactly the tasks of the modules tuned in this run.
    records = best_records(modules, tgt, [args.work / key, shipped], keep=None if args.from_scratch else shipped)
    covered = [n if not n.startswith("onnx:") else _model_name(n[len("onnx:"):]) for n in modules]
    n = write_database(records, tgt, shipped, dict(host.tvm), covered)
    size = sum(f.stat().st_size for f in shipped.iterdir() if f.is_file())
    log.info("wrote %d records to %s (%.1f MB) in %.0f s", n, shipped, size / 1e6, time.perf_counter() - t0)

if __name__ == "__main__":
    main()
