"""``compress qat``: LSQ QAT / GAQAT on a checkpoint, exported as a verified QDQ ONNX artifact."""

from __future__ import annotations

from pathlib import Path

import typer

from compress.cli.common import JsonOption, cli_progress, emit_json, print_table, say, say_guard
from compress.cli.inputs import (
    CalibDataOption,
    EvalDataOption,
    InputOption,
    InputShapeOption,
    MaxDropOption,
    MetricOption,
    MinSqnrOption,
    ModelFactoryOption,
    TrustPickleOption,
    load_model_from_cli,
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
        from pydantic import ValidationError

        from compress.data import image_shape, load_data
        from compress.errors import ConfigError
        from compress.guard import enforce
        from compress.qat import GAQATConfig

        try:
            config = GAQATConfig(
                method=method, bits=bits, act_bits=act_bits, freeze=freeze, max_steps=max_steps, lr=lr,
                batch_size=batch_size, warmup_steps=warmup, per_channel=not per_tensor,
                first_last_bits=first_last_bits or None, seed=seed, checkpoint_every=checkpoint_every, eval_every=eval_every,
                early_stop_patience=patience,
            )  # fmt: skip
        except ValidationError as exc:
            raise ConfigError("; ".join(e["msg"] for e in exc.errors())) from None
        bundle = load_model_from_cli(checkpoint, model_factory, trust_pickle, input_shape, inputs)
        splits = load_data(data, calib_data=calib_data, eval_data=eval_data, seed=seed,
                           preprocessing=bundle.preprocessing or None,
                           input_shape=image_shape(bundle.spec.inputs)).for_model(bundle.spec)  # fmt: skip
        with cli_progress(not json_out):
            summary = run_qat_command(bundle, splits, config, out, target, resume,
                                      guard={"metric": metric, "max_drop": max_drop, "min_sqnr_db": min_sqnr})
        if summary is None:  # a non-zero rank under torchrun: rank 0 writes the outputs
            return
        if json_out:
            emit_json(summary)
            enforce(summary["guard"], "qat", layers=summary["worst_layers"], written=str(out))
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
        enforce(summary["guard"], "qat", layers=summary["worst_layers"], written=str(out))


def run_qat_command(bundle, splits, config, out: Path, target_name: str, resume: bool,  # type: ignore[no-untyped-def]
                    guard: dict | None = None):
    """Train, export, verify and judge with the accuracy guard (``guard``: its ``metric``,
    ``max_drop``, ``min_sqnr_db``); returns the summary (None on ranks other than 0). An N:M sparse
    checkpoint keeps its pattern (the mask is locked, as in the recipe's stage)."""
    from compress.exporting import source_info
    from compress.guard import guard_module_result
    from compress.qat.train import keep_nm_pattern, onnx_agreement, run_qat, write_json
    from compress.training import dist_info
    from export import StageRecord, export_onnx
    from targets import get_target

    tgt = get_target(target_name)
    out.mkdir(parents=True, exist_ok=True)
    keep_nm_pattern(bundle)
    result = run_qat(bundle.module, splits, config, out, resume=resume, task=bundle.task)
    if dist_info()[0] != 0:
        return None
    metrics = {k: v for k, v in result.metrics.items() if k != "plot"}
    art = export_onnx(
        result.model, bundle.spec, out / "onnx", target=tgt, model_name=bundle.model_name,
        preprocessing=bundle.preprocessing,
        stages=[StageRecord(stage="qat", config=config.model_dump(mode="json"),
                            metrics={k: v for k, v in metrics.items() if k not in ("layers", "conflict")},
                            seconds=metrics.get("wall_seconds"))],
        extra={**source_info(bundle), "bits_weights": config.bits, "bits_activations": config.activation_bits,
               "quantized_layers": metrics["layers"]},
    )  # fmt: skip
    check = onnx_agreement(result.model, art.model_path, splits.test, bundle.spec)
    if "onnxruntime_accuracy" in check:
        art.update_metrics(accuracy=check["onnxruntime_accuracy"])
    art.update_metrics(onnx_check=check)
    metrics["onnx_check"] = check
    fp32_check, verdict, worst = guard_module_result(art, splits.test, technique="qat", reference=bundle,
                                                     compressed=result.model, target=tgt, **(guard or {}))  # fmt: skip
    metrics.update(metric=fp32_check["metric"], onnxruntime_score=fp32_check["accuracy"],
                   fp32_score=fp32_check.get("reference_accuracy"))  # fmt: skip
    from compress.checkpoint import save_checkpoint
    from compress.qat.train import quantized_bundle

    meta_metrics = {k: v for k, v in metrics.items() if k not in ("layers", "conflict", "onnx_check")}
    qbundle = quantized_bundle(result.model, bundle, config, meta_metrics)
    qbundle.metadata["guard"] = verdict["status"]
    ckpt = save_checkpoint(qbundle, out / "model.pt", model_kwargs={"num_classes": bundle.num_classes})
    summary = {"artifact": str(art.path), "checkpoint": str(ckpt), "train_log": str(out / "train" / "train_log.jsonl"),
               "plot": result.metrics.get("plot"), "metrics": metrics, "guard": verdict, "worst_layers": worst}  # fmt: skip
    write_json(out / "summary.json", summary)
    return summary
