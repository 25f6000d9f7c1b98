"""``compress sparsify``: make a checkpoint N:M sparse and write a pattern-verified ONNX artifact."""

from __future__ import annotations

from pathlib import Path

import typer

from compress.cli.common import JsonOption, cli_progress, emit_json, print_table, say_guard
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
        import json

        from pydantic import ValidationError

        from compress.checkpoint import save_checkpoint
        from compress.data import image_shape, load_data
        from compress.errors import ConfigError
        from compress.guard import enforce, guard_module_result
        from compress.sparsity import NMSparsityConfig
        from compress.sparsity.api import apply_nm_sparsity
        from compress.sparsity.export import export_sparse_onnx
        from export.artifact import StageRecord
        from targets import get_target

        try:
            config = NMSparsityConfig(pattern=pattern, method=method, decay=decay, sdgf_schedule=sdgf,  # type: ignore[arg-type]
                                      max_steps=max_steps, lr=lr, kappa=kappa, include_attention=include_attention,
                                      indivisible=indivisible, seed=seed)  # type: ignore[arg-type]  # fmt: skip
        except ValidationError as exc:
            msgs = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']} (got {e.get('input')!r})"
                for e in exc.errors()
            )
            raise ConfigError(f"invalid sparsify options: {msgs}") from None
        tgt = get_target(target)
        tgt.require("nm-sparse", "N:M sparse weights")
        bundle = load_model_from_cli(checkpoint, model_factory, trust_pickle, input_shape, inputs)
        if config.method != "oneshot" and data is None and calib_data is None:
            raise ConfigError(
                f"--method {config.method} trains the model and needs --data or --calib-data (or use --method oneshot)"
            )
        splits = None
        if data is not None or calib_data is not None or eval_data is not None:
            splits = load_data(data, calib_data=calib_data, eval_data=eval_data, seed=seed,
                               preprocessing=bundle.preprocessing or None, input_shape=image_shape(bundle.spec.inputs))
        out.mkdir(parents=True, exist_ok=True)
        with cli_progress(not json_out):
            sparse, metrics = apply_nm_sparsity(bundle, config, splits, out_dir=out / "train", resume=resume)
            record = StageRecord(stage="sparsify", config=config.resolved(), metrics=metrics)
            art = export_sparse_onnx(sparse, out / "onnx", target=tgt, stages=[record])
            verdict: dict = {"status": "unmeasured", "reason": "no data: pass --data or --eval-data"}
            layers: list[dict] = []
            if splits is not None:
                check, verdict, layers = guard_module_result(art, splits.test, technique="sparsify", reference=bundle,
                                                             compressed=sparse.module, target=tgt, metric=metric,
                                                             max_drop=max_drop, min_sqnr_db=min_sqnr)  # fmt: skip
                metrics.update(metric=check["metric"], onnx_test_accuracy=check["accuracy"],
                               dense_test_accuracy=check.get("reference_accuracy"))  # fmt: skip
                art.update_metrics(accuracy=check["accuracy"], reference_accuracy=check.get("reference_accuracy"))
            ckpt = save_checkpoint(sparse.derive(sparse.module, metadata={**sparse.metadata, "guard": verdict["status"]}),
                                   out / "sparse.pt", model_kwargs={"num_classes": sparse.num_classes or 10})  # fmt: skip
        nm = art.manifest.metrics["nm_sparsity"]
        result = {"checkpoint": str(ckpt), "artifact": str(art.path), "config": config.resolved(), "metrics": metrics,
                  "guard": verdict, "pattern_verified_on_onnx": nm["verified"], "layers": nm["layers"],
                  "compressed_size_fp32": nm["compressed_size_fp32"], "compressed_size_int8": nm["compressed_size_int8"]}  # fmt: skip
        (out / "sparsify.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        if json_out:
            emit_json(result)
            enforce(verdict, "sparsify", layers=layers, written=str(out))
            return
        print_table(
            f"{config.pattern} {config.method} -> {ckpt}",
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
        typer.echo(f"pattern {config.pattern} verified on {art.model_path}")
        say_guard(verdict)
        enforce(verdict, "sparsify", layers=layers, written=str(out))
