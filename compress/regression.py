"""A run against a baseline run: accuracy, latency with its noise band, size and artifact hashes.

``compress run RECIPE -o RUN --baseline BASE`` and ``compress compare BASE RUN`` both call
:func:`compare_runs` on two ``summary.json`` files. Every ``(target, format)`` row of the new run is
matched with the baseline's and judged per measure:

- **accuracy**: the change in points of the run's metric (same metric and sample count, else "not
  comparable"); a regression is a loss of more than ``max_accuracy_regression`` points.
- **latency** p50 and p90: the ratio new/baseline. When the baseline's artifact is at hand, ``compress
  run --baseline`` times it side by side with the new one (interleaved rounds on the same machine in
  the same run), and the ratio is of those two; otherwise of the latencies the two runs recorded,
  which on shared CI runners compares two machines. The ratio comes with a 95 % noise band from a moving-block bootstrap
  of the latency samples both runs record (blocks of about sqrt(n) consecutive runs, because samples
  taken one after another are correlated: a plain bootstrap or a rank test would take drift within a
  run for signal). A p50 regression must exceed ``max_latency_regression`` *and* its band must exclude
  1.0; a band that contains 1.0 is "within noise", whatever the point ratio says.
- **size**: the change in bytes; a regression grows by more than ``max_size_regression`` percent.
- **artifact**: the content hash; a byte-identical artifact is named as such, so a latency change on
  it is known to come from the machine or the runtime.

Gates left unset are reported without failing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from edgecompress.compress.errors import ConfigError

REGRESSION_GATES = ("max_accuracy_regression", "max_latency_regression", "max_size_regression")
REGRESSED = "REGRESSED"
CONFIDENCE = 0.95
BOOTSTRAP_DRAWS = 2000


def thin_samples(samples: list[float] | None, keep: int = 2000) -> list[float]:
    """At most ``keep`` of the latency samples, every k-th in run order (a fast model's thousands of
    runs would bloat the summary; the first ``keep`` alone would be the first round's only)."""
    s = samples or []
    return s[:: max(1, math.ceil(len(s) / keep))]


def load_run(path: str | Path) -> dict[str, Any]:
    """The summary of a run: a run folder (its ``summary.json``) or the summary file itself.

    Raises:
        ConfigError: no summary there, or it is not a run summary.
    """
    p = Path(path)
    file = p / "summary.json" if p.is_dir() else p
    if not file.is_file():
        raise ConfigError(f"{path}: no run summary (expected a run folder of 'compress run' or its summary.json)")
    try:
        summary = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{file}: not a readable run summary ({exc})") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("results"), list):
        raise ConfigError(f"{file}: not a summary written by 'compress run' (no 'results' list)")
    return summary


def _block_quantiles(x: np.ndarray, q: float, rng: np.random.Generator, block: int) -> np.ndarray:
    """The ``q`` quantile of ``BOOTSTRAP_DRAWS`` moving-block resamples of the time series ``x``."""
    n = len(x)
    starts = rng.integers(0, n - block + 1, size=(BOOTSTRAP_DRAWS, math.ceil(n / block)))
    idx = (starts[:, :, None] + np.arange(block)).reshape(BOOTSTRAP_DRAWS, -1)[:, :n]
    return np.quantile(x[idx], q, axis=1)


def latency_change(before: list[float], after: list[float], quantile: float = 0.5, *, seed: int = 0) -> dict[str, Any]:
    """The ratio of the ``quantile`` of ``after`` to that of ``before`` (latency samples in run order),
    with its noise band: ``{"ratio", "low", "high", "block"}`` (``low``/``high`` None with fewer than 10
    samples on a side)."""
    b, a = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    ratio = float(np.quantile(a, quantile) / np.quantile(b, quantile))
    if min(len(a), len(b)) < 10:
        return {"ratio": ratio, "low": None, "high": None, "block": None}
    rng = np.random.default_rng(seed)
    block = max(1, round(math.sqrt(min(len(a), len(b)))))
    draws = _block_quantiles(a, quantile, rng, block) / _block_quantiles(b, quantile, rng, block)
    low, high = np.quantile(draws, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
    return {"ratio": ratio, "low": float(low), "high": float(high), "block": block}


def _row(target: str, fmt: str, measure: str, before: Any, after: Any, change: str, band: str, verdict: str,
         gate: str | None = None, limit: float | None = None, value: float | None = None) -> dict[str, Any]:  # fmt: skip
    return {"target": target, "format": fmt, "measure": measure, "before": before, "after": after, "change": change,
            "noise_band": band, "verdict": verdict, "gate": gate, "limit": limit, "value": value}  # fmt: skip


def _worse(value: float, limit: float | None, *, better: str = "better") -> str:
    """Verdict of a change ``value`` (> 0 is worse) against its gate."""
    if value <= 0:
        return "unchanged" if value == 0 else better
    if limit is None:
        return "worse (no gate)"
    return REGRESSED if value > limit else "worse, within gate"


def _accuracy_row(t: str, f: str, old: dict, new: dict, limit: float | None) -> dict[str, Any]:
    a, b = old.get("accuracy"), new.get("accuracy")
    metric = new.get("metric") or "accuracy"
    if a is None or b is None:
        return _row(t, f, f"{metric}", a, b, "-", "-", "not measured")
    if old.get("metric") != new.get("metric"):
        return _row(t, f, f"{metric}", a, b, "-", "-", f"not comparable ({old.get('metric')} vs {new.get('metric')})")
    loss = round(float(a) - float(b), 6)
    return _row(t, f, f"{metric}", a, b, f"{0.0 - loss:+.2f} pt", "-", _worse(loss, limit), "max_accuracy_regression",
                limit, loss)  # fmt: skip


def _latency_rows(t: str, f: str, old: dict, new: dict, limit: float | None, *,
                  same_bytes: bool = False) -> list[dict[str, Any]]:  # fmt: skip
    """p50 and p90 rows. ``old`` is the baseline artifact timed side by side with the new one in this run
    when it was at hand (``side_by_side``), else the latency the baseline run recorded. ``same_bytes``:
    the two are one byte-identical artifact timed side by side on one runtime, so any difference is
    the measurement's (two sessions of one 0.05 ms model differed by 11 % with a tight band), not the
    change's: reported, never a regression."""
    rows = []
    for q, name in ((0.5, "p50"), (0.9, "p90")):
        key = f"latency_{name}_ms"
        a, b = old.get(key), new.get(key)
        measure = f"{name} ms"
        if a is None or b is None:
            rows.append(_row(t, f, measure, a, b, "-", "-", "not measured"))
            continue
        sa, sb = old.get("latency_samples_ms") or [], new.get("latency_samples_ms") or []
        ratio = float(b) / float(a)
        ch = latency_change(sa, sb, q) if sa and sb else {"low": None, "high": None}
        low, high = ch["low"], ch["high"]
        band = "no samples" if low is None or high is None else f"{low:.2f}x-{high:.2f}x"
        pct = (ratio - 1.0) * 100.0
        if low is not None and high is not None and low <= 1.0 <= high:
            verdict = "within noise"
        elif ratio < 1.0:
            verdict = "faster"
        elif name != "p50" or limit is None:
            verdict = "slower (no gate)" if name == "p50" else "slower (not gated)"
        else:
            verdict = REGRESSED if pct > limit else "slower, within gate"
        if same_bytes and verdict != "within noise":
            verdict = ("faster" if ratio < 1.0 else "slower") + ": one artifact in two sessions (not the change's)"
        gate = "max_latency_regression" if name == "p50" else None
        rows.append(_row(t, f, measure, a, b, f"{ratio:.3f}x", band, verdict, gate,
                         limit if gate else None, round(pct, 3)))  # fmt: skip
    return rows


def _size_row(t: str, f: str, old: dict, new: dict, limit: float | None) -> dict[str, Any]:
    a, b = old.get("size_bytes"), new.get("size_bytes")
    if not a or b is None:
        return _row(t, f, "size B", a, b, "-", "-", "not measured")
    pct = (float(b) - float(a)) / float(a) * 100.0
    return _row(t, f, "size B", a, b, f"{int(b) - int(a):+d} ({pct:+.1f} %)", "-",
                _worse(round(pct, 6), limit, better="smaller"), "max_size_regression", limit, round(pct, 3))  # fmt: skip


def compare_runs(baseline: dict[str, Any], current: dict[str, Any], *,
                 gates: dict[str, float | None] | None = None) -> dict[str, Any]:  # fmt: skip
    """Judge ``current`` (a run summary) against ``baseline``.

    Args:
        baseline: the summary of the earlier run (:func:`load_run`).
        current: the summary of the new run.
        gates: regression gates for every row (``max_accuracy_regression`` in points,
            ``max_latency_regression`` and ``max_size_regression`` in percent); default: each row's
            own ``gates`` as the new run resolved them from its recipe.

    Returns:
        ``{"rows": [...], "failures": [...], "passed": bool}``: one row per measure and
        ``(target, format)`` with before, after, change, noise band and verdict; one failure (the
        recipe gate format: target, gate, limit, value, excess) per regression beyond its gate.
    """
    old_rows = {(r["target"], r["format"]): r for r in baseline.get("results", [])}
    rows: list[dict[str, Any]] = []
    for res in current.get("results", []):
        t, f = res["target"], res["format"]
        g = {**{k: v for k, v in (res.get("gates") or {}).items() if k in REGRESSION_GATES}, **(gates or {})}
        old = old_rows.pop((t, f), None)
        if old is None:
            rows.append(_row(t, f, "artifact", None, res.get("artifact_hash"), "-", "-", "new: not in the baseline"))
            continue
        om, nm = old["metrics"], res["metrics"]
        identical = bool(res.get("artifact_hash")) and res.get("artifact_hash") == old.get("artifact_hash")
        side = res.get("baseline_latency")
        if side and side.get("artifact_hash") != old.get("artifact_hash"):
            side = None  # timed beside another baseline than this one
        timing = "timed side by side" if side else ("timed in each run" if nm.get("latency_p50_ms") else "-")
        rows.append(_row(t, f, "artifact", _short(old.get("artifact_hash")), _short(res.get("artifact_hash")), timing,
                         "-", "identical: latency changes are the machine's" if identical else "changed"))  # fmt: skip
        acc = _accuracy_row(t, f, om, nm, g.get("max_accuracy_regression"))
        if om.get("accuracy") is not None and om.get("samples") != nm.get("samples") and "comparable" not in acc["verdict"]:
            acc["verdict"] += f" (on {om.get('samples')} vs {nm.get('samples')} samples)"
        lat_old = {**side, "side_by_side": True} if side else om
        rows += [acc, *_latency_rows(t, f, lat_old, nm, g.get("max_latency_regression"), same_bytes=identical and bool(side)),
                 _size_row(t, f, om, nm, g.get("max_size_regression"))]  # fmt: skip
    for (t, f), _ in old_rows.items():
        rows.append(_row(t, f, "artifact", "present", None, "-", "-", "removed: in the baseline only"))
    failures = [{"target": r["target"], "format": r["format"], "gate": r["gate"], "limit": r["limit"],
                 "value": r["value"], "excess": round(r["value"] - r["limit"], 3)}
                for r in rows if r["verdict"] == REGRESSED]  # fmt: skip
    return {"rows": rows, "failures": failures, "passed": not failures}


def _short(digest: str | None) -> str | None:
    return digest[:12] if digest else None


def parse_percent(value: Any) -> float | None:
    """``"10%"``, ``"10 %"``, ``10`` or ``10.0`` -> 10.0 (percent); None stays None."""
    if value is None or isinstance(value, int | float):
        return None if value is None else float(value)
    text = str(value).strip().removesuffix("%").strip()
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{value!r} is not a percentage (write e.g. 10% or 10)") from None


COMPARISON_COLUMNS = ["target", "format", "measure", "before", "after", "change", "noise band (95 %)", "verdict"]


def comparison_table(rows: list[dict[str, Any]]) -> list[list[Any]]:
    """The rows of the before / after / change / verdict table, in :data:`COMPARISON_COLUMNS` order."""
    return [[r["target"], r["format"], r["measure"], r["before"], r["after"], r["change"], r["noise_band"],
             r["verdict"]] for r in rows]  # fmt: skip
