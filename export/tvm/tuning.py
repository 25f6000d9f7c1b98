"""MetaSchedule tuning under a budget, into a persistent database per target.

Untuned TVM CPU code is one to two orders of magnitude slower than onnxruntime, because the
default CPU pipeline does not schedule loops at all. MetaSchedule (Shao et al., "Tensor Program
Optimization with Probabilistic Programs", NeurIPS 2022) searches schedules per fused operator
("task") and keeps the best in a database keyed by the operator's structure ("workload").

How this module uses it:

* one database folder per target (kind, triple, CPU), so a workload tuned for one model is
  found again for any other model that contains the same operator;
* tasks are tuned one at a time and each task's records are committed before the next starts,
  so an interrupted tune keeps what it finished and the next run resumes with the rest;
* a ledger (``attempted.json``) records the tasks already given their trials, so a second run
  with the same budget does no new trials even for tasks whose candidates all failed to build;
* the databases shipped inside this package (``export/tvm/tuned/<key>/``) are read as well, so
  the built-in examples get fast artifacts without a tune.

Measurement on the host uses an in-process builder and runner: on a busy two-core machine the
default process pools spend longer starting than measuring, and time out. Targets whose code runs
elsewhere (ARM64, GPUs) are measured on the device over TVM RPC (:mod:`export.tvm.rpc_measure`),
never on this machine or an emulator: their records go to that target's own database.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from export.errors import ExportError

if TYPE_CHECKING:
    from export.tvm.rpc_measure import MeasureDevice

log = logging.getLogger(__name__)

SHIPPED_DIR = Path(__file__).parent / "tuned"
WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
LEDGER_FILE = "attempted.json"
DEFAULT_TRIALS_PER_TASK = 16
#: How a candidate is timed, on this machine or on a device: 3 calls per measurement and at least
#: 20 ms, enough to rank schedules (the artifact's latency is measured later by `compress profile`).
EVALUATOR = {"number": 3, "repeat": 1, "min_repeat_ms": 20}
_BUDGET_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h)?\s*$")


@dataclass(frozen=True)
class TuneBudget:
    """How much tuning to do: a number of trials, a time limit, or both (whichever ends first).

    ``trials_per_task`` caps the trials of one task, so a budget is spread over the tasks.
    """

    trials: int | None = None
    seconds: float | None = None
    trials_per_task: int = DEFAULT_TRIALS_PER_TASK

    @classmethod
    def parse(cls, value: str | int | TuneBudget | None, *, trials_per_task: int | None = None) -> TuneBudget | None:
        """``"10m"``, ``"90s"``, ``"1h"`` (time), ``"200"`` or ``200`` (trials); None means no tuning.

        Raises:
            ExportError: the value is neither a duration nor a trial count.
        """
        if value is None or isinstance(value, TuneBudget):
            return value
        per_task = trials_per_task or DEFAULT_TRIALS_PER_TASK
        if isinstance(value, int):
            return cls(trials=value, trials_per_task=min(per_task, value)) if value > 0 else None
        m = _BUDGET_RE.match(str(value))
        if not m:
            raise TuneBudgetError(
                f"tuning budget {value!r} is not understood; use a duration like '10m', '90s', '1h' or a trial count like '200'"
            )
        number, unit = float(m.group(1)), m.group(2)
        if unit is None:
            trials = int(number)
            return cls(trials=trials, trials_per_task=min(per_task, trials)) if trials > 0 else None
        scale = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}[unit]
        return cls(seconds=number * scale, trials_per_task=per_task) if number > 0 else None


class TuneBudgetError(ExportError, ValueError):
    """A tuning budget that cannot be parsed (bad input, exit code 2)."""


@dataclass
class TuningReport:
    """What a tuning run did: written into the artifact manifest."""

    database: str
    tasks: int = 0
    tasks_from_database: int = 0
    tasks_tuned: int = 0
    tasks_left: int = 0
    trials: int = 0
    seconds: float = 0.0
    task_names: list[str] = field(default_factory=list)
    measured_on: str = "this machine (in process)"
    built_on: str = "this machine (in process)"

    @property
    def complete(self) -> bool:
        return self.tasks_left == 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["complete"] = self.complete
        return d


def default_database_root() -> Path:
    """Where tuning databases live: ``$EDGECOMPRESS_CACHE/tvm-tuning`` or the user cache folder."""
    root = os.environ.get("EDGECOMPRESS_CACHE")
    if root:
        return Path(root) / "tvm-tuning"
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("edgecompress")) / "tvm-tuning"


def database_key(target_spec: dict[str, Any]) -> str:
    """A folder name identifying the code a target runs: kind, triple, CPU, features, GPU arch.

    Example:
        >>> database_key({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell", "num-cores": 2})
        'llvm-x86_64-linux-gnu-haswell-2c'
    """
    parts = [str(target_spec.get("kind", "llvm"))]
    for k in ("mtriple", "mcpu", "arch", "device"):
        if target_spec.get(k):
            parts.append(str(target_spec[k]))
    mattr = target_spec.get("mattr")
    if mattr:
        parts.append("".join(sorted(str(a) for a in mattr)))
    if target_spec.get("num-cores"):
        parts.append(f"{target_spec['num-cores']}c")
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", "-".join(parts))


def _open_json_db(folder: Path) -> Any:
    from tvm.s_tir import meta_schedule as ms

    folder.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(
        path_workload=str(folder / WORKLOAD_FILE), path_tuning_record=str(folder / RECORD_FILE), allow_missing=True
    )


def open_databases(target_spec: dict[str, Any], root: Path | None = None) -> tuple[Any, Any, list[Path]]:
    """(user database, database for lookups = user + shipped, folders read) for a target."""
    from tvm.s_tir import meta_schedule as ms

    key = database_key(target_spec)
    user_dir = (root or default_database_root()) / key
    user = _open_json_db(user_dir)
    folders = [user_dir]
    shipped_dir = SHIPPED_DIR / key
    if (shipped_dir / RECORD_FILE).is_file():
        shipped = ms.database.JSONDatabase(
            path_workload=str(shipped_dir / WORKLOAD_FILE),
            path_tuning_record=str(shipped_dir / RECORD_FILE),
            allow_missing=False,
        )
        folders.append(shipped_dir)
        return user, ms.database.UnionDatabase(user, shipped), folders
    return user, user, folders


def has_records(database: Any, folders: list[Path]) -> bool:
    """Whether any of the database folders holds at least one tuning record."""
    return any((f / RECORD_FILE).is_file() and (f / RECORD_FILE).stat().st_size > 0 for f in folders)


def _ledger(folder: Path) -> dict[str, int]:
    path = folder / LEDGER_FILE
    if not path.is_file():
        return {}
    try:
        return {str(k): int(v) for k, v in json.loads(path.read_text()).items()}
    except (ValueError, AttributeError):
        log.warning("tuning ledger %s is unreadable; starting a new one", path)
        return {}


def _save_ledger(folder: Path, ledger: dict[str, int]) -> None:
    tmp = folder / f".{LEDGER_FILE}.tmp"
    tmp.write_text(json.dumps(ledger, indent=1, sort_keys=True))
    os.replace(tmp, folder / LEDGER_FILE)


def workload_hash(task_mod: Any) -> str:
    from tvm.s_tir.meta_schedule.utils import shash2hex

    return str(shash2hex(task_mod))


def tune(
    fused_mod: Any,
    tgt: Any,
    target_spec: dict[str, Any],
    budget: TuneBudget,
    *,
    root: Path | None = None,
    seed: int = 0,
    device: MeasureDevice | None = None,
    plan: Any = None,
    builds: Callable[[Callable[[Any], str] | None], Any] | None = None,
) -> TuningReport:
    """Tune the fused module's tasks that the databases do not cover yet, within ``budget``.

    Tasks are visited heaviest first (FLOPs times occurrences). Each task gets
    ``budget.trials_per_task`` trials (fewer when the trial budget runs out); the time budget is
    checked before each task. Records are committed to the user database as they are measured,
    and the ledger as each task ends.

    Args:
        device: time candidates on this device over TVM RPC (required for code that does not run
            here: ARM64, GPUs); None times them in this process.
        plan: with ``device``, how candidates are packaged for it (a
            :class:`export.tvm.compile.LibraryPlan`: the cross compiler, or a ``.tar``).
        builds: compiles candidates elsewhere (a Ray cluster, :class:`compress.cluster.RayBuilds`):
            called with how to package a candidate (None: MetaSchedule's ``.tar``), returns the
            MetaSchedule builder; measurement stays where ``device`` says, records are unchanged.

    Returns:
        A :class:`TuningReport` (``trials == 0`` when everything was already in a database).

    Raises:
        TuningDeviceError: the device stopped answering; what was measured before is kept.
    """
    from tvm.s_tir import meta_schedule as ms

    from export.tvm.rpc_measure import TuningDeviceError, candidate_packager, rpc_workers

    _import_tensor_intrinsics()
    user, lookup, folders = open_databases(target_spec, root)
    user_dir = folders[0]
    ledger = _ledger(user_dir)
    report = TuningReport(database=str(user_dir))
    tasks = ms.relax_integration.extract_tasks(fused_mod, tgt)
    tasks = sorted(tasks, key=lambda t: -float(t.weight) * _flops(t.dispatched[0]))
    report.tasks = len(tasks)
    start = time.perf_counter()
    trials_left = budget.trials
    link = None
    if device is None:
        workers = _in_process_workers()
    else:
        if plan is None:
            raise ValueError("tuning on a device needs the target's library plan (how to package candidates)")
        builder, runner, link = rpc_workers(device, plan, str(tgt.kind.name).replace("llvm", "cpu"))
        workers = (builder, runner)
        report.measured_on = device.where
    if builds is not None:
        workers = (builds(None if device is None else candidate_packager(plan)), workers[1])
        report.built_on = str(getattr(builds, "where", "the builder given by the caller"))
    try:
        for task in tasks:
            mod = task.dispatched[0]
            key = workload_hash(mod)
            if lookup.query_tuning_record(mod, tgt, task.task_name) is not None:
                report.tasks_from_database += 1
                continue
            if ledger.get(key, 0) >= budget.trials_per_task:
                report.tasks_from_database += 1  # already given its trials; none built (e.g. a layout op)
                continue
            out_of_time = budget.seconds is not None and time.perf_counter() - start >= budget.seconds
            if out_of_time or (trials_left is not None and trials_left <= 0):
                report.tasks_left += 1
                continue
            n = budget.trials_per_task if trials_left is None else min(budget.trials_per_task, trials_left)
            log.info("tuning %s with %d trials (%s)", task.task_name, n, target_spec.get("kind"))
            # TuneContext built here rather than by extracted_tasks_to_tune_contexts: that helper
            # reconfigures file loggers per call and fails on the second call in a process.
            ctx = ms.TuneContext(
                mod=mod, target=task.target, space_generator="post-order-apply", search_strategy=_strategy(n),
                task_name=task.task_name, logger=logging.getLogger(f"{__name__}.metaschedule"), rand_state=seed,
                num_threads=int(target_spec.get("num-cores") or 1),
            ).clone()  # fmt: skip
            ctxs, weights = [ctx], [float(task.weight)]
            ms.tune_tasks(
                tasks=ctxs, task_weights=weights, work_dir=str(user_dir / "logs"), max_trials_global=n,
                max_trials_per_task=n, num_trials_per_iter=min(n, 16), database=user, builder=workers[0],
                runner=workers[1], cost_model="random" if n < 32 else "xgb",  # replay-trace ignores the model
            )  # fmt: skip
            if link is not None and link.lost is not None:
                report.tasks_left += 1
                report.seconds = round(time.perf_counter() - start, 2)
                raise TuningDeviceError(
                    f"the device {link.device.where} stopped answering while tuning {task.task_name} "
                    f"({link.lost}). The {report.tasks_tuned} task(s) finished before and the candidates measured so far "
                    f"are saved in {user_dir}; rerun the same command to resume"
                )
            ledger[key] = ledger.get(key, 0) + n
            _save_ledger(user_dir, ledger)
            report.tasks_tuned += 1
            report.trials += n
            report.task_names.append(task.task_name)
            if trials_left is not None:
                trials_left -= n
    finally:
        if link is not None:
            link.close()
    report.seconds = round(time.perf_counter() - start, 2)
    return report


def _import_tensor_intrinsics() -> None:
    """Import TVM's tensor intrinsics (needed by MetaSchedule) with a cheap ``inspect.stack``.

    Each of the hundreds of TVMScript functions in ``tvm.s_tir.tensor_intrin`` calls
    ``inspect.stack()``, which looks up a module for every frame by scanning ``sys.modules``;
    with torch loaded that import takes minutes on a busy machine. TVMScript reads only the
    source line of the decorator's caller (the third frame), so the others are built without it.
    """
    import inspect
    import sys

    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    original = inspect.stack

    def cheap_stack(context: int = 1) -> list[inspect.FrameInfo]:
        frames: list[inspect.FrameInfo] = []
        frame: Any = sys._getframe(1)
        while frame is not None:
            if len(frames) < 3:
                info = inspect.getframeinfo(frame, context)
                frames.append(inspect.FrameInfo(frame, *info, positions=info.positions))
            else:
                code = frame.f_code
                frames.append(inspect.FrameInfo(frame, code.co_filename, frame.f_lineno, code.co_name, None, None,
                                                positions=None))  # fmt: skip
            frame = frame.f_back
        return frames

    inspect.stack = cheap_stack  # type: ignore[assignment]
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401
    finally:
        inspect.stack = original  # type: ignore[assignment]


def _strategy(trials: int) -> Any:
    """Random schedule sampling for small budgets; evolutionary search with a small population otherwise.

    The default evolutionary population (2,048 candidates per round) costs minutes of CPU before
    the first measurement on a busy machine, which is wasted when only a few trials are allowed.
    """
    from tvm.s_tir import meta_schedule as ms

    if trials < 32:
        return ms.search_strategy.ReplayTrace()
    return ms.search_strategy.EvolutionarySearch(population_size=256, genetic_num_iters=2)


def _flops(mod: Any) -> float:
    try:
        from tvm.s_tir.analysis import estimate_tir_flops

        return float(estimate_tir_flops(mod))
    except Exception:  # FLOP estimation is only an ordering hint
        return 1.0


def done_future(res: list[float] | None, error: str | None) -> Any:
    """A MetaSchedule runner future that is already finished (these runners measure synchronously)."""
    return _done_future_class()(res, error)


@functools.cache
def _done_future_class() -> Any:
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.runner import PyRunnerFuture, RunnerResult

    @derived_object
    class DoneFuture(PyRunnerFuture):
        def __init__(self, res: list[float] | None, error: str | None) -> None:
            super().__init__()
            self.res = res
            self.error = error

        def done(self) -> bool:
            return True

        def result(self) -> Any:
            return RunnerResult(self.res, self.error)

    return DoneFuture


def in_process_builder(export: Callable[[Any], str] | None = None) -> Any:
    """A MetaSchedule builder that compiles candidates in this process (no worker pool).

    ``export`` packages a compiled candidate and returns its path (default: MetaSchedule's ``.tar``,
    which ``tvm.runtime.load_module`` links on load).
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build, default_export

    package = export or default_export

    @derived_object
    class InProcessBuilder(PyBuilder):
        def build(self, build_inputs: list[Any]) -> list[Any]:
            results = []
            for bi in build_inputs:
                try:
                    results.append(BuilderResult(package(default_build(bi.mod, bi.target, None)), None))
                except Exception as exc:  # a candidate schedule that does not compile: a failed trial
                    results.append(BuilderResult(None, f"in-process build failed: {exc}"))
            return results

    return InProcessBuilder()


def _in_process_workers() -> tuple[Any, Any]:
    """A MetaSchedule builder and runner that work in this process (no worker pools)."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, PyRunner
    from tvm.s_tir.meta_schedule.runner.local_runner import default_alloc_argument, default_run_evaluator

    config = EvaluatorConfig(enable_cpu_cache_flush=False, **EVALUATOR)

    @derived_object
    class InProcessRunner(PyRunner):
        def run(self, runner_inputs: list[Any]) -> list[Any]:
            import tvm

            futures = []
            for ri in runner_inputs:
                try:
                    lib = tvm.runtime.load_module(str(ri.artifact_path))
                    dev = tvm.runtime.device(str(ri.device_type), 0)
                    args = default_alloc_argument(dev, tuple(a.as_json() for a in ri.args_info), 1)
                    futures.append(done_future(list(default_run_evaluator(lib, dev, config, args)), None))
                except Exception as exc:  # a candidate that crashes at run time: a failed trial
                    futures.append(done_future(None, f"in-process run failed: {exc}"))
            return futures

    return in_process_builder(), InProcessRunner()
