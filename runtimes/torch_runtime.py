"""torch eager: the reference every other runtime is compared with."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np


class TorchSession:
    """Runs an ``nn.Module`` in eval mode without gradients."""

    runtime = "torch"

    def __init__(self, module: Any, threads: int = 0):
        import torch

        self.module = module
        with contextlib.suppress(NotImplementedError):  # torch.export program modules are already in eval mode
            module.eval()
        self.threads = threads or torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)

    def run(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()

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
