"""Which measured configuration Quantune returns: the fastest accurate one, the most accurate, or the
Pareto front of accuracy and latency, with the unquantized fp32 model always a candidate.

``latency`` (the default) keeps the configurations within ``max_drop`` points of fp32 on the
search's metric and returns the fastest; when none is faster than fp32 the answer is fp32, with
the reason. ``accuracy`` returns the most accurate (latency only reported). ``pareto`` returns the
``latency`` choice and the front (no candidate both more accurate and faster). Ties in speed go to
the more accurate, then to the earlier proposal, so the choice never depends on completion order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgecompress.compress.ptq.evaluator import TrialResult

OBJECTIVES = ("latency", "accuracy", "pareto")


@dataclass
class Choice:
    """The pick: ``trial`` None means the fp32 model; ``reason`` says why in one sentence."""

    trial: TrialResult | None
    reason: str
    front: list[dict[str, Any]] = field(default_factory=list)

    @property
    def is_fp32(self) -> bool:
        return self.trial is None


def better(a: TrialResult, b: TrialResult | None) -> bool:
    """Whether ``a`` scores strictly higher than ``b`` (accuracy, then SQNR); a failed trial never does."""
    if a.accuracy is None:
        return False
    if b is None or b.accuracy is None:
        return True
    return (a.accuracy, a.sqnr_db or 0.0) > (b.accuracy, b.sqnr_db or 0.0)


def most_accurate(trials: list[TrialResult]) -> TrialResult | None:
    """The best-scoring trial; among equals the earliest in ``trials`` (proposal order) wins."""
    best: TrialResult | None = None
    for r in trials:
        if better(r, best):
            best = r
    return best


def pareto_front(trials: list[TrialResult], fp32_accuracy: float, fp32_latency_ms: float | None) -> list[dict[str, Any]]:
    """The non-dominated points (higher accuracy, lower latency), fp32 included, fastest first."""
    points: list[tuple[float, float, str, str]] = [
        (float(r.accuracy or 0.0), float(r.latency_ms), r.config.label(), r.config.key())
        for r in trials if r.ok and r.latency_ms is not None
    ]  # fmt: skip
    if fp32_latency_ms is not None:
        points.append((fp32_accuracy, fp32_latency_ms, "fp32", "fp32"))
    front = [p for p in points
             if not any(q[0] >= p[0] and q[1] <= p[1] and (q[0] > p[0] or q[1] < p[1]) for q in points)]  # fmt: skip
    front.sort(key=lambda p: (p[1], -p[0]))
    return [{"label": lab, "key": key, "accuracy": acc, "latency_ms": round(lat, 4)} for acc, lat, lab, key in front]


def choose(trials: list[TrialResult], *, objective: str, fp32_accuracy: float, fp32_latency_ms: float | None,
           max_drop: float, min_score: float | None = None) -> Choice:  # fmt: skip
    """Pick the configuration the objective asks for (see the module docstring).

    ``min_score`` replaces ``fp32_accuracy - max_drop`` as the accepted score (the SQNR metric,
    where fp32 against itself is unbounded).

    Raises:
        ValueError: an unknown objective, or a latency objective without latencies.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
    if objective == "accuracy":
        best = most_accurate(trials)
        return Choice(best, "the most accurate configuration measured" if best else "no configuration worked")
    if fp32_latency_ms is None:
        raise ValueError(f"objective {objective!r} needs latencies: the trials were not timed")
    floor = fp32_accuracy - max_drop if min_score is None else min_score
    within = f"within {max_drop:g} points of fp32" if min_score is None else f"at {min_score:g} or more"
    feasible = [r for r in trials if r.ok and r.latency_ms is not None and (r.accuracy or 0.0) >= floor]
    front = pareto_front(trials, fp32_accuracy, fp32_latency_ms) if objective == "pareto" else []
    if not feasible:
        best = most_accurate(trials)
        why = (f"no quantized configuration scores {within} (fp32: {fp32_accuracy:.2f})"
               + (f"; the most accurate scored {best.accuracy:.2f}" if best and best.accuracy is not None else ""))  # fmt: skip
        return Choice(None, why, front)
    order = sorted(range(len(feasible)), key=lambda i: (feasible[i].latency_ms, -(feasible[i].accuracy or 0.0), i))
    fastest = feasible[order[0]]
    if float(fastest.latency_ms or 0.0) >= fp32_latency_ms:
        return Choice(None, f"no quantized configuration {within} is faster than fp32: the "
                            f"fastest ({fastest.config.label()}) takes {fastest.latency_ms:.3f} ms against fp32's "
                            f"{fp32_latency_ms:.3f} ms ({float(fastest.latency_ms or 0.0) / fp32_latency_ms:.2f}x)", front)  # fmt: skip
    return Choice(fastest, f"the fastest configuration {within}: {fastest.latency_ms:.3f} ms "
                           f"against fp32's {fp32_latency_ms:.3f} ms in the search", front)  # fmt: skip
