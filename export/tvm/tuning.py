"""MetaSchedule tuning under a budget, into a persistent database per target.

Untuned TVM CPU code is one to two orders of magnitude slower than onnxruntime, because the
default CPU pipeline does not schedule loops at all. MetaSchedule (Shao et al., "Tensor Program
Optimization with Probabilistic Programs", NeurIPS 2022) searches schedules per fused operator
("task") and keeps the best in a database keyed by the operator's structure ("workload").

How this module uses it:

* one database folder per target (kind, triple, CPU), so a workload tuned for one model is
  found again for any other model that contains the same operator; databases of older x86-64
  CPUs apply too, and every record is verified before use (:mod:`edgecompress.export.tvm.records`);
* the budget is spread over tasks by their FLOPs, each task tuned in rounds that stop early
  when they stop improving, with a progress line per round;
* tasks are tuned one at a time and each task's records are committed before the next starts,
  so an interrupted tune keeps what it finished and the next run resumes with the rest;
* a ledger (``attempted.json``) records the tasks already given their trials, so a second run
  with the same budget does no new trials even for tasks whose candidates all failed to build;
* the databases shipped inside this package (``export/tvm/tuned/<key>/``) are read as well, so
  the built-in examples get fast artifacts without a tune.

Measurement on the host uses an in-process builder and runner: on a busy two-core machine the
default process pools spend longer starting than measuring, and time out. Targets whose code runs
elsewhere (ARM64, GPUs) are measured on the device over TVM RPC (:mod:`edgecompress.export.tvm.rpc_measure`),
never on this machine or an emulator: their records go to that target's own database.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgecompress.export.errors import ExportError
from edgecompress.export.tvm import records
from edgecompress.export.tvm.intrinsics import import_tensor_intrinsics
from edgecompress.export.tvm.records import (  # noqa: F401  (the database helpers' old home: re-exported)
    RECORD_FILE,
    SHIPPED_DIR,
    WORKLOAD_FILE,
    database_key,
    default_database_root,
    workload_hash,
)
from edgecompress.export.tvm.workers import in_process_workers

if TYPE_CHECKING:
    from edgecompress.export.tvm.workers import CandidateRunner

log = logging.getLogger(__name__)

LEDGER_FILE = "attempted.json"
DEFAULT_TRIALS_PER_TASK = 16
#: The cap per task under a time budget (the time shares and early stopping decide before it).
TIMED_TRIALS_PER_TASK = 512
_BUDGET_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h)?\s*$")


@dataclass(frozen=True)
class TuneBudget:
    """How much tuning to do: a number of trials, a time limit, or both (whichever ends first).

    ``trials_per_task`` caps the trials of one task (default 16 with a trial budget, 512 with a
    time budget, where each task's share of the time and early stopping end it first).
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
        timed_cap = trials_per_task or TIMED_TRIALS_PER_TASK
        return cls(seconds=number * scale, trials_per_task=timed_cap) if number > 0 else None


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


def tune(
    fused_mod: Any,
    tgt: Any,
    target_spec: dict[str, Any],
    budget: TuneBudget,
    *,
    root: Path | None = None,
    seed: int = 0,
    device: CandidateRunner | None = None,
    plan: Any = None,
    builds: Callable[[Callable[[Any], str] | None], Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> TuningReport:
    """Tune the fused module's tasks that the databases do not cover yet, within ``budget``.

    Tasks are visited heaviest first (FLOPs times occurrences) and tuned in rounds of
    :data:`ROUND_TRIALS` trials: the first samples schedules at random, later rounds evolve the
    best ones (XGBoost cost model kept across a task's rounds). A time budget is spread over the
    tasks by their share of the model's FLOPs, time a task leaves unused goes to the next ones, and
    a task stops early after :data:`PATIENCE` rounds that improve it by less than
    :data:`MIN_GAIN`. A task whose only records were tuned for another CPU (transferred) has that
    record timed here first, so tuning continues from it. Records are committed to the user
    database as they are measured, and the ledger as each task ends; every round reports a line
    (``progress``, or the log).

    Args:
        device: the runner that times candidates on the device (a ``CandidateRunner``, made by
            ``runtimes.tvm_tuning.open_tuning_device``; required for code that does not run here:
            ARM64, GPUs); None times them in this process.
        plan: with ``device``, how candidates are packaged for it (a
            :class:`export.tvm.compile.LibraryPlan`: the cross compiler, or a ``.tar``).
        builds: compiles candidates elsewhere (a Ray cluster, :class:`compress.cluster.RayBuilds`):
            called with how to package a candidate (None: MetaSchedule's ``.tar``), returns the
            MetaSchedule builder; measurement stays where ``device`` says, records are unchanged.
        progress: called with one line of text per round; None logs it.

    Returns:
        A :class:`TuningReport` (``trials == 0`` when everything was already in a database).

    Raises:
        TuningDeviceError: the device stopped answering; what was measured before is kept.
    """
    from tvm.s_tir import meta_schedule as ms

    from edgecompress.export.tvm.int8_arm import dotprod_intrinsic_builds, target_has_dotprod
    from edgecompress.export.tvm.rpc_measure import TuningDeviceError, candidate_packager

    import_tensor_intrinsics()
    if target_has_dotprod(tgt):
        dotprod_intrinsic_builds()  # logs a warning when sdot candidates cannot build (scalar code only)
    say = progress or (lambda line: log.info("%s", line))
    user_dir = records.sources(target_spec, root)[0].folder
    user = records.open_json_database(user_dir, create=True, target_spec=target_spec)
    ledger = _ledger(user_dir)
    report = TuningReport(database=str(user_dir))
    tasks = sorted(ms.relax_integration.extract_tasks(fused_mod, tgt), key=lambda t: -_weight(t))
    report.tasks = len(tasks)
    selection = records.select_records(tasks, tgt, target_spec, root, verify=device is None)
    todo = []
    for task, choice in zip(tasks, selection.choices, strict=True):
        if (choice.source is not None and choice.source.kind != "transferred") or ledger.get(choice.workload, 0) >= budget.trials_per_task:
            report.tasks_from_database += 1  # tuned already, or given its trials (none built: e.g. a layout op)
        else:
            todo.append((task, choice))
    if device is None:
        workers = in_process_workers()
    else:
        if plan is None:
            raise ValueError("tuning on a device needs the target's library plan (how to package candidates)")
        workers = device.workers(plan, _device_type(tgt))
        report.measured_on = device.where
    if builds is not None:
        workers = (builds(None if device is None else candidate_packager(plan)), workers[1])
        report.built_on = str(getattr(builds, "where", "the builder given by the caller"))
    clock = _Clock(budget)
    try:
        weights = [_weight(t) for t, _ in todo]
        for i, (task, choice) in enumerate(todo):
            if clock.out_of_time() or (clock.trials_left is not None and clock.trials_left <= 0):
                report.tasks_left += 1
                continue
            cap = budget.trials_per_task - ledger.get(choice.workload, 0)
            if clock.trials_left is not None:
                cap = min(cap, clock.trials_left)
            if choice.source is not None:  # transferred from another CPU: time it here, tune on from it
                _remeasure(choice, tgt, workers, user)
            share = weights[i] / sum(weights[i:])
            label = f"[{i + 1}/{len(todo)}] {task.task_name}"
            done = _tune_task(task, user, workers, target_spec, cap, clock.seconds_for(share), clock, label, say, seed)
            if device is not None and device.lost is not None:
                report.tasks_left += 1
                report.seconds = round(clock.elapsed(), 2)
                raise TuningDeviceError(
                    f"the device {device.where} stopped answering while tuning {task.task_name} "
                    f"({device.lost}). The {report.tasks_tuned} task(s) finished before and the candidates measured so far "
                    f"are saved in {user_dir}; rerun the same command to resume"
                )
            ledger[choice.workload] = ledger.get(choice.workload, 0) + done
            _save_ledger(user_dir, ledger)
            report.tasks_tuned += 1
            report.trials += done
            report.task_names.append(task.task_name)
    finally:
        if device is not None:
            device.close()
    report.seconds = round(clock.elapsed(), 2)
    return report


#: Trials per tuning round; a task's budget is spent in rounds so it can stop early.
ROUND_TRIALS = 16
#: A task stops after this many rounds in a row that improve its best time by less than MIN_GAIN.
PATIENCE = 2
MIN_GAIN = 0.02


class _Clock:
    """The budget as it is spent: elapsed time, trials left, and a task's share of the time left."""

    def __init__(self, budget: TuneBudget) -> None:
        self.budget = budget
        self.start = time.perf_counter()
        self.trials_left = budget.trials

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def out_of_time(self) -> bool:
        return self.budget.seconds is not None and self.elapsed() >= self.budget.seconds

    def seconds_for(self, share: float) -> float | None:
        return None if self.budget.seconds is None else max(0.0, self.budget.seconds - self.elapsed()) * share

    def left(self) -> str:
        if self.budget.seconds is not None:
            return f"{max(0.0, self.budget.seconds - self.elapsed()):.0f} s left"
        return f"{self.trials_left} trials left"

    def spend(self, trials: int) -> None:
        if self.trials_left is not None:
            self.trials_left -= trials


def _tune_task(task: Any, user: Any, workers: tuple[Any, Any], target_spec: dict[str, Any], cap: int,
               seconds: float | None, clock: _Clock, label: str, say: Callable[[str], None], seed: int) -> int:  # fmt: skip
    """Tune one task in rounds until ``cap`` trials, its time share, or no more gain; returns the trials run."""
    from tvm.s_tir import meta_schedule as ms

    mod = task.dispatched[0]
    cores = int(target_spec.get("num-cores") or 1)
    cost_model = ms.cost_model.CostModel.create("xgb", num_tuning_cores=cores) if cap > ROUND_TRIALS else "random"
    start, done, stale = time.perf_counter(), 0, 0
    best = _best_seconds(user, mod)
    while done < cap:
        n = min(ROUND_TRIALS, cap - done)
        # TuneContext built here rather than by extracted_tasks_to_tune_contexts: that helper
        # reconfigures file loggers per call and fails on the second call in a process.
        ctx = ms.TuneContext(
            mod=mod, target=task.target, space_generator="post-order-apply",
            search_strategy=_strategy(evolve=best is not None and cap > ROUND_TRIALS), task_name=task.task_name,
            logger=logging.getLogger(f"{__name__}.metaschedule"), rand_state=seed + done, num_threads=cores,
        ).clone()  # fmt: skip
        ms.tune_tasks(
            tasks=[ctx], task_weights=[float(task.weight)], work_dir=str(Path(str(user.path_workload)).parent / "logs"),
            max_trials_global=n, max_trials_per_task=n, num_trials_per_iter=n, database=user, builder=workers[0],
            runner=workers[1], cost_model=cost_model,
        )  # fmt: skip
        done += n
        clock.spend(n)
        new = _best_seconds(user, mod)
        gain = 0.0 if new is None else (1.0 if best is None else (best - new) / best)
        best = new if new is not None else best
        stale = stale + 1 if gain < MIN_GAIN else 0
        best_text = f"best {best * 1e3:.3f} ms" if best is not None else "no candidate built"
        say(f"tuning {label}: {done} trials, {best_text}, {clock.elapsed():.0f} s elapsed, {clock.left()}")
        if stale >= PATIENCE and done < cap:
            say(f"tuning {label}: stopped early ({PATIENCE} rounds under {MIN_GAIN:.0%} gain)")
            break
        if clock.out_of_time() or (seconds is not None and time.perf_counter() - start >= seconds):
            break
    return done


def _weight(task: Any) -> float:
    """A task's share of the model's work: FLOPs times occurrences (at least 1)."""
    return max(float(task.weight) * _flops(task.dispatched[0]), 1.0)


def _device_type(tgt: Any) -> str:
    return str(tgt.kind.name).replace("llvm", "cpu")


def _best_seconds(db: Any, mod: Any) -> float | None:
    """The mean time of the best record of ``mod`` in ``db`` (None: none yet)."""
    if not db.has_workload(mod):
        return None
    top = db.get_top_k(db.commit_workload(mod), 1)
    secs = [float(s) for s in (top[0].run_secs or [])] if top else []
    return sum(secs) / len(secs) if secs else None


def _remeasure(choice: Any, tgt: Any, workers: tuple[Any, Any], user: Any) -> None:
    """Time a record tuned for another CPU here and commit it to this target's database."""
    import tvm
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.builder import BuilderInput
    from tvm.s_tir.meta_schedule.runner import RunnerInput

    sch = tvm.s_tir.Schedule(choice.mod)
    try:
        choice.record.trace.apply_to_schedule(sch, remove_postproc=False)
    except Exception:  # a schedule that does not replay: tune from scratch
        return
    (built,) = workers[0].build([BuilderInput(sch.mod, tgt)])
    if built.error_msg:
        return
    args = ms.arg_info.ArgInfo.from_prim_func(choice.mod["main"])
    (future,) = workers[1].run([RunnerInput(built.artifact_path, _device_type(tgt), args)])
    res = future.result()
    if not res.error_msg and res.run_secs:
        user.commit_tuning_record(ms.database.TuningRecord(choice.record.trace, user.commit_workload(choice.mod),
                                                           res.run_secs, tgt, args))  # fmt: skip


def _strategy(*, evolve: bool) -> Any:
    """Random schedule sampling (a task's first round, small budgets); otherwise evolutionary search
    from the best measured schedules, with a small population.

    The default evolutionary population (2,048 candidates per round) costs minutes of CPU before
    the first measurement on a busy machine, which is wasted when only a few trials are allowed.
    """
    from tvm.s_tir import meta_schedule as ms

    if not evolve:
        return ms.search_strategy.ReplayTrace()
    return ms.search_strategy.EvolutionarySearch(population_size=256, genetic_num_iters=2)


def _flops(mod: Any) -> float:
    try:
        from tvm.s_tir.analysis import estimate_tir_flops

        return float(estimate_tir_flops(mod))
    except Exception:  # FLOP estimation is only an ordering hint
        return 1.0


