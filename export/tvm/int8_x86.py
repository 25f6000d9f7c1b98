"""The x86 VNNI form of an integer convolution: blocked layouts that MetaSchedule can tensorize.

AVX-512 VNNI's ``vpdpbusd`` adds, into each of 16 int32 lanes, the dot product of 4 uint8 values
with 4 int8 values. MetaSchedule's x86 rules (chosen for any ``llvm`` target whose CPU has
``avx512vnni``) tensorize a convolution with the intrinsic ``dot_16x4_vnni`` only when those 4
input channels lie next to each other in memory, and the 16 x 4 weights of 16 output channels in
one 64-byte block; in TVM's plain NCHW/OIHW layouts they do not, and the convolution stays scalar.
This module writes such a convolution (``groups == 1``) in blocked layouts:

* activations ``NCHW4c``: ``x[n, c // 4, h, w, c % 4]`` (uint8, padded with the zero point);
* weights ``[O/16, I/4, KH, KW, 16, 4]``: ``w[o // 16, i // 4, kh, kw, o % 16, i % 4]``, packed here
  once (channels padded with zero weights to multiples of 16 and 4);
* output ``NCHW16c`` int32, returned to NCHW after the requantization epilogue.

The layouts themselves are shared with the ARM form (:mod:`edgecompress.export.tvm.int8_blocked`).

Untuned, this form is already faster than the NCHW one (EfficientNet-Lite1 int8, one core: 165 ms
against 229 ms); tuned, its convolutions use ``vpdpbusd`` (Lite1's 1x1 head convolution after 32
trials: 0.15 ms, against 0.59 ms for the same convolution in fp32, ``bench/tvm_int8.py --conv-trials
32``). Reference: Intel, "Intel 64 and IA-32 Architectures Software Developer's Manual",
VPDPBUSD; TVM's ``tvm.s_tir.tensor_intrin.x86``.
"""

from __future__ import annotations

from typing import Any

from edgecompress.export.tvm.int8_blocked import BlockedConv, BlockLayout, conv2d_nchwc_int8
from edgecompress.export.tvm.int8_blocked import blocked_conv as _blocked_conv

__all__ = ["IC_BLOCK", "OC_BLOCK", "VNNI_INTRIN", "VNNI_LAYOUT", "BlockedConv", "blocked_conv", "conv2d_nchwc_int8",
           "register_vnni_intrinsic", "target_has_vnni"]  # fmt: skip

#: int32 lanes of one 512-bit ``vpdpbusd`` (output channels per weight block).
OC_BLOCK = 16
#: uint8 values multiplied into one lane (input channels per activation block).
IC_BLOCK = 4
#: The TVM tensor intrinsic MetaSchedule's x86 VNNI rules tensorize with (``ScheduleRule::DefaultX86``).
VNNI_INTRIN = "dot_16x4_vnni"
#: The x86 VNNI blocks: convolutions only (matrix products stay plain integer kernels).
VNNI_LAYOUT = BlockLayout("x86-vnni", OC_BLOCK, IC_BLOCK, "uint8", VNNI_INTRIN)


def target_has_vnni(target: Any) -> bool:
    """Whether a TVM ``llvm`` target's CPU has AVX-512 VNNI (or AVX-VNNI), as MetaSchedule decides it."""
    import tvm

    if str(target.kind.name) != "llvm":
        return False
    has_feature = tvm.get_global_func("target.target_has_feature", allow_missing=True)
    if has_feature is None:
        return False
    try:
        return bool(has_feature("avx512vnni", target)) or bool(has_feature("avxvnni", target))
    except Exception:  # a target LLVM cannot parse here (another architecture): no x86 feature
        return False


def blocked_conv(x: Any, x_shape: list[int], zero: int, wq: Any, attrs: Any, add_param: Any,
                 add_function: Any) -> BlockedConv:  # fmt: skip
    """The uint8 x int8 convolution of ``x`` (NCHW, uint8, zero point ``zero``) with ``wq`` (OIHW int8)
    in the x86 VNNI layouts (see :func:`export.tvm.int8_blocked.blocked_conv`)."""
    return _blocked_conv(x, x_shape, zero, wq, attrs, add_param, add_function, VNNI_LAYOUT)


_registered: list[bool] = []


def register_vnni_intrinsic() -> None:
    """Re-register ``dot_16x4_vnni`` with operand types the bundled LLVM accepts.

    TVM 0.27's implementation calls ``llvm.x86.avx512.vpdpbusd.512`` with three ``<16 x i32>``
    operands; the LLVM inside the apache-tvm 0.27 wheel declares the two multiplied operands as
    ``<64 x i8>`` (LLVM 22) and rejects the call ("Call parameter type does not match function
    signature"), so every tensorized candidate failed to build and MetaSchedule silently kept scalar
    code. The description (what the intrinsic computes) is TVM's own; only the implementation's
    operand types change, and only when LLVM accepts them (a probe compile). Idempotent; needs
    :func:`export.tvm.intrinsics.import_tensor_intrinsics` to have run.
    """
    if _registered:
        return
    from tvm.s_tir import TensorIntrin
    from tvm.s_tir.tensor_intrin.x86 import dot_product_16x4_u8i8i32_desc
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def dot_product_16x4_u8i8i32_vnni(
        A: T.Buffer((4,), "uint8", offset_factor=1),  # type: ignore[valid-type]
        B: T.Buffer((16, 4), "int8", offset_factor=1),  # type: ignore[valid-type]
        C: T.Buffer((16,), "int32", offset_factor=1),  # type: ignore[valid-type]
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            a_u8x64 = T.reinterpret(T.broadcast(a_i32, 16), dtype="uint8x64")
            b_i8x64 = B.vload([0, 0], dtype="int8x64")
            c_i32x16 = C.vload([0], dtype="int32x16")
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"), c_i32x16, a_u8x64, b_i8x64,
                dtype="int32x16",
            )

    if _builds(dot_product_16x4_u8i8i32_vnni):  # an LLVM with the older <16 x i32> signature keeps TVM's own
        TensorIntrin.register(VNNI_INTRIN, dot_product_16x4_u8i8i32_desc, dot_product_16x4_u8i8i32_vnni, override=True)
    _registered.append(True)


def _builds(impl: Any) -> bool:
    """Whether LLVM accepts the implementation (compiled alone, for a VNNI CPU)."""
    import tvm

    try:
        tvm.compile(impl.with_attr("global_symbol", "vnni_probe"), target=tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake"}))
    except Exception:  # LLVM's verifier refuses the call: the other signature
        return False
    return True
