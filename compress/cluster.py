"""Scale-out on a Ray cluster: Quantune trials as Ray tasks, MetaSchedule candidate builds on Ray workers.

Ray (``pip install -e .[cluster]``) is the engine; nothing here schedules, retries or moves data by
hand. :func:`connect` joins the cluster named by ``--ray-address`` (or ``RAY_ADDRESS``), or starts a
private one-machine Ray whose servers all listen on 127.0.0.1 only (Ray binds every interface
otherwise). :class:`RayTrialExecutor` puts the model, calibration and validation arrays into the
object store once; each trial is a task with one CPU that materialises them on its node (once per
node and data) and measures one configuration; a worker lost mid-trial is retried once by Ray and
then comes back as a failed trial naming the reason, never cached. :func:`ray_builder` is a
MetaSchedule builder whose candidates compile on Ray workers while timing stays on the device.

Every node runs the same edgecompress, onnxruntime and TVM as the driver (a trial scored with
another onnxruntime would not mean the same thing): the first result from a node whose versions
differ stops the search with a :class:`ClusterError`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgecompress.compress.errors import CompressError, first_line
from edgecompress.compress.ptq.evaluator import LOST, TrialResult, TrialTask

log = logging.getLogger(__name__)

EXTRA_HINT = "install the cluster extra: pip install -e '.[cluster]' (or pip install 'edgecompress[cluster]')"


class MissingExtraError(CompressError, ImportError):
    """An optional dependency is not installed (exit code 3); the message names the extra."""


class ClusterError(CompressError, ConnectionError):
    """The Ray cluster cannot be reached or its nodes do not match this machine (exit code 3)."""


def import_ray() -> Any:
    """The ``ray`` module, or :class:`MissingExtraError` naming the extra."""
    try:
        import ray
    except ImportError as exc:
        raise MissingExtraError(f"--executor ray needs Ray, which is not installed ({exc}); {EXTRA_HINT}") from None
    return ray


_FLAG = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def connect(address: str | None = None, *, num_cpus: int | None = None) -> tuple[str, bool]:
    """Join a Ray cluster; returns (where, whether this call made the connection: then
    :func:`disconnect` ends it).

    Args:
        address: ``HOST:PORT`` of the cluster's head (GCS); default ``RAY_ADDRESS``; without
            either, a private Ray on this machine, loopback only, with ``num_cpus`` CPUs.

    Raises:
        MissingExtraError: Ray is not installed. ClusterError: the address does not answer.
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    saved_env = os.environ.get(_FLAG)
    if address is None:
        # Ray resolves 127.0.0.1 to the machine's routable address and binds its servers to every
        # interface unless it believes it is alone (its flag for single-machine platforms); the
        # servers it starts now inherit the environment, read when ray is imported.
        os.environ[_FLAG] = "0"
    try:
        ray = import_ray()
        if ray.is_initialized():
            return "the Ray cluster this process is already connected to", False
        quiet = {"log_to_driver": False, "configure_logging": False}
        if address is None:
            from ray._private import ray_constants  # ray may have been imported before: the same flag

            _saved_flag.append(ray_constants.ENABLE_RAY_CLUSTER)
            ray_constants.ENABLE_RAY_CLUSTER = False
            ray.init(num_cpus=num_cpus, include_dashboard=False, **quiet)
            cpus = int(ray.cluster_resources().get("CPU", 0))
            return f"a private Ray on this machine (127.0.0.1, {cpus} CPUs)", True
        try:
            ray.init(address=address, **quiet)
        except (ConnectionError, TimeoutError, ValueError) as exc:
            raise ClusterError(
                f"cannot reach the Ray cluster at {address}: {first_line(exc, 200)}. Start it with "
                "'ray start --head' on the head node and pass its address (HOST:PORT, the GCS port, 6379 by default)"
            ) from None
        nodes, cpus = len(ray.nodes()), int(ray.cluster_resources().get("CPU", 0))
        return f"the Ray cluster at {address} ({nodes} nodes, {cpus} CPUs)", True
    finally:
        if saved_env is None:
            os.environ.pop(_FLAG, None)
        else:
            os.environ[_FLAG] = saved_env


_saved_flag: list[bool] = []


def disconnect() -> None:
    """End the connection :func:`connect` made (a private Ray stops) and restore Ray's address flag."""
    import ray

    ray.shutdown()
    if _saved_flag:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = _saved_flag.pop()


def _versions() -> tuple[str, ...]:
    """What a trial's score depends on besides its inputs (compared between driver and workers)."""
    from importlib.metadata import version

    import onnxruntime

    return (f"onnxruntime {onnxruntime.__version__}", f"edgecompress {version('edgecompress')}")


def _lost_errors(ray: Any) -> tuple[type[BaseException], ...]:
    ex = ray.exceptions
    return tuple(getattr(ex, n) for n in ("WorkerCrashedError", "NodeDiedError", "ObjectLostError", "OwnerDiedError",
                                          "RaySystemError", "LocalRayletDiedError", "TaskUnschedulableError",
                                          "ActorDiedError") if hasattr(ex, n))  # fmt: skip


def _pack(task: TrialTask) -> dict[str, bytes]:
    """The files a trial reads (the model and the arrays), to go to the object store once."""
    files = {"model.onnx": task.prepared.path.read_bytes()}
    files.update({f"arrays/{p.name}": p.read_bytes() for p in sorted(task.arrays.iterdir()) if p.is_file()})
    return files


def _localise(task: TrialTask, files: dict[str, bytes], digest: str) -> TrialTask:
    """The task with its paths pointing at this node's copy of ``files`` (written once per node)."""
    root = Path(tempfile.gettempdir()) / "edgecompress-ray" / digest
    done = root / ".complete"
    if not done.is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".writing-", dir=root.parent))
        for rel, blob in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(blob)
        (tmp / ".complete").touch()
        try:
            tmp.rename(root)  # atomic: a second worker on the node that lost the race uses the winner's copy
        except OSError:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    prepared = dataclasses.replace(task.prepared, path=root / "model.onnx")
    return dataclasses.replace(task, prepared=prepared, arrays=root / "arrays", calib_cache=root / "calibration")


def _trial_on_worker(fn: Callable[[Any], TrialResult], task: Any, files: dict[str, bytes] | None,
                     digest: str) -> tuple[TrialResult, tuple[str, ...]]:  # fmt: skip
    """The Ray task: materialise the data on this node, run ``fn`` and say which versions ran it."""
    if files is not None:
        task = _localise(task, files, digest)
    return fn(task), _versions()


class RayTrialExecutor:
    """Quantune trials as Ray tasks (``--executor ray``); see the module docstring.

    Args:
        workers: trials in flight at once (default: the cluster's CPUs).
        address: the cluster (see :func:`connect`).
    """

    def __init__(self, workers: int | None = None, address: str | None = None):
        self._ray = ray = import_ray()
        self.where, self._owns = connect(address, num_cpus=workers if address is None else None)
        self.workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._remote = ray.remote(_trial_on_worker).options(num_cpus=1, max_retries=1, retry_exceptions=False)
        self._refs: dict[Any, tuple[int, Any]] = {}
        self._shipped: dict[tuple[str, str], tuple[Any, str]] = {}
        self._tickets = itertools.count()
        self._lost = _lost_errors(ray)
        self._versions = _versions()
        log.info("Quantune trials run on %s, %d at a time", self.where, self.workers)

    def _data(self, task: Any) -> tuple[Any, str]:
        if not isinstance(task, TrialTask):
            return None, ""
        key = (str(task.prepared.path), str(task.arrays))
        if key not in self._shipped:
            files = _pack(task)
            h = hashlib.sha256()
            for rel in sorted(files):
                h.update(rel.encode() + b"\0" + hashlib.sha256(files[rel]).digest())
            self._shipped[key] = (self._ray.put(files), h.hexdigest()[:24])
        return self._shipped[key]

    def submit(self, fn: Callable[[Any], TrialResult], task: Any) -> int:
        ticket = next(self._tickets)
        files, digest = self._data(task)
        self._refs[self._remote.remote(fn, task, files, digest)] = (ticket, task)
        return ticket

    def wait(self, timeout: float | None = None) -> list[tuple[int, TrialResult]]:
        if not self._refs:
            return []
        ready, _ = self._ray.wait(list(self._refs), num_returns=1, timeout=timeout)
        if ready:  # and whatever else has finished meanwhile
            ready, _ = self._ray.wait(list(self._refs), num_returns=len(self._refs), timeout=0)
        return [self._result(ref) for ref in ready]

    def _result(self, ref: Any) -> tuple[int, TrialResult]:
        ticket, task = self._refs.pop(ref)
        try:
            result, versions = self._ray.get(ref)
        except self._ray.exceptions.RayTaskError as exc:  # the trial itself raised: a bug, as in process
            raise exc.as_instanceof_cause() from None
        except self._lost as exc:
            reason = first_line(exc, empty=type(exc).__name__)
            config = getattr(task, "config", task)
            log.warning("trial %s lost its worker twice: %s", getattr(config, "label", lambda: config)(), reason)
            return ticket, TrialResult(config, None, error=f"worker lost (retried once): {type(exc).__name__}: {reason}",
                                       extra={LOST: True})  # fmt: skip
        if versions != self._versions:
            raise ClusterError(f"a Ray worker runs {', '.join(versions)} but this machine {', '.join(self._versions)}; "
                               "install the same versions on every node")  # fmt: skip
        return ticket, result

    def cancel(self) -> None:
        for ref in self._refs:
            self._ray.cancel(ref)
        self._refs.clear()

    def close(self) -> None:
        self.cancel()
        if self._owns:
            disconnect()


def _build_on_worker(mod_json: str, target_json: str, package: Callable[[Any], str] | None) -> tuple[str, bytes]:
    """The Ray task of :func:`ray_builder`: compile one candidate, return its file's suffix and bytes."""
    import tvm
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build, default_export

    rt_mod = default_build(tvm.ir.load_json(mod_json), tvm.ir.load_json(target_json), None)
    path = Path((package or default_export)(rt_mod))
    try:
        return path.suffix, path.read_bytes()
    finally:
        import shutil

        shutil.rmtree(path.parent, ignore_errors=True)


class RayBuilds:
    """Compiles MetaSchedule candidates on Ray workers (``--executor ray`` with ``--tune``).

    Given to :func:`export.tvm.tuning.tune` as ``builds``: called with how to package a candidate
    (MetaSchedule's ``.tar`` by default; for a cross target the target's library plan, whose
    compiler the workers must have), it returns a MetaSchedule builder. Each candidate is a Ray
    task (one CPU, retried once if its worker is lost) whose file comes back here, where the runner
    times it on this machine or sends it to the device. A candidate that does not compile is a
    failed trial, as with the local builder.

    Raises:
        MissingExtraError, ClusterError: as :func:`connect`.
    """

    def __init__(self, address: str | None = None):
        self._ray = import_ray()
        self.where, self._owns = connect(address)
        log.info("MetaSchedule candidates build on %s", self.where)

    def __call__(self, package: Callable[[Any], str] | None) -> Any:
        import tvm
        from tvm.ir.utils import derived_object
        from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder

        ray = self._ray
        remote = ray.remote(_build_on_worker).options(num_cpus=1, max_retries=1, retry_exceptions=False)
        lost = _lost_errors(ray)

        @derived_object
        class RayBuilder(PyBuilder):
            def build(self, build_inputs: list[Any]) -> list[Any]:
                refs = [remote.remote(tvm.ir.save_json(bi.mod), tvm.ir.save_json(bi.target), package) for bi in build_inputs]
                results = []
                for ref in refs:
                    try:
                        suffix, blob = ray.get(ref)
                    except ray.exceptions.RayTaskError as exc:  # the schedule does not compile: a failed trial
                        results.append(BuilderResult(None, f"ray build failed: {str(exc.cause)[:500]}"))
                        continue
                    except lost as exc:
                        results.append(BuilderResult(None, f"ray build worker lost (retried once): {type(exc).__name__}"))
                        continue
                    out = Path(tempfile.mkdtemp(prefix="edgecompress-ms-")) / f"candidate{suffix}"
                    out.write_bytes(blob)
                    results.append(BuilderResult(str(out), None))
                return results

        return RayBuilder()

    def close(self) -> None:
        if self._owns:
            disconnect()
