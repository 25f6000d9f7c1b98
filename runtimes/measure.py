"""Every timing and every accuracy comparison, the same way for every runtime.

Latency: warm-up runs excluded, then at least ``min_runs`` timed runs and at least
``min_seconds`` of timing; reported as p50/p90/p99 with the runtime, threads and batch size.
Accuracy: top-1 on a labelled split; agreement and SQNR against a reference session.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from export.verify import compare_outputs


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
    x: np.ndarray,
    *,
    warmup: int = 10,
    min_runs: int = 30,
    min_seconds: float = 2.0,
    max_runs: int = 100_000,
) -> LatencyStats:
    """Time ``session.run(x)``.

    Args:
        session: any :class:`runtimes.base.Session`.
        x: the input batch (its first dimension is the batch size).
        warmup: untimed runs first (allocations, lazy initialisation, caches).
        min_runs: at least this many timed runs...
        min_seconds: ...and at least this much timing in total.
        max_runs: a hard cap for very fast models.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    for _ in range(warmup):
        session.run(x)
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_runs and (len(samples) < min_runs or time.perf_counter() - start < min_seconds):
        t = time.perf_counter()
        session.run(x)
        samples.append((time.perf_counter() - t) * 1e3)
    return LatencyStats.from_samples(samples, runtime=session.runtime, threads=session.threads, batch=len(x))


def run_batched(session: Any, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Outputs for all of ``x``, run in batches."""
    return np.concatenate([session.run(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in %."""
    return float(100.0 * np.mean(np.asarray(logits).argmax(1) == labels))


def evaluate(session: Any, dataset: Any, *, batch_size: int = 256, reference: Any = None) -> dict[str, float]:
    """Top-1 accuracy of ``session`` on ``dataset``; with ``reference``, agreement and SQNR too."""
    out = run_batched(session, dataset.x, batch_size)
    result = {"accuracy": top1_accuracy(out, dataset.y), "samples": float(len(dataset))}
    if reference is not None:
        ref = run_batched(reference, dataset.x, batch_size)
        result["reference_accuracy"] = top1_accuracy(ref, dataset.y)
        result.update(compare_outputs(ref, out))
    return result
