"""``compress run --auto``: try candidate chains, keep the Pareto front, pick the best within budgets.

Each candidate is an ordinary recipe run (same caching and resume) in ``OUT/candidates/<name>``,
measured on every target's runtime. After each candidate the selection is recomputed and
``OUT/summary.json`` rewritten, so the best-so-far survives a time budget or a kill. The final
choice per target is the candidate that meets every gate and is best by the objective
(``latency``, ``size`` or ``accuracy``); when none meets them all, the error says which gate
could not be met and how close the nearest candidate came.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from edgecompress.compress.errors import GateFailure
from edgecompress.compress.pipeline import _gates_for, run_recipe
from edgecompress.compress.recipe import CandidateSpec, Recipe, parse_recipe, resolved_dict
from edgecompress.export.fileio import write_json_atomic

log = logging.getLogger(__name__)


def default_candidates(recipe: Recipe, measured: dict[str, dict[str, Any]]) -> list[CandidateSpec]:
    """The next candidates to try, given what was measured so far (``name -> summary``).

    Order: fp32 first (the baseline), then int8 PTQ; QAT only when PTQ missed the accuracy gate;
    a codebook only when some candidate misses the size gate; 2:4 sparsity + PTQ only for targets
    with sparse tensor cores.
    """
    from edgecompress.targets import get_target

    targets = [get_target(t) for t in recipe.targets]
    auto = recipe.auto
    out = [CandidateSpec(name="fp32", stages=[])]
    if all(t.supports("int8") for t in targets):
        out.append(CandidateSpec(name="ptq-int8", stages=[{"ptq": {"search": "quantune", "budget_trials": auto.ptq_trials,
                                                                                 "objective": "accuracy"}}]))
    ptq = measured.get("ptq-int8")
    if ptq is not None and any(f["gate"] == "max_accuracy_drop" for f in ptq.get("failures", [])):
        out.append(CandidateSpec(name="qat-w8a8", stages=[{"qat": {"bits": 8, "act_bits": 8, "method": "gaqat",
                                                                   "max_steps": auto.qat_steps}}]))  # fmt: skip
    size_missed = any(any(f["gate"] == "max_size_mb" for f in s.get("failures", [])) for s in measured.values())
    if size_missed and all(t.supports("codebook") for t in targets):
        out.append(CandidateSpec(name="codebook-3bit", stages=[{"codebook": {"bits": 3}}]))
    if all(t.supports("2:4-sparse") for t in targets):
        out.append(CandidateSpec(name="sparse24-ptq", stages=[{"sparsify": {"pattern": "2:4", "method": "mdgf",
                                                                            "max_steps": auto.qat_steps}},
                                                              {"ptq": {"search": "quantune", "objective": "accuracy",
                                                                       "budget_trials": auto.ptq_trials}}]))  # fmt: skip
    return out


def _key(objective: str, metrics: dict[str, Any]) -> tuple[float, ...]:
    acc = -(metrics.get("accuracy") or 0.0)
    lat = metrics.get("latency_p50_ms") or float("inf")
    size = metrics.get("size_bytes") or float("inf")
    if objective == "size":
        return (size, lat, acc)
    if objective == "accuracy":
        return (acc, lat, size)
    return (lat, size, acc)


def pareto_front(points: list[dict[str, Any]]) -> list[bool]:
    """For each point (``accuracy``, ``latency_p50_ms``, ``size_bytes``): is it non-dominated?"""

    def vec(m: dict[str, Any]) -> tuple[float, float, float]:
        return (-(m.get("accuracy") or 0.0), m.get("latency_p50_ms") or float("inf"), m.get("size_bytes") or float("inf"))

    vs = [vec(p) for p in points]
    flags = []
    for i, a in enumerate(vs):
        dominated = any(all(bj <= aj for aj, bj in zip(a, b, strict=True)) and b != a for j, b in enumerate(vs) if j != i)
        flags.append(not dominated)
    return flags


def select(recipe: Recipe, candidates: list[dict[str, Any]]) -> dict[str, Any]:
    """Per target: the Pareto flags, the chosen candidate, or the gates nobody met and the nearest miss."""
    from edgecompress.targets import get_target

    selection: dict[str, Any] = {}
    for tname in recipe.targets:
        rows = [c for c in candidates if c["target"] == tname and c.get("metrics")]
        for c, flag in zip(rows, pareto_front([c["metrics"] for c in rows]), strict=True):
            c["pareto"] = flag
        gates = _gates_for(recipe, get_target(tname))
        ok = [c for c in rows if not c["failed_gates"]]
        if ok:
            best = min(ok, key=lambda c: _key(recipe.auto.objective, c["metrics"]))
            selection[tname] = {"chosen": best["name"], "artifact": best["artifact"], "objective": recipe.auto.objective}
            continue
        nearest: dict[str, Any] = {}
        for c in rows:
            for f in c["failed_gates"]:
                if isinstance(f["excess"], float | int) and (f["gate"] not in nearest or f["excess"] < nearest[f["gate"]]["excess"]):
                    nearest[f["gate"]] = {"candidate": c["name"], "excess": f["excess"], "limit": f["limit"], "value": f["value"]}
        selection[tname] = {"chosen": None, "gates": gates, "unmet": nearest}
    return selection


def run_auto(recipe: Recipe, out: str | Path, *, allow_code: bool = False, allow_failed: bool = False) -> dict[str, Any]:
    """Try candidates within ``recipe.auto.time_budget_s`` and return the summary with the selection.

    Raises:
        GateFailure: no candidate meets every gate of some target (after writing the summary).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    explicit = list(recipe.auto.candidates)
    measured: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    tried: set[str] = set()
    summary: dict[str, Any] = {}
    while True:
        pending = [c for c in (explicit or default_candidates(recipe, measured)) if c.name not in tried]
        if not pending:
            break
        cand = pending[0]
        tried.add(cand.name)
        if time.perf_counter() - t0 > recipe.auto.time_budget_s:
            skipped.append(cand.name)
            log.warning("auto: time budget spent, candidate %s not tried", cand.name)
            continue
        sub = parse_recipe(resolved_dict(recipe) | {"stages": cand.stages}, f"candidate {cand.name}")
        try:
            s = run_recipe(sub, out / "candidates" / cand.name, allow_code=allow_code, allow_failed=allow_failed)
        except GateFailure:
            s = json.loads((out / "candidates" / cand.name / "summary.json").read_text())
        measured[cand.name] = s
        for r in s["results"]:
            rows.append({"name": cand.name, "stages": [next(iter(st)) for st in cand.stages], **r})
        summary = _write_summary(recipe, out, rows, skipped, t0)
    summary = _write_summary(recipe, out, rows, skipped, t0)
    if summary["failures"]:
        raise GateFailure("no candidate meets every budget; the table shows the nearest miss per gate", summary["failures"])
    return summary


def _write_summary(recipe: Recipe, out: Path, rows: list[dict[str, Any]], skipped: list[str], t0: float) -> dict[str, Any]:
    selection = select(recipe, rows)
    chosen = {t: s["chosen"] for t, s in selection.items()}
    results = [r for r in rows if chosen.get(r["target"]) == r["name"]]
    summary = {
        "recipe": recipe.name,
        "model": (recipe.model.example or recipe.model.checkpoint),
        "data": recipe.data_label(),
        "mode": "auto",
        "candidates": rows,
        "skipped_candidates": skipped,
        "selection": selection,
        "results": results,
        "passed": all(c is not None for c in chosen.values()),
        "failures": [] if all(c is not None for c in chosen.values()) else [
            {"target": t, "gate": g, "limit": n["limit"], "value": n["value"], "excess": n["excess"]}
            for t, s in selection.items() if s["chosen"] is None for g, n in s["unmet"].items()
        ],
        "stages": [],
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    write_json_atomic(out / "summary.json", summary)
    from edgecompress.compress.report import write_report

    write_report(out)
    return summary
