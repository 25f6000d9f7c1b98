"""``compress targets``: the registered device targets."""

from __future__ import annotations

import typer

from edgecompress.compress.cli.common import JsonOption, emit_json, print_table


def register(app: typer.Typer) -> None:
    @app.command("targets")
    def targets_cmd(
        pattern: str = typer.Argument("*", help="Glob over target names."),
        json_out: bool = JsonOption,
    ) -> None:
        """List device targets (built-in and from --targets-file)."""
        from edgecompress.targets import list_targets

        found = list_targets(pattern)
        if json_out:
            emit_json({"targets": [t.to_dict() for t in found]})
            return
        print_table(
            "device targets",
            ["name", "kind", "description", "precisions", "onnxruntime providers", "profiling"],
            [[t.name, t.kind, t.description, ", ".join(sorted(t.precisions)), ", ".join(t.ort_providers),
              t.remote.mode] for t in found],
        )  # fmt: skip
