"""``compress list``: techniques, models, datasets, runtimes and export formats."""

from __future__ import annotations

import typer

from edgecompress.compress.cli.common import JsonOption, emit_json, print_table

WHAT = ("techniques", "models", "datasets", "runtimes", "formats")


def register(app: typer.Typer) -> None:
    @app.command("list")
    def list_cmd(
        what: str = typer.Argument("techniques", help=f"One of: {', '.join(WHAT)}."),
        json_out: bool = JsonOption,
    ) -> None:
        """List what this installation offers."""
        from edgecompress.compress.errors import ConfigError

        if what not in WHAT:
            raise ConfigError(f"cannot list {what!r}; choose one of: {', '.join(WHAT)}")
        rows: list[list[str]]
        if what == "techniques":
            from edgecompress.compress.stages import list_stages

            rows = [[s.name, s.description] for s in list_stages()]
        elif what == "models":
            from edgecompress.compress.models import describe_model, list_models

            rows = [[n, describe_model(n)] for n in list_models()]
        elif what == "datasets":
            from edgecompress.compress.data import BUILTIN_DATASETS

            rows = [[n, "built-in"] for n in BUILTIN_DATASETS]
        elif what == "runtimes":
            from edgecompress.runtimes import list_runtimes

            rows = [[n, ""] for n in list_runtimes()]
        else:
            from edgecompress.compress.exporting import export_formats

            rows = [[n, ""] for n in export_formats()]
        if json_out:
            emit_json({what: [{"name": r[0], "description": r[1]} for r in rows]})
        else:
            print_table(what, ["name", "description"], rows)
