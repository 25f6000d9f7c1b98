"""Quantune end to end: search a PTQ configuration for an ONNX artifact and write the best one.

Lee et al., "Quantune: Post-training quantization of convolutional neural networks using extreme
gradient boosting for fast deployment" (FGCS 132, 2022). The loop: a strategy proposes
configurations, the evaluator measures them on onnxruntime (through the tuning-database cache),
budgets (trials, wall time, target accuracy) stop it, and the best measured configuration is always
quantized and written, also when the time budget ended the search.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgecompress.compress.errors import GateFailure, UnsupportedError
from edgecompress.compress.progress import progress
from edgecompress.compress.ptq.config import PTQConfig, QuantuneSearchConfig
from edgecompress.compress.ptq.evaluator import (
    LOST,
    Evaluator,
    LatencySpec,
    TrialResult,
    disjoint_validation,
    load_feeds,
)
from edgecompress.compress.ptq.executors import TrialExecutor, make_executor
from edgecompress.compress.ptq.finalize import finalize, objective_max_drop, resolution_notes
from edgecompress.compress.ptq.objective import better, choose, most_accurate
from edgecompress.compress.ptq.strategies import SearchStrategy

log = logging.getLogger(__name__)

# The configuration whose per-layer sensitivity ranks layers for keep_float="sensitive<K>".
SENSITIVITY_REFERENCE = PTQConfig(calibration="minmax", calib_size=100, per_channel=True)


@dataclass
class SearchResult:
    """What a search measured, in order, and why it stopped."""

    strategy: str
    trials: list[TrialResult]
    best: TrialResult | None
    stopped_by: str
    wall_seconds: float
    overhead_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "stopped_by": self.stopped_by, "wall_seconds": round(self.wall_seconds, 3),
                "strategy_overhead_seconds": round(self.overhead_seconds, 3), "trials": [t.to_dict() for t in self.trials],
                "best": None if self.best is None else self.best.to_dict(), **self.extra}  # fmt: skip


def run_search(
    strategy: SearchStrategy,
    evaluator: Evaluator,
    *,
    budget_trials: int | None = None,
    budget_time_s: float | None = None,
    target_accuracy: float | None = None,
    executor: TrialExecutor | None = None,
    clock: Any = time.perf_counter,
) -> SearchResult:
    """Run ``strategy`` until a budget is spent, the target is reached or the space is exhausted.

    Up to ``executor.workers`` trials are in flight at once and each result is recorded (tuning
    database, progress) as soon as it arrives, in completion order. The strategy sees results in
    the order it proposed them and proposal ``k`` is made knowing exactly results ``0..k-workers``,
    so a seeded search proposes the same configurations on any executor with the same number of
    workers, however the cluster schedules them. At least one result always exists: when the time
    budget ends the trials in flight are cancelled once one has finished, and the best measured
    configuration is kept.
    """
    ex = executor or make_executor(1)
    start = clock()
    total = budget_trials or len(strategy.candidates)
    loop = _SearchLoop(strategy, evaluator, ex, budget_trials, target_accuracy)
    with progress(f"{strategy.name} search", min(total, len(strategy.candidates))) as bar:
        while True:
            out_of_time = budget_time_s is not None and clock() - start >= budget_time_s
            if out_of_time and loop.results:
                loop.stop("time budget")
            loop.advance(proposing=not out_of_time or not loop.proposed)
            if loop.stopped_by is not None or not loop.inflight:
                break
            timeout = None if budget_time_s is None else max(0.0, budget_time_s - (clock() - start))
            arrived = loop.collect(timeout if loop.results else None)
            bar.advance(arrived)
    ex.cancel()
    trials = loop.trials()  # in proposal order: among equal scores the earliest wins, whatever finished first
    return SearchResult(strategy.name, trials, most_accurate(trials), loop.stopped_by or "space exhausted", clock() - start,
                        strategy.overhead_seconds)  # fmt: skip


class _SearchLoop:
    """The bookkeeping of :func:`run_search`: proposals in flight, results waiting for their turn."""

    def __init__(self, strategy: SearchStrategy, evaluator: Evaluator, ex: TrialExecutor,
                 budget_trials: int | None, target_accuracy: float | None):  # fmt: skip
        self.strategy, self.evaluator, self.ex = strategy, evaluator, ex
        self.budget_trials, self.target = budget_trials, target_accuracy
        self.proposed: list[PTQConfig] = []  # in proposal order
        self.inflight: dict[int, int] = {}  # executor ticket -> proposal index
        self.results: dict[int, TrialResult] = {}  # proposal index -> result, as they arrive
        self.observed = 0  # results 0..observed-1 were shown to the strategy
        self.best: TrialResult | None = None
        self.stopped_by: str | None = None
        self.exhausted = False

    def stop(self, why: str) -> None:
        if self.stopped_by is None:
            self.stopped_by = why

    def _propose_one(self) -> bool:
        if self.budget_trials is not None and len(self.proposed) >= self.budget_trials:
            return False
        batch = self.strategy.propose(1)
        if not batch:
            self.exhausted = True
            return False
        config = batch[0]
        self.strategy.claim([config])
        k = len(self.proposed)
        self.proposed.append(config)
        hit = self.evaluator.lookup(config)
        if hit is not None:
            self.results[k] = hit
        else:
            self.inflight[self.ex.submit(self.evaluator.trial_fn, self.evaluator.task(config))] = k
        return True

    def advance(self, proposing: bool = True) -> None:
        """Propose while the window has room, showing the strategy each result in proposal order."""
        while self.stopped_by is None:
            window = self.ex.workers
            if proposing and not self.exhausted and len(self.proposed) - self.observed < window and self._propose_one():
                continue
            if self.observed in self.results:
                r = self.results[self.observed]
                self.observed += 1
                self.strategy.observe([r])
                self._consider(r)
                continue
            break
        if self.stopped_by is None and not self.inflight and self.observed == len(self.proposed):
            self.stop("trial budget" if self.budget_trials is not None and len(self.proposed) >= self.budget_trials
                      else "space exhausted")  # fmt: skip

    def _consider(self, r: TrialResult) -> None:
        if better(r, self.best):
            self.best = r
            log.info("%s trial %d: new best %.2f%% with %s", self.strategy.name, len(self.results), r.accuracy,
                     r.config.label())  # fmt: skip
        if self.target is not None and self.best is not None and (self.best.accuracy or 0.0) >= self.target:
            self.stop("target accuracy")

    def collect(self, timeout: float | None) -> int:
        """Wait for trials in flight; record each as it arrives (the driver alone writes the database)."""
        arrived = self.ex.wait(timeout)
        for ticket, r in arrived:
            k = self.inflight.pop(ticket)
            self.evaluator.record(self.proposed[k], r)
            self.results[k] = r
        return len(arrived)

    def trials(self) -> list[TrialResult]:
        """Every finished trial in proposal order (cancelled ones are absent)."""
        return [self.results[k] for k in sorted(self.results)]


def _default_metric(prepared: Any, val: dict[str, Any], has_labels: bool, task: str | None) -> str:
    """top1 with labels, else agreement for a logits output, else cosine (from the fp32 outputs)."""
    from edgecompress.compress.ptq.ort_backend import model_outputs
    from edgecompress.runtimes.measure import default_metric

    head = {k: v[:2] for k, v in val.items()}
    return default_metric(has_labels, model_outputs(prepared.path, head), task)


@dataclass
class QuantuneResult:
    """The outcome of :func:`quantize_artifact`."""

    artifact: Any
    search: SearchResult
    fp32_accuracy: float
    sensitivity: list[dict[str, Any]]
    metrics: dict[str, Any]


def _batch_as_built(model: Any, inputs: list[Any]) -> list[Any]:
    """The inputs with the batch the graph was built for, when it is fixed (a brevitas graph traced
    at batch 1): runtimes then run larger batches in slices."""
    fixed = {}
    for v in model.graph.input:
        dims = v.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            fixed[v.name] = int(dims[0].dim_value)
    return [spec.model_copy(update={"shape": [fixed[spec.name], *spec.shape[1:]]}) if spec.name in fixed and spec.shape
            else spec for spec in inputs]  # fmt: skip


def _sensitivity_ranking(evaluator: Evaluator, calib: Any, val: Any, val_y: Any) -> list[str]:
    from edgecompress.compress.ptq.sensitivity import layer_sensitivity

    cache = evaluator.workdir / f"sensitivity-{evaluator.data_hash[:16]}.json"
    if cache.is_file():
        return list(json.loads(cache.read_text()))
    rows = layer_sensitivity(evaluator.prepared, SENSITIVITY_REFERENCE, calib, val, val_y, evaluator.fp32_outputs,
                             evaluator.calib_cache, threads=evaluator.threads, metric=evaluator.metric)  # fmt: skip
    order = [r["node"] for r in rows]
    cache.write_text(json.dumps(order))
    return order


def _slow_layers(evaluator: Evaluator, calib: Any) -> list[str]:
    """The layers slower in int8 than in float here (cached per model, data and runtime context)."""
    import hashlib
    import tempfile

    from edgecompress.compress.ptq.layer_speed import slow_layers
    from edgecompress.compress.ptq.ort_backend import quantize_to_file
    from edgecompress.export.spec import slice_feeds

    spec = evaluator.latency or LatencySpec(threads=evaluator.threads)
    context = hashlib.sha256(f"{spec.context}|{spec.providers}|{spec.threads}".encode()).hexdigest()[:16]
    cache = evaluator.workdir / f"layer-speed-{evaluator.data_hash[:16]}-{context}.json"
    if cache.is_file():
        return list(json.loads(cache.read_text())["slow"])
    with tempfile.TemporaryDirectory(prefix="quantune-speed-") as tmp:
        int8 = Path(tmp) / "int8.onnx"
        quantize_to_file(evaluator.prepared, SENSITIVITY_REFERENCE, calib, int8, evaluator.calib_cache)
        one = evaluator.arrays / "latency.npz"
        feeds = load_feeds(one) if one.is_file() else slice_feeds(load_feeds(evaluator.arrays / "val.npz"), 0, 1)
        slow, table = slow_layers(evaluator.prepared, int8, feeds, list(spec.providers), spec.threads)
    cache.write_text(json.dumps({"slow": slow, "reference": SENSITIVITY_REFERENCE.label(), "layers": table}))
    return slow


def quantize_artifact(
    source: Any,
    splits: Any,
    config: QuantuneSearchConfig,
    dest: str | Path,
    *,
    target: Any = None,
    exclude_prior_names: set[str] | None = None,
    module: Any = None,
) -> QuantuneResult:
    """Search (or apply) a PTQ configuration for the fp32 ONNX ``source`` artifact and write the best.

    Args:
        source: an fp32 ONNX :class:`export.Artifact`.
        splits: data splits; ``calib`` calibrates, ``val`` (first ``config.val_samples``) scores trials
            with ``config.metric`` (default from the data: top1 with labels, else agreement/cosine).
        config: strategy, space, budgets, executor, database.
        dest: the ``onnx-qdq`` artifact folder to write; it also holds ``trials.json``,
            ``sensitivity.json`` and ``sensitivity.md``.
        target: recorded in the manifest.
        exclude_prior_names: model names left out of the transfer prior (benchmarks' leave-one-out).
        module: the fp32 torch model ``source`` was exported from: the space then also holds brevitas'
            post-training algorithms (``SearchSpace.brevitas``); None (an ONNX-only input) leaves them out.

    Raises:
        ConfigError: an invalid model, space or database. DataError: empty calibration set.
        UnsupportedError: every measured configuration failed.
    """

    from edgecompress.compress.cache import cache_dir
    from edgecompress.compress.ptq.database import TuningDatabase, load_prior
    from edgecompress.compress.ptq.descriptors import model_descriptors
    from edgecompress.compress.ptq.ort_backend import prepare_model
    from edgecompress.compress.ptq.sensitivity import layer_sensitivity, sensitivity_markdown
    from edgecompress.compress.ptq.space import applies_to, enumerate_space
    from edgecompress.compress.ptq.strategies import make_strategy
    from edgecompress.export import StageRecord, write_onnx_artifact

    t0 = time.perf_counter()
    if config.executor == "ray":  # fail before any work when the cluster extra is missing
        from edgecompress.compress.cluster import import_ray

        import_ray()
    prepared = prepare_model(source.model_path, cache_dir("quantune", "models"))
    db = TuningDatabase(config.database)
    name = source.manifest.model_name or Path(source.model_path).stem
    descriptors = model_descriptors(source.model_path)
    db.put_model(prepared.model_hash, name, descriptors)
    inputs = list(source.manifest.inputs)
    val_ds = splits.val.head(config.val_samples)
    nval = len(val_ds)
    calib_x, val_x = splits.calib.feeds(inputs), val_ds.feeds(inputs)
    val_x, val_y, overlap = disjoint_validation(calib_x, val_x, val_ds.y)
    nval -= overlap
    metric = config.metric or _default_metric(prepared, val_x, val_y is not None, source.manifest.extra.get("task"))
    spec = LatencySpec.for_target(target, seconds=config.latency_seconds)
    evaluator = Evaluator(prepared, calib_x, val_x, val_y, database=db, metric=metric, latency=spec, module=module,
                          workdir=cache_dir("quantune", "work", prepared.model_hash[:24]))  # fmt: skip
    evaluator.set_sensitivity_source(lambda: _sensitivity_ranking(evaluator, calib_x, val_x, val_y))
    evaluator.set_slow_source(lambda: _slow_layers(evaluator, calib_x))
    max_drop = objective_max_drop(config, target)
    executor = make_executor(config.workers or (0 if config.executor == "ray" else 1), config.executor, config.ray_address)
    try:
        if config.search == "none":
            from edgecompress.compress.ptq.strategies import GridSearch

            strategy: SearchStrategy = GridSearch([config.config], seed=config.seed)
        else:
            prior = load_prior(db, use_seed=config.use_seed_database, exclude_hashes={prepared.model_hash},
                               exclude_names=exclude_prior_names or set(), latency_context=spec.context)  # fmt: skip
            space = [c for c in enumerate_space(config.resolved_space(), brevitas=module is not None)
                     if applies_to(c, prepared)]  # fmt: skip
            strategy = make_strategy(config.search, space, seed=config.seed,
                                     descriptors=descriptors, fp32_accuracy=evaluator.fp32_accuracy, prior=prior,
                                     rounds=config.xgb_rounds, eta=config.xgb_eta, gamma=config.xgb_gamma,
                                     objective=config.objective, max_drop=max_drop,
                                     fp32_latency_ms=evaluator.fp32_latency_ms, min_score=config.min_sqnr_db)  # fmt: skip
            log.info("%s search: %d configurations, prior of %d trials", config.search, len(strategy.candidates), len(prior))
        result = run_search(strategy, evaluator, budget_trials=config.budget_trials, budget_time_s=config.budget_time_s,
                            target_accuracy=config.target_accuracy, executor=executor)  # fmt: skip
    finally:
        executor.close()
    if config.search == "none":
        result.stopped_by = "fixed config"
    result.extra["prior_trials"] = len(getattr(strategy, "prior", []))
    result.extra["measured_now"] = evaluator.measured
    result.extra["executor"] = {"kind": config.executor, "where": executor.where, "workers": executor.workers}
    best = result.best
    if best is None:
        errors = sorted({t.error or "" for t in result.trials})
        raise UnsupportedError(f"all {len(result.trials)} PTQ trials failed on {name}; errors: {'; '.join(errors)[:500]}")
    if config.search == "none":  # a configuration given as is is applied as is (its latency is still said)
        config = config.model_copy(update={"objective": "accuracy"})
    choice = choose(result.trials, objective=config.objective, fp32_accuracy=evaluator.fp32_accuracy,
                    fp32_latency_ms=evaluator.fp32_latency_ms, max_drop=max_drop,
                    min_score=config.min_sqnr_db if metric == "sqnr" else None)  # fmt: skip
    sens: list[dict[str, Any]] = []
    if config.sensitivity:
        scheme = (choice.trial or best).config  # each layer alone through onnxruntime's quantizer, with this scheme
        scheme = scheme.model_copy(update={"brevitas": "none"}) if scheme.brevitas != "none" else scheme
        sens = layer_sensitivity(prepared, scheme, calib_x, val_x, val_y, evaluator.fp32_outputs,
                                 evaluator.calib_cache, metric=metric)  # fmt: skip
    final = finalize(Path(source.model_path), prepared, choice, evaluator, calib_x, config, spec)
    chosen = final.trial
    if chosen is None and config.require_quantized and config.objective != "accuracy":
        raise GateFailure(f"no quantized model was returned for {name}: {final.reason}. Drop --require-quantized to "
                          "get the fp32 model, or allow more accuracy loss (--max-drop) or trials",
                          failures=[{"target": getattr(target, "name", "-"), "gate": "require_quantized",
                                     "limit": "faster than fp32", "value": final.reason, "excess": None}])  # fmt: skip
    metrics = {
        "metric": metric, "val_accuracy": chosen.accuracy if chosen else evaluator.fp32_accuracy,
        "fp32_val_accuracy": evaluator.fp32_accuracy, "val_samples": nval, "calib_samples": len(splits.calib),
        "val_source": splits.val.name, "calib_source": splits.calib.name,
        "sqnr_db_vs_fp32": chosen.sqnr_db if chosen else None, "trials": len(result.trials),
        "measured_now": evaluator.measured, "stopped_by": result.stopped_by,
        "search_seconds": round(result.wall_seconds, 2), "config": chosen.config.label() if chosen else "fp32",
        "float_nodes": final.float_nodes, "executor": result.extra["executor"],
        "lost_trials": sum(1 for t in result.trials if t.extra.get(LOST)), **final.metrics(config.objective, max_drop),
        "notes": [*resolution_notes(nval, max_drop, config.objective, metric), *final.notes,
                  *([f"{overlap} validation sample(s) also in the calibration set were left out of scoring"] if overlap else [])],
    }  # fmt: skip
    log_json = {"model": name, "model_hash": prepared.model_hash, "data_hash": evaluator.data_hash,
                "fp32_accuracy": evaluator.fp32_accuracy, "fp32_latency_ms": evaluator.fp32_latency_ms,
                "search": config.model_dump(mode="json"), "choice": final.metrics(config.objective, max_drop),
                "pareto_front": final.front, **result.to_dict()}  # fmt: skip
    label = chosen.config.label() if chosen else "fp32"
    files = {
        "trials.json": (json.dumps(log_json, indent=2) + "\n").encode(),
        "sensitivity.json": (json.dumps(sens, indent=2) + "\n").encode(),
        "sensitivity.md": sensitivity_markdown(sens, label).encode(),
    }
    chosen_cfg = chosen.config.canonical() if chosen else "fp32"
    stage = StageRecord(stage="ptq", config={**config.model_dump(mode="json"), "chosen": chosen_cfg},
                        metrics=metrics, seconds=round(time.perf_counter() - t0, 2))  # fmt: skip
    art = write_onnx_artifact(
        final.model, dest, fmt="onnx-qdq" if chosen else "onnx", model_name=name, target=target,
        inputs=_batch_as_built(final.model, list(source.manifest.inputs)), preprocessing=source.manifest.preprocessing,
        stages=[*source.manifest.stages, stage], parent_hash=source.hash, metrics={"ptq": metrics},
        extra={**source.manifest.extra, "ptq_config": chosen_cfg}, extra_files=files,
    )  # fmt: skip
    return QuantuneResult(art, result, evaluator.fp32_accuracy, sens, metrics)


def guard_quantized(result: Any, test: Any, target: Any, reference: Any, *, max_drop: float | None,
                    min_sqnr_db: float | None) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """Score the int8 artifact on the test data against its fp32 source (the ``reference``
    checkpoint, or the ONNX file it came from) with the search's metric, judge it and record the
    verdict in its manifest."""
    from edgecompress.compress.evaluation import check_artifact
    from edgecompress.compress.guard import judge, record

    art = result.artifact
    check = check_artifact(art, test, target=target, reference=reference, metric=result.metrics["metric"])
    verdict = judge(check, target=target, max_drop=max_drop, min_sqnr_db=min_sqnr_db)
    record(art, verdict)
    return check, verdict
