"""GPU check: TVM CUDA artifacts and torch eager on a real NVIDIA GPU, plus 2:4 sparse matmul speed.

Two steps, because the GPU machine has no package registry and no TVM compiler:

1. ``python bench/gpu_check.py prepare --dir .gpu`` (here, no GPU needed): exports every built-in
   example model as a TVM artifact for ``cuda-sm90`` (batch 1, untuned: TVM's default GPU
   schedules), copies the trained checkpoints, writes 512 MNIST test digits with labels, and
   gathers what the GPU machine lacks: the ``apache-tvm-ffi`` wheel, the pydantic wheels and
   TVM's *runtime* (the wheel without its 250 MB compiler library: ``tvm.base`` then runs
   runtime-only, which is all a device needs).
2. ``bash .gpu/run.sh`` on the GPU machine (``bench/gpu_device.sh``: installs the carried wheels,
   then ``python bench/gpu_check.py run --dir .gpu --out DIR``): for each model,
   torch eager fp32 on the GPU and the TVM artifact through the Relax VM on the GPU, batch 1:
   median end-to-end latency (host clock, synchronised after every call), the ratio, and the
   accuracy of both on the 512 digits with their top-1 agreement and max abs difference; then
   the same artifact profiled through a TVM RPC server on the GPU machine's loopback (the
   device-side clock) and the 2:4 semi-structured matmul check (``bench/gpu_nm_check.py``).
   Writes ``gpu_check.{json,md}`` into DIR.

The CUDA code in a TVM artifact built on a machine without the CUDA runtime is CUDA C source; the
GPU machine compiles it when the library loads (NVRTC through cuda-bindings, or nvcc), for the
artifact's architecture (:func:`runtimes.cuda_jit.register_cuda_jit`).

onnxruntime on the GPU is not measured: onnxruntime-gpu with the CUDA libraries it needs
(cuDNN alone is hundreds of MB) is far over what can be carried to the GPU machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = ["cnn", "mobilenetv2", "resnet", "squeezenet", "shufflenet", "vit"]
TARGET = "cuda-sm90"
WHEELS = ["apache-tvm-ffi", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "platformdirs", "typer"]


def prepare(folder: Path, models: list[str]) -> int:
    """Build everything the GPU run needs into ``folder`` (artifacts, checkpoints, data, wheels)."""
    import importlib.metadata as md

    import numpy as np

    from edgecompress.compress.cache import cache_dir
    from edgecompress.compress.data import load_splits

    folder.mkdir(parents=True, exist_ok=True)
    compress_cli = str(Path(sys.executable).with_name("compress"))
    for name in models:
        ckpt = cache_dir("examples", "seed0") / f"{name}.pt"
        if not ckpt.is_file():
            subprocess.run([compress_cli, "example", "train", name, "-o", str(ckpt.parent)], check=True)
        shutil.copy2(ckpt, folder / f"{name}.pt")
        art = folder / f"{name}-{TARGET}"
        if not (art / "manifest.json").is_file():
            subprocess.run([compress_cli, "export", str(ckpt), "--format", "tvm", "--target", TARGET, "-o", str(art)],
                           check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    test = load_splits("mnist").test
    np.savez_compressed(folder / "digits.npz", x=test.x[:512].astype(np.float32), y=test.y[:512].astype(np.int64))

    wheels = folder / "whl"
    wheels.mkdir(exist_ok=True)
    pins = [f"{n}=={md.version(n)}" for n in WHEELS]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                    "--platform", "manylinux_2_24_x86_64", "--platform", "manylinux_2_17_x86_64",
                    "--platform", "manylinux2014_x86_64", "-d", str(wheels), *pins], check=True)  # fmt: skip
    import tvm

    tvm_dir = Path(tvm.__file__).parent
    with tarfile.open(folder / "tvm-runtime.tar.gz", "w:gz") as tar:
        tar.add(tvm_dir, arcname="tvm", filter=lambda ti: None if ti.name.endswith(("libtvm_compiler.so", ".pyc")) else ti)
    src = folder / "src"  # the project's code as committed, next to the files it reads
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD", "edgecompress", "compress", "export", "runtimes", "targets",
                              "bench", "pyproject.toml"], check=True, capture_output=True).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    shutil.copy2(ROOT / "bench" / "gpu_device.sh", folder / "run.sh")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    print(f"prepared {folder} ({size / 2**20:.1f} MiB)")
    return 0


def _median_ms(fn: Any, sync: Any, *, warmup: int = 20, runs: int = 200) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _run_model(folder: Path, name: str, x: Any, y: Any) -> dict[str, Any]:
    import numpy as np
    import torch
    import tvm
    from tvm.runtime.vm import VirtualMachine

    from edgecompress.compress.checkpoint import load_checkpoint
    from edgecompress.export.artifact import load_artifact
    from edgecompress.export.tvm.compile import load_params
    from edgecompress.runtimes.cuda_jit import register_cuda_jit

    row: dict[str, Any] = {"model": name}
    bundle = load_checkpoint(folder / f"{name}.pt")
    model = bundle.module.eval().cuda()
    with torch.inference_mode():
        xt = torch.from_numpy(x).cuda()
        torch_logits = torch.cat([model(xt[i : i + 64]) for i in range(0, len(xt), 64)]).cpu().numpy()
        one = xt[:1]
        row["torch_ms"] = _median_ms(lambda: model(one), torch.cuda.synchronize)

    art = load_artifact(folder / f"{name}-{TARGET}")
    extra = art.manifest.extra
    register_cuda_jit(str(extra.get("tvm_target", {}).get("arch", "")) or None)
    t0 = time.perf_counter()
    lib = tvm.runtime.load_module(str(art.model_path))  # CUDA source is compiled here
    dev = tvm.cuda(0)
    vm = VirtualMachine(lib, dev)
    params = [tvm.runtime.tensor(p.numpy(), dev) for p in load_params(Path(art.path) / extra["params_file"])]
    main = vm["main"]
    inp = tvm.runtime.tensor(x[:1], dev)
    main(inp, *params)
    dev.sync()
    row["tvm_load_s"] = round(time.perf_counter() - t0, 2)
    outs = []
    for i in range(len(x)):
        inp.copyfrom(x[i : i + 1])
        out = main(inp, *params)
        outs.append((out.numpy() if hasattr(out, "numpy") else out[0].numpy())[0])
    tvm_logits = np.stack(outs)
    inp.copyfrom(x[:1])
    row["tvm_ms"] = _median_ms(lambda: main(inp, *params), dev.sync)
    evaluator = vm.time_evaluator("main", dev, number=10, repeat=30)
    row["tvm_device_clock_ms"] = statistics.median(evaluator(inp, *params).results) * 1e3
    row["tvm_over_torch"] = row["tvm_ms"] / row["torch_ms"]
    row["torch_acc"] = float((torch_logits.argmax(1) == y).mean() * 100)
    row["tvm_acc"] = float((tvm_logits.argmax(1) == y).mean() * 100)
    row["top1_agreement"] = float((torch_logits.argmax(1) == tvm_logits.argmax(1)).mean() * 100)
    row["max_abs_diff"] = float(np.abs(torch_logits - tvm_logits).max())
    return row


def _rpc_profile(folder: Path, name: str) -> dict[str, Any]:
    """Profile one artifact through ``compress device-server``'s RPC path on the GPU machine's loopback."""
    import tempfile

    from edgecompress.export.artifact import load_artifact
    from edgecompress.runtimes.cuda_jit import write_server_python
    from edgecompress.runtimes.tvm_rpc import DeviceServer, profile_remote
    from edgecompress.targets import get_target

    art = load_artifact(folder / f"{name}-{TARGET}")
    with tempfile.TemporaryDirectory() as tmp:
        python = write_server_python(Path(tmp), sys.executable)  # server + workers with the CUDA JIT
        with DeviceServer(9190, key="gpu", python=str(python)) as srv:
            try:
                stats = profile_remote(art, rpc=srv.address, key="gpu", target=get_target(TARGET), timeout=120)
            except Exception as exc:
                raise RuntimeError(f"{exc}\n--- server log ---\n{srv.output()}") from None
    return {"model": name, "rpc_p50_ms": stats.p50_ms, "rpc_p90_ms": stats.p90_ms, "runs": stats.runs}


def run(folder: Path, out: Path, models: list[str]) -> int:
    """Measure on this machine's GPU; write gpu_check.{json,md} into ``out``."""
    import numpy as np
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: nothing measured")
        return 3
    out.mkdir(parents=True, exist_ok=True)
    data = np.load(folder / "digits.npz")
    x, y = data["x"], data["y"]
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": [],
                              "errors": {}, "rpc": []}  # fmt: skip
    try:
        import tvm

        result["tvm"] = tvm.__version__
    except Exception as exc:  # report and go on to the parts that need no TVM
        result["errors"]["tvm-import"] = repr(exc)[:500]
    for name in models:
        try:
            result["rows"].append(_run_model(folder, name, x, y))
            print(json.dumps(result["rows"][-1]), flush=True)
        except Exception as exc:  # one model's failure must not hide the others
            result["errors"][name] = repr(exc)[-800:]
            print(f"{name}: {exc!r}"[:800], flush=True)
    for name in models[:2]:
        try:
            result["rpc"].append(_rpc_profile(folder, name))
        except Exception as exc:
            result["errors"][f"rpc-{name}"] = str(exc)[-2500:]
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"TVM CUDA (untuned, default GPU schedules) vs torch eager fp32 on {result['device']}, batch 1, "
             f"median of 200 end-to-end calls (synchronised)", "",
             "| model | torch eager ms | TVM ms | TVM/torch | TVM device clock ms | torch acc | TVM acc | "
             "top-1 agree | max abs diff |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['torch_ms']:.3f} | {r['tvm_ms']:.3f} | {r['tvm_over_torch']:.2f}x | "
                     f"{r['tvm_device_clock_ms']:.3f} | {r['torch_acc']:.1f} | {r['tvm_acc']:.1f} | "
                     f"{r['top1_agreement']:.1f} | {r['max_abs_diff']:.2g} |")  # fmt: skip
    for r in result["rpc"]:
        lines.append(f"\nRPC loopback on the GPU machine, {r['model']}: p50 {r['rpc_p50_ms']:.3f} ms, "
                     f"p90 {r['rpc_p90_ms']:.3f} ms ({r['runs']} runs, device clock)")  # fmt: skip
    for k, v in result["errors"].items():
        lines.append(f"\nerror {k}: {v}")
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if result["rows"] and not any(k in models for k in result["errors"]) else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["prepare", "run"])
    ap.add_argument("--dir", type=Path, default=ROOT / ".gpu", help="Folder carried to the GPU machine.")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="Where `run` writes results.")
    ap.add_argument("--models", default=",".join(MODELS))
    args = ap.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    return prepare(args.dir, models) if args.step == "prepare" else run(args.dir, args.out, models)


if __name__ == "__main__":
    raise SystemExit(main())
