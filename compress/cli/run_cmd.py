"""``compress run`` and ``compress report``: the whole pipeline from a recipe, and its report."""

from __future__ import annotations

from pathlib import Path

import typer

from compress.cli.common import JsonOption, cli_progress, emit_json, print_table, say


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run_cmd(
        recipe: Path = typer.Argument(..., help="Recipe YAML (version: 1)."),
        out: Path = typer.Option(..., "-o", "--out", help="Run folder (stages, artifacts, report); reused to resume."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the resolved recipe, run nothing."),
        auto: bool = typer.Option(False, "--auto", help="Try candidate chains within the budgets and pick the best."),
        allow_code: bool = typer.Option(False, "--allow-code", help="Allow the recipe's model factory to import Python code."),
        allow_failed: bool = typer.Option(False, "--allow-failed", help="Take a model checkpoint whose accuracy guard failed."),
        json_out: bool = JsonOption,
    ) -> None:
        """Run RECIPE: stages, export per target, checks, profiles, gates (exit 4 on a failed gate)."""
        import yaml

        from compress.pipeline import check_recipe_inputs, run_recipe
        from compress.recipe import load_recipe, resolved_dict

        r = load_recipe(recipe)
        if dry_run:
            check_recipe_inputs(r)
            if json_out:
                emit_json(resolved_dict(r))
            else:
                typer.echo(yaml.safe_dump(resolved_dict(r), sort_keys=False), nl=False)
            return
        from compress.errors import GateFailure

        try:
            with cli_progress(not json_out):
                if auto:
                    from compress.auto import run_auto

                    summary = run_auto(r, out, allow_code=allow_code, allow_failed=allow_failed)
                else:
                    summary = run_recipe(r, out, allow_code=allow_code, allow_failed=allow_failed)
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
        json_out: bool = JsonOption,
    ) -> None:
        """Write the report of a run (report.md) and print where it is."""
        from compress.report import write_report

        path = write_report(run_dir)
        if json_out:
            emit_json({"report": str(path)})
        else:
            say(f"report: {path}")


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
                     m.get("latency_p50_ms"), m.get("size_bytes"), "PASS" if not r["failed_gates"] else "FAIL"])  # fmt: skip
    print_table(
        f"{summary['recipe']}: {summary['model']} on {summary['data']} ({summary['wall_seconds']} s)"
        + (" (the chosen candidate)" if summary.get("mode") == "auto" else ""),
        ["target", "format", "top-1 %", "fp32 top-1 %", "drop (pt)", "p50 ms", "size bytes", "gates"],
        rows,
    )
    for r in summary["results"]:
        for note in r.get("notes", []):
            say(f"note ({r['target']}/{r['format']}): {note}")
    say(f"report: {out / 'report.md'} and {out / 'report.html'}")
