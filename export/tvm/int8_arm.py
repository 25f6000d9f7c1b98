"""The ARM64 dot-product form of integer convolutions and matrix products.

ARMv8.2's dot-product extension (FEAT_DotProd, LLVM ``+dotprod``; Cortex-A55/A76 and newer have it,
Cortex-A53/A72 do not) adds ``sdot``: into each of 4 int32 lanes, the dot product of 4 int8 values
with 4 int8 values (``udot``: uint8 x uint8). MetaSchedule's ARM rules, chosen for an aarch64
``llvm`` target whose features say ``has_dotprod`` (``+dotprod`` in ``mattr``, or an ``mcpu`` that
has it, as ``cortex-a76``), tensorize a reduction with TVM's ``dot_4x4_i8i8s32_sdot`` when the 4
int8 activations of one lane lie next to each other and the 4 x 4 weights of 4 output channels
form one 16-byte block. This module writes convolutions (``groups == 1``) and matrix products in
such blocked layouts (:mod:`edgecompress.export.tvm.int8_blocked`, blocks of 4 x 4):

* convolutions: activations ``NCHW4c`` int8, weights ``[O/4, I/4, KH, KW, 4, 4]``, output ``NCHW4c``;
* matrix products: activations ``[M, K/4, 4]`` int8, weights ``[N/4, K/4, 4, 4]``, output ``[M, N/4, 4]``.

**Activations are shifted into int8.** onnxruntime's quantizer writes uint8 activations and int8
weights; ``sdot`` multiplies int8 by int8, ``udot`` uint8 by uint8, and the mixed ``usdot`` needs
``+i8mm`` and has no TVM intrinsic. So a uint8 activation ``x`` with zero point ``zx`` becomes the
int8 ``x - 128`` with zero point ``zx - 128``; ``(x - 128) - (zx - 128) = x - zx``, so the
convolution is unchanged: it is padded with ``zx - 128`` and its zero-point correction is
``(zx - 128) * sum(w)``, computed at compile time as before. Exact, with no loss of range.

Targets without the dot-product extension keep the plain NCHW integer kernels of
:mod:`edgecompress.export.tvm.int8`. TVM 0.27's ``sdot`` intrinsic builds with the LLVM bundled in
its wheel for aarch64 (unlike its x86 VNNI one): :func:`dotprod_intrinsic_builds` probes it.

Reference: Arm, "Arm Architecture Reference Manual for A-profile architecture", SDOT (vector);
TVM's ``tvm.s_tir.tensor_intrin.arm_cpu``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from edgecompress.export.tvm.int8_blocked import BlockLayout

log = logging.getLogger(__name__)

#: int32 lanes of one 128-bit ``sdot`` (output channels per weight block).
OC_BLOCK = 4
#: int8 values multiplied into one lane (input channels per activation block).
IC_BLOCK = 4
#: The TVM tensor intrinsic MetaSchedule's ARM dot-product rules tensorize int8 x int8 blocks with
#: (``ScheduleRule::DefaultARM("dotprod")``).
DOTPROD_INTRIN = "dot_4x4_i8i8s32_sdot"
#: The ARM dot-product blocks: convolutions and matrix products, int8 activations.
DOTPROD_LAYOUT = BlockLayout("arm-dotprod", OC_BLOCK, IC_BLOCK, "int8", DOTPROD_INTRIN, matmul=True)
#: An aarch64 target with the dot-product extension, for the probe.
PROBE_TARGET = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]}
_probed: dict[str, bool] = {}


def target_has_dotprod(target: Any) -> bool:
    """Whether a TVM target is an aarch64 ``llvm`` target with the dot-product extension, as
    MetaSchedule decides it (the target's canonicalized ``feature.has_dotprod``)."""
    if str(target.kind.name) != "llvm":
        return False
    attrs = target.attrs
    return bool(attrs.get("feature.is_aarch64", False)) and bool(attrs.get("feature.has_dotprod", False))


def aarch64_asm(func: Any, target: Any) -> str:
    """The aarch64 assembly LLVM writes for a TIR function (compiled for ``target``, not run)."""
    import tvm

    return str(tvm.compile(func.with_attr("global_symbol", "probe"), target=target).mod.inspect_source("asm"))


def dotprod_intrinsic_builds() -> bool:
    """Whether TVM's ``dot_4x4_i8i8s32_sdot`` compiles with the bundled LLVM to an ``sdot`` (a probe
    compile of its implementation for an aarch64 target, once per process).

    The x86 VNNI intrinsic of the same TVM does not pass its LLVM's verifier (see
    :func:`export.tvm.int8_x86.register_vnni_intrinsic`); when an intrinsic does not build, every
    tensorized candidate fails and MetaSchedule silently keeps scalar code.
    """
    if DOTPROD_INTRIN not in _probed:
        import tvm
        from tvm.s_tir import TensorIntrin

        from edgecompress.export.tvm.intrinsics import import_tensor_intrinsics

        import_tensor_intrinsics()
        try:
            impl = TensorIntrin.get(DOTPROD_INTRIN).impl
            asm = aarch64_asm(impl, tvm.target.Target(PROBE_TARGET))
            _probed[DOTPROD_INTRIN] = _count_sdot(asm) > 0
        except Exception as exc:  # LLVM's verifier or the backend refuses it: tuning keeps scalar code
            log.warning("TVM's ARM dot-product intrinsic %s does not build: %s", DOTPROD_INTRIN, str(exc)[:200])
            _probed[DOTPROD_INTRIN] = False
        if not _probed[DOTPROD_INTRIN]:
            log.warning("ARM dot-product kernels will not be tensorized with sdot: %s does not compile to it",
                        DOTPROD_INTRIN)  # fmt: skip
    return _probed[DOTPROD_INTRIN]


@dataclass(frozen=True)
class SampledCandidate:
    """One schedule MetaSchedule would time for a function, compiled for an aarch64 target.

    Attributes:
        tensorized: the schedule tensorizes a block with :data:`DOTPROD_INTRIN`.
        sdot: ``sdot`` instructions in its assembly.
        error: why it did not compile (None: it compiled).
        trace: its MetaSchedule trace (what a tuning record stores).
    """

    tensorized: bool
    sdot: int
    error: str | None = None
    trace: Any = field(default=None, compare=False, repr=False)


def sample_candidates(func: Any, target: Any, *, trials: int, seed: int = 0) -> list[SampledCandidate]:
    """MetaSchedule's first ``trials`` candidates for one TIR function (a ``PrimFunc``, or a tuning
    task's module; random samples of its design space for ``target``, post-processed as for
    measurement), compiled for ``target``.

    Nothing runs: this shows what tuning on an ARM64 device would time, without the device (an
    emulator's timings are meaningless, so tuning refuses one). With the dot-product rules, the
    blocked kernels' candidates tensorize with ``sdot``.

    Example:
        >>> [c.sdot > 0 for c in sample_candidates(conv, tgt, trials=4)]  # doctest: +SKIP
        [True, True, True, True]
    """
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from edgecompress.export.tvm.intrinsics import import_tensor_intrinsics

    import_tensor_intrinsics()
    mod = func if isinstance(func, tvm.IRModule) else tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    ctx = ms.TuneContext(mod=mod, target=target, space_generator="post-order-apply",
                         search_strategy=ms.search_strategy.ReplayTrace(), task_name="sample",
                         logger=log, rand_state=seed, num_threads=1).clone()  # fmt: skip
    spaces = ctx.space_generator.generate_design_space(mod)
    ctx.pre_tuning(max_trials=trials, num_trials_per_iter=trials, design_spaces=spaces,
                   database=ms.database.MemoryDatabase(), cost_model=None)  # fmt: skip
    out = []
    for candidate in ctx.search_strategy.generate_measure_candidates() or []:
        tensorized = DOTPROD_INTRIN in str(candidate.sch.trace)
        try:
            asm = str(tvm.compile(candidate.sch.mod, target=target).mod.inspect_source("asm"))
        except Exception as exc:  # a candidate that does not compile: a failed trial when tuning
            out.append(SampledCandidate(tensorized, 0, str(exc).strip().splitlines()[-1][:200], candidate.sch.trace))
            continue
        out.append(SampledCandidate(tensorized, _count_sdot(asm), None, candidate.sch.trace))
    return out


def _count_sdot(asm: str) -> int:
    return sum(1 for line in asm.splitlines() if line.strip().startswith("sdot"))
