"""``compress qat``: LSQ QAT / GAQAT on a checkpoint, exported as a verified QDQ ONNX artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from edgecompress.compress.cli.common import JsonOption, cli_progress, emit_json, print_table, say, say_guard
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
    @app.command("qat")
    def qat_cmd(
        checkpoint: Path = typer.Argument(..., help="Float model checkpoint (.pt/.pth/.safetensors/.pt2)."),
        data: str | None = typer.Option(
            None, "--data", "-d", help="mnist, digits, rotated-mnist, photos, text, an .npz or an image folder (split)."
        ),
        calib_data: str | None = CalibDataOption,
        eval_data: str | None = EvalDataOption,
        metric: str | None = MetricOption,
        max_drop: float | None = MaxDropOption,
        min_sqnr: float | None = MinSqnrOption,
        bits: int = typer.Option(4, "--bits", help="Weight bit-width, 2-8."),
        act_bits: int | None = typer.Option(
            None, "--act-bits", help="Activation bit-width, 2-8 (default: --bits)."
        ),
        method: str = typer.Option("gaqat", "--method", help="qat, qat-sam, qat-sagm or gaqat."),
        freeze: str = typer.Option(
            "task", "--freeze", help="GAQAT: freeze the task, smooth or whole scale gradient."
        ),
        max_steps: int = typer.Option(1000, "--max-steps", help="Training steps."),
        lr: float = typer.Option(1e-3, "--lr", help="Learning rate (cosine schedule)."),
        batch_size: int = typer.Option(64, "--batch-size"),
        warmup: int = typer.Option(200, "--warmup", help="GAQAT: steps before any freezing."),
        per_tensor: bool = typer.Option(
            False, "--per-tensor", help="One weight scale per tensor, not per channel."
        ),
        first_last_bits: int = typer.Option(
            8, "--first-last-bits", help="Bits of the first and last layer; 0: same as the others."
        ),
        seed: int = typer.Option(0, "--seed"),
        checkpoint_every: int = typer.Option(100, "--checkpoint-every"),
        eval_every: int = typer.Option(100, "--eval-every", help="Validate every N steps."),
        patience: int | None = typer.Option(
            None, "--patience", help="Early stop after N evaluations without gain."
        ),
        resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in OUT."),
        target: str = typer.Option(
            "x86-64", "--target", "-t", help="Device target recorded in the artifact."
        ),
        out: Path = typer.Option(..., "-o", "--out", help="Output folder (artifact in OUT/onnx)."),
        model_factory: str | None = ModelFactoryOption,
        trust_pickle: bool = TrustPickleOption,
        input_shape: str | None = InputShapeOption,
        inputs: list[str] | None = InputOption,
        json_out: bool = JsonOption,
    ) -> None:
        """Quantization-aware training of CHECKPOINT (LSQ, optionally SAM/SAGM/GAQAT) to a QDQ ONNX artifact."""
        from edgecompress.compress.api import qat
        from edgecompress.compress.qat import GAQATConfig

        options: dict[str, Any] = dict(method=method, bits=bits, act_bits=act_bits, freeze=freeze, max_steps=max_steps, lr=lr,
                       batch_size=batch_size, warmup_steps=warmup, per_channel=not per_tensor,
                       first_last_bits=first_last_bits, seed=seed, checkpoint_every=checkpoint_every,
                       eval_every=eval_every, early_stop_patience=patience)  # fmt: skip
        with cli_progress(not json_out):
            res = qat(checkpoint, data=data, calib_data=calib_data, eval_data=eval_data, target=target, workdir=out,
                      resume=resume, metric=metric, max_drop=max_drop, min_sqnr=min_sqnr, raise_on_failure=False,
                      **model_options(model_factory, trust_pickle, input_shape, inputs), **options)  # fmt: skip
        if res.artifact is None:  # a non-zero rank under torchrun: rank 0 writes the outputs
            return
        summary = res.summary
        config = GAQATConfig.model_validate(res.bundle.metadata["qat"]["config"])
        if json_out:
            emit_json(summary)
            res.raise_for_failure()
            return
        m = summary["metrics"]
        print_table(
            f"QAT {config.method} W{config.bits}A{config.activation_bits} -> {summary['artifact']}",
            ["steps", "torch fake-quant acc (%)", "onnxruntime acc (%)", "top-1 agreement (%)", "SQNR (dB)", "conflict rate"],
            [[m["steps"], m["onnx_check"].get("torch_accuracy"), m["onnx_check"].get("onnxruntime_accuracy"),
              m["onnx_check"]["top1_agreement"], m["onnx_check"]["sqnr_db"],
              (m.get("conflict") or {}).get("overall_conflict_rate")]],
        )  # fmt: skip
        say(f"training log: {summary['train_log']}")
        if summary.get("plot"):
            say(f"conflict plot: {summary['plot']}")
        say_guard(summary["guard"])
        res.raise_for_failure()

