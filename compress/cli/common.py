"""Shared CLI plumbing: output (human tables or --json), option parsing, progress bars."""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import typer

from edgecompress.compress.errors import ConfigError

# Exit codes (DESIGN.md): 2 bad input, 3 unsupported/backend missing, 4 a gate failed, 1 anything else.
EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT, EXIT_UNSUPPORTED, EXIT_GATE = 0, 1, 2, 3, 4

JsonOption = typer.Option(False, "--json", help="Write machine-readable JSON to stdout instead of the human summary.")
ExecutorOption = typer.Option(
    None, "--executor", help="Where trials or tuning builds run: local (default) or ray (a Ray cluster; the 'cluster' extra)."
)
RayAddressOption = typer.Option(
    None, "--ray-address", help="With --executor ray: the cluster's HOST:PORT (default RAY_ADDRESS, else a private "
    "Ray on this machine bound to 127.0.0.1).",
)


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def _clean(obj: Any) -> Any:
    """JSON-safe copy: inf/nan become strings, paths and tuples are converted."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if hasattr(obj, "__fspath__"):
        return str(obj)
    return obj


def emit_json(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(_clean(data), indent=2) + "\n")


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], *, stderr: bool = False) -> None:
    """A rich table (human output)."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*[fmt(v) for v in r])
    _console(stderr).print(table)


def say(message: str, *, stderr: bool = False) -> None:
    _console(stderr).print(message)


def say_guard(verdict: dict[str, Any]) -> None:
    """One line on the accuracy guard's verdict (failures also raise, exit 4)."""
    status = verdict["status"]
    if status == "unmeasured":
        say(f"accuracy guard: not measured ({verdict.get('reason', 'no data')})")
        return
    if verdict["metric"] == "sqnr":
        say(f"accuracy guard {status}: SQNR {verdict['value']:.1f} dB vs fp32 (floor {verdict['limit']:.1f} dB) "
            f"on {verdict['samples']} samples, {verdict.get('runtime')}")  # fmt: skip
        return
    say(f"accuracy guard {status}: {verdict['metric']} drop {verdict['drop']:.2f} points vs fp32 (limit "
        f"{verdict['limit']:.2f}) on {verdict['samples']} samples, {verdict.get('runtime')}")  # fmt: skip


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """``1,28,28`` -> (1, 28, 28)."""
    if not text:
        return None
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise ConfigError(f"--input-shape {text!r} must be comma-separated integers like 1,28,28") from None
    if not shape or any(s <= 0 for s in shape):
        raise ConfigError(f"--input-shape {text!r} must be positive integers like 1,28,28")
    return shape


@contextlib.contextmanager
def cli_progress(enabled: bool = True) -> Iterator[None]:
    """Install rich progress bars for library work, only when stderr is a terminal."""
    from edgecompress.compress.progress import set_progress_factory

    if not enabled or not sys.stderr.isatty():
        yield
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=_console(stderr=True), transient=True,
    )  # fmt: skip

    @contextlib.contextmanager
    def factory(description: str, total: int | None) -> Iterator[Any]:
        task_id = bar.add_task(description, total=total)

        class _Task:
            def advance(self, n: int = 1) -> None:
                bar.advance(task_id, n)

            def update(self, **fields: Any) -> None:
                bar.update(task_id, **fields)

        try:
            yield _Task()
        finally:
            bar.remove_task(task_id)

    with bar:
        set_progress_factory(factory)
        try:
            yield
        finally:
            set_progress_factory(None)
