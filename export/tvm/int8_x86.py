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

Untuned, this form is already faster than the NCHW one (EfficientNet-Lite1 int8, one core: 165 ms
against 229 ms); tuned, its convolutions use ``vpdpbusd`` (Lite1's 1x1 head convolution after 32
trials: 0.15 ms, against 0.59 ms for the same convolution in fp32, ``bench/tvm_int8.py --conv-trials
32``). Reference: Intel, "Intel 64 and IA-32 Architectures Software Developer's Manual",
VPDPBUSD; TVM's ``tvm.s_tir.tensor_intrin.x86``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: int32 lanes of one 512-bit ``vpdpbusd`` (output channels per weight block).
OC_BLOCK = 16
#: uint8 values multiplied into one lane (input channels per activation block).
IC_BLOCK = 4


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


@dataclass
class BlockedConv:
    """A convolution in the blocked layouts: its Relax expression and how to undo the layout.

    Attributes:
        accumulator: the int32 ``NCHW16c`` result of the convolution.
        shape: its shape.
        channels: the padded number of output channels (a multiple of 16).
        out_channels: the convolution's own number of output channels.
    """

    accumulator: Any
    shape: list[int]
    channels: int
    out_channels: int

    @property
    def vector_shape(self) -> list[int]:
        """The shape a per-output-channel vector takes to broadcast over the accumulator."""
        return [1, self.shape[1], 1, 1, OC_BLOCK]

    def pad_vector(self, values: np.ndarray) -> np.ndarray:
        """A per-channel vector padded to the blocked channel count (padded channels get zeros)."""
        if values.size == 1:
            values = np.broadcast_to(values.reshape(()), (self.out_channels,))
        padded = np.zeros(self.channels, values.dtype)
        padded[: self.out_channels] = values.reshape(-1)
        return padded

    def to_nchw(self, expr: Any) -> Any:
        """``expr`` (blocked like the accumulator) back in NCHW, without the padded channels."""
        from tvm import relax

        n, blocks, h, w, _ = self.shape
        out = relax.op.reshape(relax.op.permute_dims(expr, [0, 1, 4, 2, 3]), [n, blocks * OC_BLOCK, h, w])
        if self.channels != self.out_channels:
            out = relax.op.strided_slice(out, axes=[1], begin=[0], end=[self.out_channels])
        return out


def blocked_conv(x: Any, x_shape: list[int], zero: int, wq: np.ndarray, attrs: Any, add_param: Any,
                 add_function: Any) -> BlockedConv:  # fmt: skip
    """The uint8 x int8 convolution of ``x`` (NCHW, uint8, zero point ``zero``) with ``wq`` (OIHW int8)
    in the blocked layouts.

    Args:
        x: the activation expression.
        x_shape: its shape (NCHW).
        zero: its zero point (the value of padding, spatial and channel).
        wq: the weights.
        attrs: the float ``conv2d``'s attributes (strides, padding, dilation; ``groups`` must be 1).
        add_param: ``(name, array) -> Var``, a new weight parameter.
        add_function: ``(name, PrimFunc) -> GlobalVar``, a new TIR function of the module.
    """
    from tvm import relax

    out_channels, in_channels, kh, kw = (int(v) for v in wq.shape)
    channels = -(-out_channels // OC_BLOCK) * OC_BLOCK
    in_padded = -(-in_channels // IC_BLOCK) * IC_BLOCK
    top, left, bottom, right = (int(v) for v in attrs.padding)
    if any((top, left, bottom, right, in_padded - in_channels)):
        x = relax.op.nn.pad(x, [0, 0, 0, in_padded - in_channels, top, bottom, left, right], pad_value=float(zero))
    n, _, h, w = x_shape
    h, w = h + top + bottom, w + left + right
    blocks = in_padded // IC_BLOCK
    blocked_x = relax.op.permute_dims(relax.op.reshape(x, [n, blocks, IC_BLOCK, h, w]), [0, 1, 3, 4, 2])
    packed = np.zeros((channels, in_padded, kh, kw), np.int8)
    packed[:out_channels, :in_channels] = wq
    packed = packed.reshape(channels // OC_BLOCK, OC_BLOCK, in_padded // IC_BLOCK, IC_BLOCK, kh, kw)
    packed = np.ascontiguousarray(packed.transpose(0, 2, 4, 5, 1, 3))  # [O/16, I/4, KH, KW, 16, 4]
    weight = add_param("wpacked", packed)
    x_shape = [n, blocks, h, w, IC_BLOCK]
    strides = [int(v) for v in attrs.strides]
    dilation = [int(v) for v in attrs.dilation]
    height = (x_shape[2] - (kh - 1) * dilation[0] - 1) // strides[0] + 1
    width = (x_shape[3] - (kw - 1) * dilation[1] - 1) // strides[1] + 1
    out_shape = [x_shape[0], channels // OC_BLOCK, height, width, OC_BLOCK]
    func = conv2d_nchwc_int8(x_shape, list(packed.shape), out_shape, strides, dilation)
    gv = add_function("conv2d_nchwc_int8", func)
    acc = relax.call_tir(gv, [blocked_x, weight], relax.TensorType(out_shape, "int32"))
    return BlockedConv(acc, out_shape, channels, out_channels)


def conv2d_nchwc_int8(x_shape: list[int], w_shape: list[int], out_shape: list[int], strides: list[int],
                      dilation: list[int]) -> Any:  # fmt: skip
    """The TIR function ``out[n, o, h, w, ob] = sum x[n, i, h*s+kh*d, w*s+kw*d, ib] * w[o, i, kh, kw, ob, ib]``
    (uint8 x int8 -> int32, the input already padded); the 4 input channels of a block are the
    innermost reduction, as ``dot_16x4_vnni`` needs."""
    from tvm import te, tirx

    def i64(dims: list[int]) -> list[Any]:  # Relax shapes are int64: the buffers must match them
        return [tirx.IntImm("int64", int(d)) for d in dims]

    x = te.placeholder(i64(x_shape), "uint8", name="x")
    w = te.placeholder(i64(w_shape), "int8", name="w")
    ic = te.reduce_axis((tirx.IntImm("int64", 0), tirx.IntImm("int64", w_shape[1])), name="ic")
    rh = te.reduce_axis((tirx.IntImm("int64", 0), tirx.IntImm("int64", w_shape[2])), name="kh")
    rw = te.reduce_axis((tirx.IntImm("int64", 0), tirx.IntImm("int64", w_shape[3])), name="kw")
    ib = te.reduce_axis((tirx.IntImm("int64", 0), tirx.IntImm("int64", IC_BLOCK)), name="ib")
    sh, sw = strides
    dh, dw = dilation
    out = te.compute(
        i64(out_shape),
        lambda n, o, h, wo, ob: te.sum(
            x[n, ic, h * sh + rh * dh, wo * sw + rw * dw, ib].astype("int32") * w[o, ic, rh, rw, ob, ib].astype("int32"),
            axis=[ic, rh, rw, ib],
        ),
        name="conv2d_nchwc_int8",
    )
    return te.create_prim_func([x, w, out])


#: The TVM tensor intrinsic MetaSchedule's x86 VNNI rules tensorize with (``ScheduleRule::DefaultX86``).
VNNI_INTRIN = "dot_16x4_vnni"
_registered: list[bool] = []


def register_vnni_intrinsic() -> None:
    """Re-register ``dot_16x4_vnni`` with operand types the bundled LLVM accepts.

    TVM 0.27's implementation calls ``llvm.x86.avx512.vpdpbusd.512`` with three ``<16 x i32>``
    operands; the LLVM inside the apache-tvm 0.27 wheel declares the two multiplied operands as
    ``<64 x i8>`` (LLVM 22) and rejects the call ("Call parameter type does not match function
    signature"), so every tensorized candidate failed to build and MetaSchedule silently kept scalar
    code. The description (what the intrinsic computes) is TVM's own; only the implementation's
    operand types change, and only when LLVM accepts them (a probe compile). Idempotent; needs
    :func:`export.tvm.tuning._import_tensor_intrinsics` to have run.
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
