"""ONNX -> TVM Relax -> a compiled library for a device target.

The import goes through TVM's Relax ONNX frontend (fp32 graphs and QDQ int8 graphs alike), the
weights are detached into a parameter file so the library holds only code, and the module is
lowered with the target's default pipeline. CPU modules are first legalized and fused so that
MetaSchedule tuning records (:mod:`edgecompress.export.tvm.tuning`) can be applied per fused operator.

Reference: Chen et al., "TVM: An Automated End-to-End Optimizing Compiler for Deep Learning",
OSDI 2018; Lai et al., "Relax: Composable Abstractions for End-to-End Dynamic Machine Learning",
2023.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgecompress.export.errors import ExportError, UnsupportedExportError
from edgecompress.export.tvm.onnx_prep import prepare_for_tvm

log = logging.getLogger(__name__)

LIB_STEM = "model"
PARAMS_FILE = "params.bin"


@dataclass(frozen=True)
class LibraryPlan:
    """How the compiled module is packaged for a target.

    Attributes:
        suffix: ``so`` (loadable shared library) or ``tar`` (object files to link on the device).
        compiler: the cross compiler command used for a ``.so`` (None: the host compiler).
        ndk: True when the Android NDK (``TVM_NDK_CC``) links the library.
        note: why a ``.tar`` was produced instead of a ``.so``, if it was.
    """

    suffix: str
    compiler: str | None = None
    ndk: bool = False
    note: str = ""


def tvm_target(target: Any) -> Any:
    """The ``tvm.target.Target`` for a :class:`targets.Target` (device target plus its host)."""
    import tvm

    spec = dict(target.tvm)
    if target.tvm_host:
        return tvm.target.Target(spec, host=dict(target.tvm_host))
    return tvm.target.Target(spec)


def device_kind(target: Any) -> str:
    """The TVM device the library runs on: ``cpu``, ``cuda`` or ``opencl``."""
    kind = str(target.tvm.get("kind", "llvm"))
    return "cpu" if kind == "llvm" else kind


def is_cross(target: Any) -> bool:
    """True when code for ``target`` cannot run on this machine's CPU."""
    from edgecompress.targets import runs_on_host

    return device_kind(target) != "cpu" or not runs_on_host(target.mtriple)


def library_plan(target: Any) -> LibraryPlan:
    """Choose ``.so`` or ``.tar`` for ``target``: a ``.so`` needs a linker for the device's CPU.

    Host-CPU, CUDA and host-linked targets get a ``.so`` from the host compiler. ARM64 targets get
    a ``.so`` when ``aarch64-linux-gnu-g++`` (or the target's ``cross_compiler``) is on ``PATH``, or
    an Android NDK compiler is set in ``TVM_NDK_CC``; otherwise a ``.tar`` of object files that
    the device links when it loads it.
    """
    host_triple = target.mtriple
    if not is_cross(target) or (device_kind(target) != "cpu" and not host_triple.startswith("aarch64")):
        return LibraryPlan("so")
    wanted = target.cross_compiler
    if wanted == "ndk" or "android" in host_triple:
        if os.environ.get("TVM_NDK_CC"):
            return LibraryPlan("so", compiler=os.environ["TVM_NDK_CC"], ndk=True)
        for name in ("aarch64-linux-android-clang++", "aarch64-linux-gnu-g++"):
            if shutil.which(name):
                return LibraryPlan("so", compiler=name)
        return LibraryPlan(
            "tar", note="no Android NDK (set TVM_NDK_CC) or aarch64 cross compiler found: wrote a .tar to link on the device"
        )
    cc = wanted if wanted and wanted != "ndk" and shutil.which(wanted) else shutil.which("aarch64-linux-gnu-g++")
    if cc:
        return LibraryPlan("so", compiler=str(cc))
    return LibraryPlan(
        "tar", note="no aarch64 cross compiler found (apt install g++-aarch64-linux-gnu): wrote a .tar to link on the device"
    )


def import_onnx(
    onnx_model: Any, shapes: dict[str, list[int]], target_name: str, dtypes: dict[str, str] | None = None, *,
    graph_rewrite: Callable[[Any, list[Any]], tuple[Any, list[Any]]] | None = None,
) -> tuple[Any, list[Any]]:
    """Import an ONNX model into Relax with static input shapes (``{input: [batch, ...]}``) and
    dtypes (default float32); returns (module, params).

    ``graph_rewrite`` gets ``(module, weights)`` right after the import, before anything is derived
    from the weights, and returns them rewritten (the integer kernels of :mod:`export.tvm.int8`).

    Raises:
        UnsupportedExportError: the frontend has no converter for an operator (named in the message).
        ExportError: the import failed for another reason.
    """
    import tvm
    from tvm import relax

    onnx_model = prepare_for_tvm(onnx_model)  # local functions inlined, shape arithmetic folded, C names
    custom = sorted({f"{n.domain}::{n.op_type}" for n in onnx_model.graph.node if n.domain not in ("", "ai.onnx")})
    if custom:
        raise UnsupportedExportError(
            f"operators {', '.join(custom)} are not supported by TVM's ONNX frontend for target {target_name!r}"
        )
    try:
        mod = _from_onnx_or_folded(onnx_model, shapes, dtypes or {n: "float32" for n in shapes})
    except tvm.error.OpNotImplemented as exc:
        ops = str(exc).split(":", 1)[-1].strip().splitlines()[0]
        raise UnsupportedExportError(
            f"operator(s) {ops} not supported by TVM's ONNX frontend for target {target_name!r}"
        ) from None
    except (RuntimeError, NotImplementedError, ValueError, AttributeError, TypeError, KeyError, IndexError) as exc:
        # the frontend's own bugs (an AttributeError inside a converter) are its refusal too: named, exit 3
        m = re.search(r"Error converting operator (\w+)", _captured.get("last", "") + str(exc))
        op = f" operator {m.group(1)}" if m else ""
        detail = [ln for ln in str(exc).strip().splitlines() if ln.strip()][-1][:200]
        raise UnsupportedExportError(
            f"TVM cannot import{op} of this ONNX graph for target {target_name!r}: {detail}"
        ) from None
    mod, params = relax.frontend.detach_params(mod)
    weights = list(params.get("main", []))
    if graph_rewrite is not None:
        mod, weights = graph_rewrite(mod, weights)
    return fold_param_transforms(mod, weights)


_captured: dict[str, str] = {}


def _from_onnx_or_folded(onnx_model: Any, shapes: dict[str, list[int]], dtypes: dict[str, str]) -> Any:
    """Import with TVM's frontend; if that fails, fold the graph's shape arithmetic first and retry.

    Graphs that compute shapes at run time (``Shape -> Gather -> Reshape``, e.g. a channel
    shuffle) trip the frontend; with the input shape fixed they are constants, and onnxruntime's
    basic (standard-ONNX) optimizations fold them away.
    """
    import contextlib
    import io

    from tvm.relax.frontend.onnx import from_onnx

    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):  # the frontend prints the failing operator
            return from_onnx(onnx_model, shape_dict=shapes, dtype_dict=dtypes, keep_params_in_input=True)
    except Exception as first:  # any frontend failure: retry once on the folded graph
        _captured["last"] = buf.getvalue()
        folded = _fold_shapes(onnx_model, shapes)
        if folded is None:
            raise first from None
        log.info("TVM import failed (%s); retrying on the shape-folded graph", str(first).splitlines()[-1][:120])
        return from_onnx(folded, shape_dict=shapes, dtype_dict=dtypes, keep_params_in_input=True)


def _fold_shapes(onnx_model: Any, shapes: dict[str, list[int]]) -> Any:
    import tempfile

    import onnx

    from edgecompress.export.ort_session import ort_session

    model = onnx.ModelProto()
    model.CopyFrom(onnx_model)
    for inp in model.graph.input:
        if inp.name in shapes:
            for dim, size in zip(inp.type.tensor_type.shape.dim, shapes[inp.name], strict=False):
                dim.Clear()
                dim.dim_value = int(size)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "folded.onnx"
        onnx.save(model, str(src))
        try:
            ort_session(src, optimization="basic", optimized_model_path=dst)
            return onnx.load(str(dst))
        except Exception:  # onnxruntime cannot load it either: report the frontend's error
            return None


def fold_param_transforms(mod: Any, params: list[Any], *, max_growth: float = 1.01) -> tuple[Any, list[Any]]:
    """Compute once, at compile time, what ``main`` derives from its weights alone.

    The ONNX frontend turns ``Gemm`` into ``matmul(x, permute_dims(W))`` and biases into
    ``reshape(b)``; with the weights passed as parameters those ran on every call (a 400 KB
    transpose was a quarter of the example CNN's latency). ``LiftTransformParams`` splits them
    into ``main_transform_params``; that function is compiled for this machine, run on the weights
    here, and ``main`` then takes the transformed weights. When the transformed weights would be
    larger than the originals (an int8 QDQ graph's dequantized weights are 4x larger), the module
    is returned unchanged: artifact size is part of what this toolchain optimizes.

    Args:
        mod: a Relax module whose ``main`` takes ``(input, *params)`` (attribute ``num_input``).
        params: the weights in the order ``main`` takes them.
        max_growth: the largest allowed ratio of transformed to original weight bytes.

    Returns:
        (module with only ``main``, weights in the order the new ``main`` takes them).
    """
    import tvm
    from tvm import relax

    if not params or "num_input" not in (mod["main"].attrs or {}):
        return mod, params
    base = tvm.transform.Sequential(
        [relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings()]
    )(mod)
    lifted = relax.transform.LiftTransformParams()(base)
    names = [gv.name_hint for gv in lifted.functions]
    if "main_transform_params" not in names:
        return mod, params
    transform = _with_helpers(lifted, "main_transform_params")
    dev = tvm.cpu()
    with tvm.target.Target("llvm"):
        executable = tvm.compile(transform, target=tvm.target.Target("llvm"))
    vm = tvm.relax.VirtualMachine(executable, dev)
    new = list(vm["main_transform_params"]([tvm.runtime.tensor(p.numpy(), dev) for p in params]))
    nbytes = sum(int(p.numpy().nbytes) for p in params)
    new_bytes = sum(int(p.numpy().nbytes) for p in new)
    if new_bytes > max_growth * nbytes:
        log.info("weights not pre-transformed: %d -> %d bytes", nbytes, new_bytes)
        return mod, params
    main_only = _with_helpers(lifted, "main")
    log.debug("weights pre-transformed at compile time: %d -> %d tensors", len(params), len(new))
    return main_only, [tvm.runtime.tensor(p.numpy()) for p in new]


def _with_helpers(lifted: Any, entry: str) -> Any:
    """A module holding ``entry`` (``main`` or ``main_transform_params``) of ``lifted`` and every
    other function in it but those two (the TIR functions they call, if any were legalized already)."""
    import tvm

    mod = tvm.IRModule({entry: lifted[entry]})
    for gv in lifted.functions:
        if gv.name_hint not in ("main", "main_transform_params"):
            mod[gv] = lifted[gv]
    return mod


def fuse_for_cpu(mod: Any, tgt: Any) -> Any:
    """Legalize and fuse a Relax module: the form whose fused TIR functions are tuning tasks."""
    import tvm
    from tvm import relax

    seq = tvm.transform.Sequential(
        [
            relax.transform.DecomposeOpsForInference(),
            relax.transform.CanonicalizeBindings(),
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
        ]
    )
    with tgt:
        return seq(mod)


def apply_database(mod: Any, tgt: Any, database: Any) -> Any:
    """Replace fused TIR functions by their best tuned schedules from ``database``."""
    from tvm import relax

    with tgt, database:
        return relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)


def build(mod: Any, tgt: Any) -> Any:
    """Compile a Relax module for ``tgt`` with TVM's default pipeline for that target kind."""
    import tvm

    try:
        return tvm.compile(mod, target=tgt)
    except RuntimeError as exc:  # TVM errors (tvm.error.*) derive from RuntimeError
        op = _first_op_name(str(exc))
        detail = str(exc).strip().splitlines()[-1][:300]
        raise UnsupportedExportError(
            f"TVM cannot compile{(' operator ' + op) if op else ''} for target {tgt.kind.name!r}: {detail}"
        ) from None


def _first_op_name(message: str) -> str:
    m = re.search(r"relax\.[a-z_.0-9]+", message)
    return m.group(0) if m else ""


def export_library(executable: Any, folder: Path, plan: LibraryPlan) -> Path:
    """Write the compiled module into ``folder`` as ``model.so`` or ``model.tar``."""
    path = folder / f"{LIB_STEM}.{plan.suffix}"
    if plan.suffix == "tar":
        executable.export_library(str(path))
        return path
    if plan.compiler is None:
        executable.export_library(str(path))
        return path
    if plan.ndk:
        from tvm.support import ndk

        executable.export_library(str(path), fcompile=ndk.create_shared)
        return path
    from tvm.support import cc

    try:
        executable.export_library(str(path), fcompile=cc.cross_compiler(plan.compiler))
    except Exception as exc:  # a broken cross toolchain: name it, the .tar route still works
        raise ExportError(f"linking with cross compiler {plan.compiler!r} failed: {exc}") from exc
    return path


def save_params(params: list[Any], folder: Path) -> Path:
    """Save the detached weights (in the order ``main`` takes them) as TVM's parameter file."""
    import tvm

    path = folder / PARAMS_FILE
    path.write_bytes(bytes(tvm.runtime.save_param_dict({f"p{i}": p for i, p in enumerate(params)})))
    return path


def load_params(path: Path) -> list[Any]:
    """The parameters written by :func:`save_params`, in order (``tvm.runtime.Tensor`` on the CPU)."""
    import tvm

    d = tvm.runtime.load_param_dict(path.read_bytes())
    return [d[f"p{i}"] for i in range(len(d))]


def import_exported_program(program: Any, batch: int, target_name: str) -> tuple[Any, list[Any]]:
    """Import a ``torch.export`` program into Relax directly (no ONNX); returns (module, params).

    A dynamic batch dimension is bound to ``batch``; a static one must equal it.

    Raises:
        UnsupportedExportError: the frontend has no converter for an operator (named in the message).
        ExportError: the program's batch is static and differs from ``batch``.
    """
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    try:
        mod = from_exported_program(program, keep_params_as_input=True, unwrap_unit_return_tuple=True)
    except (RuntimeError, NotImplementedError, AssertionError, KeyError, ValueError) as exc:
        m = re.search(r"[Uu]nsupported (?:function type|op(?:erator)?)[^\w]*([\w.:]+)", str(exc))
        op = f" operator {m.group(1)}" if m else ""
        detail = ([ln for ln in str(exc).strip().splitlines() if ln.strip()] or [type(exc).__name__])[-1][:200]
        raise UnsupportedExportError(
            f"TVM cannot import{op} of this torch.export program for target {target_name!r}: {detail}"
        ) from None
    shape = mod["main"].params[0].ty.shape  # a TensorType: static ints and symbolic tir Vars
    dim0: Any = shape[0] if shape is not None else None
    if hasattr(dim0, "value"):  # a static IntImm (tvm.tirx in 0.27, tvm.tir before)
        if int(dim0.value) != batch:
            raise ExportError(f"the torch.export program has a static batch of {int(dim0.value)}; "
                              f"compile it with batch={int(dim0.value)}")  # fmt: skip
    elif hasattr(dim0, "name"):  # a symbolic batch: fix it to the compiled batch
        mod = relax.transform.BindSymbolicVars({dim0.name: batch}, "main")(mod)
    mod, params = relax.frontend.detach_params(mod)
    return fold_param_transforms(mod, list(params.get("main", [])))
