"""``compress quantize``: Quantune post-training quantization (search) on onnxruntime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from compress.cli.common import (
    ExecutorOption,
    JsonOption,
    RayAddressOption,
    cli_progress,
    emit_json,
    print_table,
    say,
    say_guard,
)
from compress.cli.inputs import (
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
    load_model_from_cli,
    parse_inputs,
)


def _load_config_file(path: Path) -> dict[str, Any]:
    import yaml

    from compress.errors import ConfigError

    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of PTQ or search options, got {type(data).__name__}")
    return data


def _build_config(config_file: Path | None, options: dict[str, Any]) -> Any:
    """A QuantuneSearchConfig from the YAML file (a PTQConfig means: apply it, no search) and the flags."""
    from pydantic import ValidationError

    from compress.errors import ConfigError
    from compress.ptq.config import PTQConfig, QuantuneSearchConfig

    base: dict[str, Any] = {}
    if config_file is not None:
        data = _load_config_file(config_file)
        if set(data) <= set(PTQConfig.model_fields):
            base = {"search": "none", "config": data}
        else:
            base = data
    for k, v in options.items():
        if v is not None:
            base[k] = v
    try:
        return QuantuneSearchConfig(**base)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"invalid PTQ option {where}: {first['msg']} (got {first.get('input')!r})") from None


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
        import shutil

        from compress.data import image_shape, load_data
        from compress.guard import enforce
        from compress.ptq.config import parse_duration
        from compress.ptq.search import quantize_artifact
        from targets import get_target

        tgt = get_target(target)
        tgt.require("int8", "Quantune PTQ")
        cfg = _build_config(config_file, {
            "search": search, "space": space, "budget_trials": budget_trials, "budget_time_s": parse_duration(budget_time),
            "target_accuracy": target_accuracy, "workers": workers, "seed": seed, "executor": executor,
            "ray_address": ray_address, "objective": objective, "max_drop": max_drop,
            "require_quantized": True if require_quantized else None,
            "database": str(database) if database else None, "val_samples": val_samples,
            "use_seed_database": False if no_seed_database else None, "sensitivity": False if no_sensitivity else None,
            "metric": metric,
        })  # fmt: skip
        work = out.with_name(f".{out.name}.fp32-src")
        with cli_progress(not json_out):
            try:
                from compress.exporting import onnx_file_or_checkpoint

                loaded: list[Any] = []  # the fp32 checkpoint, kept as the guard's reference

                def load() -> Any:
                    loaded.append(load_model_from_cli(model, model_factory, trust_pickle, input_shape, inputs))
                    return loaded[0]

                source = onnx_file_or_checkpoint(model, work, target=tgt, inputs=parse_inputs(inputs), load=load)
                splits = load_data(data, calib_data=calib_data, eval_data=eval_data,
                                   preprocessing=source.manifest.preprocessing or None,
                                   input_shape=image_shape(source.manifest.inputs))
                if eval_data is not None and val_samples is None:  # a file given as eval data is used whole
                    cfg = cfg.model_copy(update={"val_samples": len(splits.val)})
                result = quantize_artifact(source, splits, cfg, out, target=tgt, module=loaded[0].module if loaded else None)
                check, verdict = guard_quantized(result, splits.test, tgt, loaded[0] if loaded else None,
                                                 max_drop=max_drop, min_sqnr_db=min_sqnr)  # fmt: skip
            finally:
                shutil.rmtree(work, ignore_errors=True)
        m = result.metrics
        summary = {"artifact": str(result.artifact.path), "format": result.artifact.manifest.format, "config": m["config"],
                   "objective": m["objective"], "chosen": m["chosen"], "reason": m["reason"], "latency_ms": m["latency_ms"],
                   "fp32_latency_ms": m["fp32_latency_ms"], "speedup_vs_fp32": m["speedup_vs_fp32"],
                   "latency_timing": m["latency_timing"], "ptq_algorithms": m["ptq_algorithms"], "notes": m["notes"],
                   "metric": m["metric"], "val_accuracy": m["val_accuracy"], "fp32_val_accuracy": m["fp32_val_accuracy"],
                   "calib_samples": m["calib_samples"], "val_samples": m["val_samples"],
                   "trials": m["trials"], "measured_now": m["measured_now"], "stopped_by": m["stopped_by"],
                   "search_seconds": m["search_seconds"], "executor": m["executor"], "lost_trials": m["lost_trials"],
                   "size_bytes": result.artifact.size_bytes,
                   "trial_log": str(result.artifact.path / "trials.json"),
                   "sensitivity": result.sensitivity[:10], "test_samples": check["samples"],
                   "test_score": check["accuracy"], "fp32_test_score": check.get("reference_accuracy"),
                   "guard": verdict}  # fmt: skip
        worst = [{"layer": r["node"], "kind": r["op_type"], "sqnr_db": r["sqnr_db"], "drop": r["accuracy_drop"]}
                 for r in result.sensitivity[:8]]  # fmt: skip
        if json_out:
            emit_json(summary)
            enforce(verdict, "quantize", layers=worst, written=str(result.artifact.path))
            return
        print_table(
            f"quantized {result.artifact.manifest.model_name} -> {result.artifact.path}",
            ["search", "trials", "stopped by", "best config", f"val {m['metric']}", f"fp32 val {m['metric']}", "seconds"],
            [[cfg.search, m["trials"], m["stopped_by"], m["config"], m["val_accuracy"], m["fp32_val_accuracy"],
              m["search_seconds"]]],
        )  # fmt: skip
        if result.sensitivity:
            print_table("most sensitive layers (quantized alone)", ["layer", "op", "drop (pt)", "SQNR dB"],
                        [[r["node"], r["op_type"], r["accuracy_drop"], r["sqnr_db"]] for r in result.sensitivity[:5]])  # fmt: skip
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
        say(f"trial log: {result.artifact.path / 'trials.json'}; sensitivity: {result.artifact.path / 'sensitivity.md'}")
        say_guard(verdict)
        enforce(verdict, "quantize", layers=worst, written=str(result.artifact.path))


def guard_quantized(result: Any, test: Any, target: Any, reference: Any, *, max_drop: float | None,
                    min_sqnr_db: float | None) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """Score the int8 artifact on the test data against its fp32 source (the ``reference``
    checkpoint, or the ONNX file it came from) with the search's metric, judge it and record the
    verdict in its manifest."""
    from compress.evaluation import check_artifact
    from compress.guard import judge, record

    art = result.artifact
    check = check_artifact(art, test, target=target, reference=reference, metric=result.metrics["metric"])
    verdict = judge(check, target=target, max_drop=max_drop, min_sqnr_db=min_sqnr_db)
    record(art, verdict)
    return check, verdict
