"""``compress quantize``: Quantune post-training quantization (search) on onnxruntime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from edgecompress.compress.cli.common import (
    ExecutorOption,
    JsonOption,
    RayAddressOption,
    cli_progress,
    emit_json,
    print_table,
    say,
    say_guard,
)
from edgecompress.compress.cli.inputs import (
    CalibDataOption,
    DataOption,
    EvalDataOption,
    InputOption,
    InputShapeOption,
    MaxDropOption,
    MetricOption,
    MinSqnrOption,
    ModelFactoryOption,
    TrustPickleOption,
    model_options,
)


def register(app: typer.Typer) -> None:
    @app.command("quantize")
    def quantize_cmd(
        model: Path = typer.Argument(..., help="Checkpoint (.pt/.pth/.safetensors/.pt2) or fp32 .onnx file."),
        data: str | None = DataOption,
        calib_data: str | None = CalibDataOption,
        eval_data: str | None = EvalDataOption,
        metric: str | None = MetricOption,
        max_drop: float | None = MaxDropOption,
        min_sqnr: float | None = MinSqnrOption,
        out: Path = typer.Option(..., "-o", "--out", help="Artifact folder to write (onnx-qdq, with trials.json and sensitivity.md)."),
        config_file: Path | None = typer.Option(None, "--config", help="YAML: a PTQConfig (applied as is) or search options."),
        search: str | None = typer.Option(None, "--search", help="quantune, random, grid, genetic or none (default: quantune)."),
        space: str | None = typer.Option(None, "--space", help="Search space preset: tiny, bench, default, full."),
        budget_trials: int | None = typer.Option(None, "--budget-trials", help="Most configurations to measure (default 20)."),
        budget_time: str | None = typer.Option(None, "--budget-time", help="Wall-time budget, e.g. 90s, 10m, 1h."),
        target_accuracy: float | None = typer.Option(None, "--target-accuracy", help="Stop when a config reaches this top-1 %."),
        target: str = typer.Option("x86-64", "--target", "-t", help="Device target (must run int8): see 'compress targets'."),
        workers: int | None = typer.Option(None, "--workers", help="Trials in flight at once (local: a process pool; "
                                           "ray: Ray tasks, default the cluster's CPUs)."),
        objective: str | None = typer.Option(None, "--objective", help="latency (default: the fastest config within "
                                             "--max-drop points of fp32, or fp32), accuracy, or pareto."),
        require_quantized: bool = typer.Option(False, "--require-quantized", help="Exit 4 instead of returning fp32 "
                                               "when no quantized configuration is faster."),
        executor: str | None = ExecutorOption,
        ray_address: str | None = RayAddressOption,
        seed: int | None = typer.Option(None, "--seed", help="Seed of random/genetic search and the cost model."),
        database: Path | None = typer.Option(None, "--database", help="Tuning database (default: the user cache's)."),
        no_seed_database: bool = typer.Option(False, "--no-seed-database", help="Do not use the shipped seed trials as prior."),
        no_sensitivity: bool = typer.Option(False, "--no-sensitivity", help="Skip the per-layer sensitivity table."),
        val_samples: int | None = typer.Option(None, "--val-samples", help="Validation samples per trial (default 500)."),
        model_factory: str | None = ModelFactoryOption,
        trust_pickle: bool = TrustPickleOption,
        input_shape: str | None = InputShapeOption,
        inputs: list[str] | None = InputOption,
        json_out: bool = JsonOption,
    ) -> None:
        """Find the best int8 onnxruntime quantization of MODEL (Quantune) and write it to OUT."""
        from edgecompress.compress.api import quantize
        from edgecompress.compress.ptq.config import parse_duration

        options: dict[str, Any] = {"search": search, "space": space, "budget_trials": budget_trials,
                   "budget_time_s": parse_duration(budget_time), "target_accuracy": target_accuracy, "workers": workers,
                   "seed": seed, "executor": executor, "ray_address": ray_address, "objective": objective,
                   "require_quantized": True if require_quantized else None,
                   "database": str(database) if database else None, "val_samples": val_samples,
                   "use_seed_database": False if no_seed_database else None,
                   "sensitivity": False if no_sensitivity else None}  # fmt: skip
        with cli_progress(not json_out):
            result = quantize(model, config_file, data=data, calib_data=calib_data, eval_data=eval_data, target=target,
                              workdir=out, metric=metric, max_drop=max_drop, min_sqnr=min_sqnr, raise_on_failure=False,
                              **model_options(model_factory, trust_pickle, input_shape, inputs), **options)  # fmt: skip
        if json_out:
            emit_json(result.summary)
            result.raise_for_failure()
            return
        m, art = result.metrics, result.artifact
        print_table(
            f"quantized {art.manifest.model_name} -> {art.path}",
            ["search", "trials", "stopped by", "best config", f"val {m['metric']}", f"fp32 val {m['metric']}", "seconds"],
            [[m["search"], m["trials"], m["stopped_by"], m["config"], m["val_accuracy"], m["fp32_val_accuracy"],
              m["search_seconds"]]],
        )  # fmt: skip
        if m["sensitivity"]:
            print_table("most sensitive layers (quantized alone)", ["layer", "op", "drop (pt)", "SQNR dB"],
                        [[r["node"], r["op_type"], r["accuracy_drop"], r["sqnr_db"]] for r in m["sensitivity"][:5]])  # fmt: skip
        say(f"data: calibration {m['calib_samples']} samples of {m['calib_source']}; trials scored on "
            f"{m['val_samples']} samples of {m['val_source']} ({m['metric']})")
        speed = f"{m['speedup_vs_fp32']:.2f}x fp32's speed" if m["speedup_vs_fp32"] else "latency not measured"
        say(f"returned {m['chosen']} ({m['objective']} objective): {m['reason']}; {m['latency_ms']} ms, {speed} "
            f"({m['latency_timing']})")
        for note in m["notes"]:
            say(f"note: {note}")
        ex = m["executor"]
        lost = f"; {m['lost_trials']} trial(s) lost their worker twice (failed, not cached)" if m["lost_trials"] else ""
        say(f"trials ran on {ex['where']}, {ex['workers']} at a time{lost}")
        say(f"trial log: {art.path / 'trials.json'}; sensitivity: {art.path / 'sensitivity.md'}")
        say_guard(result.guard or {})
        result.raise_for_failure()

