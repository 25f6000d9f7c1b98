"""Running a recipe: load -> stages -> export per target -> check -> profile -> gates -> report.

Every stage writes into ``OUT/stages/NN-name/`` and finishes by writing ``done.json`` with its
cache key (the hash of its input + resolved config + data). Rerunning a recipe reuses finished
stages with the same key; a stage killed midway resumes from its own checkpoints. Exports go to
``OUT/artifacts/<target>-<format>/`` (atomic), and ``OUT/summary.json`` + ``OUT/report.md``
summarise the run. Gates are evaluated last; failures raise :class:`GateFailure` (exit 4) after
everything is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from edgecompress.compress.checkpoint import ModelBundle, load_checkpoint
from edgecompress.compress.data import Splits, image_shape, load_data
from edgecompress.compress.errors import ConfigError, GateFailure, UnsupportedError
from edgecompress.compress.recipe import ExportSpec, Recipe, resolved_dict
from edgecompress.compress.regression import REGRESSION_GATES, thin_samples
from edgecompress.compress.stages import StageContext, StageOutput, get_stage
from edgecompress.export.fileio import write_json_atomic

log = logging.getLogger(__name__)


def _write_json(path: Path, data: Any) -> None:
    write_json_atomic(path, data)


def model_hash(bundle: ModelBundle) -> str:
    """Content hash of a model's weights (and name), for stage cache keys."""
    h = hashlib.sha256(bundle.model_name.encode())
    for k, v in sorted(bundle.module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def load_recipe_model(recipe: Recipe, *, allow_code: bool = False, allow_failed: bool = False) -> ModelBundle:
    """The recipe's starting model (a built-in example is trained once and cached).

    Raises:
        ConfigError: the checkpoint failed its accuracy guard when written (unless ``allow_failed``).
    """
    spec = recipe.model
    if spec.example:
        from edgecompress.compress.examples import example_checkpoint

        path = example_checkpoint(spec.example, seed=recipe.seed)
        return load_checkpoint(path)
    assert spec.checkpoint is not None  # guaranteed by ModelSpec's validator
    from edgecompress.compress.guard import refuse_failed

    bundle = load_checkpoint(
        spec.checkpoint,
        model_factory=spec.factory,
        allow_code=allow_code,
        trust_pickle=spec.trust_pickle,
        input_shape=tuple(spec.input_shape) if spec.input_shape else None,
        inputs=spec.input_specs(),
    )
    refuse_failed(bundle.metadata.get("guard"), f"recipe model checkpoint {spec.checkpoint}", allow_failed=allow_failed)
    return bundle


def _gates_for(recipe: Recipe, target: Any) -> dict[str, float | None]:
    gates = target.budgets.to_dict()
    if target.name in recipe.gates:
        spec = recipe.gates[target.name]
        gates.update({k: getattr(spec, k) for k in spec.model_fields_set})
    return gates


def _measured(gate: str, metrics: dict[str, Any]) -> float | None:
    """The measured value an absolute gate limits (None when not measured)."""
    if gate == "max_size_mb":
        return None if metrics.get("size_bytes") is None else metrics["size_bytes"] / 1e6
    return metrics.get({"max_accuracy_drop": "accuracy_drop", "max_latency_ms": "latency_p50_ms"}.get(gate, ""))


def evaluate_gates(target_name: str, gates: dict[str, float | None], metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Compare measured metrics with gates; one dict per failed (or unmeasurable) gate."""
    failures = []
    for gate, limit in gates.items():
        if limit is None:
            continue
        value = _measured(gate, metrics)
        if value is None:
            failures.append({"target": target_name, "gate": gate, "limit": limit, "value": "not measured", "excess": "-"})
        elif value > limit:
            failures.append({"target": target_name, "gate": gate, "limit": limit, "value": value, "excess": value - limit})
    return failures


def run_stages(recipe: Recipe, bundle: ModelBundle, out: Path, splits: Any, targets: list[Any]) -> tuple[StageOutput, list[dict]]:
    """Apply the recipe's stages in order, reusing finished ones; returns the last output and the lineage."""
    current = StageOutput(bundle=bundle)
    key = model_hash(bundle)
    data_fp = splits.train.fingerprint()
    lineage: list[dict] = []
    for i, (name, cfg) in enumerate(recipe.resolved_stages()):
        spec = get_stage(name)
        stage_dir = out / "stages" / f"{i:02d}-{name}"
        cfg_json = json.dumps(cfg.model_dump(mode="json"), sort_keys=True)
        key = hashlib.sha256(f"{key}|{name}|{cfg_json}|{data_fp}|{recipe.seed}".encode()).hexdigest()
        done = stage_dir / "done.json"
        if current.bundle is None and spec.consumes == "module":
            raise UnsupportedError(
                f"stage {i} ({name}) needs a PyTorch model, but the stage before it produced an ONNX artifact; "
                f"put {name!r} before ONNX stages such as 'ptq'"
            )
        source = current.bundle if current.bundle is not None else current.artifact
        t0 = time.perf_counter()
        if done.exists() and json.loads(done.read_text()).get("key") == key:
            log.info("stage %s: reusing finished output in %s", name, stage_dir)
            current = spec.load(stage_dir, source, cfg)
            reused = True
        else:
            stage_dir.mkdir(parents=True, exist_ok=True)
            ctx = StageContext(out_dir=stage_dir, splits=splits, targets=targets, seed=recipe.seed, resume=True)
            current = spec.run(source, cfg, ctx)
            _write_json(done, {"key": key, "stage": name, "metrics": current.metrics})
            reused = False
        lineage.append({"stage": name, "config": json.loads(cfg_json), "metrics": current.metrics,
                        "seconds": round(time.perf_counter() - t0, 2), "reused": reused})  # fmt: skip
        if current.bundle is not None:
            current.bundle.metadata.setdefault("stages", [])
            current.bundle.metadata["stages"] = [
                {"stage": r["stage"], "config": r["config"], "metrics": r["metrics"]} for r in lineage
            ]
    return current, lineage


def _device_sessions(e: ExportSpec, art: Any, target: Any) -> list[Any]:
    """The export entry's device (``rpc``/``tracker``), as a session that runs the artifact there."""
    if e.rpc is None and e.tracker is None:
        return []
    from edgecompress.runtimes.tvm_rpc import remote_session

    return [remote_session(art, e.rpc, key=e.key, target=target, tracker=e.tracker)]


def _export_result(recipe: Recipe, e: ExportSpec, art: Any, target: Any, splits: Splits,
                   reference: ModelBundle, baseline_art: Any = None) -> dict[str, Any]:  # fmt: skip
    """Check, profile and gate one exported artifact; the ``results`` row of the summary.

    An artifact this machine cannot run (ARM64 or GPU code) is checked on the export entry's device
    when it names one; otherwise its accuracy and latency gates are listed as pending on the device
    (``pending_gates``), with the command that checks it there, instead of failing as unmeasured.
    ``baseline_art``, the baseline run's artifact of the same row, is timed side by side with ``art``
    (``baseline_latency``), so that a comparison is not a comparison of two machines or two moments.
    """
    from edgecompress.compress.evaluation import check_artifact, profile_side_by_side
    from edgecompress.runtimes import runtime_for

    sessions = _device_sessions(e, art, target)
    metrics: dict[str, Any] = {"size_bytes": art.size_bytes}
    notes = list(art.manifest.extra.get("notes", []))
    if sessions or runtime_for(art).supports(art, target):
        check = check_artifact(art, splits.test, target=target, reference=reference, metric=recipe.metric,
                               sessions=sessions)  # fmt: skip
        metrics.update(metric=check["metric"], accuracy=check["accuracy"], samples=check.get("samples"),
                       reference_accuracy=check.get("reference_accuracy"), accuracy_drop=check.get("accuracy_drop"),
                       top1_agreement=check["rows"][-1].get("top1_agreement"), sqnr_db=check["rows"][-1].get("sqnr_db"))  # fmt: skip
    else:
        notes.append(f"not checked here: {target.name} code runs on the device; check it there with "
                     f"compress check {art.path} --data D --rpc HOST:PORT --key K")  # fmt: skip
    side: dict[str, Any] | None = None
    if target.is_host:
        arts = [art] if baseline_art is None else [art, baseline_art]
        stats = profile_side_by_side(arts, target=target, batch=int(recipe.profile.get("batch", 1)),
                                     min_runs=int(recipe.profile.get("min_runs", 30)),
                                     min_seconds=float(recipe.profile.get("min_seconds", 2.0)))  # fmt: skip
        lat = stats[0]
        if baseline_art is not None:
            side = {"artifact": str(baseline_art.path), "latency_p50_ms": stats[1].p50_ms,
                    "latency_p90_ms": stats[1].p90_ms, "latency_samples_ms": thin_samples(stats[1].samples_ms),
                    "artifact_hash": baseline_art.hash}  # fmt: skip
        metrics.update(latency_p50_ms=lat.p50_ms, latency_p90_ms=lat.p90_ms, latency_runtime=lat.runtime,
                       latency_threads=lat.threads, latency_runs=lat.runs,
                       latency_samples_ms=thin_samples(lat.samples_ms))  # fmt: skip
    else:
        metrics["latency_note"] = f"not measured: {target.name} is a remote device (use compress profile --rpc)"
    art.update_metrics(**{k: v for k, v in metrics.items() if v is not None and k != "latency_samples_ms"})
    gates = _gates_for(recipe, target)
    absolute = {k: v for k, v in gates.items() if k not in REGRESSION_GATES}
    remote = not target.is_host and not sessions
    pending = [k for k, v in absolute.items() if v is not None and remote and _measured(k, metrics) is None]
    failed = evaluate_gates(target.name, {k: v for k, v in absolute.items() if k not in pending}, metrics)
    return {"target": target.name, "format": e.format, "artifact": str(art.path), "artifact_hash": art.hash,
            "metrics": metrics, "gates": gates, "failed_gates": failed, "pending_gates": pending, "notes": notes,
            **({"baseline_latency": side} if side else {})}  # fmt: skip


def baseline_artifact(base: dict[str, Any], where: str | Path, target: str, fmt: str) -> Any:
    """The baseline run's artifact for ``(target, fmt)`` when it is on this machine and intact, else None.

    It is looked for in the baseline folder (``artifacts/<target>-<format>``, where a restored run keeps
    it) and then at the path the baseline recorded.
    """
    from edgecompress.export import ArtifactError, load_artifact

    row = next((r for r in base.get("results", []) if r["target"] == target and r["format"] == fmt), None)
    if row is None:
        return None
    folder = Path(where) if Path(where).is_dir() else Path(where).parent
    for cand in (folder / "artifacts" / f"{target}-{fmt}", Path(row["artifact"])):
        if (cand / "manifest.json").is_file():
            try:
                return load_artifact(cand)
            except ArtifactError as exc:
                log.warning("baseline artifact %s unusable (%s): comparing with its recorded latency", cand, exc)
    return None


def run_recipe(recipe: Recipe, out: str | Path, *, allow_code: bool = False, allow_failed: bool = False,
               baseline: str | Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Run a recipe into the folder ``out`` and return the summary (also written to summary.json).

    ``baseline`` (a previous run folder or its summary.json) adds ``comparison`` to the summary: each
    result against the baseline's (:func:`compress.regression.compare_runs`), judged by the recipe's
    ``max_*_regression`` gates.

    Raises:
        GateFailure: after writing every output, when a gate failed or a measure regressed beyond its
            gate (exit code 4).
    """
    from edgecompress.compress.api.deploy import export
    from edgecompress.compress.regression import compare_runs, load_run
    from edgecompress.targets import get_target

    out = Path(out)
    base = load_run(baseline) if baseline is not None else None  # a bad baseline fails before any work
    out.mkdir(parents=True, exist_ok=True)
    import yaml

    (out / "recipe.resolved.yaml").write_text(yaml.safe_dump(resolved_dict(recipe), sort_keys=False))
    t_start = time.perf_counter()
    reference = load_recipe_model(recipe, allow_code=allow_code, allow_failed=allow_failed)
    splits = recipe_splits(recipe, reference)
    targets = [get_target(t) for t in recipe.targets]
    final, lineage = run_stages(recipe, reference, out, splits, targets)
    exports = recipe.export or [ExportSpec(format="onnx", target=t.name) for t in targets]
    results = []
    for e in exports:
        target = get_target(e.target)
        source = final.artifact if final.bundle is None or (final.artifact is not None and e.format == "onnx") \
            else final.bundle
        art = export(source, e, workdir=out / "artifacts" / f"{target.name}-{e.format}", allow_failed=allow_failed).artifact
        old = baseline_artifact(base, baseline, target.name, e.format) if base is not None and baseline else None
        results.append(_export_result(recipe, e, art, target, splits, reference, old))
    failures = [f for r in results for f in r["failed_gates"]]
    summary: dict[str, Any] = {
        "recipe": recipe.name,
        "model": reference.model_name,
        "data": recipe.data_label(),
        "samples": splits.usage(),
        "stages": lineage,
        "results": results,
    }
    if base is not None:
        comparison = compare_runs(base, summary)
        summary["comparison"] = {"baseline": str(baseline), "baseline_recipe": base.get("recipe"), **comparison}
        failures += comparison["failures"]
    summary.update(passed=not failures, failures=failures, wall_seconds=round(time.perf_counter() - t_start, 1))
    _write_json(out / "summary.json", summary)
    from edgecompress.compress.report import write_report

    write_report(out)
    if failures:
        raise GateFailure(f"{len(failures)} gate(s) failed; see {out / 'report.md'}", failures,
                          comparison=summary.get("comparison", {}).get("rows"))  # fmt: skip
    return summary


def recipe_splits(recipe: Recipe, reference: ModelBundle) -> Splits:
    """The recipe's data by role (``data`` split four ways, ``calib_data``/``eval_data`` whole),
    checked against the model's inputs."""
    return load_data(recipe.data, calib_data=recipe.calib_data, eval_data=recipe.eval_data, seed=recipe.seed,
                     preprocessing=reference.preprocessing or None,
                     input_shape=image_shape(reference.spec.inputs)).for_model(reference.spec)  # fmt: skip


def check_recipe_inputs(recipe: Recipe) -> None:
    """Cheap up-front checks for --dry-run (the model file exists, the data resolves)."""
    if recipe.model.checkpoint and not Path(recipe.model.checkpoint).is_file():
        raise ConfigError(f"recipe model checkpoint {recipe.model.checkpoint!r} does not exist")
    if recipe.model.example:
        from edgecompress.compress.models import list_models

        if recipe.model.example not in list_models():
            raise ConfigError(f"unknown example model {recipe.model.example!r}; known: {', '.join(list_models())}")
    from edgecompress.compress.data import BUILTIN_DATASETS

    for role, value in (("data", recipe.data), ("calib_data", recipe.calib_data), ("eval_data", recipe.eval_data)):
        if value and value not in BUILTIN_DATASETS and not Path(value).exists():
            raise ConfigError(f"recipe {role} {value!r} is neither a built-in dataset ({', '.join(BUILTIN_DATASETS)}) "
                              "nor an existing path")  # fmt: skip
