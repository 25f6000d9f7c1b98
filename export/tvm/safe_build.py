"""Build a model with verified tuning records, and repair the choice when the whole model is wrong.

Each record is checked on its own task before it is applied (:func:`export.tvm.records.
select_records`). The whole model is then compared with its reference (onnxruntime or torch). If
it still disagrees while records are applied, the untuned build is checked: when that one is
right, the records are to blame, and a bisection over the applied records (in task order) finds
the one that breaks the model; it is quarantined and the model is built again without it. An
export therefore never fails because of a database: at worst the model is built untuned, with a
note that says so. Only a model that TVM computes wrongly without any record fails (exit 3).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgecompress.export.errors import CompiledOutputError
from edgecompress.export.tvm import compile as tc
from edgecompress.export.tvm.records import Selection, database_key, select_records

log = logging.getLogger(__name__)

#: Records found wrong by bisection before the model is built untuned instead.
MAX_REPAIRS = 3


@dataclass
class Built:
    """The library written and what it took: its path, the check, and what was applied."""

    lib_path: Path
    check: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def choose_records(fused: Any, tgt: Any, target: Any, root: Path | None) -> Selection:
    """The verified records for every task of a fused module (verified only when the code runs here)."""
    from tvm.s_tir import meta_schedule as ms

    from edgecompress.export.tvm.intrinsics import import_tensor_intrinsics

    import_tensor_intrinsics()
    tasks = ms.relax_integration.extract_tasks(fused, tgt)
    return select_records(tasks, tgt, dict(target.tvm), root, verify=not tc.is_cross(target))


def build_verified(fused: Any, tgt: Any, selection: Selection | None, folder: Path, plan: tc.LibraryPlan,
                   check: Callable[[Path, Path], dict[str, Any]] | None, target_name: str) -> Built:  # fmt: skip
    """Apply the selection's records, build, write the library into ``folder`` and check it.

    Args:
        check: compares the library with the reference and raises :class:`CompiledOutputError` when
            it disagrees; None when the code cannot run here (nothing to repair then).

    Raises:
        CompiledOutputError: the untuned model is wrong too (not a database problem).
    """
    notes: list[str] = []
    probes = iter(range(1, 1_000_000))

    def attempt(exclude: frozenset[str]) -> tuple[Path, dict[str, Any] | CompiledOutputError]:
        mod = fused
        if selection is not None and len(selection.applied) > len(exclude):
            mod = tc.apply_database(fused, tgt, selection.database(exclude))
        # A library is loaded by path, and a process loads a path once: every build after the first
        # goes to a new folder, or the check would run the first build's code again.
        n = next(probes)
        where = folder if n == 1 else folder / f".probe-{n}"
        where.mkdir(exist_ok=True)
        lib_path = tc.export_library(tc.build(mod, tgt), where, plan)
        if check is None:
            return lib_path, {}
        try:
            return lib_path, check(folder, lib_path)
        except CompiledOutputError as exc:
            return lib_path, exc

    for _ in range(MAX_REPAIRS + 1):
        lib_path, result = attempt(frozenset())
        if not isinstance(result, CompiledOutputError):
            return Built(_settle(lib_path, folder), result, notes)
        applied = selection.applied if selection is not None else []
        if not applied:
            raise result
        names = [c.task for c in applied]
        lib_path, untuned = attempt(frozenset(names))
        if isinstance(untuned, CompiledOutputError):
            raise CompiledOutputError(f"{untuned} (also without any tuning record: TVM cannot compile this model "
                                      f"correctly for {target_name}; export it with --format onnx)") from None  # fmt: skip
        def fails_with_first(k: int, names: list[str] = names) -> bool:
            return isinstance(attempt(frozenset(names[k:]))[1], CompiledOutputError)

        culprit = _bisect(names, fails_with_first)
        choice = applied[culprit]
        assert selection is not None
        reason = f"the whole model disagrees with its reference with this record applied ({result})"
        log.warning("tuning record of %s breaks the model; quarantined", choice.task)
        notes.append(f"tuning record of task {choice.task} ({choice.source.label if choice.source else '?'}) made the "
                     "model wrong although its task checked out; quarantined, built without it")  # fmt: skip
        selection.refuse(choice, reason)
    lib_path, result = attempt(frozenset(c.task for c in selection.applied) if selection else frozenset())
    if isinstance(result, CompiledOutputError):  # pragma: no cover - the untuned build passed above
        raise result
    notes.append(f"more than {MAX_REPAIRS} tuning records made the model wrong: built untuned. Clear the database with "
                 f"'compress tuning clear --target {target_name}' or export with --no-tuned-records")  # fmt: skip
    return Built(_settle(lib_path, folder), result, notes)


def _settle(lib_path: Path, folder: Path) -> Path:
    """Move the library that passed into ``folder`` (from a probe folder) and drop the probes."""
    import os
    import shutil

    final = folder / lib_path.name
    if lib_path != final:
        os.replace(lib_path, final)
    for probe in folder.glob(".probe-*"):
        shutil.rmtree(probe, ignore_errors=True)
    return final


def _bisect(names: list[str], fails_with_first: Callable[[int], bool]) -> int:
    """Index of the record whose addition makes the model wrong: the smallest k with
    ``fails_with_first(k)`` true, minus one (``fails_with_first(len(names))`` is known true and
    ``fails_with_first(0)`` false)."""
    lo, hi = 0, len(names)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fails_with_first(mid):
            hi = mid
        else:
            lo = mid
    return hi - 1


def describe(selection: Selection, target_spec: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Manifest fields and notes for the records applied: how many, from where, which refused."""
    s = selection.summary()
    transferred = s["transferred_from"]
    tuned: bool | str = s["tasks"] > 0 and s["applied"] == s["tasks"]
    if tuned and transferred:
        tuned = "transferred"
    info = {"tuned": tuned, "tuned_tasks": s["applied"], "tasks": s["tasks"], "records": s["records_by_source"],
            "database_key": database_key(target_spec), "transferred_from": transferred,
            "refused_records": s["refused_records"]}  # fmt: skip
    notes: list[str] = []
    if s["applied"]:
        where = ", ".join(f"{n} {label}" for label, n in sorted(s["records_by_source"].items()))
        notes.append(f"tuning records applied to {s['applied']} of {s['tasks']} operators ({where})")
    if transferred:
        notes.append(f"records tuned for {', '.join(transferred)} applied on {database_key(target_spec)} "
                     "(verified here); --tune tunes them further for this CPU")  # fmt: skip
    if 0 < s["applied"] < s["tasks"]:
        notes.append(f"partly tuned: {s['applied']} of {s['tasks']} operators have tuned schedules")
    if s["refused_records"]:
        tasks = sorted({r["task"] for r in s["refused_records"]})
        notes.append(f"{len(s['refused_records'])} tuning record(s) computed wrong results and were not used "
                     f"(tasks {', '.join(tasks[:4])}{' ...' if len(tasks) > 4 else ''})")  # fmt: skip
    return info, notes
