"""Every timing and every accuracy comparison, the same way for every runtime.

Latency: warm-up runs excluded, then at least ``min_runs`` timed runs and at least
``min_seconds`` of timing; reported as p50/p90/p99 with the runtime, threads and batch size.
Accuracy: one metric per model (:data:`METRICS`): top-1 on labels, or top-1 agreement, cosine
similarity or SQNR of the outputs against the fp32 reference session.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from edgecompress.export.spec import Feeds, as_feeds, slice_feeds
from edgecompress.export.spec import batch_size as batch_size_of
from edgecompress.export.verify import (
    compare_all_outputs,
    cosine_similarity,
    sqnr_db,
    top1_accuracy,
    top1_agreement,
)


@dataclass
class LatencyStats:
    """Latency of one model on one runtime, in milliseconds."""

    runtime: str
    threads: int
    batch: int
    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    where: str = "local"
    note: str = ""
    samples_ms: list[float] | None = None

    @classmethod
    def from_samples(cls, samples_ms: list[float] | np.ndarray, **info: Any) -> LatencyStats:
        s = np.asarray(samples_ms, dtype=np.float64)
        return cls(
            runs=len(s),
            p50_ms=float(np.percentile(s, 50)),
            p90_ms=float(np.percentile(s, 90)),
            p99_ms=float(np.percentile(s, 99)),
            mean_ms=float(s.mean()),
            min_ms=float(s.min()),
            samples_ms=[round(float(v), 5) for v in s],
            **info,
        )

    def to_dict(self, with_samples: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_samples:
            d.pop("samples_ms")
        return d


def measure_latency(
    session: Any,
    x: np.ndarray | Mapping[str, np.ndarray],
    *,
    warmup: int = 10,
    min_runs: int = 30,
    min_seconds: float = 2.0,
    max_runs: int = 100_000,
) -> LatencyStats:
    """Time ``session.run(x)``.

    Args:
        session: any :class:`runtimes.base.Session`.
        x: the input batch, one array or feeds ``{input name: array}`` (the first dim is the batch).
        warmup: untimed runs first (allocations, lazy initialisation, caches).
        min_runs: at least this many timed runs...
        min_seconds: ...and at least this much timing in total.
        max_runs: a hard cap for very fast models.
    """
    feeds = session_feeds(session, x)
    for _ in range(warmup):
        session.run(feeds)
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_runs and (len(samples) < min_runs or time.perf_counter() - start < min_seconds):
        t = time.perf_counter()
        session.run(feeds)
        samples.append((time.perf_counter() - t) * 1e3)
    return LatencyStats.from_samples(samples, runtime=session.runtime, threads=session.threads, batch=batch_size_of(feeds))


def measure_interleaved(
    sessions: Sequence[Any],
    x: np.ndarray | Mapping[str, np.ndarray] | Sequence[np.ndarray | Mapping[str, np.ndarray]],
    *,
    rounds: int = 5,
    min_runs: int = 30,
    min_seconds: float = 2.0,
) -> list[LatencyStats]:
    """Latency of several sessions measured side by side: ``rounds`` slices, in alternating order
    (A B, B A, ...) so that drift of the machine and order effects fall on every session alike.

    Each slice is a :func:`measure_latency` call (its own short warm-up, at least ``min_runs / rounds``
    runs and ``min_seconds / rounds`` seconds); each session's samples are merged in run order, so every
    result has at least ``min_runs`` runs and ``min_seconds`` of timing. ``x`` is one input for all
    sessions or a sequence of one input per session.
    """
    per: list[Any] = list(x) if isinstance(x, list | tuple) else [x] * len(sessions)
    samples: list[list[float]] = [[] for _ in sessions]
    order = list(range(len(sessions)))
    for r in range(rounds):
        for i in order if r % 2 == 0 else order[::-1]:
            st = measure_latency(sessions[i], per[i], warmup=3, min_runs=max(1, -(-min_runs // rounds)),
                                 min_seconds=min_seconds / rounds)  # fmt: skip
            samples[i] += st.samples_ms or []
    return [LatencyStats.from_samples(s, runtime=sess.runtime, threads=sess.threads,
                                      batch=batch_size_of(session_feeds(sess, xi)))
            for s, sess, xi in zip(samples, sessions, per, strict=True)]  # fmt: skip


def session_feeds(session: Any, x: np.ndarray | Mapping[str, np.ndarray]) -> Feeds:
    """``x`` as feeds for ``session`` (its ``input_names``; a single array feeds a one-input model)."""
    names = list(getattr(session, "input_names", None) or (list(x) if isinstance(x, Mapping) else ["input"]))
    return as_feeds(x, names)


def run_all_batched(session: Any, x: np.ndarray | Mapping[str, np.ndarray], batch_size: int = 256) -> list[np.ndarray]:
    """Every output for all samples of ``x`` (one array or feeds), run in batches."""
    feeds = session_feeds(session, x)
    n = batch_size_of(feeds)
    parts = [session.run_all(slice_feeds(feeds, i, i + batch_size)) for i in range(0, n, batch_size)]
    if not parts:
        raise ValueError("no samples to run")
    return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]


def run_batched(session: Any, x: np.ndarray | Mapping[str, np.ndarray], batch_size: int = 256) -> np.ndarray:
    """The first output for all samples of ``x``, run in batches."""
    return run_all_batched(session, x, batch_size)[0]


METRICS = ("top1", "agreement", "cosine", "sqnr")
METRIC_UNITS = {"top1": "%", "agreement": "%", "cosine": "% (100 x mean cosine)", "sqnr": "dB"}


def is_logits(output: np.ndarray) -> bool:
    """A classifier's output: ``(N, classes)`` with more than one class."""
    return output.ndim == 2 and output.shape[1] > 1


def default_metric(has_labels: bool, outputs: list[np.ndarray], task: str | None = None) -> str:
    """Labels -> top1; a 2-d logits output -> agreement with fp32; anything else -> cosine.

    ``task`` (recorded with the model) settles a 2-d output that is not logits: ``embedding`` or
    ``other`` -> cosine.
    """
    if task in ("embedding", "other"):
        return "cosine"
    if has_labels and outputs and is_logits(outputs[0]):
        return "top1"
    if outputs and is_logits(outputs[0]):
        return "agreement"
    return "cosine"


def check_metric(metric: str | None, *, has_labels: bool, has_reference: bool) -> None:
    """Raise ValueError when ``metric`` cannot be computed from what is there."""
    if metric is None:
        return
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}")
    if metric == "top1" and not has_labels:
        raise ValueError("metric 'top1' needs labels ('y' in the data); without them use agreement, cosine or sqnr")
    if metric != "top1" and not has_reference:
        raise ValueError(f"metric {metric!r} compares with the fp32 reference, and there is none here")


def score(metric: str, outputs: list[np.ndarray], *, labels: np.ndarray | None = None,
          reference: list[np.ndarray] | None = None) -> float:  # fmt: skip
    """The value of ``metric`` (top-1 %, agreement %, 100 x mean cosine, or SQNR dB)."""
    if metric == "top1":
        if labels is None:
            raise ValueError("metric 'top1' needs labels")
        return top1_accuracy(outputs[0], labels)
    if reference is None:
        raise ValueError(f"metric {metric!r} needs the fp32 reference outputs")
    if metric == "agreement":
        if not is_logits(reference[0]):
            raise ValueError(f"metric 'agreement' needs logits (N, classes); the first output has shape {reference[0].shape}")
        return top1_agreement(reference[0], outputs[0])
    if metric == "cosine":
        return 100.0 * cosine_similarity(reference, outputs)
    if metric == "sqnr":
        return sqnr_db(_flat(reference), _flat(outputs))
    raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}")


def _flat(outputs: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(o, dtype=np.float64).ravel() for o in outputs])


def score_outputs(outputs: list[np.ndarray], labels: np.ndarray | None, reference: list[np.ndarray] | None = None,
                  *, metric: str | None = None, task: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Score a model's ``outputs``: top-1 with ``labels``; with the fp32 ``reference`` outputs,
    agreement, cosine similarity and SQNR of every output against them. ``metric`` (default:
    :func:`default_metric`; top1 without a reference) names the one that gates: its value is
    ``score``; ``task`` informs the default.

    Raises:
        ValueError: the metric cannot be computed from what is given.
    """
    result: dict[str, Any] = {"samples": len(outputs[0])}
    if labels is not None and is_logits(outputs[0]):
        result["accuracy"] = top1_accuracy(outputs[0], labels)
    if reference is not None:
        if labels is not None and is_logits(reference[0]):
            result["reference_accuracy"] = top1_accuracy(reference[0], labels)
        result.update(compare_all_outputs(reference, outputs))
    chosen = metric or (default_metric(labels is not None, reference, task) if reference is not None else "top1")
    if chosen == "top1" and "accuracy" not in result:
        raise ValueError("metric 'top1' needs labels and a logits output (N, classes)")
    if chosen != "top1" and reference is None:
        raise ValueError(f"metric {chosen!r} compares with the fp32 model, and there is no reference here")
    result["metric"] = chosen
    result["score"] = score(chosen, outputs, labels=labels, reference=reference)
    return result


def evaluate(session: Any, dataset: Any, *, batch_size: int = 256, reference: Any = None,
             metric: str | None = None, task: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Run ``session`` (and the ``reference`` session, the fp32 model) on ``dataset`` (``inputs``
    feeds, optional ``y`` labels) and :func:`score_outputs` the result."""
    ref = run_all_batched(reference, dataset.inputs, batch_size) if reference is not None else None
    out = run_all_batched(session, dataset.inputs, batch_size)
    return score_outputs(out, getattr(dataset, "y", None), ref, metric=metric, task=task)
