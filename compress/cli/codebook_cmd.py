"""``compress codebook``: JLCM codebook compression of a checkpoint, exported as packed codebooks."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from compress.cli.common import JsonOption, cli_progress, emit_json, print_table, say, say_guard
from compress.cli.inputs import (
    CalibDataOption,
    EvalDataOption,
    InputShapeOption,
    MaxDropOption,
    MetricOption,
    MinSqnrOption,
    ModelFactoryOption,
    TrustPickleOption,
    load_model_from_cli,
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
        from compress.codebook.config import JLCMConfig
        from compress.errors import ConfigError
        from compress.guard import enforce

        base: dict = {}
        if config_file is not None:
            import yaml

            if not config_file.is_file():
                raise ConfigError(f"config file {str(config_file)!r} does not exist")
            base = yaml.safe_load(config_file.read_text()) or {}
        base.update({"bits": bits, "groups": groups, "variant": variant, "update": update, "steps": steps,
                     "e2e_steps": e2e_steps, "calib_samples": calib_samples})  # fmt: skip
        try:
            cfg = JLCMConfig.model_validate(base)
        except ValueError as exc:
            raise ConfigError(f"invalid codebook options: {exc}") from None
        result = run_codebook(checkpoint, (data, calib_data, eval_data), cfg, out, target=target, measure_memory=measure_memory,
                              model_factory=model_factory, trust_pickle=trust_pickle, input_shape=input_shape,
                              progress=not json_out, guard={"metric": metric, "max_drop": max_drop,
                                                            "min_sqnr_db": min_sqnr})  # fmt: skip
        if json_out:
            emit_json(result)
            enforce(result["guard"], "codebook", layers=result["worst_layers"], written=str(out))
            return
        print_table(
            f"JLCM codebook -> {out}",
            ["bits/index", "groups", "variant", "update", "bits/weight", f"fp32 {result['metric']}",
             f"codebook {result['metric']} (torch)", f"{result['metric']} (onnxruntime)", "ONNX bytes", "fp32 ONNX bytes"],
            [[cfg.bits, cfg.groups, cfg.variant, cfg.update, result["bits_per_weight"], result["fp32_accuracy"],
              result["accuracy"], result["onnxruntime_accuracy"], result["onnx_bytes"], result["fp32_onnx_bytes"]]],
        )  # fmt: skip
        say(f"artifact: {result['artifact']} (SQNR vs torch {result['sqnr_db']:.1f} dB)")
        for note in result["notes"]:
            say(f"note: {note}")
        say_guard(result["guard"])
        enforce(result["guard"], "codebook", layers=result["worst_layers"], written=str(out))


def run_codebook(checkpoint: Path, data: tuple[str | None, str | None, str | None], cfg: object, out: Path, *,
                 target: str, measure_memory: bool,
                 model_factory: str | None, trust_pickle: bool, input_shape: str | None, progress: bool,
                 guard: dict | None = None) -> dict:  # fmt: skip
    """Load, compress, save, export and evaluate; returns the JSON summary.

    ``data`` is ``(--data, --calib-data, --eval-data)``. Unlabelled data is scored against the fp32
    model (agreement for classifiers, cosine otherwise), on torch and on onnxruntime. ``guard``
    holds the accuracy guard's ``metric``, ``max_drop`` and ``min_sqnr_db``; its verdict is in the
    result (raising is the caller's, after the outputs are written). A checkpoint made N:M sparse by
    ``compress sparsify`` keeps its pattern exactly, as the recipe's codebook stage does.
    """
    from compress.codebook.api import apply_jlcm, save_codebook_checkpoint
    from compress.codebook.artifact import export_codebook_artifact
    from compress.codebook.stage import check_nm_kept, sparse_layers
    from compress.data import image_shape, load_data
    from compress.guard import guard_module_result
    from compress.training import dataset_tensors, evaluate_accuracy
    from targets import get_target

    tgt = get_target(target)
    with cli_progress(progress):
        bundle = load_model_from_cli(checkpoint, model_factory, trust_pickle, input_shape)
        splits = load_data(data[0], calib_data=data[1], eval_data=data[2], preprocessing=bundle.preprocessing or None,
                           input_shape=image_shape(bundle.spec.inputs)).for_model(bundle.spec)  # fmt: skip
        calib = dataset_tensors(splits.calib, cfg.calib_samples)  # type: ignore[attr-defined]
        keep = sparse_layers(bundle)
        module, report = apply_jlcm(bundle.module, calib, cfg, keep_zeros=keep, task=bundle.task)  # type: ignore[arg-type]
        if keep:
            check_nm_kept(module, bundle.metadata["nm_sparsity"], report)
        compressed = bundle.derive(module, metadata={**bundle.metadata, "parent": str(checkpoint)})
        out.mkdir(parents=True, exist_ok=True)
        art = export_codebook_artifact(compressed, out / "onnx", report, target=tgt,
                                       verify_inputs=splits.test.head(16).inputs, measure_memory=measure_memory)  # fmt: skip
        # Worst layers from JLCM's own per-layer SQNR: folded row permutations reorder the channels
        # inside the model, so a layer cannot be compared with the original model's layer alone.
        check, verdict, _ = guard_module_result(art, splits.test, technique="codebook", reference=bundle,
                                                compressed=None, target=tgt, **(guard or {}))  # fmt: skip
        worst = sorted(({"layer": r["layer"], "kind": f"codebook ({r['groups']} groups, {r['permutation']})",
                         "sqnr_db": r["sqnr_db"]} for r in report["layers"] if "sqnr_db" in r),
                       key=lambda r: r["sqnr_db"])[:8] if verdict["status"] == "failed" else []  # fmt: skip
        ort_eval = check["rows"][1]
        art.update_metrics(accuracy=ort_eval["score"], metric=check["metric"])
        save_codebook_checkpoint(compressed.derive(module, metadata={**compressed.metadata, "guard": verdict["status"]}),
                                 out / "model.pt", report["layout"])  # fmt: skip
        fp_acc = check.get("reference_accuracy")
        acc = evaluate_accuracy(module, splits.test, teacher=bundle.module, task=bundle.task,
                                metric=check["metric"])  # fmt: skip
    metrics = art.manifest.metrics
    memory = metrics.get("memory", {})
    result = {
        "artifact": str(art.path),
        "checkpoint": str(out / "model.pt"),
        "config": report["config"],
        "bits_per_weight": report["accounting"]["bits_per_weight"],
        "file_bits_per_weight": metrics["file_bits_per_weight"],
        "metric": check["metric"],
        "samples": check["samples"],
        "fp32_accuracy": fp_acc,
        "accuracy": acc,
        "onnxruntime_accuracy": ort_eval["score"],
        "sqnr_db": metrics["export_check"]["sqnr_db"],
        "onnx_bytes": metrics["size_check"]["file_bytes"],
        "fp32_onnx_bytes": memory.get("fp32_file_bytes"),
        "size_check": metrics["size_check"],
        "memory": memory,
        "layers": report["layers"],
        "seconds": report["seconds"],
        "notes": report.get("notes", []),
        "guard": verdict,
        "worst_layers": worst,
    }
    (out / "codebook_report.json").write_text(json.dumps({**report, "summary": result}, indent=2, default=str))
    return result
