"""GAQAT diagnostics from the per-step training log: per-layer conflict summary and a plot."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def read_records(log_path: str | Path) -> list[dict[str, Any]]:
    """The JSON records of ``train_log.jsonl`` that carry GAQAT fields."""
    out = []
    for line in Path(log_path).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if "conflict" in rec:
                out.append(rec)
    return out


def conflict_summary(log_path: str | Path) -> dict[str, Any]:
    """Mean conflict rate per quantizer, last disorder, and when each was frozen."""
    recs = read_records(log_path)
    sums: dict[str, list[float]] = {}
    disorder: dict[str, float] = {}
    frozen: dict[str, int] = {}
    for r in recs:
        for name, rate in r["conflict"].items():
            sums.setdefault(name, []).append(rate)
        disorder.update(r.get("disorder", {}))
        for name in r.get("frozen", []):
            frozen[name] = r["step"]
    mean = {n: sum(v) / len(v) for n, v in sums.items()}
    overall = sum(mean.values()) / len(mean) if mean else None
    return {"mean_conflict_rate": mean, "overall_conflict_rate": overall, "last_disorder": disorder,
            "frozen_at_step": frozen, "steps_logged": len(recs)}  # fmt: skip


def plot_conflicts(log_path: str | Path, dest: str | Path, smooth: int = 10) -> Path | None:
    """Plot per-layer conflict rate (moving average), disorder and freeze events; None without records."""
    recs = read_records(log_path)
    if not recs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = sorted({n for r in recs for n in r["conflict"]})
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for i, name in enumerate(names):
        steps = np.array([r["step"] for r in recs if name in r["conflict"]])
        rate = np.array([r["conflict"][name] for r in recs if name in r["conflict"]])
        k = max(1, min(smooth, len(rate)))
        avg = np.convolve(rate, np.ones(k) / k, mode="valid")
        color = f"C{i % 10}"
        ax1.plot(steps[k - 1 :], avg, color=color, label=name, linewidth=1)
        d = [(r["step"], r["disorder"][name]) for r in recs if name in r.get("disorder", {})]
        if d:
            ax2.plot(*zip(*d, strict=True), color=color, marker=".", linewidth=1)
        for r in recs:
            if name in r.get("frozen", []):
                ax1.axvline(r["step"], color=color, linestyle=":", linewidth=1)
    ax1.set_ylabel(f"conflict rate (moving avg {smooth})")
    ax1.set_title("GAQAT: sign conflict of task vs smoothness scale gradients (dotted: freeze)")
    ax1.legend(fontsize=6, ncol=2)
    ax2.set_ylabel("task-gradient disorder D_l")
    ax2.set_xlabel("step")
    fig.tight_layout()
    dest = Path(dest)
    fig.savefig(dest, dpi=100)
    plt.close(fig)
    return dest
