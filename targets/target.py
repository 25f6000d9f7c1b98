"""The Target: a device described as data (what it runs, how to reach it, what it must meet)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

KINDS = ("cpu", "gpu", "mobile-cpu", "mobile-gpu")
PRECISIONS = ("fp32", "fp16", "int8", "int4", "nm-sparse", "2:4-sparse", "codebook")


@dataclass(frozen=True)
class Budgets:
    """Default gates for a target; a recipe or the CLI may tighten or loosen them.

    Attributes:
        max_latency_ms: p50 latency at batch 1 on the target's runtime, or None for no gate.
        max_accuracy_drop: top-1 points lost against the fp32 reference model.
        max_size_mb: size of the artifact's model files in MB (10**6 bytes).
    """

    max_latency_ms: float | None = None
    max_accuracy_drop: float | None = 1.0
    max_size_mb: float | None = None

    def to_dict(self) -> dict[str, float | None]:
        return {
            "max_latency_ms": self.max_latency_ms,
            "max_accuracy_drop": self.max_accuracy_drop,
            "max_size_mb": self.max_size_mb,
        }


@dataclass(frozen=True)
class Remote:
    """How latency is measured on the device itself.

    ``mode`` is ``local`` (this machine is the device), ``rpc`` (a TVM RPC server at
    ``host:port`` with ``key``) or ``tracker`` (a TVM RPC tracker at ``host:port`` that hands out
    devices registered under ``key``).
    """

    mode: str = "local"
    host: str = "127.0.0.1"
    port: int = 9090
    key: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "host": self.host, "port": self.port, "key": self.key}


@dataclass(frozen=True)
class Target:
    """A deployment target.

    Attributes:
        name: registry name, for example ``x86-64`` or ``arm64-android``.
        kind: one of ``cpu``, ``gpu``, ``mobile-cpu``, ``mobile-gpu``.
        description: one line for humans.
        tvm: TVM target as a JSON dict (never the legacy string form).
        tvm_host: host target dict for device targets (CUDA, OpenCL), else None.
        ort_providers: onnxruntime execution providers in order of preference.
        precisions: what the device runs natively (``int8``, ``fp16``, ``2:4-sparse``...).
        budgets: default gates.
        remote: how to profile on the device.
        cross_compiler: compiler command used to link a shared library for the device,
            or None when the host compiler works (or only a ``.tar`` can be produced).
        num_threads: threads the runtime should use on the device (0: runtime default).
        aliases: other names that resolve to this target.
    """

    name: str
    kind: str
    description: str
    tvm: dict[str, Any]
    ort_providers: tuple[str, ...] = ("CPUExecutionProvider",)
    precisions: frozenset[str] = frozenset({"fp32", "int8"})
    budgets: Budgets = field(default_factory=Budgets)
    remote: Remote = field(default_factory=Remote)
    tvm_host: dict[str, Any] | None = None
    cross_compiler: str | None = None
    num_threads: int = 0
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Imported here to keep the module import-cheap and avoid a cycle with the registry.
        from edgecompress.targets.errors import TargetError

        if self.kind not in KINDS:
            raise TargetError(f"target {self.name!r}: unknown kind {self.kind!r}; valid: {', '.join(KINDS)}")
        unknown = set(self.precisions) - set(PRECISIONS)
        if unknown:
            raise TargetError(
                f"target {self.name!r}: unknown precisions {sorted(unknown)}; valid: {', '.join(PRECISIONS)}"
            )
        if not isinstance(self.tvm, dict) or "kind" not in self.tvm:
            raise TargetError(f"target {self.name!r}: 'tvm' must be a dict with a 'kind' key, got {self.tvm!r}")

    @property
    def mtriple(self) -> str:
        """The LLVM triple of the CPU that runs the code ("" for the host's own): the host target's
        for device targets (CUDA, OpenCL), else the target's."""
        return str((self.tvm_host or self.tvm).get("mtriple", ""))

    @property
    def is_host(self) -> bool:
        """True when artifacts for this target run on this machine without a remote device."""
        return self.remote.mode == "local" and self.kind == "cpu" and self.cross_compiler is None

    def supports(self, precision: str) -> bool:
        """Whether the device runs ``precision`` natively."""
        return precision in self.precisions

    def require(self, precision: str, what: str = "") -> None:
        """Raise :class:`UnsupportedOnTargetError` unless ``precision`` is supported.

        Raises:
            UnsupportedOnTargetError: naming the precision, the target and what it does support.
        """
        from edgecompress.targets.errors import UnsupportedOnTargetError

        if not self.supports(precision):
            subject = f"{what} needs " if what else ""
            raise UnsupportedOnTargetError(
                f"{subject}{precision!r}, which target {self.name!r} does not support; "
                f"it supports: {', '.join(sorted(self.precisions))}"
            )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (the form written into manifests and `compress targets --json`)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "description": self.description,
            "tvm": self.tvm,
            "tvm_host": self.tvm_host,
            "ort_providers": list(self.ort_providers),
            "precisions": sorted(self.precisions),
            "budgets": self.budgets.to_dict(),
            "remote": self.remote.to_dict(),
            "cross_compiler": self.cross_compiler,
            "num_threads": self.num_threads,
            "aliases": list(self.aliases),
        }
