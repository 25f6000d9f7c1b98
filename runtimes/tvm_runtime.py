"""TVM runtime: run a TVM artifact's compiled library through the Relax virtual machine.

The library takes ``main(input, *params)`` with a static batch (recorded as ``extra.batch``);
larger batches are run in chunks and a short last chunk is padded, so any batch size works.
Remote devices are in :mod:`runtimes.tvm_rpc`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from runtimes.errors import RuntimeExecutionError, RuntimeUnavailableError

log = logging.getLogger(__name__)


class TvmSession:
    """A loaded TVM library and its parameters on a device (local or remote), run by the Relax VM."""

    runtime = "tvm"

    def __init__(self, vm: Any, dev: Any, params: list[Any], *, batch: int, threads: int, where: str = "local",
                 keepalive: Any = None):  # fmt: skip
        self._vm = vm
        self._dev = dev
        self._params = params
        self._keepalive = keepalive  # an RPC session must outlive the objects it holds
        self._input: Any = None  # the input tensor on the device, reused run to run
        self._main: Any = None
        self._host_view: np.ndarray | None = None  # a numpy view of ``_input`` (local CPU only)
        self.batch = batch
        self.threads = threads
        self.where = where

    def _tensor(self, x: np.ndarray) -> Any:
        import tvm

        return tvm.runtime.tensor(np.ascontiguousarray(x, dtype=np.float32), self._dev)

    def run(self, x: np.ndarray) -> np.ndarray:
        """Outputs for a batch ``x`` of any size (chunks of the compiled batch)."""
        x = np.asarray(x, dtype=np.float32)
        if len(x) == self.batch:  # the common case: no chunking, no copies
            return self._call(x)
        outs = []
        for i in range(0, len(x), self.batch):
            chunk = x[i : i + self.batch]
            n = len(chunk)
            if n < self.batch:  # pad the last chunk: the library has a static batch
                chunk = np.concatenate([chunk, np.zeros((self.batch - n, *chunk.shape[1:]), np.float32)])
            outs.append(self._call(chunk)[:n])
        return np.concatenate(outs) if outs else np.zeros((0,), np.float32)

    def _call(self, chunk: np.ndarray) -> np.ndarray:
        if self._input is None:
            self._input = self._tensor(chunk)
            self._main = self._vm["main"]
            self._host_view = self._numpy_view(self._input)
        elif self._host_view is not None:
            self._host_view[...] = chunk  # writes into the VM's input tensor: no FFI copy call
        else:
            self._input.copyfrom(np.ascontiguousarray(chunk, dtype=np.float32))
        out = self._main(self._input, *self._params)
        out = out if hasattr(out, "numpy") else out[0]
        if self._host_view is not None:
            # DLPack: ~1.5 us instead of ~15 us for .numpy() on a small output (the copy is needed:
            # the VM reuses the output's memory on the next call).
            return np.array(np.from_dlpack(out), copy=True)
        return out.numpy()

    def _numpy_view(self, tensor: Any) -> np.ndarray | None:
        """A writable numpy view of a tensor in this process's CPU memory (None for remote/GPU)."""
        if self.where != "local" or int(self._dev.dlpack_device_type()) != 1:  # 1: kDLCPU
            return None
        try:
            view = np.from_dlpack(tensor)
        except (TypeError, BufferError, RuntimeError):  # an older numpy or a non-CPU tensor
            return None
        return view if view.flags.writeable else None

    def time_evaluator(self, x: np.ndarray, *, number: int, repeat: int, min_repeat_ms: int = 0) -> list[float]:
        """TVM's ``time_evaluator`` on the device itself: seconds per call for each repeat."""
        f = self._vm.time_evaluator("main", self._dev, number=number, repeat=repeat, min_repeat_ms=min_repeat_ms)
        return [float(r) for r in f(self._tensor(x[: self.batch]), *self._params).results]

    def close(self) -> None:
        self._vm = None
        self._main = None
        self._input = None
        self._host_view = None
        self._params = []
        self._keepalive = None


def _device(kind: str, index: int = 0, remote: Any = None) -> Any:
    import tvm

    if remote is not None:
        return remote.device(kind, index)
    return tvm.runtime.device(kind, index)


def open_vm(lib: Any, dev: Any) -> Any:
    """The Relax VM from TVM's runtime package: works with a runtime-only TVM (no compiler library)."""
    from tvm.runtime.vm import VirtualMachine

    return VirtualMachine(lib, dev)


class TvmRuntime:
    """Runs ``tvm`` artifacts on this machine: host CPU libraries, or CUDA/OpenCL where present."""

    name = "tvm"

    def is_available(self) -> bool:
        return importlib.util.find_spec("tvm") is not None

    def supports(self, artifact: Any, target: Any = None) -> bool:
        if not artifact.manifest.format.startswith("tvm"):
            return False
        extra = artifact.manifest.extra
        if extra.get("library") != "so":
            return False
        device = extra.get("device", "cpu")
        if device == "cpu":
            from targets import runs_on_host

            return runs_on_host(str((extra.get("tvm_target") or {}).get("mtriple", "")))
        return self._device_present(device)

    @staticmethod
    def _device_present(device: str) -> bool:
        try:
            if device == "cuda":
                from runtimes.cuda_jit import ensure_cuda_runtime

                ensure_cuda_runtime()  # a runtime-only TVM does not load it by itself
            return bool(_device(device).exist)
        except Exception:  # the runtime was built without this device API
            return False

    def prepare(self, artifact: Any, target: Any = None, *, threads: int | None = None) -> TvmSession:
        """Load the artifact's library and parameters on this machine.

        Raises:
            RuntimeUnavailableError: the library is for another CPU or a device that is not here
                (profile it on the device with ``--rpc``).
            RuntimeExecutionError: the library does not load.
        """
        if not self.supports(artifact, target):
            extra = artifact.manifest.extra
            where = (extra.get("tvm_target") or {}).get("mtriple") or extra.get("device")
            raise RuntimeUnavailableError(
                f"the TVM artifact {artifact.path} is a {extra.get('library')} library for {where!r} "
                f"({extra.get('device', 'cpu')}); it does not run on this machine: profile or check it on the "
                "device with --rpc host:port --key K"
            )
        import tvm

        from export.tvm.compile import load_params

        n = threads or (getattr(target, "num_threads", 0) if target is not None and not target.is_host else 0)
        if n:
            os.environ["TVM_NUM_THREADS"] = str(n)  # read when the thread pool starts
        extra = artifact.manifest.extra
        dev = _device(extra.get("device", "cpu"))
        if extra.get("device") == "cuda":  # kernels built without the CUDA runtime are compiled now
            from runtimes.cuda_jit import register_cuda_jit

            register_cuda_jit(str((extra.get("tvm_target") or {}).get("arch") or "") or None)
        try:
            lib = tvm.runtime.load_module(str(artifact.model_path))
            vm = open_vm(lib, dev)
            params = [tvm.runtime.tensor(p.numpy(), dev) for p in load_params(Path(artifact.path) / extra["params_file"])]
        except RuntimeError as exc:  # TVM errors (tvm.error.*) derive from RuntimeError
            raise RuntimeExecutionError(f"TVM cannot load {artifact.model_path}: {exc}") from None
        used = n or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
        return TvmSession(vm, dev, params, batch=int(extra.get("batch", 1)), threads=used)
