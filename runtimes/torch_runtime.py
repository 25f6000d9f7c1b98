"""torch eager: the reference every other runtime is compared with."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import numpy as np


class TorchSession:
    """Runs an ``nn.Module`` in eval mode without gradients, fed by name as its ``spec`` says."""

    runtime = "torch"

    def __init__(self, module: Any, threads: int = 0, spec: Any = None):
        import torch

        from edgecompress.export.spec import ModelSpec

        self.module = module
        with contextlib.suppress(NotImplementedError):  # torch.export program modules are already in eval mode
            module.eval()
        self.threads = threads or torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        self.spec = spec if spec is not None else ModelSpec.single(())
        self.inputs = list(self.spec.inputs)
        self.input_names = self.spec.input_names

    def run_all(self, x: np.ndarray | Mapping[str, np.ndarray]) -> list[np.ndarray]:
        from edgecompress.export.torch_io import run_module

        return run_module(self.module, x, self.spec)

    def run(self, x: np.ndarray | Mapping[str, np.ndarray]) -> np.ndarray:
        return self.run_all(x)[0]

    def close(self) -> None:
        pass


class TorchRuntime:
    name = "torch"

    def is_available(self) -> bool:
        return True

    def supports(self, artifact: Any, target: Any) -> bool:
        return False  # torch runs modules, not artifacts: use TorchSession(module) directly

    def prepare(self, artifact: Any, target: Any = None, *, threads: int | None = None) -> TorchSession:
        raise NotImplementedError("the torch runtime runs nn.Modules: use runtimes.torch_runtime.TorchSession(module)")
