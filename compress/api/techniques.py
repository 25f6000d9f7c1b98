"""Two of the techniques as verbs: ``sparsify`` and ``quantize`` (``qat`` and ``codebook`` are in
:mod:`edgecompress.compress.api.learned`).

Each loads the model and data the caller gives, runs the technique, exports what it made, proves
it against the fp32 model on onnxruntime (the accuracy guard) and returns a :class:`Result`. The
``compress`` command of the same name calls exactly this function.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from edgecompress.compress.api.inputs import (
    as_bundle,
    as_config,
    as_source,
    as_splits,
    as_target,
    splits_for,
    workdir_for,
)
from edgecompress.compress.api.result import Result


def _finish(result: Result, raise_on_failure: bool) -> Result:
    return result.raise_for_failure() if raise_on_failure else result


def sparsify(model: Any, config: Any = None, *, data: Any = None, calib_data: Any = None, eval_data: Any = None,
             target: Any = "x86-64", workdir: str | Path | None = None, resume: bool = False, metric: str | None = None,
             max_drop: float | None = None, min_sqnr: float | None = None, raise_on_failure: bool = True,
             model_factory: str | None = None, trust_pickle: bool = False, input_shape: tuple[int, ...] | None = None,
             inputs: list[Any] | None = None, **options: Any) -> Result:  # fmt: skip
    """Make ``model`` N:M sparse (one-shot, SR-STE, MDGF or SDGF) and export a pattern-verified ONNX artifact.

    Args:
        model: an ``nn.Module`` (give ``input_shape`` or ``inputs``), a checkpoint path or a previous result.
        config: an ``NMSparsityConfig``, a dict or a YAML file; ``options`` (its fields: ``pattern``,
            ``method``, ``max_steps``, ``lr``, ...) override it.
        data: split into train/calib/val/test; ``calib_data``/``eval_data`` are used whole for their role.
            Training methods need data; ``oneshot`` does not (without data the guard is not measured).
        target: the target recorded in the artifact (it must support N:M sparse weights).
        workdir: the output folder (``sparse.pt``, ``onnx/``, ``train/``, ``sparsify.json``); default a new
            temporary folder.
        resume: continue a killed training run in ``workdir``.
        metric, max_drop, min_sqnr: the accuracy guard (default: the target's budget).
        raise_on_failure: raise ``GuardFailure`` when the guard fails (the outputs are written first).

    Returns:
        ``Result`` with ``model`` (the sparse module), ``bundle``, ``artifact`` and the summary.

    Example:
        >>> import edgecompress as ec  # doctest: +SKIP
        >>> r = ec.sparsify("ex/cnn.pt", pattern="2:4", method="mdgf", max_steps=300, data="mnist", workdir="nm/")  # doctest: +SKIP
        >>> r.metrics["sparsity_in_scope"], r.artifact.path  # doctest: +SKIP
    """
    from edgecompress.compress.checkpoint import save_checkpoint
    from edgecompress.compress.errors import ConfigError
    from edgecompress.compress.guard import guard_module_result
    from edgecompress.compress.sparsity.api import apply_nm_sparsity
    from edgecompress.compress.sparsity.config import NMSparsityConfig
    from edgecompress.compress.sparsity.export import export_sparse_onnx
    from edgecompress.export.artifact import StageRecord

    cfg = as_config(NMSparsityConfig, config, options, "sparsify")
    tgt = as_target(target)
    tgt.require("nm-sparse", "N:M sparse weights")
    bundle = as_bundle(model, model_factory=model_factory, trust_pickle=trust_pickle, input_shape=input_shape,
                       inputs=inputs)  # fmt: skip
    if cfg.method != "oneshot" and data is None and calib_data is None:
        raise ConfigError(f"--method {cfg.method} trains the model and needs --data or --calib-data (or use --method oneshot)")
    splits = None
    if data is not None or calib_data is not None or eval_data is not None:
        splits = splits_for(bundle, data, calib_data=calib_data, eval_data=eval_data, seed=cfg.seed)
    out = workdir_for("sparsify", workdir)
    out.mkdir(parents=True, exist_ok=True)
    sparse, metrics = apply_nm_sparsity(bundle, cfg, splits, out_dir=out / "train", resume=resume)
    record = StageRecord(stage="sparsify", config=cfg.resolved(), metrics=metrics)
    art = export_sparse_onnx(sparse, out / "onnx", target=tgt, stages=[record])
    verdict: dict[str, Any] = {"status": "unmeasured", "reason": "no data: pass --data or --eval-data"}
    layers: list[dict[str, Any]] = []
    if splits is not None:
        check, verdict, layers = guard_module_result(art, splits.test, technique="sparsify", reference=bundle,
                                                     compressed=sparse.module, target=tgt, metric=metric,
                                                     max_drop=max_drop, min_sqnr_db=min_sqnr)  # fmt: skip
        metrics.update(metric=check["metric"], onnx_test_accuracy=check["accuracy"],
                       dense_test_accuracy=check.get("reference_accuracy"))  # fmt: skip
        art.update_metrics(accuracy=check["accuracy"], reference_accuracy=check.get("reference_accuracy"))
    kept = sparse.derive(sparse.module, metadata={**sparse.metadata, "guard": verdict["status"]})
    ckpt = save_checkpoint(kept, out / "sparse.pt", model_kwargs={"num_classes": sparse.num_classes or 10})
    nm = art.manifest.metrics["nm_sparsity"]
    summary = {"checkpoint": str(ckpt), "artifact": str(art.path), "config": cfg.resolved(), "metrics": metrics,
               "guard": verdict, "pattern_verified_on_onnx": nm["verified"], "layers": nm["layers"],
               "compressed_size_fp32": nm["compressed_size_fp32"], "compressed_size_int8": nm["compressed_size_int8"]}  # fmt: skip
    (out / "sparsify.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    result = Result("sparsify", model=sparse.module, bundle=kept, artifact=art, metrics=metrics, guard=verdict,
                    paths={"workdir": out, "checkpoint": ckpt, "artifact": art.path}, summary=summary,
                    worst_layers=layers)  # fmt: skip
    return _finish(result, raise_on_failure)


def quantize(model: Any, config: Any = None, *, data: Any = None, calib_data: Any = None, eval_data: Any = None,
             target: Any = "x86-64", workdir: str | Path | None = None, metric: str | None = None,
             max_drop: float | None = None, min_sqnr: float | None = None, raise_on_failure: bool = True,
             model_factory: str | None = None, trust_pickle: bool = False, input_shape: tuple[int, ...] | None = None,
             inputs: list[Any] | None = None, **options: Any) -> Result:  # fmt: skip
    """Quantune: search post-training int8 quantization configurations for the fastest accurate model
    on onnxruntime, and write it as an ``onnx-qdq`` artifact (or fp32, with the reason, when no
    quantized configuration is faster within ``max_drop``).

    Args:
        model: an ``nn.Module``, a checkpoint, an fp32 ``.onnx`` file, an ONNX artifact or a previous result
            (a torch model also opens brevitas' PTQ algorithms to the search).
        config: a ``QuantuneSearchConfig`` (or a ``PTQConfig``: apply it, no search), a dict or a YAML file;
            ``options`` (``search``, ``space``, ``budget_trials``, ``budget_time_s``, ``objective``,
            ``workers``, ``seed``, ``val_samples``, ...) override it.
        data, calib_data, eval_data: calibration and scoring data by role (never overlapping).
        target: the device target (it must run int8); its runtime settings time every trial.
        workdir: the artifact folder to write (with ``trials.json`` and ``sensitivity.md``).
        metric, max_drop, min_sqnr, raise_on_failure: the objective's metric and the accuracy guard.

    Returns:
        ``Result`` whose ``metrics`` hold ``latency_ms``, ``fp32_latency_ms``, ``speedup_vs_fp32``,
        ``objective``, ``chosen``, ``reason`` and ``ptq_algorithms``.

    Example:
        >>> r = ec.quantize("ex/cnn.pt", data="mnist", search="quantune", budget_trials=20, workdir="q/")  # doctest: +SKIP
        >>> r.metrics["speedup_vs_fp32"]  # doctest: +SKIP
    """
    from edgecompress.compress.data import image_shape
    from edgecompress.compress.exporting import export_torch_onnx
    from edgecompress.compress.ptq.config import PTQConfig, QuantuneSearchConfig
    from edgecompress.compress.ptq.search import guard_quantized, quantize_artifact

    tgt = as_target(target)
    tgt.require("int8", "Quantune PTQ")
    cfg = as_config(QuantuneSearchConfig, _search_config(config, PTQConfig), {**options, "metric": metric,
                    "max_drop": max_drop}, "PTQ")  # fmt: skip
    out = workdir_for("quantize", workdir)
    work = out.with_name(f".{out.name}.fp32-src")
    try:
        source = as_source(model, work, target=tgt, model_factory=model_factory, trust_pickle=trust_pickle,
                           input_shape=input_shape, inputs=inputs)  # fmt: skip
        from edgecompress.compress.checkpoint import ModelBundle

        bundle = source if isinstance(source, ModelBundle) else None
        fp32 = source if bundle is None else export_torch_onnx(bundle, work, target=tgt)
        splits = as_splits(data, calib_data=calib_data, eval_data=eval_data,
                           preprocessing=fp32.manifest.preprocessing or None, input_shape=image_shape(fp32.manifest.inputs))  # fmt: skip
        if eval_data is not None and "val_samples" not in options:  # evaluation data given whole is used whole
            cfg = cfg.model_copy(update={"val_samples": len(splits.val)})
        res = quantize_artifact(fp32, splits, cfg, out, target=tgt, module=bundle.module if bundle else None)
        check, verdict = guard_quantized(res, splits.test, tgt, bundle, max_drop=max_drop, min_sqnr_db=min_sqnr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = _quantize_summary(res, check, verdict)
    worst = [{"layer": r["node"], "kind": r["op_type"], "sqnr_db": r["sqnr_db"], "drop": r["accuracy_drop"]}
             for r in res.sensitivity[:8]]  # fmt: skip
    result = Result("quantize", artifact=res.artifact, metrics=dict(res.metrics), guard=verdict, summary=summary,
                    worst_layers=worst, paths={"artifact": res.artifact.path})  # fmt: skip
    result.metrics.update(sensitivity=res.sensitivity, search=cfg.search)
    return _finish(result, raise_on_failure)


def _search_config(config: Any, ptq_cls: Any) -> Any:
    """A ``PTQConfig`` (as an object, a dict or a file of its fields) means: apply it, no search."""
    from edgecompress.compress.api.inputs import read_config_file

    data = read_config_file(Path(config)) if isinstance(config, str | Path) else config
    if isinstance(data, ptq_cls):
        return {"search": "none", "config": data.model_dump()}
    if isinstance(data, dict) and data and set(data) <= set(ptq_cls.model_fields):
        return {"search": "none", "config": data}
    return data


def _quantize_summary(res: Any, check: dict[str, Any], verdict: dict[str, Any]) -> dict[str, Any]:
    m, art = res.metrics, res.artifact
    keys = ("config", "objective", "chosen", "reason", "latency_ms", "fp32_latency_ms", "speedup_vs_fp32",
            "latency_timing", "ptq_algorithms", "notes", "metric", "val_accuracy", "fp32_val_accuracy",
            "calib_samples", "val_samples", "trials", "measured_now", "stopped_by", "search_seconds", "executor",
            "lost_trials")  # fmt: skip
    return {"artifact": str(art.path), "format": art.manifest.format, **{k: m[k] for k in keys},
            "size_bytes": art.size_bytes, "trial_log": str(art.path / "trials.json"),
            "sensitivity": res.sensitivity[:10], "test_samples": check["samples"], "test_score": check["accuracy"],
            "fp32_test_score": check.get("reference_accuracy"), "guard": verdict}  # fmt: skip
