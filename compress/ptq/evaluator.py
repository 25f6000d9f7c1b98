"""The trial evaluator: quantize -> run on onnxruntime -> the model's metric on the validation split
(top-1 on labels, or agreement, cosine similarity or SQNR against the fp32 model's outputs).

Quantune (Lee et al., 2022) measures each configuration on the real runtime; every strategy here
shares this evaluator, so strategies differ only in the order they ask. Results are cached in the
tuning database by (model hash, data hash, configuration key), where the data hash also covers the
onnxruntime version: a trial is never paid twice. A
configuration that onnxruntime cannot quantize or run is recorded as a failed trial with its error
and the search goes on; any other exception is a bug and propagates.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgecompress.compress.errors import first_line
from edgecompress.compress.ptq.config import PTQConfig
from edgecompress.compress.ptq.database import StoredTrial, TuningDatabase

log = logging.getLogger(__name__)

#: ``TrialResult.extra`` key set on a trial whose worker was lost (not the configuration's failure: never cached).
LOST = "worker_lost"
#: the configuration key under which the unquantized model's latency is stored
FP32_KEY = "fp32"


@dataclass
class TrialResult:
    """One measured (or cache-hit) configuration.

    Attributes:
        config: the configuration.
        accuracy: the metric's score on the validation samples (top-1 %, agreement %, 100 x cosine, or
            SQNR dB; None when the trial failed).
        sqnr_db: SQNR of every output vs the fp32 model.
        error: why the trial failed (None when it worked).
        seconds: wall time of the trial when it was measured (calibration included when it ran).
        calibration_seconds: what this configuration's calibration pass costs (shared by configs with
            the same calibration key).
        calibrated: whether this trial ran the calibration pass itself.
        cached: served from the tuning database instead of measured now.
        latency_ms: batch-1 median of the quantized model on the target's onnxruntime settings
            (None when latency was not asked for, or the trial failed).
    """

    config: PTQConfig
    accuracy: float | None
    sqnr_db: float | None = None
    error: str | None = None
    seconds: float = 0.0
    calibration_seconds: float = 0.0
    calibrated: bool = False
    cached: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    latency_ms: float | None = None

    @property
    def ok(self) -> bool:
        return self.accuracy is not None

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.config.label(), "config": self.config.canonical(), "key": self.config.key(),
                "accuracy": self.accuracy, "sqnr_db": self.sqnr_db, "error": self.error,
                "seconds": round(self.seconds, 4), "calibration_seconds": round(self.calibration_seconds, 4),
                "calibrated": self.calibrated, "cached": self.cached,
                "latency_ms": None if self.latency_ms is None else round(self.latency_ms, 4)}  # fmt: skip


@dataclass(frozen=True)
class LatencySpec:
    """How trials time their model: the target's onnxruntime providers and threads, batch 1.

    Attributes:
        providers, threads: the session, as the target runs it.
        seconds: timing per model after the warm-up (a screening number: the chosen model is timed
            again side by side with fp32).
        context: what the number depends on (machine, providers, threads, onnxruntime), the key
            of stored latencies.
    """

    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    threads: int = 1
    seconds: float = 0.5
    context: str = ""

    @classmethod
    def for_target(cls, target: Any, *, threads: int | None = None, seconds: float = 0.5) -> LatencySpec:
        import onnxruntime

        from edgecompress.targets.host import detect_host

        host = detect_host()
        providers = tuple(getattr(target, "ort_providers", None) or ("CPUExecutionProvider",))
        n = threads or int(getattr(target, "num_threads", 0) or 0) or host.num_cores
        context = (f"{host.arch}|{host.model or 'unknown cpu'}|{','.join(providers)}|threads={n}"
                   f"|onnxruntime=={onnxruntime.__version__}")  # fmt: skip
        return cls(providers, n, seconds, context)


def time_model(model_path: Path | str, feeds: dict[str, np.ndarray], spec: LatencySpec) -> float:
    """Batch-1 p50 (ms) of an ONNX model on onnxruntime as ``spec`` says (warm-up excluded)."""
    from edgecompress.runtimes.measure import measure_latency
    from edgecompress.runtimes.ort_runtime import OrtSession

    sess = OrtSession(str(model_path), list(spec.providers), spec.threads)
    return measure_latency(sess, feeds, warmup=5, min_runs=20, min_seconds=spec.seconds).p50_ms


@dataclass(frozen=True)
class TrialTask:
    """Everything a worker needs to measure one configuration (picklable for process pools)."""

    prepared: Any  # PreparedModel
    config: PTQConfig
    exclude: tuple[str, ...]
    arrays: Path  # folder with calib.npz, val.npz, val_y.npy (labelled data), fp32_outputs.npz
    calib_cache: Path
    threads: int = 1
    metric: str = "top1"
    latency: LatencySpec | None = None
    module: Any = None  # the fp32 torch model, for brevitas configurations


def quantize_trial_model(task: TrialTask, calib: dict[str, np.ndarray], out: Path) -> dict[str, Any]:
    """Write the quantized model of ``task.config`` to ``out``: onnxruntime's quantizer, on the model as
    given or on the float model brevitas' algorithms made (:mod:`compress.ptq.brevitas_backend`, its
    weights pinned to brevitas' int8 grid); returns the calibration bookkeeping
    (:func:`compress.ptq.ort_backend.quantize_to_file`)."""
    from edgecompress.compress.ptq.ort_backend import quantize_to_file

    if task.config.brevitas == "none":
        return quantize_to_file(task.prepared, task.config, calib, out, task.calib_cache, nodes_to_exclude=list(task.exclude))
    import onnx

    from edgecompress.compress.ptq import brevitas_backend as bb
    from edgecompress.export.spec import ModelSpec

    if task.module is None:
        raise bb.BrevitasError("brevitas configurations need the torch model: give the checkpoint, not an ONNX file")
    t0 = time.perf_counter()
    spec = ModelSpec.from_onnx(onnx.load(str(task.prepared.path), load_external_data=False))
    prepared, stored = bb.brevitas_onnx(task.module, task.config, calib, spec, task.calib_cache.parent / "brevitas")
    overrides = bb.override_options(stored)
    info = quantize_to_file(prepared, task.config, calib, out, task.calib_cache, tensor_overrides=overrides)
    bb.check_pinned_weights(out, prepared.path, overrides)
    return {**info, "calibration_seconds": info["calibration_seconds"] + (time.perf_counter() - t0 - info["quantize_seconds"])}


def _row_digests(feeds: dict[str, np.ndarray]) -> list[bytes]:
    names = sorted(feeds)
    n = len(feeds[names[0]]) if names else 0
    return [hashlib.sha256(b"".join(np.ascontiguousarray(feeds[k][i]).tobytes() for k in names)).digest() for i in range(n)]


def disjoint_validation(calib: dict[str, np.ndarray], val: dict[str, np.ndarray],
                        val_y: np.ndarray | None) -> tuple[dict[str, np.ndarray], np.ndarray | None, int]:  # fmt: skip
    """Validation feeds without the samples that also calibrate (scores on calibration data flatter).

    Returns the kept feeds, their labels and how many samples were dropped.

    Raises:
        DataError: every validation sample is also a calibration sample (the same data given twice).
    """
    seen = set(_row_digests(calib))
    keep = [i for i, d in enumerate(_row_digests(val)) if d not in seen]
    dropped = len(next(iter(val.values()))) - len(keep) if val else 0
    if not dropped:
        return val, val_y, 0
    if not keep:
        from edgecompress.compress.errors import DataError

        raise DataError("every validation sample is also a calibration sample: give separate data for calibration "
                        "and evaluation (--calib-data and --eval-data, or --data with its own splits)")  # fmt: skip
    idx = np.asarray(keep)
    return {k: v[idx] for k, v in val.items()}, None if val_y is None else np.asarray(val_y)[idx], dropped


def save_feeds(path: Path, feeds: dict[str, np.ndarray]) -> None:
    np.savez(path, names=np.array(list(feeds)), **{f"i{k}": feeds[n] for k, n in enumerate(feeds)})  # type: ignore[arg-type]


def load_feeds(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        names = [str(n) for n in z["names"]]
        return {n: z[f"i{k}"] for k, n in enumerate(names)}


def load_outputs(path: Path) -> list[np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return [z[f"o{k}"] for k in range(len(z.files))]


def trial_score(metric: str, outputs: list[np.ndarray], labels: np.ndarray | None, fp32: list[np.ndarray]) -> float:
    """The metric's score of a quantized model's outputs (shared by trials and the sensitivity table)."""
    from edgecompress.runtimes.measure import score

    return score(metric, outputs, labels=labels, reference=fp32)


def run_trial(task: TrialTask) -> TrialResult:
    """Measure one configuration (runs in the calling process or in a pool worker)."""
    from edgecompress.compress.ptq.ort_backend import model_outputs, trial_failure_types
    from edgecompress.export.verify import compare_all_outputs

    calib = load_feeds(task.arrays / "calib.npz")
    val = load_feeds(task.arrays / "val.npz")
    val_y = np.load(task.arrays / "val_y.npy") if (task.arrays / "val_y.npy").is_file() else None
    ref = load_outputs(task.arrays / "fp32_outputs.npz")
    t0 = time.perf_counter()
    info: dict[str, Any] = {"calibration_seconds": 0.0, "calibrated": False}
    with tempfile.TemporaryDirectory(prefix="quantune-") as tmp:
        out = Path(tmp) / "q.onnx"
        try:
            info = quantize_trial_model(task, calib, out)
            outputs = model_outputs(out, val, task.threads)
            latency = None if task.latency is None else time_model(out, load_feeds(task.arrays / "latency.npz"), task.latency)
        except trial_failure_types() as exc:
            msg = f"{type(exc).__name__}: {first_line(exc)}"
            log.info("trial %s failed: %s", task.config.label(), msg)
            return TrialResult(task.config, None, error=msg, seconds=time.perf_counter() - t0,
                               calibration_seconds=info["calibration_seconds"], calibrated=info["calibrated"])  # fmt: skip
    seconds = time.perf_counter() - t0
    if not all(np.all(np.isfinite(o)) for o in outputs):
        return TrialResult(task.config, None, error="non-finite outputs (NaN/inf) from the quantized model",
                           seconds=seconds, calibration_seconds=info["calibration_seconds"],
                           calibrated=info["calibrated"])  # fmt: skip
    acc = trial_score(task.metric, outputs, val_y, ref)
    return TrialResult(task.config, acc, sqnr_db=float(compare_all_outputs(ref, outputs)["sqnr_db"]), seconds=seconds,
                       calibration_seconds=info["calibration_seconds"], calibrated=info["calibrated"],
                       latency_ms=latency)  # fmt: skip


class Evaluator:
    """Measures configurations of one model on one dataset, through the tuning-database cache.

    Args:
        prepared: the pre-processed model (:func:`compress.ptq.ort_backend.prepare_model`).
        calib: calibration feeds ``{input name: array}`` (preprocessed).
        val, val_y: validation feeds and labels (None for unlabelled data).
        metric: what trials score (``top1`` needs labels; the others compare with fp32's outputs).
        database: the tuning database (cache and transfer memory); None keeps results in memory only.
        workdir: where arrays and calibration caches live.
        sensitive_order: weighted nodes, most sensitive first (for ``keep_float='sensitive'``); a
            callable computing it on first need is accepted.
        latency: time every trial (and fp32) this way; None measures accuracy only.
        module: the fp32 torch model (brevitas configurations quantize it); None for ONNX-only input.
    """

    def __init__(
        self,
        prepared: Any,
        calib: dict[str, np.ndarray] | np.ndarray,
        val: dict[str, np.ndarray] | np.ndarray,
        val_y: np.ndarray | None,
        *,
        metric: str = "top1",
        database: TuningDatabase | None,
        workdir: Path,
        sensitive_order: list[str] | Callable[[], list[str]] | None = None,
        threads: int = 1,
        latency: LatencySpec | None = None,
        module: Any = None,
    ):
        from edgecompress.compress.ptq.ort_backend import calibration_samples, feeds_hash, model_outputs
        from edgecompress.export.spec import as_feeds
        from edgecompress.runtimes.measure import check_metric

        calib = as_feeds(calib, prepared.input_names)  # one array is accepted for a one-input model
        val = as_feeds(val, prepared.input_names)
        calibration_samples(calib, 1)  # raises DataError on an empty calibration set
        try:
            check_metric(metric, has_labels=val_y is not None, has_reference=True)
        except ValueError as exc:
            from edgecompress.compress.errors import DataError

            raise DataError(str(exc)) from None
        self.metric = metric
        self.prepared = prepared
        self.database = database
        self.workdir = Path(workdir)
        self.arrays = self.workdir / "arrays"
        self.arrays.mkdir(parents=True, exist_ok=True)
        self.calib_cache = self.workdir / "calibration"
        self.threads = threads
        self._layer_sources: dict[str, list[str] | Callable[[], list[str]] | None] = {"sensitive": sensitive_order}
        save_feeds(self.arrays / "calib.npz", calib)
        save_feeds(self.arrays / "val.npz", val)
        (self.arrays / "val_y.npy").unlink(missing_ok=True)
        if val_y is not None:
            np.save(self.arrays / "val_y.npy", np.asarray(val_y, dtype=np.int64))
        import onnxruntime

        # The cache key's data part also names the onnxruntime version: a quantizer upgrade may change
        # results (or fix a failure), so trials measured with another version are not reused.
        # The metric is part of it too: a trial's stored "accuracy" is the metric's score.
        h = hashlib.sha256(f"onnxruntime=={onnxruntime.__version__}|metric={metric}".encode())
        for part in (feeds_hash(calib), feeds_hash(val)):
            h.update(part.encode())
        if val_y is not None:
            h.update(np.ascontiguousarray(val_y).tobytes())
        self.data_hash = h.hexdigest()
        self.val_y = val_y
        self.fp32_outputs = model_outputs(prepared.path, val, threads)
        np.savez(self.arrays / "fp32_outputs.npz", **{f"o{k}": o for k, o in enumerate(self.fp32_outputs)})  # type: ignore[arg-type]
        self.fp32_accuracy = trial_score(metric, self.fp32_outputs, val_y, self.fp32_outputs)
        self.latency = latency
        self.module = module
        self.fp32_latency_ms: float | None = None
        if latency is not None:
            from edgecompress.export.spec import slice_feeds

            one = slice_feeds(val, 0, 1)
            save_feeds(self.arrays / "latency.npz", one)
            self.fp32_latency_ms = self._stored_latency(FP32_KEY)
            if self.fp32_latency_ms is None:
                self.fp32_latency_ms = time_model(prepared.path, one, latency)
                if self.database is not None:
                    self.database.put_latency(prepared.model_hash, FP32_KEY, latency.context, self.fp32_latency_ms)
        self._memory: dict[str, TrialResult] = {}
        self._same_model: dict[str, TrialResult] = {}  # model signature -> the first result measured for it
        self.measured = 0

    #: what each layer-list kind of ``keep_float`` is computed from (named when it is missing)
    LAYER_SOURCES = {"sensitive": "a layer sensitivity ranking", "slow": "the per-layer int8/float timing"}

    def set_sensitivity_source(self, source: list[str] | Callable[[], list[str]] | None) -> None:
        """The weighted-node ranking (most sensitive first) or a callable computing it on first need."""
        self._layer_sources["sensitive"] = source

    def set_slow_source(self, source: list[str] | Callable[[], list[str]] | None) -> None:
        """The layers slower in int8 than in float (``keep_float='slow'``), or a callable timing them on
        first need (:func:`compress.ptq.layer_speed.slow_layers`)."""
        self._layer_sources["slow"] = source

    def layers_for(self, kind: str) -> list[str]:
        """The layer list of ``keep_float=kind`` (``sensitive``: most sensitive first; ``slow``), computed
        on first need.

        Raises:
            ConfigError: no source was given for it.
        """
        source = self._layer_sources.get(kind)
        if callable(source):
            source = self._layer_sources[kind] = source()
        if source is None:
            from edgecompress.compress.errors import ConfigError

            raise ConfigError(f"keep_float={kind!r} needs {self.LAYER_SOURCES[kind]}; none was given")
        return list(source)

    def task(self, config: PTQConfig) -> TrialTask:
        from edgecompress.compress.ptq.ort_backend import excluded_nodes

        order = self.layers_for("sensitive") if config.keep_float == "sensitive" else None
        slow = self.layers_for("slow") if config.keep_float == "slow" else None
        exclude = tuple(excluded_nodes(self.prepared, config, order, slow))
        return TrialTask(self.prepared, config, exclude, self.arrays, self.calib_cache, self.threads, self.metric,
                         self.latency, self.module if config.brevitas != "none" else None)  # fmt: skip

    def lookup(self, config: PTQConfig) -> TrialResult | None:
        """The result of ``config`` if it was measured: in this run, in the tuning database, or as a
        configuration that builds the same model (e.g. ``keep_float='slow'`` when no layer is slower in
        int8 is ``keep_float='none'``), which is returned as a cache hit for ``config``."""
        key = config.key()
        if key in self._memory:
            return self._memory[key]
        row = None if self.database is None else self.database.get_trial(self.prepared.model_hash, self.data_hash, key)
        if row is None:
            twin = self._same_model.get(self._model_signature(config))
            if twin is None or twin.extra.get(LOST):
                return None
            return TrialResult(config, twin.accuracy, twin.sqnr_db, twin.error, twin.seconds, twin.calibration_seconds,
                               twin.calibrated, cached=True, extra={"same_model_as": twin.config.label()},
                               latency_ms=twin.latency_ms)  # fmt: skip
        latency = None
        if self.latency is not None and row.accuracy is not None:
            latency = self._stored_latency(key)
            if latency is None:  # measured before without timing (or on another machine): measure again
                return None
        hit = TrialResult(config, row.accuracy, row.sqnr_db, row.error, row.seconds, row.calibration_seconds,
                          row.calibrated, cached=True, latency_ms=latency)  # fmt: skip
        if config.keep_float not in self._layer_sources or not callable(self._layer_sources[config.keep_float]):
            self._same_model.setdefault(self._model_signature(config), hit)  # (its float layers are known: cheap)
        return hit

    def _stored_latency(self, key: str) -> float | None:
        if self.database is None or self.latency is None:
            return None
        return self.database.get_latency(self.prepared.model_hash, key, self.latency.context)

    #: what measures a task (the executors call it wherever they run trials)
    trial_fn = staticmethod(run_trial)

    def evaluate_many(self, configs: Iterable[PTQConfig]) -> list[TrialResult]:
        """Results for ``configs`` in order, in this process: cache hits at once, the rest measured."""
        out = []
        for c in configs:
            hit = self.lookup(c)
            if hit is None:
                hit = run_trial(self.task(c))
                self.record(c, hit)
            out.append(hit)
        return out

    def evaluate(self, config: PTQConfig) -> TrialResult:
        return self.evaluate_many([config])[0]

    def _model_signature(self, config: PTQConfig) -> str:
        """What the quantized model depends on: the configuration with its float layers as the node list."""
        import json

        d = config.canonical()
        for name in ("keep_float", "keep_float_k", "exclude_nodes"):
            d.pop(name, None)
        d["float_nodes"] = sorted(self.task(config).exclude)
        return json.dumps(d, sort_keys=True)

    def record(self, config: PTQConfig, r: TrialResult) -> None:
        """Keep a measured result: in memory, and in the tuning database unless its worker was lost."""
        self.measured += 1
        self._memory[config.key()] = r
        self._same_model.setdefault(self._model_signature(config), r)
        if self.database is None or r.extra.get(LOST):
            return
        self.database.put_trial(StoredTrial(
            self.prepared.model_hash, self.data_hash, config.key(), config.canonical(), r.accuracy,
            self.fp32_accuracy, r.sqnr_db, r.error, r.seconds, r.calibration_seconds, r.calibrated,
        ))  # fmt: skip
        if r.latency_ms is not None and self.latency is not None:
            self.database.put_latency(self.prepared.model_hash, config.key(), self.latency.context, r.latency_ms)
