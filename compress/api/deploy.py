"""Deployment as verbs: ``export`` (an artifact for a target), ``check`` (accuracy on its runtime)
and ``profile`` (latency on this machine or a device); ``run`` (a recipe) is in
:mod:`edgecompress.compress.api.recipes`.

``compress export | check | profile`` and the recipe pipeline's exports call these functions.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from edgecompress.compress.api.inputs import as_dataset, as_source, as_target, workdir_for
from edgecompress.compress.api.result import Result


def export(model: Any, config: Any = None, *, format: str = "onnx", target: Any = "x86-64",
           workdir: str | Path | None = None, opset: int = 17, tune: str | int | None = None,
           rpc: str | None = None, tracker: str | None = None, key: str | None = None, timeout: float = 60.0,
           use_tuned_records: bool = True, executor: str | None = None, ray_address: str | None = None,
           allow_failed: bool = False, progress: Any = None, model_factory: str | None = None,
           trust_pickle: bool = False, input_shape: tuple[int, ...] | None = None,
           inputs: list[Any] | None = None, **options: Any) -> Result:  # fmt: skip
    """Export ``model`` for a target as a verified artifact (its outputs checked against the source).

    Args:
        model: an ``nn.Module`` (give ``input_shape`` or ``inputs``), a checkpoint, an ``.onnx`` file,
            an artifact or a previous result (its torch model, else its artifact).
        config: an export entry of a recipe (``ExportSpec``: ``format``, ``target``, ``options``,
            ``rpc``, ``key``, ...) or its dict, instead of the keywords.
        format: ``onnx`` or ``tvm`` (Relax, compiled for the target).
        target: the device target (name or ``Target``).
        workdir: the artifact folder (replaced atomically); default a new temporary folder.
        opset: the ONNX opset (>= 17).
        tune: TVM: a MetaSchedule budget (``"10m"``, or trials); ``rpc``/``tracker`` with ``key`` time the
            candidates on the device (ARM64 and GPU targets need it); ``timeout`` per remote step.
        use_tuned_records: TVM: apply verified records of the tuning database (False: untuned).
        executor, ray_address: TVM tuning builds on a Ray cluster (``executor="ray"``).
        allow_failed: take an input whose accuracy guard failed.
        progress: TVM tuning: a callable that gets one line per task and round.
        options: more options of the format (TVM: ``trials_per_task``, ``database_dir``, ``batch``,
            ``verify``, ``int8_kernels``; a recipe entry's ``options``).

    Example:
        >>> art = ec.export("ex/cnn.pt", format="tvm", target="x86-64", workdir="art-tvm/").artifact  # doctest: +SKIP
        >>> art.manifest.extra["tuned"]  # doctest: +SKIP
    """
    from edgecompress.compress.checkpoint import ModelBundle, is_onnx_file
    from edgecompress.compress.exporting import export_model
    from edgecompress.compress.guard import input_guard_status, refuse_failed

    if config is not None:  # a recipe's export entry: its options, device fields included
        from edgecompress.compress.api.inputs import as_config
        from edgecompress.compress.recipe import ExportSpec

        spec = as_config(ExportSpec, config, {}, "export")
        format, target = spec.format, spec.target
        given = {"opset": opset, **spec.export_options(), **options}
    else:
        given = {"opset": opset, "tune": tune, "rpc": rpc, "tracker": tracker, "key": key, "executor": executor,
                 "ray_address": ray_address, "timeout": timeout if (rpc or tracker) else None, **options}  # fmt: skip
    if format == "tvm":
        given.update(use_database=use_tuned_records, progress=progress)
    tgt = as_target(target)
    out = workdir_for("export", workdir)
    work = out.with_name(f".{out.name}.onnx-src")
    try:
        if isinstance(model, str | Path) and is_onnx_file(model):
            refuse_failed(input_guard_status(model), str(model), allow_failed=allow_failed)
        source = as_source(model, work, target=tgt, model_factory=model_factory, trust_pickle=trust_pickle,
                           input_shape=input_shape, inputs=inputs)  # fmt: skip
        if isinstance(source, ModelBundle):
            what = f"checkpoint {model}" if isinstance(model, str | Path) else f"model {source.model_name}"
            refuse_failed(source.metadata.get("guard"), what, allow_failed=allow_failed)
        art = export_model(source, format, tgt, out, **{k: v for k, v in given.items() if v is not None})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    m = art.manifest
    summary = {"artifact": str(art.path), "format": m.format, "target": tgt.name, "size_bytes": art.size_bytes,
               "files": m.files, "metrics": m.metrics, "notes": m.extra.get("notes", []), "tuning": m.extra.get("tuning")}  # fmt: skip
    return Result("export", artifact=art, metrics=dict(m.metrics), summary=summary, paths={"artifact": art.path})


def _artifact_and_target(artifact: Any, target: Any) -> tuple[Any, Any]:
    from edgecompress.export import load_artifact
    from edgecompress.export.artifact import Artifact

    if isinstance(artifact, Result):
        artifact = artifact.artifact
    art = artifact if isinstance(artifact, Artifact) else load_artifact(artifact)
    if target is None and art.manifest.target:
        target = art.manifest.target["name"]
    return art, as_target(target)


def check(artifact: Any, *, data: Any = None, eval_data: Any = None, split: str = "test", metric: str | None = None,
          reference: Any = None, model_factory: str | None = None, target: Any = None, threads: int | None = None,
          max_accuracy_drop: float | None = None, rpc: str | None = None, key: str | None = None,
          raise_on_failure: bool = True) -> Result:  # fmt: skip
    """Score an artifact on its runtime with the model's metric, next to the fp32 torch reference.

    Args:
        artifact: an artifact, its folder or a previous result.
        data: data whose ``split`` is scored (a path, a built-in name, arrays, batches); or ``eval_data``, used whole.
        metric: ``top1`` (labels), ``agreement``, ``cosine`` or ``sqnr`` (vs fp32); default from the data.
        reference: the fp32 model (a checkpoint, module or result); default the export's recorded source.
        target, threads: the runtime's settings (default: the artifact's target).
        max_accuracy_drop: a gate on the drop against fp32 (points); failing it raises ``GateFailure``.
        rpc, key: also run a TVM artifact on the device server at ``rpc``.

    Example:
        >>> ec.check("art/", data="mnist").metrics["accuracy_drop"]  # doctest: +SKIP
    """
    from edgecompress.compress.data import image_shape, load_dataset, split_dataset
    from edgecompress.compress.errors import ConfigError
    from edgecompress.compress.evaluation import check_artifact

    art, tgt = _artifact_and_target(artifact, target)
    if (data is None) == (eval_data is None):
        raise ConfigError("give the evaluation data as --data D (its --split is scored) or --eval-data F (used whole)")
    pre, size = art.manifest.preprocessing or None, image_shape(art.manifest.inputs)
    if eval_data is not None:
        ds = load_dataset(as_dataset(eval_data, "evaluation data"), preprocessing=pre, input_shape=size)
    else:
        ds = split_dataset(load_dataset(as_dataset(data, "data"), preprocessing=pre, input_shape=size))[split]
    ref = _reference(art, reference, model_factory)
    sessions = []
    if rpc:
        from edgecompress.runtimes.tvm_rpc import remote_session

        sessions.append(remote_session(art, rpc, key=key, target=tgt))
    result = check_artifact(art, ds, target=tgt, reference=ref, sessions=sessions, threads=threads, metric=metric)
    if rpc:
        from edgecompress.runtimes.tvm_rpc import emulation_note

        note = emulation_note(sessions[0].where, tgt)
        if note:
            result["notes"] = [*result.get("notes", []), note]
    if max_accuracy_drop is not None and result.get("accuracy_drop") is None:
        raise ConfigError(f"--max-accuracy-drop needs a metric with a drop vs fp32 (top1, agreement, cosine); "
                          f"this check scored {result['metric']}")  # fmt: skip
    failures = []
    if max_accuracy_drop is not None and result["accuracy_drop"] > max_accuracy_drop:
        failures.append({"target": tgt.name if tgt else "-", "gate": "max_accuracy_drop", "limit": max_accuracy_drop,
                         "value": result["accuracy_drop"], "excess": result["accuracy_drop"] - max_accuracy_drop})  # fmt: skip
    res = Result("check", artifact=art, metrics=result, failures=failures, summary={**result, "passed": not failures},
                 paths={"artifact": art.path})  # fmt: skip
    res.metrics["data"] = {"name": ds.name, "samples": len(ds)}
    return res.raise_for_failure() if raise_on_failure else res


def _reference(art: Any, reference: Any, model_factory: str | None) -> Any:
    from edgecompress.compress.evaluation import reference_model

    if reference is None or isinstance(reference, str | Path):
        return reference_model(art, checkpoint=reference, model_factory=model_factory,
                               allow_code=model_factory is not None)  # fmt: skip
    from edgecompress.compress.api.inputs import as_bundle

    spec = art.manifest.inputs
    return as_bundle(reference, inputs=spec if not isinstance(reference, Result) else None)


def profile(artifact: Any, *, target: Any = None, batch: int = 1, threads: int | None = None, min_runs: int = 30,
            min_seconds: float = 2.0, rpc: str | None = None, tracker: str | None = None, key: str | None = None,
            timeout: float = 60.0, max_latency_ms: float | None = None, raise_on_failure: bool = True) -> Result:  # fmt: skip
    """Latency of an artifact on its runtime: warm-up excluded, at least ``min_runs`` runs and
    ``min_seconds`` of timing, p50/p90/p99; on this machine, or on a device over TVM RPC (``rpc`` or
    ``tracker`` with ``key``).

    Args:
        max_latency_ms: a gate on the median; failing it raises ``GateFailure``.

    Example:
        >>> ec.profile("art/", threads=2).metrics["p50_ms"]  # doctest: +SKIP
    """
    from edgecompress.compress.evaluation import profile_artifact

    art, tgt = _artifact_and_target(artifact, target)
    if rpc or tracker:
        from edgecompress.runtimes.tvm_rpc import profile_remote

        stats = profile_remote(art, rpc=rpc, tracker=tracker, key=key, target=tgt, batch=batch,
                               min_runs=min_runs, min_seconds=min_seconds, timeout=timeout)  # fmt: skip
    else:
        stats = profile_artifact(art, target=tgt, batch=batch, threads=threads, min_runs=min_runs, min_seconds=min_seconds)
    summary = {"artifact": str(art.path), "format": art.manifest.format, "target": tgt.name if tgt else None,
               "tuned": art.manifest.extra.get("tuned"), **stats.to_dict()}  # fmt: skip
    failures = []
    if max_latency_ms is not None and stats.p50_ms > max_latency_ms:
        failures.append({"target": tgt.name if tgt else "-", "gate": "max_latency_ms", "limit": max_latency_ms,
                         "value": stats.p50_ms, "excess": stats.p50_ms - max_latency_ms})  # fmt: skip
    res = Result("profile", artifact=art, metrics={**summary, "stats": stats}, failures=failures,
                 summary={**summary, "passed": not failures}, paths={"artifact": art.path})  # fmt: skip
    return res.raise_for_failure() if raise_on_failure else res
