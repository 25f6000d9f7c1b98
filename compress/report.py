"""Reports of a run folder: ``report.md`` from ``summary.json`` (the HTML report builds on this)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from compress.errors import ConfigError


def _f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def render_markdown(summary: dict[str, Any]) -> str:
    lines = [f"# Report: {summary.get('recipe', 'run')}", ""]
    status = "PASSED" if summary.get("passed") else "FAILED"
    lines += [f"Model `{summary.get('model')}` on `{summary.get('data')}`: **{status}** "
              f"in {summary.get('wall_seconds')} s.", ""]  # fmt: skip
    if summary.get("stages"):
        lines += ["## Stages", "", "| # | stage | seconds | reused | metrics |", "|---|---|---|---|---|"]
        for i, s in enumerate(summary["stages"]):
            m = ", ".join(f"{k}={_f(v)}" for k, v in s.get("metrics", {}).items() if not isinstance(v, dict | list))
            lines.append(f"| {i} | {s['stage']} | {s.get('seconds')} | {s.get('reused')} | {m} |")
        lines.append("")
    lines += ["## Results per target", "",
              "| target | format | accuracy % | fp32 % | drop (pt) | agreement % | SQNR dB | p50 ms | p90 ms | size bytes |",
              "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in summary.get("results", []):
        m = r["metrics"]
        lines.append(
            f"| {r['target']} | {r['format']} | {_f(m.get('accuracy'), 2)} | {_f(m.get('reference_accuracy'), 2)} | "
            f"{_f(m.get('accuracy_drop'), 2)} | {_f(m.get('top1_agreement'), 2)} | {_f(m.get('sqnr_db'), 1)} | "
            f"{_f(m.get('latency_p50_ms'))} | {_f(m.get('latency_p90_ms'))} | {m.get('size_bytes')} |"
        )
    lines.append("")
    for r in summary.get("results", []):
        if r["metrics"].get("latency_note"):
            lines.append(f"- {r['target']}: {r['metrics']['latency_note']}")
    lines += ["", "## Gates", ""]
    if summary.get("failures"):
        lines += ["| target | gate | limit | measured | excess |", "|---|---|---|---|---|"]
        for f in summary["failures"]:
            lines.append(f"| {f['target']} | {f['gate']} | {_f(f['limit'])} | {_f(f['value'])} | {_f(f['excess'])} |")
    else:
        lines.append("All gates passed.")
    lines.append("")
    return "\n".join(lines)


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.md`` for a run folder and return its path.

    Raises:
        ConfigError: the folder holds no ``summary.json`` (not a run folder).
    """
    d = Path(run_dir)
    s = d / "summary.json"
    if not s.is_file():
        raise ConfigError(f"{d} is not a run folder (no summary.json); create one with 'compress run RECIPE -o {d}'")
    path = d / "report.md"
    path.write_text(render_markdown(json.loads(s.read_text())))
    return path
