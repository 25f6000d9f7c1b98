"""Reports of a run folder: ``report.md`` and a self-contained ``report.html`` from ``summary.json``.

The HTML page needs no network and no other file: plots are inline PNGs (matplotlib, Agg) and
the style is inline. Sections: the summary per target, the accuracy/latency/size trade-off
(Pareto) plot, latency distributions, training curves and technique plots found in the stage
folders (``train_log.jsonl``, ``*.png``), per-layer sensitivity tables (``sensitivity.json``),
and the artifact lineage read from the manifests.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from edgecompress.compress.errors import ConfigError


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
        for note in r.get("notes", []):
            lines.append(f"- {r['target']}/{r['format']}: {note}")
    lines += _comparison_md(summary, "##")
    lines += ["", "## Gates", ""]
    lines += _gates_md(summary)
    lines.append("")
    return "\n".join(lines)


def _md_table(columns: list[str], rows: list[list[Any]]) -> list[str]:
    return [f"| {' | '.join(columns)} |", f"|{'---|' * len(columns)}",
            *(f"| {' | '.join(_f(v) for v in r)} |" for r in rows)]  # fmt: skip


def _comparison_md(summary: dict[str, Any], level: str) -> list[str]:
    from edgecompress.compress.regression import COMPARISON_COLUMNS, comparison_table

    comp = summary.get("comparison")
    if not comp:
        return []
    verdict = "no regression beyond the gates" if comp.get("passed") else f"{len(comp['failures'])} regression(s)"
    return ["", f"{level} Against the baseline", "", f"Baseline `{comp.get('baseline')}`: **{verdict}**.", "",
            *_md_table(COMPARISON_COLUMNS, comparison_table(comp["rows"]))]  # fmt: skip


def _gates_md(summary: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if summary.get("failures"):
        lines += _md_table(["target", "gate", "limit", "measured", "excess"],
                           [[f["target"], f["gate"], f["limit"], f["value"], f["excess"]] for f in summary["failures"]])  # fmt: skip
    else:
        lines.append("All gates passed.")
    for r in summary.get("results", []):
        if r.get("pending_gates"):
            lines.append(f"- {r['target']}/{r['format']}: pending on the device: {', '.join(r['pending_gates'])}")
    return lines


def render_github(summary: dict[str, Any], report_url: str | None = None) -> str:
    """A compact markdown summary of a run for ``$GITHUB_STEP_SUMMARY`` or a pull-request comment."""
    ok = summary.get("passed")
    n = len(summary.get("failures", []))
    lines = [f"### {'✅' if ok else '❌'} edgecompress `{summary.get('recipe')}`: "
             f"{'passed' if ok else f'{n} gate(s) failed'}", "",
             f"Model `{summary.get('model')}` on `{summary.get('data')}`, {summary.get('wall_seconds')} s.", ""]  # fmt: skip
    rows = []
    for r in summary.get("results", []):
        m = r["metrics"]
        word = "FAIL" if r.get("failed_gates") else ("PENDING" if r.get("pending_gates") else "pass")
        rows.append([r["target"], r["format"], m.get("metric"), _f(m.get("accuracy"), 2), _f(m.get("accuracy_drop"), 2),
                     _f(m.get("latency_p50_ms")), m.get("size_bytes"), word])  # fmt: skip
    lines += _md_table(["target", "format", "metric", "score", "drop (pt)", "p50 ms", "size bytes", "gates"], rows)
    lines += _comparison_md(summary, "####")
    if summary.get("failures"):
        lines += ["", "#### Failed gates", "", *_gates_md(summary)]
    if report_url:
        lines += ["", f"[Full report with plots]({report_url})"]
    lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- HTML


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _img(b64: str, alt: str) -> str:
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def _table(columns: list[str], rows: list[list[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_f(v, 3))}</td>" for v in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _points(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Every measured candidate: the auto-selection's candidates, or the run's results."""
    pts = []
    for c in summary.get("candidates", []) or summary.get("results", []):
        m = c.get("metrics", {})
        if m.get("accuracy") is not None:
            pts.append({"label": c.get("name") or f"{c.get('target')}/{c.get('format')}", "accuracy": m["accuracy"],
                        "latency": m.get("latency_p50_ms"), "size": m.get("size_bytes"),
                        "pareto": c.get("pareto", True)})  # fmt: skip
    return pts


def _pareto_plot(summary: dict[str, Any]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [p for p in _points(summary) if p["size"] is not None]
    if not pts:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, xlabel in ((axes[0], "latency", "p50 latency (ms)"), (axes[1], "size", "size (MB)")):
        for p in pts:
            x = p[key] if key == "latency" else p["size"] / 1e6
            if x is None:
                continue
            ax.scatter(x, p["accuracy"], s=60, c="tab:blue" if p["pareto"] else "tab:gray", edgecolors="k")
            ax.annotate(p["label"], (x, p["accuracy"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.grid(alpha=0.3)
    fig.suptitle("accuracy vs latency and size (blue: Pareto front)")
    return _png(fig)


def _latency_plot(summary: dict[str, Any]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [(f"{r['target']}/{r['format']}", r["metrics"].get("latency_samples_ms"))
              for r in summary.get("results", [])]  # fmt: skip
    series = [(n, s) for n, s in series if s]
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.boxplot([s for _, s in series], vert=False, showfliers=True)
    ax.set_yticks(range(1, len(series) + 1), [n for n, _ in series])
    ax.set_xlabel("latency per run (ms)")
    ax.grid(alpha=0.3)
    return _png(fig)


def _training_plot(log_path: Path) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(ln) for ln in log_path.read_text().splitlines() if ln.strip()]
    if not records:
        return None
    numeric = sorted({k for r in records for k, v in r.items() if isinstance(v, int | float) and k != "step"})
    fig, axes = plt.subplots(1, min(3, max(1, len(numeric))), figsize=(11, 3))
    axes_list = list(axes) if hasattr(axes, "__len__") else [axes]
    preferred = [k for k in ("loss", "val_accuracy", "alpha", "density", "conflict_rate") if k in numeric]
    keys = (preferred + [k for k in numeric if k not in preferred])[: len(axes_list)]
    for ax, key in zip(axes_list, keys, strict=False):
        pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    return _png(fig)


def _quantune_plot(trials_path: Path) -> str | None:
    """Quantune's trials as accuracy against batch-1 latency, the Pareto front joined, fp32 marked."""
    log = json.loads(trials_path.read_text())
    pts = [(t["latency_ms"], t["accuracy"]) for t in log.get("trials", [])
           if t.get("latency_ms") is not None and t.get("accuracy") is not None]  # fmt: skip
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=18, c="tab:gray", label="trials")
    front = log.get("pareto_front") or []
    if front:
        ax.plot([p["latency_ms"] for p in front], [p["accuracy"] for p in front], "o-", c="tab:blue", label="Pareto front")
    if log.get("fp32_latency_ms") is not None:
        ax.scatter([log["fp32_latency_ms"]], [log["fp32_accuracy"]], marker="*", s=150, c="tab:red", label="fp32")
    chosen = (log.get("choice") or {}).get("chosen")
    ax.set_title(f"Quantune trials (returned: {chosen})" if chosen else "Quantune trials")
    ax.set_xlabel("batch-1 p50 latency (ms)")
    ax.set_ylabel("score")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def _stage_sections(run_dir: Path) -> list[str]:
    parts: list[str] = []
    stages = run_dir / "stages"
    if not stages.is_dir():
        return parts
    for sd in sorted(p for p in stages.iterdir() if p.is_dir()):
        items = []
        for log in sorted(sd.rglob("train_log.jsonl")):
            b64 = _training_plot(log)
            if b64:
                items.append(_img(b64, f"{sd.name}: training curves ({log.relative_to(sd)})"))
        for trials in sorted(sd.rglob("trials.json")):
            b64 = _quantune_plot(trials)
            if b64:
                items.append(_img(b64, f"{sd.name}: Quantune accuracy vs latency ({trials.relative_to(sd)})"))
        for png in sorted(sd.rglob("*.png")):
            items.append(_img(base64.b64encode(png.read_bytes()).decode(), f"{sd.name}: {png.relative_to(sd)}"))
        for sens in sorted(sd.rglob("sensitivity.json")):
            data = json.loads(sens.read_text())
            rows = data.get("layers", data) if isinstance(data, dict) else data
            if isinstance(rows, list) and rows and isinstance(rows[0], dict):
                cols = list(rows[0])
                items.append(f"<h4>{html.escape(sd.name)}: per-layer sensitivity</h4>"
                             + _table(cols, [[r.get(c) for c in cols] for r in rows], "sensitivity"))  # fmt: skip
        if items:
            parts.append(f"<h3>{html.escape(sd.name)}</h3>" + "".join(items))
    return parts


def _lineage(summary: dict[str, Any]) -> str:
    from edgecompress.export import ArtifactError, load_artifact

    rows = []
    for r in summary.get("results", []):
        try:
            art = load_artifact(r["artifact"])
        except ArtifactError as exc:
            rows.append([r["target"], r["format"], f"unreadable: {exc}", "-", "-"])
            continue
        chain = " -> ".join(s.stage for s in art.manifest.stages)
        rows.append([r["target"], art.manifest.format, chain, art.hash[:16], (art.manifest.parent_hash or "-")[:16]])
    return _table(["target", "format", "stages", "artifact hash", "parent hash"], rows, "lineage")


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}.pass{color:#070}.fail{color:#b00;font-weight:bold}
figure{margin:1em 0}img{max-width:100%}figcaption{font-size:12px;color:#555}
"""


def render_html(summary: dict[str, Any], run_dir: Path) -> str:
    status = "PASSED" if summary.get("passed") else "FAILED"
    res_rows = []
    for r in summary.get("results", []):
        m = r["metrics"]
        res_rows.append([r["target"], r["format"], m.get("accuracy"), m.get("reference_accuracy"), m.get("accuracy_drop"),
                         m.get("sqnr_db"), m.get("latency_p50_ms"), m.get("latency_p90_ms"), m.get("size_bytes"),
                         "FAIL" if r.get("failed_gates") else ("PENDING" if r.get("pending_gates") else "PASS")])  # fmt: skip
    body = [
        f"<h1>Report: {html.escape(str(summary.get('recipe')))}</h1>",
        f"<p>Model <code>{html.escape(str(summary.get('model')))}</code> on <code>{html.escape(str(summary.get('data')))}</code>: "
        f'<span class="{"pass" if summary.get("passed") else "fail"}">{status}</span> in {summary.get("wall_seconds")} s.</p>',
        "<h2>Summary per target</h2>",
        _table(["target", "format", "top-1 %", "fp32 top-1 %", "drop (pt)", "SQNR dB", "p50 ms", "p90 ms", "size bytes",
                "gates"], res_rows, "summary"),  # fmt: skip
    ]
    notes = [f"{r['target']}/{r['format']}: {n}" for r in summary.get("results", []) for n in r.get("notes", [])]
    if notes:
        body += ["<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>"]
    if summary.get("failures"):
        body += ["<h2>Failed gates</h2>", _table(["target", "gate", "limit", "measured", "excess"],
                 [[f["target"], f["gate"], f["limit"], f["value"], f["excess"]] for f in summary["failures"]], "gates")]  # fmt: skip
    comp = summary.get("comparison")
    if comp:
        from edgecompress.compress.regression import COMPARISON_COLUMNS, comparison_table

        body += [f"<h2>Against the baseline</h2><p>{html.escape(str(comp.get('baseline')))}</p>",
                 _table(COMPARISON_COLUMNS, comparison_table(comp["rows"]), "comparison")]  # fmt: skip
    if summary.get("selection"):
        body += ["<h2>Auto-selection</h2>", f"<p>{html.escape(str(summary['selection']))}</p>"]
    pareto = _pareto_plot(summary)
    if pareto:
        body += ["<h2>Trade-offs</h2>", _img(pareto, "accuracy vs p50 latency and size")]
    lat = _latency_plot(summary)
    if lat:
        body += ["<h2>Latency distributions</h2>", _img(lat, "latency per timed run")]
    if summary.get("stages"):
        body += ["<h2>Stages</h2>", _table(["#", "stage", "seconds", "reused"],
                 [[i, s["stage"], s.get("seconds"), s.get("reused")] for i, s in enumerate(summary["stages"])])]  # fmt: skip
    body += _stage_sections(run_dir)
    body += ["<h2>Artifact lineage</h2>", _lineage(summary)]
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>edgecompress report</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>")  # fmt: skip


def _load_summary(d: Path) -> dict[str, Any]:
    s = d / "summary.json"
    if not s.is_file():
        raise ConfigError(f"{d} is not a run folder (no summary.json); create one with 'compress run RECIPE -o {d}'")
    return json.loads(s.read_text())


def write_github_summary(run_dir: str | Path, *, report_url: str | None = None) -> Path:
    """Write ``summary.github.md`` (:func:`render_github`) into a run folder; returns its path.

    Raises:
        ConfigError: the folder holds no ``summary.json`` (not a run folder).
    """
    d = Path(run_dir)
    path = d / "summary.github.md"
    path.write_text(render_github(_load_summary(d), report_url))
    return path


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.md`` and ``report.html`` for a run folder; returns the markdown path.

    Raises:
        ConfigError: the folder holds no ``summary.json`` (not a run folder).
    """
    d = Path(run_dir)
    summary = _load_summary(d)
    path = d / "report.md"
    path.write_text(render_markdown(summary))
    (d / "report.html").write_text(render_html(summary, d))
    return path
