"""The target registry: built-in device targets plus user targets from a YAML or TOML file."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from edgecompress.targets.errors import TargetError, UnknownTargetError
from edgecompress.targets.host import detect_host
from edgecompress.targets.target import Budgets, Remote, Target

_REGISTRY: dict[str, Target] = {}
_ALIASES: dict[str, str] = {}


def register_target(target: Target, *, overwrite: bool = False) -> Target:
    """Add ``target`` to the registry.

    Raises:
        TargetError: if the name or an alias is taken and ``overwrite`` is False.
    """
    names = (target.name, *target.aliases)
    if not overwrite:
        for n in names:
            if n in _REGISTRY or n in _ALIASES:
                raise TargetError(f"target name {n!r} is already registered")
    _REGISTRY[target.name] = target
    for alias in target.aliases:
        _ALIASES[alias] = target.name
    return target


def get_target(name: str | Target) -> Target:
    """Look up a target by name or alias.

    Raises:
        UnknownTargetError: listing the known names and the closest match.

    Example:
        >>> get_target("arm64-android").kind
        'mobile-cpu'
    """
    if isinstance(name, Target):
        return name
    _ensure_builtins()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in _ALIASES:
        return _REGISTRY[_ALIASES[name]]
    known = sorted(_REGISTRY)
    close = difflib.get_close_matches(name, known + sorted(_ALIASES), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UnknownTargetError(f"unknown target {name!r}{hint}; known: {', '.join(known)}")


def list_targets(pattern: str = "*") -> list[Target]:
    """Registered targets whose name matches the glob ``pattern``, sorted by name."""
    _ensure_builtins()
    return [t for n, t in sorted(_REGISTRY.items()) if fnmatch.fnmatch(n, pattern)]


def _parse_target(name: str, spec: dict[str, Any], source: str) -> Target:
    allowed = {
        "kind", "description", "tvm", "tvm_host", "ort_providers", "precisions", "budgets", "remote",
        "cross_compiler", "num_threads", "aliases", "extends",
    }  # fmt: skip
    unknown = set(spec) - allowed
    if unknown:
        raise TargetError(
            f"{source}: target {name!r} has unknown keys {sorted(unknown)}; valid: {', '.join(sorted(allowed))}"
        )
    base: dict[str, Any] = {}
    if "extends" in spec:
        parent = get_target(spec["extends"]).to_dict()
        parent.pop("name")
        parent.pop("aliases")
        base = parent
    merged = {**base, **{k: v for k, v in spec.items() if k != "extends"}}
    for required in ("kind", "tvm"):
        if required not in merged:
            raise TargetError(f"{source}: target {name!r} needs {required!r} (or 'extends' from a built-in target)")
    try:
        budgets = Budgets(**(merged.get("budgets") or {}))
        remote = Remote(**(merged.get("remote") or {}))
    except TypeError as exc:
        raise TargetError(f"{source}: target {name!r}: {exc}") from None
    return Target(
        name=name,
        kind=merged["kind"],
        description=merged.get("description", f"user target from {source}"),
        tvm=dict(merged["tvm"]),
        tvm_host=merged.get("tvm_host"),
        ort_providers=tuple(merged.get("ort_providers") or ("CPUExecutionProvider",)),
        precisions=frozenset(merged.get("precisions") or ("fp32", "int8")),
        budgets=budgets,
        remote=remote,
        cross_compiler=merged.get("cross_compiler"),
        num_threads=int(merged.get("num_threads") or 0),
        aliases=tuple(merged.get("aliases") or ()),
    )


def load_targets_file(path: str | Path) -> list[Target]:
    """Register the targets defined in a YAML or TOML file and return them.

    The file maps target names to specs (``targets:`` at the top level is optional)::

        targets:
          my-pi5:
            extends: arm64-linux
            remote: {mode: rpc, host: 127.0.0.1, port: 9090, key: pi5}
            budgets: {max_latency_ms: 20}

    Raises:
        TargetError: the file is missing, unparsable, or a spec is invalid.
    """
    p = Path(path)
    if not p.is_file():
        raise TargetError(f"targets file {str(p)!r} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # parse errors of either format: report them as bad input
        raise TargetError(f"targets file {str(p)!r} cannot be parsed: {exc}") from None
    if isinstance(data, dict) and "targets" in data:
        data = data["targets"]
    if not isinstance(data, dict) or not data:
        raise TargetError(f"targets file {str(p)!r} must map target names to specs")
    loaded = []
    for name, spec in data.items():
        if not isinstance(spec, dict):
            raise TargetError(f"{p}: target {name!r} must be a mapping, got {type(spec).__name__}")
        loaded.append(register_target(_parse_target(str(name), spec, str(p)), overwrite=True))
    return loaded


def _builtin_targets() -> Iterable[Target]:
    host = detect_host()
    x86_precisions = {"fp32", "int8", "codebook", "nm-sparse"}
    yield Target(
        name="x86-64",
        kind="cpu",
        description=f"this x86-64 host ({host.llvm_mcpu}: {', '.join(host.feature_names) or 'baseline SSE'})",
        tvm={"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": host.llvm_mcpu, "num-cores": host.num_cores},
        ort_providers=("CPUExecutionProvider",),
        precisions=frozenset(x86_precisions),
        budgets=Budgets(max_latency_ms=50.0, max_accuracy_drop=1.0, max_size_mb=None),
        aliases=("host", f"x86-64/{host.llvm_mcpu}"),
    )
    arm_precisions = frozenset({"fp32", "fp16", "int8", "codebook", "nm-sparse"})
    yield Target(
        name="arm64-linux",
        kind="mobile-cpu",
        description="64-bit ARM Linux board (Cortex-A76 class, NEON), e.g. Raspberry Pi 5",
        tvm={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76", "mattr": ["+neon"], "num-cores": 4},
        ort_providers=("XnnpackExecutionProvider", "CPUExecutionProvider"),
        precisions=arm_precisions,
        budgets=Budgets(max_latency_ms=100.0, max_accuracy_drop=1.0, max_size_mb=50.0),
        remote=Remote(mode="rpc", host="127.0.0.1", port=9090, key="arm64-linux"),
        cross_compiler="aarch64-linux-gnu-g++",
        num_threads=4,
        aliases=("arm64/linux", "aarch64-linux"),
    )
    yield Target(
        name="arm64-android",
        kind="mobile-cpu",
        description="Android phone, 64-bit ARM (NEON, dot-product), via TVM RPC",
        tvm={
            "kind": "llvm",
            "mtriple": "aarch64-linux-android",
            "mcpu": "cortex-a76",
            "mattr": ["+neon", "+dotprod"],
            "num-cores": 4,
        },
        ort_providers=("XnnpackExecutionProvider", "CPUExecutionProvider"),
        precisions=arm_precisions,
        budgets=Budgets(max_latency_ms=100.0, max_accuracy_drop=1.0, max_size_mb=20.0),
        remote=Remote(mode="tracker", host="127.0.0.1", port=9190, key="android"),
        cross_compiler="ndk",
        num_threads=4,
        aliases=("arm64/android", "android"),
    )
    gpu_precisions = frozenset({"fp32", "fp16", "int8", "2:4-sparse", "nm-sparse", "codebook"})
    for sm, gpu in (("sm_80", "A100 (Ampere)"), ("sm_90", "H100 (Hopper)")):
        yield Target(
            name=f"cuda-{sm.replace('_', '')}",
            kind="gpu",
            description=f"NVIDIA {gpu}, CUDA {sm}",
            tvm={"kind": "cuda", "arch": sm, "max_threads_per_block": 1024, "max_shared_memory_per_block": 49152},
            tvm_host={"kind": "llvm", "mtriple": "x86_64-linux-gnu"},
            ort_providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
            precisions=gpu_precisions,
            budgets=Budgets(max_latency_ms=10.0, max_accuracy_drop=1.0),
            remote=Remote(mode="rpc", host="127.0.0.1", port=9090, key="cuda"),
            aliases=(f"cuda/{sm.replace('_', '')}",) + (("cuda",) if sm == "sm_80" else ()),
        )
    for flavour, desc in (("mali", "ARM Mali (Valhall) GPU"), ("adreno", "Qualcomm Adreno GPU")):
        yield Target(
            name=f"opencl-{flavour}",
            kind="mobile-gpu",
            description=f"{desc} through OpenCL on Android",
            tvm={"kind": "opencl", "device": flavour, "max_num_threads": 256},
            tvm_host={"kind": "llvm", "mtriple": "aarch64-linux-android", "mattr": ["+neon"]},
            ort_providers=("CPUExecutionProvider",),
            precisions=frozenset({"fp32", "fp16", "codebook"}),
            budgets=Budgets(max_latency_ms=50.0, max_accuracy_drop=1.0, max_size_mb=20.0),
            remote=Remote(mode="tracker", host="127.0.0.1", port=9190, key=f"android-{flavour}"),
            cross_compiler="ndk",
            aliases=(f"opencl/{flavour}",) + (("opencl-mobile",) if flavour == "mali" else ()),
        )


def _ensure_builtins() -> None:
    if _REGISTRY:
        return
    for t in _builtin_targets():
        register_target(t, overwrite=True)
