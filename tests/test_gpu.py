"""On an NVIDIA GPU: a CUDA artifact built by the toolchain runs on the GPU and matches torch.

Skipped where the CUDA driver is absent (this project's CI machines); run on a lent GPU machine
with ``pytest -m gpu tests/test_gpu.py``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import edgecompress as ec


def _gpu_arch() -> str | None:
    from edgecompress.runtimes.cuda_jit import cuda_driver_present

    if not cuda_driver_present():
        return None
    try:
        cap = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout.split()[0]  # fmt: skip
    except (OSError, subprocess.SubprocessError, IndexError):
        return None
    return "sm" + cap.replace(".", "")


@pytest.mark.gpu
def test_cuda_artifact_runs_on_the_gpu_like_torch(cnn_checkpoint: Path, tmp_path: Path) -> None:
    arch = _gpu_arch()
    if arch is None:
        pytest.skip("no NVIDIA GPU with a CUDA driver here")
    target = "cuda-sm90" if int(arch[2:]) >= 90 else "cuda-sm80"  # the CUDA targets the registry has
    art = ec.export(cnn_checkpoint, format="tvm", target=target, workdir=tmp_path / "cuda").artifact
    report = ec.check(art, data="digits", reference=cnn_checkpoint, target=target).metrics
    (gpu_row,) = [r for r in report["rows"] if not r["runtime"].endswith("(reference)")]
    assert gpu_row["top1_agreement"] >= 99.0 and gpu_row["sqnr_db"] >= 30.0, gpu_row
    stats = ec.profile(art, target=target, min_runs=20, min_seconds=0.5).metrics["stats"]
    assert stats.p50_ms > 0
