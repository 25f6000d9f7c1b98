"""``compress codebook``: JLCM codebook compression of a checkpoint, exported as packed codebooks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from edgecompress.compress.cli.common import JsonOption, cli_progress, emit_json, print_table, say, say_guard
from edgecompress.compress.cli.inputs import (
    CalibDataOption,
    EvalDataOption,
    InputShapeOption,
    MaxDropOption,
    MetricOption,
    MinSqnrOption,
    ModelFactoryOption,
    TrustPickleOption,
    model_options,
)


def register(app: typer.Typer) -> None:
    @app.command("codebook")
    def codebook_cmd(
        checkpoint: Path = typer.Argument(..., help="Float checkpoint (.pt/.pth/.safetensors/.pt2)."),
        data: str | None = typer.Option(
            None, "--data", "-d", help="Calibration/evaluation data: mnist, digits, photos, a .npz or a folder (split)."
        ),
        calib_data: str | None = CalibDataOption,
        eval_data: str | None = EvalDataOption,
        metric: str | None = MetricOption,
        max_drop: float | None = MaxDropOption,
        min_sqnr: float | None = MinSqnrOption,
        bits: int = typer.Option(3, "--bits", help="Bits per codeword index (2, 3, 4; 1-6 accepted)."),
        groups: int = typer.Option(8, "--groups", help="Neuron groups per layer (k-means over neuron statistics)."),
        variant: str = typer.Option("scales", "--variant", help="scales: one codebook + a scale per group; codebooks: one codebook per group."),
        update: str = typer.Option("proximal", "--update", help="Mapping update: proximal (JLCM), ste or none."),
        steps: int = typer.Option(150, "--steps", help="Layer-wise learning steps per layer (0: k-means init only)."),
        e2e_steps: int = typer.Option(0, "--e2e-steps", help="Steps of the final end-to-end distillation phase."),
        calib_samples: int = typer.Option(256, "--calib-samples", help="Calibration samples used."),
        config_file: Path | None = typer.Option(None, "--config", help="JSON/YAML JLCMConfig (command-line options win)."),
        target: str = typer.Option("x86-64", "--target", "-t", help="Target recorded in the artifact."),
        measure_memory: bool = typer.Option(True, "--memory/--no-memory", help="Measure onnxruntime session-load memory vs fp32."),
        out: Path = typer.Option(..., "-o", "--out", help="Output folder: model.pt, codebook_report.json, onnx/ artifact."),
        model_factory: str | None = ModelFactoryOption,
        trust_pickle: bool = TrustPickleOption,
        input_shape: str | None = InputShapeOption,
        json_out: bool = JsonOption,
    ) -> None:
        """Compress CHECKPOINT's Linear/Conv2d weights to packed codebooks (JLCM) and export them."""
        from edgecompress.compress.api import codebook

        options: dict[str, Any] = {"bits": bits, "groups": groups, "variant": variant, "update": update, "steps": steps,
                   "e2e_steps": e2e_steps, "calib_samples": calib_samples}  # fmt: skip
        with cli_progress(not json_out):
            res = codebook(checkpoint, config_file, data=data, calib_data=calib_data, eval_data=eval_data, target=target,
                           workdir=out, measure_memory=measure_memory, metric=metric, max_drop=max_drop,
                           min_sqnr=min_sqnr, raise_on_failure=False,
                           **model_options(model_factory, trust_pickle, input_shape), **options)  # fmt: skip
        result, cfg = res.summary, res.summary["config"]
        if json_out:
            emit_json(result)
            res.raise_for_failure()
            return
        print_table(
            f"JLCM codebook -> {out}",
            ["bits/index", "groups", "variant", "update", "bits/weight", f"fp32 {result['metric']}",
             f"codebook {result['metric']} (torch)", f"{result['metric']} (onnxruntime)", "ONNX bytes", "fp32 ONNX bytes"],
            [[cfg["bits"], cfg["groups"], cfg["variant"], cfg["update"], result["bits_per_weight"], result["fp32_accuracy"],
              result["accuracy"], result["onnxruntime_accuracy"], result["onnx_bytes"], result["fp32_onnx_bytes"]]],
        )  # fmt: skip
        say(f"artifact: {result['artifact']} (SQNR vs torch {result['sqnr_db']:.1f} dB)")
        for note in result["notes"]:
            say(f"note: {note}")
        say_guard(result["guard"])
        res.raise_for_failure()

