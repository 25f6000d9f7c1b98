"""TVM runtime: run a TVM artifact's compiled library through the Relax virtual machine.

The library takes ``main(input, *params)`` with a static batch (recorded as ``extra.batch``);
larger batches are run in chunks and a short last chunk is padded, so any batch size works.
Remote devices are in :mod:`edgecompress.runtimes.tvm_rpc`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgecompress.runtimes.errors import RuntimeExecutionError, RuntimeUnavailableError

log = logging.getLogger(__name__)


class TvmSession:
    """A loaded TVM library and its parameters on a device (local or remote), run by the Relax VM.

    The library takes ``main(*inputs, *params)`` with a static batch; ``inputs`` are the
    manifest's input specs (names and dtypes, in the library's argument order).
    """

    runtime = "tvm"

    def __init__(self, vm: Any, dev: Any, params: list[Any], *, batch: int, threads: int, where: str = "local",
                 keepalive: Any = None, inputs: list[Any] | None = None):  # fmt: skip
        from edgecompress.export.artifact import TensorSpec
        from edgecompress.export.spec import numpy_dtype

        self._vm = vm
        self._dev = dev
        self._params = params
        self._keepalive = keepalive  # an RPC session must outlive the objects it holds
        self._inputs: list[Any] | None = None  # the input tensors on the device, reused run to run
        self._main: Any = None
        self._host_views: list[np.ndarray | None] = []  # numpy views of ``_inputs`` (local CPU only)
        self.batch = batch
        self.threads = threads
        self.where = where
        self.inputs = list(inputs or [TensorSpec(name="input", shape=[batch])])
        self.input_names = [i.name for i in self.inputs]
        self._dtypes = [numpy_dtype(i.dtype) for i in self.inputs]

    def _tensor(self, x: np.ndarray, dtype: np.dtype) -> Any:
        import tvm

        return tvm.runtime.tensor(np.ascontiguousarray(x, dtype=dtype), self._dev)

    def run_all(self, x: np.ndarray | Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Every output for a batch of any size (chunks of the compiled batch, the last one padded)."""
        from edgecompress.export.spec import as_feeds

        feeds = as_feeds(x, self.input_names)
        arrays = [np.asarray(feeds[n]) for n in self.input_names]
        n = len(arrays[0])
        if n == self.batch:  # the common case: no chunking, no copies
            return self._call(arrays)
        parts: list[list[np.ndarray]] = []
        for i in range(0, n, self.batch):
            chunk = [a[i : i + self.batch] for a in arrays]
            m = len(chunk[0])
            if m < self.batch:  # pad the last chunk: the library has a static batch
                chunk = [np.concatenate([c, np.zeros((self.batch - m, *c.shape[1:]), c.dtype)]) for c in chunk]
            parts.append([o[:m] for o in self._call(chunk)])
        if not parts:
            return [np.zeros((0,), np.float32)]
        return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]

    def run(self, x: np.ndarray | Mapping[str, np.ndarray]) -> np.ndarray:
        """The first output for a batch of any size."""
        return self.run_all(x)[0]

    def _call(self, chunk: list[np.ndarray]) -> list[np.ndarray]:
        if self._inputs is None:
            self._inputs = [self._tensor(c, d) for c, d in zip(chunk, self._dtypes, strict=True)]
            self._main = self._vm["main"]
            self._host_views = [self._numpy_view(t) for t in self._inputs]
        else:
            for tensor, view, c, d in zip(self._inputs, self._host_views, chunk, self._dtypes, strict=True):
                if view is not None:
                    view[...] = c  # writes into the VM's input tensor: no FFI copy call
                else:
                    tensor.copyfrom(np.ascontiguousarray(c, dtype=d))
        out = self._main(*self._inputs, *self._params)
        outs = [out] if hasattr(out, "numpy") else list(out)
        if self._host_views and self._host_views[0] is not None:
            # DLPack: ~1.5 us instead of ~15 us for .numpy() on a small output (the copy is needed:
            # the VM reuses the output's memory on the next call).
            return [np.array(np.from_dlpack(o), copy=True) for o in outs]
        return [o.numpy() for o in outs]

    def _numpy_view(self, tensor: Any) -> np.ndarray | None:
        """A writable numpy view of a tensor in this process's CPU memory (None for remote/GPU)."""
        if self.where != "local" or int(self._dev.dlpack_device_type()) != 1:  # 1: kDLCPU
            return None
        try:
            view = np.from_dlpack(tensor)
        except (TypeError, BufferError, RuntimeError):  # an older numpy or a non-CPU tensor
            return None
        return view if view.flags.writeable else None

    def time_evaluator(self, x: np.ndarray | Mapping[str, np.ndarray], *, number: int, repeat: int,
                       min_repeat_ms: int = 0) -> list[float]:  # fmt: skip
        """TVM's ``time_evaluator`` on the device itself: seconds per call for each repeat."""
        from edgecompress.export.spec import as_feeds

        feeds = as_feeds(x, self.input_names)
        args = [self._tensor(np.asarray(feeds[n])[: self.batch], d) for n, d in zip(self.input_names, self._dtypes, strict=True)]
        f = self._vm.time_evaluator("main", self._dev, number=number, repeat=repeat, min_repeat_ms=min_repeat_ms)
        return [float(r) for r in f(*args, *self._params).results]

    def close(self) -> None:
        self._vm = None
        self._main = None
        self._inputs = None
        self._host_views = []
        self._params = []
        remote, self._keepalive = self._keepalive, None
        if remote is not None:
            # A device server serves one client at a time, and TVM ends an RPC session only when its
            # objects are collected: the VM, module and arrays above form cycles with it, so collect
            # now or the next connection waits (seen: a third session hung 600 s on the emulated device).
            del remote
            import gc

            gc.collect()


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
            from edgecompress.targets import runs_on_host

            return runs_on_host(str((extra.get("tvm_target") or {}).get("mtriple", "")))
        return self._device_present(device)

    @staticmethod
    def _device_present(device: str) -> bool:
        try:
            if device == "cuda":
                from edgecompress.runtimes.cuda_jit import ensure_cuda_runtime

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

        from edgecompress.export.tvm.compile import load_params

        n = threads or (getattr(target, "num_threads", 0) if target is not None and not target.is_host else 0)
        if n:
            os.environ["TVM_NUM_THREADS"] = str(n)  # read when the thread pool starts
        extra = artifact.manifest.extra
        dev = _device(extra.get("device", "cpu"))
        if extra.get("device") == "cuda":  # kernels built without the CUDA runtime are compiled now
            from edgecompress.runtimes.cuda_jit import register_cuda_jit

            register_cuda_jit(str((extra.get("tvm_target") or {}).get("arch") or "") or None)
        try:
            lib = tvm.runtime.load_module(str(artifact.model_path))
            vm = open_vm(lib, dev)
            params = [tvm.runtime.tensor(p.numpy(), dev) for p in load_params(Path(artifact.path) / extra["params_file"])]
        except RuntimeError as exc:  # TVM errors (tvm.error.*) derive from RuntimeError
            raise RuntimeExecutionError(f"TVM cannot load {artifact.model_path}: {exc}") from None
        used = n or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
        return TvmSession(vm, dev, params, batch=int(extra.get("batch", 1)), threads=used,
                          inputs=list(artifact.manifest.inputs))
