"""Where Quantune trials run: in this process, in a local process pool, or on a Ray cluster.

A search submits one trial at a time and waits for whichever finishes first, so a slow trial never
holds the others back and results come back in completion order. The search, not the executor,
decides what a result means (it alone writes the tuning database); an executor only runs
``fn(task)`` somewhere and hands the result back, or a failed :class:`TrialResult` saying why the
worker was lost (:data:`LOST` in its ``extra``), which is never cached as the configuration's fault.
"""

from __future__ import annotations

import itertools
import multiprocessing
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any, Protocol

from edgecompress.compress.ptq.evaluator import LOST, TrialResult

__all__ = ["LOST", "InProcessExecutor", "LocalPoolExecutor", "TrialExecutor", "make_executor"]

TrialFn = Callable[[Any], TrialResult]


class TrialExecutor(Protocol):
    """Runs trials; ``workers`` is how many may be in flight at once.

    ``submit`` returns a ticket; ``wait`` blocks until at least one submitted trial finished (or
    ``timeout`` seconds passed) and returns ``(ticket, result)`` pairs; ``cancel`` drops what is
    still in flight (a time budget that ended); ``close`` releases the workers.
    """

    workers: int
    where: str

    def submit(self, fn: TrialFn, task: Any) -> int: ...

    def wait(self, timeout: float | None = None) -> list[tuple[int, TrialResult]]: ...

    def cancel(self) -> None: ...

    def close(self) -> None: ...


class InProcessExecutor:
    """Trials one after another in this process (the default); ``wait`` runs the oldest one."""

    workers = 1
    where = "this process"

    def __init__(self) -> None:
        self._queue: list[tuple[int, TrialFn, Any]] = []
        self._tickets = itertools.count()

    def submit(self, fn: TrialFn, task: Any) -> int:
        ticket = next(self._tickets)
        self._queue.append((ticket, fn, task))
        return ticket

    def wait(self, timeout: float | None = None) -> list[tuple[int, TrialResult]]:
        if not self._queue:
            return []
        ticket, fn, task = self._queue.pop(0)
        return [(ticket, fn(task))]

    def cancel(self) -> None:
        self._queue.clear()

    def close(self) -> None:
        self._queue.clear()


class LocalPoolExecutor:
    """Trials in a local process pool (``--workers N``); spawned workers so no torch/ORT state is forked."""

    def __init__(self, workers: int):
        self.workers = workers
        self.where = f"a local pool of {workers} processes"
        self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
        self._futures: dict[Future[TrialResult], int] = {}
        self._tickets = itertools.count()

    def submit(self, fn: TrialFn, task: Any) -> int:
        ticket = next(self._tickets)
        self._futures[self._pool.submit(fn, task)] = ticket
        return ticket

    def wait(self, timeout: float | None = None) -> list[tuple[int, TrialResult]]:
        if not self._futures:
            return []
        done, _ = wait(list(self._futures), timeout=timeout, return_when=FIRST_COMPLETED)
        return [(self._futures.pop(f), f.result()) for f in done]

    def cancel(self) -> None:
        for f in self._futures:
            f.cancel()
        self._futures.clear()

    def close(self) -> None:
        self._futures.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)


def make_executor(workers: int = 1, executor: str = "local", address: str | None = None) -> TrialExecutor:
    """The executor a search config asks for.

    Args:
        workers: trials in flight at once (local: pool processes; ray: concurrent tasks, default the
            cluster's CPUs when 0).
        executor: ``local`` (this process, or a process pool when ``workers > 1``) or ``ray``.
        address: with ``ray``, the cluster's ``HOST:PORT`` (default ``RAY_ADDRESS``, else a private
            one-machine cluster bound to localhost).

    Raises:
        MissingExtraError: ``ray`` without the ``cluster`` extra installed (exit 3).
    """
    if executor not in ("local", "ray"):
        from edgecompress.compress.errors import ConfigError

        raise ConfigError(f"unknown executor {executor!r}; valid: local, ray")
    if executor == "ray":
        from edgecompress.compress.cluster import RayTrialExecutor

        return RayTrialExecutor(workers=workers or None, address=address)
    return InProcessExecutor() if workers <= 1 else LocalPoolExecutor(workers)
