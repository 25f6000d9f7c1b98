"""Tuning databases: where records live, which ones apply to a target, and proof that they are right.

MetaSchedule keeps tuned schedules ("records") per operator structure ("workload") in JSON
databases. This module decides which record each task of a model gets, and never hands out one
that computes a wrong result:

* **Sources.** For a target, the databases read are, in order: the user's own (one folder per
  target key under :func:`default_database_root`), the one shipped in this package for that key,
  and then "transferred" ones: databases tuned for another x86-64 CPU whose features this target
  has (records tuned on ``haswell`` apply on an AVX-512 ``cascadelake``). A schedule is a loop
  structure, valid on any CPU that can run the code; only its speed is the source CPU's.
* **Verification.** Before a record is used, its task is compiled twice for the target, as the
  record schedules it and unscheduled (TVM's plain lowering, slow but straightforward), and both
  run on the same random inputs with the same random output buffers; every buffer must agree. A
  schedule that leaves part of an output unwritten or computes it wrongly fails. The verdict is
  cached per (workload, schedule, target key) in the user's database folder (``checks.json``);
  a shipped folder carries the verdicts of its own key, checked when it was written.
* **Quarantine.** A record that fails is never applied: the next best record of the task is
  tried, then the task stays untuned. Wrong records are moved out of the user's database into
  ``quarantine.json`` (so MetaSchedule's search does not breed from them); shipped and
  transferred records stay where they are and are skipped by their cached verdict.

The wrong records this guards against are real: a MetaSchedule schedule of a 1x1 convolution
fused with ReLU6 and the zero padding of the next layer (``reverse_compute_at`` of the pad into
the convolution's tile loop) never writes the padded last row and column of its output (TVM
0.27; fixture in the project's shared fixtures). :func:`export.tvm.onnx_prep.fold_pad_into_conv`
removes that pattern from ONNX graphs; verification catches it and anything like it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SHIPPED_DIR = Path(__file__).parent / "tuned"
WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
TARGET_FILE = "target.json"
CHECKS_FILE = "checks.json"
QUARANTINE_FILE = "quarantine.json"
#: Candidate records tried per task and source before the task is left untuned.
TOP_K = 4
#: x86-64 CPU names this toolchain targets (``targets.host.HostCPU.llvm_mcpu``), each with every
#: feature of the ones before it: records tuned for one apply to any later one.
X86_LEVELS = ("x86-64", "haswell", "skylake-avx512", "cascadelake", "sapphirerapids")


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


_X86_KEY = re.compile(r"^llvm-(?P<mtriple>x86_64-[a-z0-9_]+-[a-z0-9_]+)-(?P<mcpu>[a-z0-9.-]+?)-(?P<cores>\d+)c$")


def folder_target(folder: Path) -> dict[str, Any] | None:
    """The target spec a database folder was tuned for: its ``target.json``, else parsed from an
    x86-64 folder name (databases written before ``target.json`` existed); None when unknown."""
    path = folder / TARGET_FILE
    if path.is_file():
        try:
            spec = json.loads(path.read_text())
            return spec if isinstance(spec, dict) else None
        except ValueError:
            return None
    m = _X86_KEY.match(folder.name)
    if m is None or m.group("mcpu") not in X86_LEVELS:
        return None
    return {"kind": "llvm", "mtriple": m.group("mtriple"), "mcpu": m.group("mcpu"), "num-cores": int(m.group("cores"))}


def transfer_rank(source: dict[str, Any], target: dict[str, Any]) -> int | None:
    """How close records tuned for ``source`` are to ``target`` (0 = the same CPU; larger = older
    CPU or other core count), or None when they cannot apply (another kind, triple, features, or a
    CPU with features the target lacks)."""
    same = ("kind", "mtriple", "arch", "device")
    if any(source.get(k) != target.get(k) for k in same) or sorted(source.get("mattr") or []) != sorted(target.get("mattr") or []):
        return None
    src_cpu, dst_cpu = source.get("mcpu"), target.get("mcpu")
    if src_cpu == dst_cpu:
        gap = 0
    elif src_cpu in X86_LEVELS and dst_cpu in X86_LEVELS and str(target.get("mtriple", "")).startswith("x86_64"):
        gap = X86_LEVELS.index(dst_cpu) - X86_LEVELS.index(src_cpu)
        if gap < 0:
            return None
    else:
        return None
    return 2 * gap + (0 if source.get("num-cores") == target.get("num-cores") else 1)


@dataclass(frozen=True)
class Source:
    """One database folder read for a target: ``own`` (this target's key), ``shipped`` (in this
    package, this key) or ``transferred`` (another CPU's key, see :func:`transfer_rank`)."""

    folder: Path
    kind: str
    key: str

    @property
    def label(self) -> str:
        return self.kind if self.kind != "transferred" else f"transferred from {self.key}"


def sources(target_spec: dict[str, Any], root: Path | None = None) -> list[Source]:
    """Every database folder whose records may apply to ``target_spec``, best first."""
    key = database_key(target_spec)
    user_root = root or default_database_root()
    found = [Source(user_root / key, "own", key)]
    if (SHIPPED_DIR / key / RECORD_FILE).is_file():
        found.append(Source(SHIPPED_DIR / key, "shipped", key))
    others: list[tuple[int, int, Source]] = []
    for order, base in enumerate((user_root, SHIPPED_DIR)):
        if not base.is_dir():
            continue
        for folder in sorted(base.iterdir()):
            spec = folder_target(folder) if folder.name != key and (folder / RECORD_FILE).is_file() else None
            rank = transfer_rank(spec, target_spec) if spec is not None else None
            if rank is not None:
                others.append((rank, order, Source(folder, "transferred", folder.name)))
    found.extend(s for _, _, s in sorted(others, key=lambda t: (t[0], t[1], t[2].key)))
    return found


def open_json_database(folder: Path, *, create: bool = False, target_spec: dict[str, Any] | None = None) -> Any:
    """A MetaSchedule JSON database in ``folder`` (created, with its ``target.json``, when asked)."""
    from tvm.s_tir import meta_schedule as ms

    if create:
        folder.mkdir(parents=True, exist_ok=True)
        if target_spec is not None and not (folder / TARGET_FILE).is_file():
            (folder / TARGET_FILE).write_text(json.dumps(target_spec, sort_keys=True))
    return ms.database.JSONDatabase(path_workload=str(folder / WORKLOAD_FILE), path_tuning_record=str(folder / RECORD_FILE),
                                    allow_missing=create)  # fmt: skip


def has_any_records(target_spec: dict[str, Any], root: Path | None = None) -> bool:
    """Whether any database that applies to the target holds a record (cheap: file sizes only)."""
    return any((s.folder / RECORD_FILE).is_file() and (s.folder / RECORD_FILE).stat().st_size > 0
               for s in sources(target_spec, root))  # fmt: skip


def record_id(record: Any) -> str:
    """A stable identity of a record's schedule (its printed trace)."""
    return hashlib.sha1(str(record.trace).encode()).hexdigest()[:16]


def workload_hash(mod: Any) -> str:
    """MetaSchedule's structural hash of a task's module (the workload key)."""
    from tvm.s_tir.meta_schedule.utils import shash2hex

    return str(shash2hex(mod))


class RecordChecks:
    """Cached verdicts on records for one target (``checks.json`` in the target's own folder)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / CHECKS_FILE
        self.data: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            try:
                loaded = json.loads(self.path.read_text())
                self.data = loaded if isinstance(loaded, dict) else {}
            except ValueError:
                log.warning("record checks %s are unreadable; records will be checked again", self.path)

    def get(self, workload: str, rid: str) -> dict[str, Any] | None:
        return self.data.get(f"{workload}:{rid}")

    def put(self, workload: str, rid: str, verdict: dict[str, Any]) -> None:
        """Record a verdict (in memory; :meth:`save` writes the file)."""
        self.data[f"{workload}:{rid}"] = verdict

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{CHECKS_FILE}.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)

    def wrong(self) -> list[dict[str, Any]]:
        return [v for v in self.data.values() if not v.get("ok")]


def _random_arrays(mod: Any, seed: int) -> list[Any]:
    """Random float values (integers: zeros, always valid as indices) for every buffer of a task."""
    from tvm.s_tir import meta_schedule as ms

    return safe_arguments([info.as_json() for info in ms.arg_info.ArgInfo.from_prim_func(mod["main"])], seed)


def safe_arguments(args_info: list[Any], seed: int = 0) -> list[Any]:
    """numpy arrays for MetaSchedule argument infos (``["TENSOR", dtype, shape]``): floats random, integers
    zeros. MetaSchedule's own random integers index out of bounds in a gather (a token embedding's
    ``take``), and TVM's fast take then segfaults the process; zero is a valid index everywhere."""
    import numpy as np

    rng = np.random.default_rng(seed)
    arrays = []
    for _, dtype, shape in args_info:
        dims = [int(d) for d in shape]
        if str(dtype).startswith(("float", "bfloat")):
            arrays.append(rng.standard_normal(dims).astype(str(dtype)))
        else:
            arrays.append(np.zeros(dims, dtype=str(dtype)))
    return arrays


def compare_buffers(expected: list[Any], actual: list[Any]) -> str | None:
    """None when every buffer agrees (floats to 1e-3 of the buffer's scale, integers to 1), else why not."""
    import numpy as np

    for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
        if e.dtype.kind == "f":
            finite = np.isfinite(e) & np.isfinite(a)
            if not np.array_equal(np.isfinite(e), np.isfinite(a)):
                return f"buffer {i}: non-finite values at different places"
            scale = float(np.abs(e[finite]).max()) if finite.any() else 0.0
            err = float(np.abs(e[finite] - a[finite]).max()) if finite.any() else 0.0
            if err > 1e-3 * max(scale, 1e-6):
                bad = int((np.abs(e - a) > 1e-3 * max(scale, 1e-6)).sum())
                return f"buffer {i}: {bad} of {e.size} values differ (max abs error {err:.3g}, scale {scale:.3g})"
        elif e.size and int(np.abs(e.astype(np.int64) - a.astype(np.int64)).max()) > 1:
            return f"buffer {i}: integer values differ by more than 1"
    return None


def check_record(mod: Any, record: Any, tgt: Any, reference: Any = None, *, seed: int = 0) -> tuple[str | None, Any]:
    """Run a task as ``record`` schedules it and unscheduled; (None, reference) when they agree,
    else (what differed, reference). ``reference`` is the unscheduled build (reused across records)."""
    import tvm

    if reference is None:
        reference = tvm.compile(mod, target=tgt)
    sch = tvm.s_tir.Schedule(mod)
    try:
        record.trace.apply_to_schedule(sch, remove_postproc=False)
        scheduled = tvm.compile(sch.mod, target=tgt)
    except Exception as exc:  # a schedule that no longer applies or builds: not usable
        return f"the schedule does not build: {str(exc).strip().splitlines()[-1][:200]}", reference
    arrays = _random_arrays(mod, seed)
    dev = tvm.cpu()
    ref_args = [tvm.runtime.tensor(a, dev) for a in arrays]
    got_args = [tvm.runtime.tensor(a, dev) for a in arrays]
    reference(*ref_args)
    scheduled(*got_args)
    return compare_buffers([t.numpy() for t in ref_args], [t.numpy() for t in got_args]), reference


@dataclass
class Choice:
    """The record chosen for one task (None: untuned), where it came from, and the ones refused."""

    task: str
    workload: str
    mod: Any
    record: Any = None
    source: Source | None = None
    refused: list[dict[str, str]] | None = None


class Selection:
    """The verified record of every task of a model, best source first (:func:`select_records`)."""

    def __init__(self, choices: list[Choice], checks: RecordChecks, own: Path) -> None:
        self.choices = choices
        self.checks = checks
        self.own = own

    @property
    def applied(self) -> list[Choice]:
        return [c for c in self.choices if c.record is not None]

    def database(self, exclude: frozenset[str] = frozenset()) -> Any:
        """A database holding only the chosen records (``exclude``: task names to leave untuned)."""
        from tvm.s_tir import meta_schedule as ms

        memory = ms.database.MemoryDatabase()
        for c in self.applied:
            if c.task not in exclude:
                r = c.record
                memory.commit_tuning_record(ms.database.TuningRecord(r.trace, memory.commit_workload(c.mod), r.run_secs,
                                                                     r.target, r.args_info))  # fmt: skip
        return memory

    def refuse(self, choice: Choice, reason: str) -> None:
        """Mark a chosen record wrong (found by checking the whole model) and quarantine it."""
        self.checks.put(choice.workload, record_id(choice.record), {"ok": False, "task": choice.task, "reason": reason,
                                                                    "source": choice.source.label if choice.source else ""})  # fmt: skip
        self.checks.save()
        if choice.source is not None and choice.source.kind == "own":
            quarantine(self.own, {record_id(choice.record)}, {record_id(choice.record): reason})
        choice.refused = [*(choice.refused or []), {"source": choice.source.label if choice.source else "", "reason": reason}]
        choice.record, choice.source = None, None

    def summary(self) -> dict[str, Any]:
        """Counts for the manifest: tasks, applied, by source, and every refused record."""
        by_source: dict[str, int] = {}
        for c in self.applied:
            label = c.source.label if c.source else "?"
            by_source[label] = by_source.get(label, 0) + 1
        refused = [{"task": c.task, **r} for c in self.choices for r in (c.refused or [])]
        transferred = sorted({c.source.key for c in self.applied if c.source and c.source.kind == "transferred"})
        return {"tasks": len(self.choices), "applied": len(self.applied), "records_by_source": by_source,
                "transferred_from": transferred, "refused_records": refused}  # fmt: skip


def _candidates(mod: Any, opened: list[tuple[Source, Any]]) -> list[tuple[Source, Any]]:
    """A task's records: this target's (own and shipped, fastest first), then each transferred source's."""
    groups: dict[str, list[tuple[float, Source, Any]]] = {}
    for source, db in opened:
        if not db.has_workload(mod):
            continue
        group = "this-target" if source.kind != "transferred" else source.key
        for rec in db.get_top_k(db.commit_workload(mod), TOP_K):
            secs = [float(s) for s in (rec.run_secs or [])]
            groups.setdefault(group, []).append((sum(secs) / len(secs) if secs else float("inf"), source, rec))
    return [(s, r) for group in groups.values() for _, s, r in sorted(group, key=lambda t: t[0])]


def select_records(tasks: list[Any], tgt: Any, target_spec: dict[str, Any], root: Path | None = None, *,
                   verify: bool = True) -> Selection:  # fmt: skip
    """Choose each task's record from the target's databases, verifying it first (``verify=False``
    for code that cannot run here: ARM64, GPUs). Wrong records are skipped and quarantined."""
    srcs = sources(target_spec, root)
    opened = [(s, open_json_database(s.folder)) for s in srcs if (s.folder / RECORD_FILE).is_file()]
    checks = RecordChecks(srcs[0].folder)
    # Shipped records were checked for exactly this key when they were shipped (bench/tune_examples.py).
    shipped = {s.folder: RecordChecks(s.folder) for s in srcs if s.kind == "shipped"}
    choices: list[Choice] = []
    wrong_own: dict[str, str] = {}
    for task in tasks:
        mod = task.dispatched[0]
        choice = Choice(task=str(task.task_name), workload=workload_hash(mod), mod=mod, refused=[])
        reference = None
        for source, rec in _candidates(mod, opened):
            rid = record_id(rec)
            verdict = checks.get(choice.workload, rid) if verify else {"ok": True}
            if verdict is None and source.folder in shipped:
                verdict = shipped[source.folder].get(choice.workload, rid)
            if verdict is None:
                reason, reference = check_record(mod, rec, tgt, reference)
                verdict = {"ok": reason is None, "task": choice.task, "source": source.label, "reason": reason or ""}
                checks.put(choice.workload, rid, verdict)
                if reason:
                    log.warning("tuning record for %s (%s) computes a wrong result: %s; not used", choice.task,
                                source.label, reason)  # fmt: skip
            if verdict.get("ok"):
                choice.record, choice.source = rec, source
                break
            choice.refused = [*(choice.refused or []), {"source": source.label, "reason": str(verdict.get("reason", ""))}]
            if source.kind == "own":
                wrong_own[rid] = str(verdict.get("reason", ""))
        choices.append(choice)
    if checks.data:
        checks.save()  # once per model, not once per verdict
    if wrong_own:
        quarantine(srcs[0].folder, set(wrong_own), wrong_own)
    return Selection(choices, checks, srcs[0].folder)


def quarantine(folder: Path, ids: set[str], reasons: dict[str, str]) -> int:
    """Move the records ``ids`` out of the database in ``folder`` into ``quarantine.json``; returns
    how many moved. The database files are rewritten atomically without them."""
    import tempfile

    if not (folder / RECORD_FILE).is_file():
        return 0
    db = open_json_database(folder)
    records = list(db.get_all_tuning_records())
    bad = [r for r in records if record_id(r) in ids]
    if not bad:
        return 0
    qpath = folder / QUARANTINE_FILE
    kept = json.loads(qpath.read_text()) if qpath.is_file() else []
    kept.extend({"record": record_id(r), "workload": workload_hash(r.workload.mod), "reason": reasons.get(record_id(r), ""),
                 "trace": str(r.trace)} for r in bad)  # fmt: skip
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        fresh = open_json_database(Path(tmp), create=True)
        for r in records:
            if record_id(r) not in ids:
                fresh.commit_tuning_record(type(r)(r.trace, fresh.commit_workload(r.workload.mod), r.run_secs, r.target,
                                                   r.args_info))  # fmt: skip
        for name in (WORKLOAD_FILE, RECORD_FILE):
            src = Path(tmp) / name
            if not src.exists():
                src.write_text("")
            os.replace(src, folder / name)
    qpath.write_text(json.dumps(kept, indent=1))
    log.warning("quarantined %d wrong tuning record(s) from %s into %s", len(bad), folder, qpath)
    return len(bad)


def clear_database(target_spec: dict[str, Any], root: Path | None = None) -> Path:
    """Delete this target's own database folder (records, checks, quarantine, ledger); returns it."""
    import shutil

    folder = (root or default_database_root()) / database_key(target_spec)
    shutil.rmtree(folder, ignore_errors=True)
    return folder


def database_status(target_spec: dict[str, Any], root: Path | None = None) -> list[dict[str, Any]]:
    """One row per database that applies to the target: source, folder, records, wrong ones seen."""
    rows = []
    for s in sources(target_spec, root):
        path = s.folder / RECORD_FILE
        n = sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0
        q = s.folder / QUARANTINE_FILE
        rows.append({"source": s.label, "folder": str(s.folder), "records": n,
                     "quarantined": len(json.loads(q.read_text())) if q.is_file() else 0})  # fmt: skip
    own = RecordChecks(sources(target_spec, root)[0].folder)
    rows[0]["wrong_records_seen"] = len(own.wrong())
    return rows
