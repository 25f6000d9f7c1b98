"""After the search: build the chosen model, time it side by side with fp32, and say what was returned.

Trial latencies are screening numbers (short, one model at a time, possibly beside other trials);
the returned model is timed again here interleaved with the fp32 model in one run
(:func:`runtimes.measure.measure_interleaved`, batch 1, the target's providers and threads). Under
the ``latency`` and ``pareto`` objectives a quantized model that is not faster side by side gives
way to fp32, with the reason; under ``accuracy`` it is kept and the slowdown is said.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgecompress.compress.ptq.config import PTQConfig, QuantuneSearchConfig
from edgecompress.compress.ptq.evaluator import (
    Evaluator,
    LatencySpec,
    TrialResult,
    load_feeds,
    quantize_trial_model,
)
from edgecompress.compress.ptq.objective import Choice

#: trials score top-1 style metrics in whole samples; a threshold under this many is noise
MIN_SAMPLES_IN_THRESHOLD = 3


@dataclass
class Final:
    """The returned model and what the output says about it (``trial`` None: the fp32 model)."""

    trial: TrialResult | None
    model: Any
    reason: str
    float_nodes: list[str] = field(default_factory=list)
    latency_ms: float | None = None
    fp32_latency_ms: float | None = None
    front: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    timing: str = ""

    def metrics(self, objective: str, max_drop: float) -> dict[str, Any]:
        ratio = None
        if self.latency_ms and self.fp32_latency_ms:
            ratio = round(self.fp32_latency_ms / self.latency_ms, 3)
        return {"objective": objective, "max_drop": max_drop, "chosen": "fp32" if self.trial is None else self.trial.config.label(),
                "reason": self.reason, "latency_ms": _r(self.latency_ms), "fp32_latency_ms": _r(self.fp32_latency_ms),
                "speedup_vs_fp32": ratio, "latency_timing": self.timing,
                "ptq_algorithms": [] if self.trial is None else ptq_algorithms(self.trial.config, len(self.float_nodes))}  # fmt: skip


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


def ptq_algorithms(config: PTQConfig, float_layers: int = 0) -> list[str]:
    """The post-training steps a configuration applies, in words (for the JSON and the report)."""
    brevitas: list[str] = []
    if config.brevitas != "none":
        names = {"equalize": "cross-layer graph equalization", "bias_correction": "bias correction",
                 "gptq": "GPTQ weight rounding", "gpfq": "GPFQ weight rounding"}  # fmt: skip
        brevitas = [f"brevitas {names[a]}" for a in config.brevitas.split("+")]
    calib = f"{config.calibration} calibration ({config.calib_size} samples"
    calib += f", percentile {config.percentile})" if config.calibration == "percentile" else ")"
    steps = [*brevitas, "onnxruntime quantize_static (QDQ)", calib,
             "per-channel weights" if config.per_channel else "per-tensor weights",
             f"int{config.weight_bits} {'symmetric' if config.weight_symmetric else 'asymmetric'} weights",
             f"int8 {'symmetric' if config.activation_symmetric else 'asymmetric'} activations"]  # fmt: skip
    if config.reduce_range:
        steps.append("7-bit reduced range")
    if float_layers:
        steps.append(f"{float_layers} layer(s) kept in float ({config.keep_float})")
    return steps


def objective_max_drop(config: QuantuneSearchConfig, target: Any) -> float:
    """The accuracy loss the latency objective accepts: the config's, else the target's budget, else 1 point."""
    from edgecompress.compress.guard import DEFAULT_MAX_DROP

    if config.max_drop is not None:
        return float(config.max_drop)
    budget = getattr(getattr(target, "budgets", None), "max_accuracy_drop", None)
    return float(budget if budget is not None else DEFAULT_MAX_DROP)


def resolution_notes(samples: int, max_drop: float, objective: str, metric: str) -> list[str]:
    """Say when the validation set is too small for the comparison the objective makes."""
    if metric not in ("top1", "agreement") or objective == "accuracy" or samples <= 0:
        return []
    step = 100.0 / samples
    if max_drop >= MIN_SAMPLES_IN_THRESHOLD * step:
        return []
    return [f"the validation set has {samples} samples (one sample is {step:.2f} points): the accepted drop of "
            f"{max_drop:g} points is {max_drop / step:.1f} samples, within sampling noise; give more validation data "
            "(--eval-data, --val-samples) or a larger --max-drop"]  # fmt: skip


def side_by_side(paths: list[Path], feeds: dict[str, Any], spec: LatencySpec, seconds: float) -> list[float]:
    """Batch-1 p50 (ms) of each model, measured interleaved in one run with the target's settings."""
    from edgecompress.runtimes.measure import measure_interleaved
    from edgecompress.runtimes.ort_runtime import OrtSession

    sessions = [OrtSession(str(p), list(spec.providers), spec.threads) for p in paths]
    return [s.p50_ms for s in measure_interleaved(sessions, feeds, rounds=4, min_runs=40, min_seconds=seconds)]


def finalize(source_path: Path, prepared: Any, choice: Choice, evaluator: Evaluator, calib: Any,
             config: QuantuneSearchConfig, spec: LatencySpec) -> Final:  # fmt: skip
    """Build the chosen model (or load fp32) and time it beside fp32; see the module docstring."""
    import onnx

    feeds = load_feeds(evaluator.arrays / "latency.npz")
    seconds = max(1.0, 4 * spec.seconds)
    timing = f"side by side with fp32, batch 1, {spec.threads} thread(s), onnxruntime {', '.join(spec.providers)}"
    if choice.trial is None:
        return Final(None, onnx.load(str(source_path)), choice.reason, latency_ms=evaluator.fp32_latency_ms,
                     fp32_latency_ms=evaluator.fp32_latency_ms, front=choice.front, timing="fp32, batch 1")  # fmt: skip
    trial = choice.trial
    with tempfile.TemporaryDirectory(prefix="quantune-final-") as tmp:
        qpath = Path(tmp) / "model.onnx"
        task = evaluator.task(trial.config)
        quantize_trial_model(task, calib, qpath)
        fp32_ms, q_ms = side_by_side([source_path, qpath], feeds, spec, seconds)
        model = onnx.load(str(qpath))
    ratio = fp32_ms / q_ms
    if q_ms < fp32_ms:
        return Final(trial, model, choice.reason, list(task.exclude), q_ms, fp32_ms, choice.front, timing=timing)
    if config.objective == "accuracy":
        note = (f"the returned int8 model is {1 / ratio:.2f}x slower than fp32 side by side ({q_ms:.3f} ms against "
                f"{fp32_ms:.3f} ms): use --objective latency to get the fastest accurate model")  # fmt: skip
        return Final(trial, model, choice.reason, list(task.exclude), q_ms, fp32_ms, choice.front, [note], timing)
    reason = (f"side by side the fastest accurate int8 configuration ({trial.config.label()}) took {q_ms:.3f} ms against "
              f"fp32's {fp32_ms:.3f} ms ({1 / ratio:.2f}x): no quantized model is faster than fp32 here")  # fmt: skip
    return Final(None, onnx.load(str(source_path)), reason, latency_ms=fp32_ms, fp32_latency_ms=fp32_ms,
                 front=choice.front, timing=timing)  # fmt: skip
