"""``compress run`` and ``compress report``: the whole pipeline from a recipe, and its report."""

from __future__ import annotations

from pathlib import Path

import typer

from edgecompress.compress.cli.common import JsonOption, cli_progress, emit_json, print_table, say


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run_cmd(
        recipe: Path = typer.Argument(..., help="Recipe YAML (version: 1)."),
        out: Path = typer.Option(..., "-o", "--out", help="Run folder (stages, artifacts, report); reused to resume."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the resolved recipe, run nothing."),
        auto: bool = typer.Option(False, "--auto", help="Try candidate chains within the budgets and pick the best."),
        allow_code: bool = typer.Option(False, "--allow-code", help="Allow the recipe's model factory to import Python code."),
        allow_failed: bool = typer.Option(False, "--allow-failed", help="Take a model checkpoint whose accuracy guard failed."),
        baseline: Path | None = typer.Option(
            None, "--baseline", help="A previous run folder (or its summary.json): judge this run against it."
        ),
        json_out: bool = JsonOption,
    ) -> None:
        """Run RECIPE: stages, export per target, checks, profiles, gates (exit 4 on a failed gate).

        With --baseline, every result is compared with the baseline run's (accuracy, p50/p90 latency
        with a noise band, size, artifact hash) and the recipe's max_*_regression gates apply.
        """
        import yaml

        from edgecompress.compress.pipeline import check_recipe_inputs
        from edgecompress.compress.recipe import load_recipe, resolved_dict

        r = load_recipe(recipe)
        if dry_run:
            check_recipe_inputs(r)
            if json_out:
                emit_json(resolved_dict(r))
            else:
                typer.echo(yaml.safe_dump(resolved_dict(r), sort_keys=False), nl=False)
            return
        from edgecompress.compress.api import run
        from edgecompress.compress.errors import GateFailure

        try:
            with cli_progress(not json_out):
                summary = run(r, workdir=out, auto=auto, allow_code=allow_code, allow_failed=allow_failed,
                              baseline=baseline).summary  # fmt: skip
        except GateFailure:
            # Machines read the summary on failure too: print it, then exit 4 with the gate table.
            if json_out and (out / "summary.json").is_file():
                import json

                emit_json(json.loads((out / "summary.json").read_text()))
            raise
        if json_out:
            emit_json(summary)
            return
        if auto:
            _print_candidates(summary)
        _print_summary(summary, out)

    @app.command("report")
    def report_cmd(
        run_dir: Path = typer.Argument(..., help="A run folder written by 'compress run'."),
        fmt: str = typer.Option("html", "--format", help="html (report.md + report.html) or github (markdown to stdout)."),
        report_url: str | None = typer.Option(None, "--report-url", help="Link to the uploaded full report (github)."),
        json_out: bool = JsonOption,
    ) -> None:
        """Write the report of a run (report.md, report.html) and print where it is.

        --format github prints a compact markdown summary (verdict, results, the comparison with the
        baseline, failed gates) for $GITHUB_STEP_SUMMARY or a pull-request comment, and writes it to
        RUN/summary.github.md.
        """
        from edgecompress.compress.errors import ConfigError
        from edgecompress.compress.report import write_github_summary, write_report

        if fmt not in ("html", "github"):
            raise ConfigError(f"--format {fmt!r}: choose html or github")
        if fmt == "github":
            path = write_github_summary(run_dir, report_url=report_url or None)
            if json_out:
                emit_json({"summary": str(path)})
            else:
                typer.echo(path.read_text(), nl=False)
            return
        path = write_report(run_dir)
        if json_out:
            emit_json({"report": str(path)})
        else:
            say(f"report: {path}")

    @app.command("compare")
    def compare_cmd(
        baseline: Path = typer.Argument(..., help="The earlier run folder (or its summary.json)."),
        run: Path = typer.Argument(..., help="The new run folder (or its summary.json)."),
        max_accuracy_regression: float | None = typer.Option(None, help="Points of the metric (default: RUN's recipe)."),
        max_latency_regression: str | None = typer.Option(None, help="Percent of p50, e.g. 10% (default: RUN's recipe)."),
        max_size_regression: str | None = typer.Option(None, help="Percent of bytes, e.g. 5% (default: RUN's recipe)."),
        json_out: bool = JsonOption,
    ) -> None:
        """Compare RUN with BASELINE: before / after / change / noise band / verdict (exit 4 on a regression)."""
        from edgecompress.compress.errors import ConfigError, GateFailure
        from edgecompress.compress.regression import compare_runs, load_run, parse_percent

        try:
            limits = {"max_accuracy_regression": max_accuracy_regression,
                      "max_latency_regression": parse_percent(max_latency_regression),
                      "max_size_regression": parse_percent(max_size_regression)}  # fmt: skip
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        result = compare_runs(load_run(baseline), load_run(run), gates={k: v for k, v in limits.items() if v is not None})
        if json_out:
            emit_json({"baseline": str(baseline), "run": str(run), **result})
        else:
            _print_comparison(result["rows"], f"{run} against {baseline}")
        if result["failures"]:
            raise GateFailure(f"{len(result['failures'])} measure(s) regressed beyond their gates", result["failures"])


def _print_comparison(rows: list[dict], title: str) -> None:
    from edgecompress.compress.regression import COMPARISON_COLUMNS, comparison_table

    print_table(title, COMPARISON_COLUMNS, comparison_table(rows))


def _print_candidates(summary: dict) -> None:
    rows = []
    for c in summary["candidates"]:
        m = c["metrics"]
        rows.append([c["name"], c["target"], m.get("accuracy"), m.get("accuracy_drop"), m.get("latency_p50_ms"),
                     m.get("size_bytes"), "yes" if c.get("pareto") else "", "FAIL" if c["failed_gates"] else "PASS"])  # fmt: skip
    print_table("auto: candidates", ["candidate", "target", "top-1 %", "drop (pt)", "p50 ms", "size bytes", "Pareto",
                                     "gates"], rows)  # fmt: skip
    for t, sel in summary["selection"].items():
        say(f"{t}: chose {sel['chosen']}" if sel["chosen"] else f"{t}: no candidate meets every budget")
    if summary.get("skipped_candidates"):
        say(f"not tried (time budget): {', '.join(summary['skipped_candidates'])}")


def _print_summary(summary: dict, out: Path) -> None:
    rows = []
    for r in summary["results"]:
        m = r["metrics"]
        rows.append([r["target"], r["format"], m.get("accuracy"), m.get("reference_accuracy"), m.get("accuracy_drop"),
                     m.get("latency_p50_ms"), m.get("size_bytes"), _gate_word(r)])  # fmt: skip
    print_table(
        f"{summary['recipe']}: {summary['model']} on {summary['data']} ({summary['wall_seconds']} s)"
        + (" (the chosen candidate)" if summary.get("mode") == "auto" else ""),
        ["target", "format", "top-1 %", "fp32 top-1 %", "drop (pt)", "p50 ms", "size bytes", "gates"],
        rows,
    )
    for r in summary["results"]:
        for note in r.get("notes", []):
            say(f"note ({r['target']}/{r['format']}): {note}")
        if r.get("pending_gates"):
            say(f"pending on the device ({r['target']}/{r['format']}): {', '.join(r['pending_gates'])}")
    if summary.get("comparison"):
        _print_comparison(summary["comparison"]["rows"], f"against the baseline {summary['comparison']['baseline']}")
    say(f"report: {out / 'report.md'} and {out / 'report.html'}")


def _gate_word(result: dict) -> str:
    if result["failed_gates"]:
        return "FAIL"
    return "PENDING" if result.get("pending_gates") else "PASS"
