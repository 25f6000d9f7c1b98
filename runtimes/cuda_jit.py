"""Compile the CUDA source inside a TVM artifact when it loads on the GPU machine.

A TVM library for a CUDA target that was built on a machine without the CUDA runtime (any CI
machine, this project's build machines) holds its kernels as CUDA C source. TVM's CUDA loader
compiles that source when the library loads, by calling the global function
``tvm_callback_cuda_compile``. TVM's own callback takes the GPU architecture from the current
compilation target, which a runtime-only TVM (the wheel without its compiler library, as on a
device) does not have; this one takes it from the artifact (``sm_90``), or asks the GPU.

``nvcc`` is used when it is on ``PATH``, NVRTC (through ``cuda-bindings``) otherwise;
``TVM_CUDA_COMPILE_MODE=nvcc|nvrtc`` forces one.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

from edgecompress.runtimes.errors import RuntimeUnavailableError

_registered: dict[str, str | None] = {}


def ensure_cuda_runtime() -> None:
    """Load TVM's CUDA runtime library when ``import tvm`` did not (a runtime-only TVM skips it).

    Raises:
        RuntimeUnavailableError: the library is missing or cannot load (e.g. no CUDA driver).
    """
    import tvm_ffi

    if tvm_ffi.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True) is not None:
        return
    from tvm import base
    from tvm_ffi.libinfo import load_lib_ctypes

    runtime_dir = Path(base._LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    try:
        base._LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
            package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL"
        )
    except (OSError, RuntimeError) as exc:
        raise RuntimeUnavailableError(
            f"TVM's CUDA runtime does not load here ({exc}): a CUDA driver and libcudart are needed"
        ) from None


def _device_arch() -> str:
    import tvm

    dev = tvm.cuda(0)
    if not dev.exist:
        raise RuntimeUnavailableError("no CUDA GPU on this machine: a CUDA artifact cannot load here")
    return "sm_" + str(dev.compute_version).replace(".", "")


def compiler_mode() -> str:
    """``nvrtc`` or ``nvcc``: which CUDA compiler this machine can use for the JIT.

    Raises:
        RuntimeUnavailableError: neither is installed (names the packages to install).
    """
    forced = os.environ.get("TVM_CUDA_COMPILE_MODE", "").lower()
    if forced in ("nvrtc", "nvcc"):
        return forced
    if shutil.which("nvcc"):
        return "nvcc"
    if importlib.util.find_spec("cuda") is not None and importlib.util.find_spec("cuda.bindings") is not None:
        return "nvrtc"
    raise RuntimeUnavailableError(
        "this CUDA artifact holds CUDA source to compile on the GPU machine, and neither NVRTC "
        "(pip install cuda-bindings) nor nvcc is installed here"
    )


def compile_with_nvcc(code: str, arch: str) -> bytes:
    """CUDA source -> fatbin for ``arch`` with ``nvcc`` (the flags TVM's own nvcc path uses).

    TVM's helper asks the current compilation target for the architecture even when it is given,
    which a runtime-only TVM cannot answer, hence this direct call.

    Raises:
        RuntimeUnavailableError: nvcc is missing or rejects the source (its message is kept).
    """
    import subprocess
    import tempfile

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeUnavailableError("nvcc is not on PATH: cannot compile this CUDA artifact's kernels")
    sm = arch.removeprefix("sm_").removeprefix("compute_")
    with tempfile.TemporaryDirectory(prefix="edgecompress-cuda-") as tmp:
        src, out = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.fatbin"
        src.write_text(code)
        cmd = [nvcc, "--fatbin", "-O3", f"-gencode=arch=compute_{sm},code=sm_{sm}", "--use_fast_math",
               "--expt-relaxed-constexpr", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
               "-o", str(out), str(src)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            errors = [ln for ln in proc.stderr.splitlines() if "error" in ln] or proc.stderr.splitlines()
            raise RuntimeUnavailableError(f"nvcc could not compile the kernels for {arch}: " + "\n".join(errors[:10]))
        return out.read_bytes()


def register_cuda_jit(arch: str | None, *, load_runtime: bool = True) -> None:
    """Register ``tvm_callback_cuda_compile`` for ``arch`` (e.g. ``sm_90``; None: the GPU's own).

    Idempotent; a later call with another architecture replaces the callback. ``load_runtime``
    also loads TVM's CUDA runtime library; a process that forks workers (the RPC server) must
    not, since CUDA does not survive a fork: its workers load the library themselves.
    """
    if load_runtime:
        ensure_cuda_runtime()
    if _registered.get("arch", "unset") == arch:
        return
    import tvm_ffi
    from tvm.support import nvcc  # registers TVM's own callback on import: replaced just below

    def compile_source(code: str, *_: Any) -> bytes:
        mode = compiler_mode()
        target_arch = arch or _device_arch()
        if mode == "nvcc":
            return compile_with_nvcc(code, target_arch)
        return bytes(nvcc.compile_cuda(code, target_format="cubin", arch=target_arch, compiler="nvrtc"))

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_source, override=True)
    _registered["arch"] = arch


_WRAPPER = """#!{python}
# Written by edgecompress: starts TVM's RPC server (and each of its worker processes) with the
# CUDA JIT registered, so CUDA artifacts built without the CUDA runtime load on this GPU.
import runpy, sys
sys.path[:0] = {paths!r}
from edgecompress.runtimes import cuda_jit
cuda_jit.register_cuda_jit(None, load_runtime=False)
sys.executable = {wrapper!r}
flag, what, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
if flag == "-m":
    if what == "tvm.exec.rpc_server":
        # CUDA does not survive a fork: spawn session workers, each loading the CUDA runtime.
        rest += ["--no-fork"] + (["--load-library", {cuda_lib!r}] if {cuda_lib!r} else [])
    sys.argv = [what, *rest]
    runpy.run_module(what, run_name="__main__", alter_sys=True)
elif flag == "-c":  # multiprocessing's spawn start
    sys.argv = ["-c", *rest]
    exec(compile(what, "<string>", "exec"), {{"__name__": "__main__"}})
else:
    sys.exit("usage: python-cuda-jit -m MODULE ... | -c CODE ...")
"""


def cuda_driver_present() -> bool:
    """Whether the CUDA driver library loads here (dlopen only: CUDA itself is not initialised)."""
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def write_server_python(folder: Path, python: str) -> Path:
    """Write an executable that runs ``python`` with the CUDA JIT registered (for the RPC server).

    Use it as the server's Python (``DeviceServer(python=...)``): the server, its pool worker and
    every session worker then start through it. Sessions are spawned rather than forked and load
    TVM's CUDA runtime themselves when the CUDA driver is present.
    """
    import tvm
    from tvm import base

    cuda_lib = ""
    if cuda_driver_present():
        cuda_lib = str(Path(base._LOADED_LIBS["tvm_runtime"]._name).resolve().parent / "libtvm_runtime_cuda.so")
    import importlib.util

    spec = importlib.util.find_spec("edgecompress")  # the folder that holds the package, without importing it
    root = str(Path(spec.origin if spec and spec.origin else __file__).resolve().parents[1])
    paths = [root, str(Path(tvm.__file__).resolve().parents[1])]
    wrapper = folder / "python-cuda-jit"
    wrapper.write_text(_WRAPPER.format(python=python, paths=paths, wrapper=str(wrapper), cuda_lib=cuda_lib))
    wrapper.chmod(0o755)
    return wrapper
