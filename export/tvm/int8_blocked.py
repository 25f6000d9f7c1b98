"""Blocked layouts of integer convolutions and matrix products, the form CPU dot-product
instructions need before MetaSchedule can tensorize them.

x86 VNNI's ``vpdpbusd`` (:mod:`edgecompress.export.tvm.int8_x86`) and ARM's ``sdot``
(:mod:`edgecompress.export.tvm.int8_arm`) both add, into each int32 lane, the dot product of 4
8-bit activations with 4 8-bit weights. MetaSchedule tensorizes a reduction with them only when
those 4 input channels lie next to each other in memory and the weights of the instruction's output
lanes form one contiguous block; TVM's plain NCHW/OIHW layouts have neither. A :class:`BlockLayout`
says how large the blocks are and which activation type the instruction multiplies; this module
writes the kernels in it:

* convolutions (``groups == 1``): activations ``NCHW{ic}c`` (``x[n, c // ic, h, w, c % ic]``,
  padded with the zero point), weights ``[O/oc, I/ic, KH, KW, oc, ic]`` packed once here (channels
  padded with zero weights to multiples of ``oc`` and ``ic``), output ``NCHW{oc}c`` int32;
* matrix products ``[..., K] x [K, N]``: activations ``[M, K/ic, ic]``, weights
  ``[N/oc, K/ic, oc, ic]``, output ``[M, N/oc, oc]`` int32.

The accumulator returns to the graph's layout after the requantization epilogue (which TVM fuses
into the kernel), without the padded channels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Name prefixes of the TIR functions of blocked kernels (how :mod:`export.tvm.int8` counts them).
BLOCKED_CONV_PREFIX = "conv2d_nchwc_int8"
BLOCKED_MATMUL_PREFIX = "matmul_blocked_int8"

AddParam = Callable[[str, np.ndarray], Any]
AddFunction = Callable[[str, Any], Any]


@dataclass(frozen=True)
class BlockLayout:
    """The blocks of one dot-product instruction.

    Attributes:
        name: for the manifest (``x86-vnni``, ``arm-dotprod``).
        oc_block: int32 output lanes of one instruction (output channels per weight block).
        ic_block: 8-bit values multiplied into one lane (input channels per activation block).
        x_dtype: the activation type the instruction multiplies (``uint8`` or ``int8``; weights are int8).
        intrinsic: the TVM tensor intrinsic MetaSchedule tensorizes the block with.
        matmul: matrix products are blocked too (otherwise only convolutions).
    """

    name: str
    oc_block: int
    ic_block: int
    x_dtype: str
    intrinsic: str
    matmul: bool = False


def _padded(n: int, block: int) -> int:
    return -(-n // block) * block


def _pad_vector(values: np.ndarray, channels: int, out_channels: int) -> np.ndarray:
    if values.size == 1:
        values = np.broadcast_to(values.reshape(()), (out_channels,))
    padded = np.zeros(channels, values.dtype)
    padded[:out_channels] = values.reshape(-1)
    return padded


@dataclass
class BlockedConv:
    """A convolution in the blocked layouts: its Relax expression and how to undo the layout.

    Attributes:
        accumulator: the int32 ``NCHW{oc}c`` result of the convolution.
        shape: its shape.
        channels: the padded number of output channels (a multiple of ``oc_block``).
        out_channels: the convolution's own number of output channels.
        oc_block: output channels per block.
    """

    accumulator: Any
    shape: list[int]
    channels: int
    out_channels: int
    oc_block: int = 16

    @property
    def vector_shape(self) -> list[int]:
        """The shape a per-output-channel vector takes to broadcast over the accumulator."""
        return [1, self.shape[1], 1, 1, self.oc_block]

    def pad_vector(self, values: np.ndarray) -> np.ndarray:
        """A per-channel vector padded to the blocked channel count (padded channels get zeros)."""
        return _pad_vector(values, self.channels, self.out_channels)

    def to_nchw(self, expr: Any) -> Any:
        """``expr`` (blocked like the accumulator) back in NCHW, without the padded channels."""
        from tvm import relax

        n, blocks, h, w, _ = self.shape
        out = relax.op.reshape(relax.op.permute_dims(expr, [0, 1, 4, 2, 3]), [n, blocks * self.oc_block, h, w])
        if self.channels != self.out_channels:
            out = relax.op.strided_slice(out, axes=[1], begin=[0], end=[self.out_channels])
        return out


@dataclass
class BlockedMatmul:
    """A matrix product in the blocked layouts.

    Attributes:
        accumulator: the int32 ``[M, N/oc, oc]`` result.
        shape: its shape.
        channels: the padded number of output columns (a multiple of ``oc_block``).
        out_channels: the product's own number of output columns ``N``.
        oc_block: output columns per block.
        leading: the activation's dimensions before ``K`` (``M`` is their product).
    """

    accumulator: Any
    shape: list[int]
    channels: int
    out_channels: int
    oc_block: int
    leading: list[int]

    @property
    def vector_shape(self) -> list[int]:
        return [1, self.shape[1], self.oc_block]

    def pad_vector(self, values: np.ndarray) -> np.ndarray:
        return _pad_vector(values, self.channels, self.out_channels)

    def to_rows(self, expr: Any) -> Any:
        """``expr`` (blocked like the accumulator) back in ``[..., N]``, without the padded columns."""
        from tvm import relax

        out = relax.op.reshape(expr, [self.shape[0], self.channels])
        if self.channels != self.out_channels:
            out = relax.op.strided_slice(out, axes=[1], begin=[0], end=[self.out_channels])
        return relax.op.reshape(out, [*self.leading, self.out_channels])


def blocked_conv(x: Any, x_shape: list[int], zero: int, wq: np.ndarray, attrs: Any, add_param: AddParam,
                 add_function: AddFunction, layout: BlockLayout) -> BlockedConv:  # fmt: skip
    """The 8-bit convolution of ``x`` (NCHW, ``layout.x_dtype``, zero point ``zero``) with ``wq``
    (OIHW int8) in the blocked layouts.

    Args:
        x: the activation expression.
        x_shape: its shape (NCHW).
        zero: its zero point (the value of padding, spatial and channel).
        wq: the weights.
        attrs: the float ``conv2d``'s attributes (strides, padding, dilation; ``groups`` must be 1).
        add_param: ``(name, array) -> Var``, a new weight parameter.
        add_function: ``(name, PrimFunc) -> GlobalVar``, a new TIR function of the module.
        layout: the block sizes and activation type.
    """
    from tvm import relax

    ocb, icb = layout.oc_block, layout.ic_block
    out_channels, in_channels, kh, kw = (int(v) for v in wq.shape)
    channels, in_padded = _padded(out_channels, ocb), _padded(in_channels, icb)
    top, left, bottom, right = (int(v) for v in attrs.padding)
    if any((top, left, bottom, right, in_padded - in_channels)):
        x = relax.op.nn.pad(x, [0, 0, 0, in_padded - in_channels, top, bottom, left, right], pad_value=float(zero))
    n, _, h, w = x_shape
    h, w = h + top + bottom, w + left + right
    blocks = in_padded // icb
    blocked_x = relax.op.permute_dims(relax.op.reshape(x, [n, blocks, icb, h, w]), [0, 1, 3, 4, 2])
    packed = np.zeros((channels, in_padded, kh, kw), np.int8)
    packed[:out_channels, :in_channels] = wq
    packed = packed.reshape(channels // ocb, ocb, blocks, icb, kh, kw)
    packed = np.ascontiguousarray(packed.transpose(0, 2, 4, 5, 1, 3))  # [O/oc, I/ic, KH, KW, oc, ic]
    weight = add_param("wpacked", packed)
    x_shape = [n, blocks, h, w, icb]
    strides = [int(v) for v in attrs.strides]
    dilation = [int(v) for v in attrs.dilation]
    height = (x_shape[2] - (kh - 1) * dilation[0] - 1) // strides[0] + 1
    width = (x_shape[3] - (kw - 1) * dilation[1] - 1) // strides[1] + 1
    out_shape = [n, channels // ocb, height, width, ocb]
    func = conv2d_nchwc_int8(x_shape, list(packed.shape), out_shape, strides, dilation, x_dtype=layout.x_dtype)
    gv = add_function(BLOCKED_CONV_PREFIX, func)
    acc = relax.call_tir(gv, [blocked_x, weight], relax.TensorType(out_shape, "int32"))
    return BlockedConv(acc, out_shape, channels, out_channels, ocb)


def blocked_matmul(x: Any, x_shape: list[int], zero: int, w_nk: np.ndarray, add_param: AddParam,
                   add_function: AddFunction, layout: BlockLayout) -> BlockedMatmul:  # fmt: skip
    """The 8-bit matrix product of ``x`` (``[..., K]``, ``layout.x_dtype``, zero point ``zero``) with
    the int8 weights ``w_nk`` (``[N, K]``: one row per output column) in the blocked layouts."""
    from tvm import relax

    ocb, icb = layout.oc_block, layout.ic_block
    out_channels, depth = (int(v) for v in w_nk.shape)
    leading = [int(v) for v in x_shape[:-1]]
    rows = int(np.prod(leading, dtype=np.int64))
    channels, depth_padded = _padded(out_channels, ocb), _padded(depth, icb)
    x = relax.op.reshape(x, [rows, depth])
    if depth_padded != depth:
        x = relax.op.nn.pad(x, [0, 0, 0, depth_padded - depth], pad_value=float(zero))
    blocks = depth_padded // icb
    blocked_x = relax.op.reshape(x, [rows, blocks, icb])
    packed = np.zeros((channels, depth_padded), np.int8)
    packed[:out_channels, :depth] = w_nk
    packed = np.ascontiguousarray(packed.reshape(channels // ocb, ocb, blocks, icb).transpose(0, 2, 1, 3))
    weight = add_param("wpacked", packed)  # [N/oc, K/ic, oc, ic]
    out_shape = [rows, channels // ocb, ocb]
    func = matmul_blocked_int8([rows, blocks, icb], list(packed.shape), out_shape, x_dtype=layout.x_dtype)
    gv = add_function(BLOCKED_MATMUL_PREFIX, func)
    acc = relax.call_tir(gv, [blocked_x, weight], relax.TensorType(out_shape, "int32"))
    return BlockedMatmul(acc, out_shape, channels, out_channels, ocb, leading)


def _i64(dims: list[int]) -> list[Any]:
    """Relax shapes are int64: the TIR buffers must match them."""
    from tvm import tirx

    return [tirx.IntImm("int64", int(d)) for d in dims]


def _reduce_axis(extent: int, name: str) -> Any:
    from tvm import te, tirx

    return te.reduce_axis((tirx.IntImm("int64", 0), tirx.IntImm("int64", extent)), name=name)


def conv2d_nchwc_int8(x_shape: list[int], w_shape: list[int], out_shape: list[int], strides: list[int],
                      dilation: list[int], *, x_dtype: str = "uint8") -> Any:  # fmt: skip
    """The TIR function ``out[n, o, h, w, ob] = sum x[n, i, h*s+kh*d, w*s+kw*d, ib] * w[o, i, kh, kw, ob, ib]``
    (``x_dtype`` x int8 -> int32, the input already padded); the input channels of a block are the
    innermost reduction, as the dot-product intrinsics need."""
    from tvm import te

    x = te.placeholder(_i64(x_shape), x_dtype, name="x")
    w = te.placeholder(_i64(w_shape), "int8", name="w")
    ic, rh, rw = _reduce_axis(w_shape[1], "ic"), _reduce_axis(w_shape[2], "kh"), _reduce_axis(w_shape[3], "kw")
    ib = _reduce_axis(x_shape[4], "ib")
    sh, sw = strides
    dh, dw = dilation
    out = te.compute(
        _i64(out_shape),
        lambda n, o, h, wo, ob: te.sum(
            x[n, ic, h * sh + rh * dh, wo * sw + rw * dw, ib].astype("int32") * w[o, ic, rh, rw, ob, ib].astype("int32"),
            axis=[ic, rh, rw, ib],
        ),
        name=BLOCKED_CONV_PREFIX,
    )
    return te.create_prim_func([x, w, out])


def matmul_blocked_int8(x_shape: list[int], w_shape: list[int], out_shape: list[int], *, x_dtype: str = "int8") -> Any:
    """The TIR function ``out[m, nb, ob] = sum x[m, kb, ib] * w[nb, kb, ob, ib]`` (``x_dtype`` x int8
    -> int32); the ``ib`` values of a block are the innermost reduction."""
    from tvm import te

    x = te.placeholder(_i64(x_shape), x_dtype, name="x")
    w = te.placeholder(_i64(w_shape), "int8", name="w")
    kb, ib = _reduce_axis(x_shape[1], "kb"), _reduce_axis(x_shape[2], "ib")
    out = te.compute(
        _i64(out_shape),
        lambda m, nb, ob: te.sum(x[m, kb, ib].astype("int32") * w[nb, kb, ob, ib].astype("int32"), axis=[kb, ib]),
        name=BLOCKED_MATMUL_PREFIX,
    )
    return te.create_prim_func([x, w, out])
