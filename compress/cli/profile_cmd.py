"""``compress profile``: latency of an artifact on this machine or on a device over TVM RPC."""

from __future__ import annotations

from pathlib import Path

import typer

from edgecompress.compress.cli.common import JsonOption, emit_json, print_table, say


def register(app: typer.Typer) -> None:
    @app.command("profile")
    def profile_cmd(
        artifact: Path = typer.Argument(..., help="Artifact folder."),
        target: str | None = typer.Option(None, "--target", "-t", help="Target (default: the artifact's)."),
        batch: int = typer.Option(1, min=1, help="Batch size."),
        threads: int | None = typer.Option(None, help="Runtime threads (default: the target's)."),
        min_runs: int = typer.Option(30, min=1, help="At least this many timed runs..."),
        min_seconds: float = typer.Option(2.0, min=0.0, help="...and at least this many seconds of timing."),
        rpc: str | None = typer.Option(None, "--rpc", help="TVM RPC server host:port of the device."),
        tracker: str | None = typer.Option(None, "--tracker", help="TVM RPC tracker host:port (a device farm)."),
        key: str | None = typer.Option(None, "--key", help="Device key for --rpc/--tracker."),
        timeout: float = typer.Option(60.0, help="Seconds before a silent device is given up on."),
        max_latency_ms: float | None = typer.Option(None, help="Fail (exit 4) when p50 latency is higher."),
        json_out: bool = JsonOption,
    ) -> None:
        """Measure ARTIFACT's latency: warm-up excluded, >= min-runs and >= min-seconds, p50/p90/p99."""
        from edgecompress.compress.api import profile

        res = profile(artifact, target=target, batch=batch, threads=threads, min_runs=min_runs, min_seconds=min_seconds,
                      rpc=rpc, tracker=tracker, key=key, timeout=timeout, max_latency_ms=max_latency_ms,
                      raise_on_failure=False)  # fmt: skip
        stats, art = res.metrics["stats"], res.artifact
        if json_out:
            emit_json(res.summary)
        else:
            print_table(
                f"latency of {art.path}",
                ["runtime", "where", "threads", "batch", "runs", "p50 ms", "p90 ms", "p99 ms"],
                [[stats.runtime, stats.where, stats.threads, stats.batch, stats.runs, stats.p50_ms, stats.p90_ms,
                  stats.p99_ms]],
            )  # fmt: skip
            if stats.note:
                say(f"note: {stats.note}")
        res.raise_for_failure()
