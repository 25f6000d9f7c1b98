"""The learned compressions as verbs: ``qat`` (LSQ / GAQAT) and ``codebook`` (JLCM).

Both train on the caller's data, export what they learned, prove it against the fp32 model on
onnxruntime (the accuracy guard) and return a :class:`Result`; ``compress qat`` and ``compress
codebook`` call exactly these functions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgecompress.compress.api.inputs import as_bundle, as_config, as_target, splits_for, workdir_for
from edgecompress.compress.api.result import Result


def qat(model: Any, config: Any = None, *, data: Any = None, calib_data: Any = None, eval_data: Any = None,
        target: Any = "x86-64", workdir: str | Path | None = None, resume: bool = False, metric: str | None = None,
        max_drop: float | None = None, min_sqnr: float | None = None, raise_on_failure: bool = True,
        model_factory: str | None = None, trust_pickle: bool = False, input_shape: tuple[int, ...] | None = None,
        inputs: list[Any] | None = None, **options: Any) -> Result:  # fmt: skip
    """Quantization-aware training (LSQ, optionally SAM/SAGM and GAQAT freezing) to a QDQ ONNX artifact.

    Args:
        model: an ``nn.Module`` (give ``input_shape`` or ``inputs``), a checkpoint path or a previous result.
            An N:M sparse model keeps its pattern (the mask is locked).
        config: a ``GAQATConfig``, a dict or a YAML file; ``options`` (``bits``, ``act_bits``, ``method``,
            ``max_steps``, ``lr``, ``freeze``, ...) override it.
        data, calib_data, eval_data: the training and evaluation data, by role.
        target: the target recorded in the artifact.
        workdir: the output folder (``model.pt``, ``onnx/``, ``train/``, ``summary.json``); default a new
            temporary folder. ``resume`` continues an interrupted run there.
        metric, max_drop, min_sqnr: the accuracy guard (default: the target's budget).
        raise_on_failure: raise ``GuardFailure`` when the guard fails (the outputs are written first).

    Returns:
        ``Result`` with the fake-quantized ``model``, its ``artifact`` (int8 QDQ on onnxruntime) and the
        summary; under ``torchrun`` the ranks other than 0 return a result without them.

    Example:
        >>> r = ec.qat("ex/cnn.pt", bits=4, method="gaqat", max_steps=2000, data="mnist", workdir="qat/")  # doctest: +SKIP
        >>> r.metrics["onnx_check"]["sqnr_db"]  # doctest: +SKIP
    """
    from edgecompress.compress.checkpoint import save_checkpoint
    from edgecompress.compress.exporting import export_torch_onnx
    from edgecompress.compress.guard import guard_module_result
    from edgecompress.compress.qat.config import GAQATConfig
    from edgecompress.compress.qat.train import (
        keep_nm_pattern,
        onnx_agreement,
        quantized_bundle,
        run_qat,
        write_json,
    )
    from edgecompress.compress.training import dist_info
    from edgecompress.export import StageRecord

    cfg = as_config(GAQATConfig, config, options, "qat")
    tgt = as_target(target)
    bundle = as_bundle(model, model_factory=model_factory, trust_pickle=trust_pickle, input_shape=input_shape,
                       inputs=inputs)  # fmt: skip
    splits = splits_for(bundle, data, calib_data=calib_data, eval_data=eval_data, seed=cfg.seed)
    out = workdir_for("qat", workdir)
    out.mkdir(parents=True, exist_ok=True)
    keep_nm_pattern(bundle)
    trained = run_qat(bundle.module, splits, cfg, out, resume=resume, task=bundle.task)
    if dist_info()[0] != 0:  # a non-zero rank under torchrun: rank 0 writes the outputs
        return Result("qat", paths={"workdir": out})
    metrics = {k: v for k, v in trained.metrics.items() if k != "plot"}
    record = StageRecord(stage="qat", config=cfg.model_dump(mode="json"), seconds=metrics.get("wall_seconds"),
                         metrics={k: v for k, v in metrics.items() if k not in ("layers", "conflict")})  # fmt: skip
    art = export_torch_onnx(bundle.derive(trained.model), out / "onnx", target=tgt, stages=[record],
                            extra={"bits_weights": cfg.bits, "bits_activations": cfg.activation_bits,
                                   "quantized_layers": metrics["layers"]})  # fmt: skip
    onnx_check = onnx_agreement(trained.model, art.model_path, splits.test, bundle.spec)
    if "onnxruntime_accuracy" in onnx_check:
        art.update_metrics(accuracy=onnx_check["onnxruntime_accuracy"])
    art.update_metrics(onnx_check=onnx_check)
    metrics["onnx_check"] = onnx_check
    check, verdict, worst = guard_module_result(art, splits.test, technique="qat", reference=bundle,
                                                compressed=trained.model, target=tgt, metric=metric,
                                                max_drop=max_drop, min_sqnr_db=min_sqnr)  # fmt: skip
    metrics.update(metric=check["metric"], onnxruntime_score=check["accuracy"], fp32_score=check.get("reference_accuracy"))
    qbundle = quantized_bundle(trained.model, bundle, cfg,
                               {k: v for k, v in metrics.items() if k not in ("layers", "conflict", "onnx_check")})  # fmt: skip
    qbundle.metadata["guard"] = verdict["status"]
    ckpt = save_checkpoint(qbundle, out / "model.pt", model_kwargs={"num_classes": bundle.num_classes})
    summary = {"artifact": str(art.path), "checkpoint": str(ckpt), "train_log": str(out / "train" / "train_log.jsonl"),
               "plot": trained.metrics.get("plot"), "metrics": metrics, "guard": verdict, "worst_layers": worst}  # fmt: skip
    write_json(out / "summary.json", summary)
    result = Result("qat", model=qbundle.module, bundle=qbundle, artifact=art, metrics=metrics, guard=verdict,
                    worst_layers=worst, summary=summary,
                    paths={"workdir": out, "artifact": art.path, "checkpoint": ckpt})  # fmt: skip
    return result.raise_for_failure() if raise_on_failure else result


def codebook(model: Any, config: Any = None, *, data: Any = None, calib_data: Any = None, eval_data: Any = None,
             target: Any = "x86-64", workdir: str | Path | None = None, measure_memory: bool = True,
             metric: str | None = None, max_drop: float | None = None, min_sqnr: float | None = None,
             raise_on_failure: bool = True, model_factory: str | None = None, trust_pickle: bool = False,
             input_shape: tuple[int, ...] | None = None, inputs: list[Any] | None = None, **options: Any) -> Result:  # fmt: skip
    """JLCM: compress the Linear/Conv2d weights to learned codebooks (about 2-3 bits per weight) and
    export them packed (``onnx-codebook``), checked on onnxruntime.

    Args:
        model: an ``nn.Module`` (give ``input_shape`` or ``inputs``), a checkpoint path or a previous result.
            An N:M sparse model keeps its pattern exactly.
        config: a ``JLCMConfig``, a dict or a YAML/JSON file; ``options`` (``bits``, ``groups``,
            ``variant``, ``update``, ``steps``, ``e2e_steps``, ``calib_samples``) override it.
        data, calib_data, eval_data: calibration and evaluation data, by role (unlabelled data is
            scored against the fp32 model: agreement for classifiers, cosine otherwise).
        measure_memory: measure onnxruntime's session-load memory against the fp32 model.
        workdir: the output folder (``model.pt``, ``onnx/``, ``codebook_report.json``).
        metric, max_drop, min_sqnr, raise_on_failure: the accuracy guard, as in :func:`qat`.

    Example:
        >>> r = ec.codebook("ex/cnn.pt", bits=3, groups=4, data="mnist", workdir="cb/")  # doctest: +SKIP
        >>> r.metrics["bits_per_weight"]  # doctest: +SKIP
    """
    from edgecompress.compress.codebook.api import apply_jlcm, save_codebook_checkpoint
    from edgecompress.compress.codebook.artifact import export_codebook_artifact
    from edgecompress.compress.codebook.config import JLCMConfig
    from edgecompress.compress.codebook.stage import check_nm_kept, sparse_layers
    from edgecompress.compress.guard import guard_module_result
    from edgecompress.compress.training import dataset_tensors, evaluate_accuracy

    cfg = as_config(JLCMConfig, config, options, "codebook")
    tgt = as_target(target)
    bundle = as_bundle(model, model_factory=model_factory, trust_pickle=trust_pickle, input_shape=input_shape,
                       inputs=inputs)  # fmt: skip
    splits = splits_for(bundle, data, calib_data=calib_data, eval_data=eval_data)
    out = workdir_for("codebook", workdir)
    keep = sparse_layers(bundle)
    module, report = apply_jlcm(bundle.module, dataset_tensors(splits.calib, cfg.calib_samples), cfg, keep_zeros=keep,
                                task=bundle.task)  # fmt: skip
    if keep:
        check_nm_kept(module, bundle.metadata["nm_sparsity"], report)
    parent = str(model) if isinstance(model, str | Path) else bundle.source
    compressed = bundle.derive(module, metadata={**bundle.metadata, "parent": parent})
    out.mkdir(parents=True, exist_ok=True)
    art = export_codebook_artifact(compressed, out / "onnx", report, target=tgt,
                                   verify_inputs=splits.test.head(16).inputs, measure_memory=measure_memory)  # fmt: skip
    # Worst layers from JLCM's own per-layer SQNR: folded row permutations reorder the channels inside
    # the model, so a layer cannot be compared with the original model's layer alone.
    check, verdict, _ = guard_module_result(art, splits.test, technique="codebook", reference=bundle, compressed=None,
                                            target=tgt, metric=metric, max_drop=max_drop, min_sqnr_db=min_sqnr)  # fmt: skip
    worst = sorted(({"layer": r["layer"], "kind": f"codebook ({r['groups']} groups, {r['permutation']})",
                     "sqnr_db": r["sqnr_db"]} for r in report["layers"] if "sqnr_db" in r),
                   key=lambda r: r["sqnr_db"])[:8] if verdict["status"] == "failed" else []  # fmt: skip
    ort_eval = check["rows"][1]
    art.update_metrics(accuracy=ort_eval["score"], metric=check["metric"])
    kept = compressed.derive(module, metadata={**compressed.metadata, "guard": verdict["status"]})
    save_codebook_checkpoint(kept, out / "model.pt", report["layout"])
    acc = evaluate_accuracy(module, splits.test, teacher=bundle.module, task=bundle.task, metric=check["metric"])
    summary = _codebook_summary(art, report, check, acc, out)
    summary.update(guard=verdict, worst_layers=worst)
    (out / "codebook_report.json").write_text(json.dumps({**report, "summary": summary}, indent=2, default=str))
    result = Result("codebook", model=module, bundle=kept, artifact=art, summary=summary, guard=verdict,
                    metrics={k: v for k, v in summary.items() if k not in ("layers", "guard", "worst_layers")},
                    worst_layers=worst, paths={"workdir": out, "artifact": art.path, "checkpoint": out / "model.pt"})  # fmt: skip
    return result.raise_for_failure() if raise_on_failure else result


def _codebook_summary(art: Any, report: dict[str, Any], check: dict[str, Any], acc: float, out: Path) -> dict[str, Any]:
    metrics = art.manifest.metrics
    memory = metrics.get("memory", {})
    return {
        "artifact": str(art.path), "checkpoint": str(out / "model.pt"), "config": report["config"],
        "bits_per_weight": report["accounting"]["bits_per_weight"], "file_bits_per_weight": metrics["file_bits_per_weight"],
        "metric": check["metric"], "samples": check["samples"], "fp32_accuracy": check.get("reference_accuracy"),
        "accuracy": acc, "onnxruntime_accuracy": check["rows"][1]["score"], "sqnr_db": metrics["export_check"]["sqnr_db"],
        "onnx_bytes": metrics["size_check"]["file_bytes"], "fp32_onnx_bytes": memory.get("fp32_file_bytes"),
        "size_check": metrics["size_check"], "memory": memory, "layers": report["layers"], "seconds": report["seconds"],
        "notes": report.get("notes", []),
    }  # fmt: skip
