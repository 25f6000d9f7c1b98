"""An emulated ARM64 device on this machine: a Debian arm64 root folder run under ``qemu-aarch64-static``.

``make device-emu`` (``tools/device_emu/build.py``) builds the root once into the cache; this module
finds it, checks it is complete, and starts a TVM RPC server inside it
(``compress device-server --emulate arm64``). ``compress profile/check --rpc`` then upload a
cross-compiled ARM64 library to it and run it on real ARM64 code, instruction by instruction:
the *outputs* are those of ARM64 code, while the *latency* is that of qemu translating every
instruction on a shared x86 machine, which says nothing about any real ARM64 device.

No binfmt_misc is needed: every ARM64 program is started as ``qemu-aarch64-static -L ROOT
ROOT/usr/bin/python3``. The TVM RPC server starts its worker with ``sys.executable``, which must
therefore be a host-runnable wrapper too: the root's ``sitecustomize.py`` points it at
:data:`WRAPPER` (a shell script that runs the root's python under qemu).

Layout of a built root::

    ROOT/usr/bin/python3                  Debian's arm64 python (bookworm: 3.11)
    ROOT/opt/edgecompress/site/           arm64 wheels: apache-tvm, numpy, onnxruntime, ...
    ROOT/opt/edgecompress/python          host shell wrapper: qemu + python + PYTHONPATH
    ROOT/opt/edgecompress/ready.json      written last: what was installed (the root is complete)
    ROOT/proc/cpuinfo                     a fake aarch64 cpuinfo (onnxruntime parses it on import)
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgecompress.runtimes.errors import RuntimeExecutionError, RuntimeUnavailableError

#: The architectures that can be emulated (``--emulate`` values), with their qemu program.
QEMU_PROGRAMS = {"arm64": "qemu-aarch64-static"}
#: Paths inside the root (relative).
TOOL_DIR = Path("opt/edgecompress")
SITE = TOOL_DIR / "site"
WRAPPER = TOOL_DIR / "python"
STAMP = TOOL_DIR / "ready.json"
#: Seconds for the emulated server to listen: it listens after about 75 s on a 2-core x86 machine
#: (the server and its worker each import TVM under qemu); the margin is for loaded CI machines.
START_TIMEOUT_S = 600.0
# Runs inside the root: model path and a folder with x.npy in, y.npy out (host paths: qemu -L
# only redirects paths that exist inside the root).
_ORT_RUN = (
    "import sys, numpy as np, onnxruntime as ort; "
    "s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider']); "
    "x = np.load(sys.argv[2] + '/x.npy'); "
    "np.save(sys.argv[2] + '/y.npy', s.run(None, {s.get_inputs()[0].name: x})[0])"
)
EMULATION_WARNING = (
    "this is an EMULATED {arch} device (qemu user mode on this {host} machine): it runs real {arch} "
    "code, so outputs are verified, but its latency is meaningless (qemu translates every instruction: "
    "timings say nothing about a real {arch} device)"
)


def emulator_root(arch: str = "arm64") -> Path:
    """Where the emulated root of ``arch`` lives (built or not).

    ``$EDGECOMPRESS_DEVICE_EMU`` names the root folder itself; otherwise it is
    ``device-emu/<arch>`` in the cache (``$EDGECOMPRESS_CACHE`` or the user cache folder).
    """
    explicit = os.environ.get("EDGECOMPRESS_DEVICE_EMU")
    if explicit:
        return Path(explicit).expanduser()
    cache = os.environ.get("EDGECOMPRESS_CACHE")
    if cache:
        base = Path(cache)
    else:
        from platformdirs import user_cache_dir

        base = Path(user_cache_dir("edgecompress"))
    return base / "device-emu" / arch


def _check_arch(arch: str) -> str:
    if arch not in QEMU_PROGRAMS:
        raise RuntimeUnavailableError(f"cannot emulate {arch!r}; known: {', '.join(sorted(QEMU_PROGRAMS))}")
    return arch


@dataclass(frozen=True)
class EmulatedDevice:
    """A built (or not yet built) emulated root folder for one architecture.

    Example:
        >>> dev = EmulatedDevice.find("arm64").require()  # doctest: +SKIP
        >>> with dev.server(9090, key="emu"):  # doctest: +SKIP
        ...     ...  # compress profile/check ART --rpc 127.0.0.1:9090 --key emu
    """

    root: Path
    arch: str = "arm64"

    @classmethod
    def find(cls, arch: str = "arm64") -> EmulatedDevice:
        """The root of ``arch`` at its usual place (see :func:`emulator_root`)."""
        return cls(emulator_root(_check_arch(arch)), arch)

    @property
    def python(self) -> Path:
        """The host-runnable wrapper that runs the root's python under qemu."""
        return self.root / WRAPPER

    @property
    def site(self) -> Path:
        return self.root / SITE

    @property
    def qemu(self) -> str:
        """The qemu program the wrapper runs (``$EDGECOMPRESS_QEMU`` overrides, as in the wrapper)."""
        return os.environ.get("EDGECOMPRESS_QEMU") or QEMU_PROGRAMS[_check_arch(self.arch)]

    def is_built(self) -> bool:
        """True when the build finished (its stamp is written last, after the self-check)."""
        return (self.root / STAMP).is_file() and self.python.is_file()

    def info(self) -> dict[str, Any]:
        """What the build recorded: package versions, whether onnxruntime imports, build time."""
        try:
            return dict(json.loads((self.root / STAMP).read_text()))
        except (OSError, ValueError):
            return {}

    def require(self) -> EmulatedDevice:
        """This device if it can run here.

        Raises:
            RuntimeUnavailableError: the root is not built, or qemu is not installed (exit code 3).
        """
        if not self.is_built():
            raise RuntimeUnavailableError(
                f"no emulated {self.arch} device at {self.root}: run `make device-emu` first "
                "(it builds the root once, a few minutes, and caches it)"
            )
        if shutil.which(self.qemu) is None:
            raise RuntimeUnavailableError(
                f"{self.qemu} is not installed: run `make device-emu` (or apt-get install qemu-user-static)"
            )
        return self

    def command(self, *args: str) -> list[str]:
        """The host command line that runs the root's python with ``args`` (under qemu)."""
        return [str(self.python), *args]

    def server_env(self) -> dict[str, str]:
        """Environment for the emulated server: nothing of the host's python setup leaks in."""
        # The wrapper sets PYTHONPATH and unsets PYTHONHOME itself; one TVM thread, because a
        # spinning thread pool under qemu on a shared machine only burns the host's cores.
        return {"PYTHONNOUSERSITE": "1", "TVM_NUM_THREADS": "1"}

    def warning(self) -> str:
        from edgecompress.targets import detect_host

        return EMULATION_WARNING.format(arch=self.arch, host=detect_host().arch)

    def run_onnx(self, model: str | Path, x: np.ndarray, *, timeout: float = 600.0) -> np.ndarray:
        """The first output of onnxruntime's arm64 build (CPU provider) for ``x``, run in this root.

        Verifies an ONNX (or ``.ort``) model on ARM64 kernels without a phone; one qemu process per
        call (tens of seconds: python and onnxruntime start under emulation).

        Raises:
            RuntimeUnavailableError: the root is not built or its onnxruntime does not import.
            RuntimeExecutionError: onnxruntime failed on the model, or took over ``timeout`` s.
        """
        import subprocess
        import tempfile

        self.require()
        if not self.info().get("onnxruntime"):
            raise RuntimeUnavailableError(
                f"the emulated {self.arch} root at {self.root} has no working onnxruntime "
                "(rebuild it with `tools/device_emu/build.py --force`)"
            )
        with tempfile.TemporaryDirectory(prefix="edgecompress-emu-") as tmp:
            np.save(Path(tmp) / "x.npy", np.ascontiguousarray(x, dtype=np.float32))
            cmd = self.command("-c", _ORT_RUN, str(Path(model).resolve()), tmp)
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False,
                                      env={**os.environ, **self.server_env()})  # fmt: skip
            except subprocess.TimeoutExpired:
                raise RuntimeExecutionError(f"onnxruntime under qemu took over {timeout:g} s on {model}") from None
            if done.returncode != 0 or not (Path(tmp) / "y.npy").is_file():
                tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
                raise RuntimeExecutionError(
                    f"onnxruntime ({self.arch}, emulated) failed on {model} (exit {done.returncode}): " + " | ".join(tail)
                )
            return np.load(Path(tmp) / "y.npy")

    def server(self, port: int, *, key: str, host: str = "127.0.0.1", tracker: str | None = None) -> Any:
        """A :class:`runtimes.tvm_rpc.DeviceServer` that runs inside this root under qemu (not started).

        Raises:
            RuntimeUnavailableError: as :meth:`require`.
        """
        from edgecompress.runtimes.tvm_rpc import DeviceServer

        self.require()
        return DeviceServer(port, key=key, host=host, tracker=tracker, python=str(self.python),
                            env=self.server_env(), start_timeout=START_TIMEOUT_S)  # fmt: skip
