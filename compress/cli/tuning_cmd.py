"""``compress tuning``: the TVM tuning databases a target reads, and clearing its own."""

from __future__ import annotations

import typer

from edgecompress.compress.cli.common import JsonOption, emit_json, print_table

TargetOption = typer.Option("x86-64", "--target", "-t", help="Device target: see 'compress targets'.")


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="TVM tuning databases: which apply to a target, and clearing them.", no_args_is_help=True)
    app.add_typer(group, name="tuning")

    @group.command("show")
    def show_cmd(target: str = TargetOption, json_out: bool = JsonOption) -> None:
        """List the databases whose records apply to TARGET (own, shipped, transferred from older CPUs)."""
        from edgecompress.export.tvm.records import database_key, database_status
        from edgecompress.targets import get_target

        tgt = get_target(target)
        rows = database_status(dict(tgt.tvm))
        if json_out:
            emit_json({"target": tgt.name, "key": database_key(dict(tgt.tvm)), "databases": rows})
            return
        print_table(f"tuning databases for {tgt.name} ({database_key(dict(tgt.tvm))})",
                    ["source", "records", "quarantined", "folder"],
                    [[r["source"], r["records"], r["quarantined"], r["folder"]] for r in rows])  # fmt: skip

    @group.command("clear")
    def clear_cmd(target: str = TargetOption, json_out: bool = JsonOption) -> None:
        """Delete TARGET's own tuning database (records, checks, quarantine); shipped records stay."""
        from edgecompress.export.tvm.records import clear_database
        from edgecompress.targets import get_target

        tgt = get_target(target)
        folder = clear_database(dict(tgt.tvm))
        if json_out:
            emit_json({"target": tgt.name, "cleared": str(folder)})
            return
        typer.echo(f"cleared {folder}")
