"""The ``compress`` entry point: subcommands, global options and the exit-code contract.

Exit codes: 0 success, 1 unexpected error, 2 bad input or config, 3 unsupported on this target or a
backend missing, 4 a gate failed. Errors print one clear message, never a raw traceback
(``--debug`` shows it).
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

import typer

from edgecompress.compress.cli.common import EXIT_BAD_INPUT, EXIT_ERROR, EXIT_GATE, EXIT_UNSUPPORTED

app = typer.Typer(
    name="compress",
    help="Compress PyTorch models and export them to edge devices, proving accuracy and latency on the target runtime.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# One module per command group; each defines register(app). Techniques add their module here.
COMMAND_MODULES = [
    "edgecompress.compress.cli.example_cmd",
    "edgecompress.compress.cli.export_cmd",
    "edgecompress.compress.cli.check_cmd",
    "edgecompress.compress.cli.profile_cmd",
    "edgecompress.compress.cli.targets_cmd",
    "edgecompress.compress.cli.run_cmd",
    "edgecompress.compress.cli.list_cmd",
    "edgecompress.compress.cli.qat_cmd",
    "edgecompress.compress.cli.quantize_cmd",
    "edgecompress.compress.cli.sparsify_cmd",
    "edgecompress.compress.cli.codebook_cmd",
    "edgecompress.compress.cli.device_server_cmd",
    "edgecompress.compress.cli.tuning_cmd",
]

_state = {"debug": False}


@app.callback()
def _global(
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More log output (-vv for debug)."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
    targets_file: Path | None = typer.Option(
        None, "--targets-file", help="YAML/TOML file of extra device targets (see 'compress targets')."
    ),
) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    _state["debug"] = debug
    if targets_file is not None:
        from edgecompress.targets import load_targets_file

        load_targets_file(targets_file)


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def exit_code_for(exc: BaseException) -> int:
    """Map an exception to the documented exit code."""
    from edgecompress.compress.errors import GateFailure

    if isinstance(exc, GateFailure):
        return EXIT_GATE
    ours = type(exc).__module__.split(".")[0] == "edgecompress"
    if ours and isinstance(exc, NotImplementedError | ImportError | ConnectionError):
        return EXIT_UNSUPPORTED
    if ours and isinstance(exc, ValueError):
        return EXIT_BAD_INPUT
    return EXIT_ERROR


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns (and exits with) the exit code."""
    from typer.exceptions import Abort, Exit, TyperException

    from edgecompress.compress.errors import GateFailure

    try:
        rv = app(args=argv, standalone_mode=False, prog_name="compress")
        code = rv if isinstance(rv, int) else 0
    except Exit as exc:
        code = exc.exit_code
    except Abort:
        sys.stderr.write("aborted\n")
        code = 130
    except TyperException as exc:  # usage errors: bad option, missing argument
        show = getattr(exc, "show", None)
        if show is not None:
            show()
        else:
            sys.stderr.write(f"error: {exc.format_message()}\n")
        code = EXIT_BAD_INPUT
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        code = 130
    except GateFailure as exc:
        from edgecompress.compress.cli.common import print_table

        if exc.comparison:
            from edgecompress.compress.regression import COMPARISON_COLUMNS, comparison_table

            print_table("Against the baseline", COMPARISON_COLUMNS, comparison_table(exc.comparison), stderr=True)
        if exc.failures:
            print_table(
                "Failed gates",
                ["target", "gate", "limit", "measured", "excess"],
                [[f["target"], f["gate"], f["limit"], f["value"], f["excess"]] for f in exc.failures],
                stderr=True,
            )
        layers, remedies = getattr(exc, "layers", None), getattr(exc, "remedies", None)
        if layers:
            extra = next((k for k in ("max_abs_error", "drop") if k in layers[0]), None)
            names = {"max_abs_error": "max abs error", "drop": "drop alone (points)"}
            print_table("Layers that lose most (each layer's output vs fp32, measured alone)",
                        ["layer", "kind", "SQNR dB", *([names[extra]] if extra else [])],
                        [[r["layer"], r.get("kind", ""), r["sqnr_db"], *([r.get(extra)] if extra else [])]
                         for r in layers], stderr=True)  # fmt: skip
        sys.stderr.write(f"error: {exc}\n")
        for remedy in remedies or []:
            sys.stderr.write(f"  try: {remedy}\n")
        code = EXIT_GATE
    except Exception as exc:  # the top of the program: turn every error into a message and an exit code
        code = exit_code_for(exc)
        if _state["debug"]:
            import traceback

            traceback.print_exc()
        kind = "error" if code != EXIT_ERROR else f"internal error ({type(exc).__name__})"
        sys.stderr.write(f"{kind}: {exc}\n")
        if code == EXIT_ERROR and not _state["debug"]:
            sys.stderr.write("rerun with --debug to see the traceback\n")
    if argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":  # pragma: no cover
    main()
