"""Build the emulated ARM64 device once: a Debian arm64 root with TVM's arm64 wheels, run under qemu.

Run by ``make device-emu``. Steps (each skipped when its result is there):

1. the Debian packages it needs: qemu-user-static, debootstrap, and the aarch64 cross compiler
   that ``compress export --target arm64-linux`` uses to link a ``.so`` (apt-get, as root);
2. ``debootstrap --foreign --arch=arm64 --variant=minbase --include=python3`` into a temporary
   folder. The second stage would run arm64 programs through binfmt_misc, which this kind of
   machine does not have, so every downloaded ``.deb`` is unpacked with ``dpkg -x`` instead;
3. the arm64 wheels (``pip install --target --platform ..._aarch64 --only-binary=:all:``) at the
   versions of constraints.txt, else of this venv, so the device runs the TVM that compiled for it;
4. a host wrapper for the root's python, a ``sitecustomize`` that makes it ``sys.executable``
   (the TVM RPC server starts its worker with it), and a fake aarch64 ``/proc/cpuinfo``;
5. a self-check under qemu (``platform.machine()`` must be aarch64 and tvm must import), then the
   stamp ``ready.json`` and one rename into place: an interrupted build never looks done.

A second run finds the stamp and does nothing (``--force`` rebuilds).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from edgecompress.runtimes.emulator import SITE, STAMP, WRAPPER, EmulatedDevice  # noqa: E402

log = logging.getLogger("device-emu")

SUITE = "bookworm"  # python 3.11, the version of the wheels below and of this project's venv
PYTHON_VERSION = "3.11"
MIRROR = os.environ.get("DEVICE_EMU_MIRROR", "http://deb.debian.org/debian")
#: host program -> Debian package that provides it
HOST_TOOLS = {
    "qemu-aarch64-static": "qemu-user-static",
    "debootstrap": "debootstrap",
    "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu",
    "aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu",
}
#: arm64 wheels for the device: TVM's runtime and RPC server, and onnxruntime (optional).
WHEELS = ["apache-tvm", "apache-tvm-ffi", "numpy", "ml_dtypes", "typing_extensions", "cloudpickle", "tornado",
          "psutil"]  # fmt: skip
ORT_WHEELS = ["onnxruntime", "flatbuffers", "packaging", "protobuf"]

WRAPPER_TEXT = """#!/bin/sh
# Runs this root's arm64 python under qemu user mode (no binfmt_misc needed). Written by
# tools/device_emu/build.py; the root can be moved: paths are found from this script's place.
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
unset PYTHONHOME PYTHONSTARTUP
export PYTHONPATH="$here/site"
export EDGECOMPRESS_EMU_PYTHON="$here/python"
exec "${EDGECOMPRESS_QEMU:-qemu-aarch64-static}" -L "$root" "$root/usr/bin/python3" "$@"
"""

SITECUSTOMIZE_TEXT = '''"""Emulated device: subprocesses of python (TVM's popen worker) start through the qemu wrapper."""
import os
import sys

_wrapper = os.environ.get("EDGECOMPRESS_EMU_PYTHON")
if _wrapper:
    sys.executable = _wrapper
'''

CPUINFO_CORE = """processor\t: {i}
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x3
CPU part\t: 0xd0c
CPU revision\t: 1

"""

SELF_CHECK = (
    "import json, platform, numpy, tvm; print('SELF-CHECK ' + json.dumps({'machine': platform.machine(),"
    " 'python': platform.python_version(), 'tvm': tvm.__version__, 'numpy': numpy.__version__}))"
)
# Separate process: a broken onnxruntime build crashes the interpreter instead of raising.
ORT_CHECK = "import onnxruntime; print('SELF-CHECK ' + onnxruntime.__version__)"


class BuildError(RuntimeError):
    """A build step failed; the message says which and what to do."""


def run(cmd: list[str], *, timeout: float, what: str, env: dict[str, str] | None = None) -> str:
    """Run ``cmd``; its output goes to the log on failure. Raises BuildError naming ``what``."""
    shown = " ".join(cmd[:12]) + (" ..." if len(cmd) > 12 else "")
    log.info("%s: %s", what, shown if len(shown) < 200 else shown[:200] + " ...")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        raise BuildError(f"{what} took over {timeout:g} s; gave up") from None
    except FileNotFoundError as exc:
        raise BuildError(f"{what}: {exc.filename} is not installed") from None
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-25:]
        raise BuildError(f"{what} failed (exit {done.returncode}):\n" + "\n".join(tail))
    return done.stdout


def ensure_host_tools() -> None:
    """Install the Debian packages that provide the missing host programs (needs root and apt-get)."""
    missing = sorted({pkg for prog, pkg in HOST_TOOLS.items() if shutil.which(prog) is None})
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise BuildError(f"missing Debian packages {' '.join(missing)}: run `apt-get install {' '.join(missing)}` "
                         "as root, then `make device-emu` again")  # fmt: skip
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-qq"], timeout=900, what="apt-get update", env=env)
    run(["apt-get", "install", "-y", "-qq", *missing], timeout=1800, what="installing " + " ".join(missing), env=env)


def unpack(deb: Path, root: Path) -> None:
    """``dpkg -x`` that keeps merged /usr: plain ``dpkg-deb -x`` replaces the ``bin -> usr/bin``
    symlinks with folders, so the package's files go through ``tar --keep-directory-symlink``."""
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as deb_tar:
        done = subprocess.run(["tar", "-x", "--keep-directory-symlink", "-C", str(root)], stdin=deb_tar.stdout,
                              capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    if deb_tar.returncode != 0 or done.returncode != 0:
        raise BuildError(f"unpacking {deb.name} failed: {done.stderr.strip()[-500:]}")


def bootstrap(tmp: Path) -> None:
    """Debian arm64 minbase with python3, unpacked without running any arm64 program."""
    if os.geteuid() != 0:
        raise BuildError("debootstrap needs root (it creates device files and sets owners): run as root")
    run(["debootstrap", "--foreign", "--arch=arm64", "--variant=minbase", "--include=python3", SUITE, str(tmp),
         MIRROR], timeout=3600, what="debootstrap (arm64, first stage)")  # fmt: skip
    debs = sorted((tmp / "var/cache/apt/archives").glob("*.deb"))
    if not debs:
        raise BuildError(f"debootstrap downloaded no packages into {tmp}/var/cache/apt/archives")
    log.info("unpacking %d packages with dpkg -x (stage 2 would need binfmt_misc)", len(debs))
    for deb in debs:
        unpack(deb, tmp)
        deb.unlink()
    shutil.rmtree(tmp / "debootstrap", ignore_errors=True)
    for link in ("bin", "lib", "sbin"):  # merged /usr must survive the unpacking
        if not (tmp / link).is_symlink():
            raise BuildError(f"{tmp}/{link} is no longer a symlink to usr/{link} after unpacking")
    if not (tmp / "usr/bin/python3").exists():
        raise BuildError(f"no python3 in {tmp} after unpacking")


def pinned(names: list[str]) -> list[str]:
    """``name==version`` from constraints.txt, else from this venv, else unpinned (logged)."""
    constraints: dict[str, str] = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        name, sep, pin = line.split("#", 1)[0].strip().partition("==")
        if sep:
            constraints[name.strip().lower().replace("_", "-")] = pin.strip()
    specs = []
    for name in names:
        version: str | None = constraints.get(name.lower().replace("_", "-"))
        if version is None:
            try:
                version = metadata.version(name)
            except metadata.PackageNotFoundError:
                log.warning("%s is in neither constraints.txt nor this venv: installing the newest", name)
        specs.append(f"{name}=={version}" if version else name)
    return specs


def install_wheels(site: Path, names: list[str], *, what: str) -> None:
    # pip only accepts the exact platform tags it is given: list every glibc up to bookworm's 2.36.
    platforms = ["manylinux2014_aarch64", *[f"manylinux_2_{m}_aarch64" for m in range(36, 16, -1)]]
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile",
           "--target", str(site), "--only-binary=:all:", "--python-version", PYTHON_VERSION,
           "--implementation", "cp", "--no-deps"]  # fmt: skip
    for p in platforms:
        cmd += ["--platform", p]
    run([*cmd, *pinned(names)], timeout=1800, what=what)


def write_helpers(tmp: Path) -> None:
    wrapper = tmp / WRAPPER
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    wrapper.write_text(WRAPPER_TEXT)
    wrapper.chmod(0o755)
    (tmp / SITE / "sitecustomize.py").write_text(SITECUSTOMIZE_TEXT)
    # onnxruntime's arm64 build parses /proc/cpuinfo on import and crashes on the host's x86 one;
    # qemu -L serves ROOT/proc/cpuinfo instead of the host's.
    proc = tmp / "proc"
    if proc.is_symlink():  # debootstrap links proc -> /proc when it runs in a container
        proc.unlink()
    proc.mkdir(exist_ok=True)
    (tmp / "proc/cpuinfo").write_text("".join(CPUINFO_CORE.format(i=i) for i in range(os.cpu_count() or 1)))


def self_check(tmp: Path) -> dict[str, str]:
    """Python under qemu must say aarch64 and import TVM; onnxruntime is optional (recorded)."""
    out = run([str(tmp / WRAPPER), "-c", SELF_CHECK], timeout=900, what="self-check under qemu (import tvm)")
    line = next((ln for ln in out.splitlines() if ln.startswith("SELF-CHECK ")), "")
    if not line:
        raise BuildError(f"self-check printed nothing: {out[-500:]}")
    info: dict[str, str] = json.loads(line.removeprefix("SELF-CHECK "))
    if info.get("machine") != "aarch64":
        raise BuildError(f"self-check: platform.machine() is {info.get('machine')!r}, expected 'aarch64'")
    if (tmp / SITE / "onnxruntime").is_dir():
        try:
            out = run([str(tmp / WRAPPER), "-c", ORT_CHECK], timeout=900, what="self-check (import onnxruntime)")
            info["onnxruntime"] = out.strip().splitlines()[-1].removeprefix("SELF-CHECK ")
        except BuildError as exc:
            log.warning("onnxruntime does not import under qemu (left in, marked unusable): %s", exc)
            info["onnxruntime"] = ""
    return info


def build(dev: EmulatedDevice, *, with_onnxruntime: bool) -> dict[str, str]:
    """Build into a temporary sibling folder, then rename it to ``dev.root``."""
    parent = dev.root.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{dev.root.name}.building"
    if tmp.exists():
        log.info("removing an interrupted build at %s", tmp)
        shutil.rmtree(tmp)
    t0 = time.monotonic()
    bootstrap(tmp)
    log.info("root unpacked in %.0f s", time.monotonic() - t0)
    install_wheels(tmp / SITE, WHEELS, what="arm64 wheels of TVM")
    if with_onnxruntime:
        install_wheels(tmp / SITE, ORT_WHEELS, what="arm64 wheels of onnxruntime")
    write_helpers(tmp)
    info = self_check(tmp)
    info.update(built=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), suite=SUITE, arch=dev.arch,
                build_seconds=f"{time.monotonic() - t0:.0f}")  # fmt: skip
    (tmp / STAMP).write_text(json.dumps(info, indent=1) + "\n")
    if dev.root.exists():  # only with --force: the old root goes once the new one is complete
        shutil.rmtree(dev.root)
    tmp.rename(dev.root)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="arm64", help="architecture to emulate (arm64)")
    parser.add_argument("--force", action="store_true", help="rebuild even when the root is built")
    parser.add_argument("--no-onnxruntime", action="store_true", help="leave onnxruntime out of the root")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="device-emu: %(message)s")
    if platform.machine().lower() in ("aarch64", "arm64"):
        log.info("this machine is ARM64 already: use `compress device-server` without --emulate")
        return 0
    dev = EmulatedDevice.find(args.arch)
    try:
        dev.root.parent.mkdir(parents=True, exist_ok=True)
        with open(dev.root.parent / f".{dev.root.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # two builds at once: the second waits, then finds it built
            if dev.is_built() and not args.force:
                ensure_host_tools()
                log.info("already built: %s (%s); --force rebuilds", dev.root, json.dumps(dev.info()))
                return 0
            ensure_host_tools()
            info = build(dev, with_onnxruntime=not args.no_onnxruntime)
    except BuildError as exc:
        log.error("%s", exc)
        return 1
    log.info("built %s in %s s: %s", dev.root, info["build_seconds"], json.dumps(info))
    log.info("start it with: compress device-server --emulate arm64 --port 9090 --key emu")
    return 0


if __name__ == "__main__":
    sys.exit(main())
