"""``compress check``: accuracy of an artifact on its runtime against the torch reference."""

from __future__ import annotations

from pathlib import Path

import typer

from edgecompress.compress.cli.common import JsonOption, emit_json, print_table, say
from edgecompress.compress.cli.inputs import EvalDataOption, MetricOption


def register(app: typer.Typer) -> None:
    @app.command("check")
    def check_cmd(
        artifact: Path = typer.Argument(..., help="Artifact folder (from 'compress export')."),
        data: str | None = typer.Option(
            None, "--data", "-d", help="Built-in dataset name, .npz file or image folder (its --split is scored)."
        ),
        eval_data: str | None = EvalDataOption,
        split: str = typer.Option("test", help="Split of --data to evaluate: train, calib, val or test."),
        metric: str | None = MetricOption,
        reference: Path | None = typer.Option(None, help="fp32 checkpoint to compare with (default: the export source)."),
        model_factory: str | None = typer.Option(None, "--model-factory", help="Factory for a plain state_dict reference."),
        target: str | None = typer.Option(None, "--target", "-t", help="Target (default: the artifact's)."),
        threads: int | None = typer.Option(None, help="Runtime threads (default: the target's)."),
        max_accuracy_drop: float | None = typer.Option(None, help="Fail (exit 4) when accuracy drops more (points)."),
        rpc: str | None = typer.Option(None, "--rpc", help="Also run on a TVM RPC device host:port (TVM artifacts)."),
        key: str | None = typer.Option(None, "--key", help="RPC key of the device."),
        json_out: bool = JsonOption,
    ) -> None:
        """Check ARTIFACT's accuracy on DATA with its runtime, next to torch (agreement, cosine, SQNR)."""
        from edgecompress.compress.api import check
        from edgecompress.runtimes.measure import METRIC_UNITS

        res = check(artifact, data=data, eval_data=eval_data, split=split, metric=metric, reference=reference,
                    model_factory=model_factory, target=target, threads=threads, max_accuracy_drop=max_accuracy_drop,
                    rpc=rpc, key=key, raise_on_failure=False)  # fmt: skip
        result, ds = res.summary, res.metrics["data"]
        if json_out:
            emit_json(result)
        else:
            print_table(
                f"{result['metric']} on {ds['name']} ({ds['samples']} samples, all used)",
                ["runtime", "where", f"{result['metric']} ({METRIC_UNITS[result['metric']]})", "top-1 %",
                 "agreement vs fp32 %", "cosine vs fp32", "SQNR vs fp32 (dB)", "max abs err"],
                [[r["runtime"], r["where"], r["score"], r.get("accuracy"), r.get("top1_agreement"), r.get("cosine"),
                  r.get("sqnr_db"), r.get("max_abs_error")] for r in result["rows"]],
            )  # fmt: skip
            for c in result.get("cross_runtime", []):
                say(f"{c['a']} vs {c['b']}: agreement {c.get('top1_agreement', 0):.2f}%, SQNR {c['sqnr_db']:.1f} dB")
            if len(result["rows"]) == 1 or not result["rows"][0]["runtime"].endswith("(reference)"):
                say("no fp32 reference (pass --reference CKPT to compare against the fp32 model)")
            for note in result.get("notes", []):
                say(f"note: {note}")
        res.raise_for_failure()
