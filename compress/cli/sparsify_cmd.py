"""``compress sparsify``: make a checkpoint N:M sparse and write a pattern-verified ONNX artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from edgecompress.compress.cli.common import JsonOption, cli_progress, emit_json, print_table, say_guard
from edgecompress.compress.cli.inputs import (
    CalibDataOption,
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
    @app.command("sparsify")
    def sparsify_cmd(
        checkpoint: Path = typer.Argument(..., help="Dense checkpoint (.pt/.pth/.safetensors/.pt2)."),
        data: str | None = typer.Option(
            None, "--data", "-d", help="Built-in dataset, .npz or image folder (training methods); split by role."
        ),
        calib_data: str | None = CalibDataOption,
        eval_data: str | None = EvalDataOption,
        metric: str | None = MetricOption,
        max_drop: float | None = MaxDropOption,
        min_sqnr: float | None = MinSqnrOption,
        pattern: str = typer.Option(
            "2:4", "--pattern", "-p", help="N:M, e.g. 2:4, 1:4, 1:8, 1:16 (M <= 32)."
        ),
        method: str = typer.Option("mdgf", "--method", "-m", help="oneshot, srste, mdgf or sdgf."),
        decay: str = typer.Option("exp", "--decay", help="MDGF alpha decay: exp or linear."),
        sdgf: str = typer.Option("stepwise", "--sdgf", help="SDGF pattern schedule: stepwise or geometric."),
        max_steps: int = typer.Option(600, "--max-steps", help="Training steps (not used by oneshot)."),
        lr: float = typer.Option(5e-4, "--lr", help="Peak learning rate (cosine schedule)."),
        kappa: float | None = typer.Option(
            None, "--kappa", help="MDGF decay rate (default: alpha ~0.05 at 30% of steps)."
        ),
        include_attention: bool = typer.Option(
            False, "--include-attention", help="Transformers: also sparsify attention."
        ),
        indivisible: str = typer.Option(
            "pad", "--indivisible", help="Input dims not a multiple of M: pad, skip or error."
        ),
        seed: int = typer.Option(0, "--seed", help="Random seed."),
        resume: bool = typer.Option(False, "--resume", help="Continue a killed training run in OUT."),
        target: str = typer.Option("x86-64", "--target", "-t", help="Target recorded in the ONNX artifact."),
        out: Path = typer.Option(
            ..., "-o", "--out", help="Output folder: sparse.pt, onnx/ (verified artifact), train/."
        ),
        model_factory: str | None = ModelFactoryOption,
        trust_pickle: bool = TrustPickleOption,
        input_shape: str | None = InputShapeOption,
        inputs: list[str] | None = InputOption,
        json_out: bool = JsonOption,
    ) -> None:
        """Make CHECKPOINT N:M sparse (one-shot, SR-STE, MDGF, SDGF) and export a verified ONNX artifact."""
        from edgecompress.compress.api import sparsify

        options: dict[str, Any] = dict(pattern=pattern, method=method, decay=decay, sdgf_schedule=sdgf, max_steps=max_steps, lr=lr,
                       kappa=kappa, include_attention=include_attention, indivisible=indivisible, seed=seed)  # fmt: skip
        with cli_progress(not json_out):
            res = sparsify(checkpoint, data=data, calib_data=calib_data, eval_data=eval_data, target=target, workdir=out,
                           resume=resume, metric=metric, max_drop=max_drop, min_sqnr=min_sqnr, raise_on_failure=False,
                           **model_options(model_factory, trust_pickle, input_shape, inputs), **options)  # fmt: skip
        art, metrics, config, result = res.artifact, res.metrics, res.summary["config"], res.summary
        nm = art.manifest.metrics["nm_sparsity"]
        if json_out:
            emit_json(result)
            res.raise_for_failure()
            return
        print_table(
            f"{config['pattern']} {config['method']} -> {res.paths['checkpoint']}",
            ["layer", "ONNX initializer", "sparsity", "violations"],
            [[k, v["initializer"], v["sparsity"], v["violations"]] for k, v in nm["layers"].items()],
        )
        size = nm["compressed_size_fp32"]
        print_table(
            "result",
            ["dense test acc %", "sparse ONNX test acc %", "zeros in scope", "dense bytes", "N:M bytes (values+idx)"],
            [[metrics.get("dense_test_accuracy"), metrics.get("onnx_test_accuracy"), metrics["sparsity_in_scope"],
              size["dense_bytes"], size["compressed_bytes"]]],
        )  # fmt: skip
        typer.echo(f"pattern {config['pattern']} verified on {art.model_path}")
        say_guard(res.guard or {})
        res.raise_for_failure()
