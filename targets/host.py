"""Host CPU detection: which x86 vector extensions this machine has and the LLVM ``mcpu`` to use.

Reads ``/proc/cpuinfo`` (Linux) instead of importing TVM or LLVM, so the target registry stays
cheap to import. The mapping picks the oldest LLVM CPU name that enables every detected
extension, so code compiled for it runs on this host.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass


@dataclass(frozen=True)
class HostCPU:
    """What the host CPU offers, as read from the operating system."""

    arch: str
    flags: frozenset[str]
    num_cores: int
    model: str = ""  # the CPU's model name ("model name" in /proc/cpuinfo), empty when unknown

    @property
    def has_avx2(self) -> bool:
        return "avx2" in self.flags

    @property
    def has_avx512(self) -> bool:
        return "avx512f" in self.flags

    @property
    def has_vnni(self) -> bool:
        return "avx512_vnni" in self.flags or "avx_vnni" in self.flags

    @property
    def has_amx(self) -> bool:
        return "amx_tile" in self.flags

    @property
    def llvm_mcpu(self) -> str:
        """The LLVM CPU name whose features this host has (oldest such, for portability)."""
        if self.arch != "x86_64":
            return "generic"
        if self.has_amx:
            return "sapphirerapids"
        if "avx512_vnni" in self.flags:
            return "cascadelake"
        if self.has_avx512:
            return "skylake-avx512"
        if self.has_avx2:
            return "haswell"
        return "x86-64"

    @property
    def feature_names(self) -> list[str]:
        names = [("avx2", self.has_avx2), ("avx512", self.has_avx512), ("vnni", self.has_vnni), ("amx", self.has_amx)]
        return [n for n, present in names if present]


def _read_cpuinfo(path: str = "/proc/cpuinfo") -> tuple[frozenset[str], str]:
    """The first CPU's feature flags and model name."""
    flags: frozenset[str] = frozenset()
    model = ""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if not flags and line.startswith(("flags", "Features")):
                    flags = frozenset(line.split(":", 1)[1].split())
                elif not model and line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                if flags and model:
                    break
    except OSError:
        pass
    return flags, model


@functools.lru_cache(maxsize=1)
def detect_host() -> HostCPU:
    """Detect the host CPU once per process."""
    arch = platform.machine().lower().replace("amd64", "x86_64")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    flags, model = _read_cpuinfo()
    return HostCPU(arch=arch, flags=flags, num_cores=cores, model=model or platform.processor())


def runs_on_host(mtriple: str) -> bool:
    """Whether CPU code compiled for the LLVM triple ``mtriple`` runs on this machine ("" = the host's own).

    Android code never does (its libraries link against Bionic), whatever the CPU.

    Example:
        >>> runs_on_host("") and not runs_on_host("aarch64-linux-android")
        True
    """
    return not mtriple or (mtriple.startswith(detect_host().arch) and "android" not in mtriple)
