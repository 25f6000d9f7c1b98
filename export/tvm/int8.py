"""Integer kernels for quantized (QDQ) graphs on TVM.

TVM's ONNX frontend imports a QDQ graph as it is written: ``dequantize`` the 8-bit activations
and weights to float, convolve in float, ``quantize`` the result, so the int8 data saves memory but
no arithmetic. This pass rewrites the imported Relax module so that every convolution and matrix
product whose inputs are dequantized 8-bit tensors computes on the 8-bit values with an int32
accumulator, as onnxruntime's ``QLinearConv``/``QGemm`` kernels do:

    conv(sx * (xq - zx), sw * wq) = sx * sw * (conv(pad(xq, zx), wq) - zx * sum(wq))

* The activation is padded with its zero point (the float graph pads with 0.0, which is ``zx`` in
  the quantized domain) and convolved without padding, so the zero point's share of every output
  is one integer per output channel, ``zx * sum(wq[o])``, computed here once.
* Requantization is folded. When the operator's float result goes, through the bias only, into a
  ``quantize`` (what ``quantize_static`` writes: activations such as ReLU/ReLU6 are absorbed into
  the output range), and the bias is an int32 tensor with scale ``sx * sw`` (as the quantizer writes
  it), the whole ``dequantize -> conv -> + bias -> quantize`` becomes
  ``clip(round((acc + bq - zx * sum(wq)) * (sx * sw / sy)) + zy)``: one integer add and one float
  multiply per output, rounded half to even, which is onnxruntime's own requantization bit for bit.
* Otherwise (a float bias, an activation or another consumer between operator and ``quantize``) the
  accumulator is converted to float and multiplied by ``sx * sw``, and everything after it stays as
  it was, fused by TVM into the operator's epilogue.

The rewrite applies to ``relax.nn.conv2d`` (NCHW/OIHW, any groups, depthwise included) and
``relax.matmul`` (ONNX ``MatMul``, and ``Gemm`` with a 2-D weight, transposed or not) when the
activation is uint8 or int8 with one scale and zero point (per tensor), the weight is int8 with zero
points all 0 (symmetric), per tensor or per output channel, and scales and zero points are weights or
constants (known when compiling). Everything else stays on the float path, so every QDQ graph still
compiles; :class:`Int8KernelReport` counts the operators of each kind and says why some stayed float.

With ``unsigned_activations``, int8 activations are shifted by 128 into uint8 (exact: the zero point
moves with them): x86's VNNI instruction ``vpdpbusd`` multiplies uint8 by int8. Blocked layouts for
CPU dot-product instructions (:mod:`edgecompress.export.tvm.int8_blocked`) are chosen per target:
x86 VNNI (``vnni_layout``, :mod:`~edgecompress.export.tvm.int8_x86`) for convolutions, ARM64's
``sdot`` (``dotprod_layout``, :mod:`~edgecompress.export.tvm.int8_arm`) for convolutions and matrix
products, whose uint8 activations are shifted into int8 the same exact way.

Example:
    >>> mod, params, report = lower_qdq_to_integer(mod, params)  # doctest: +SKIP
    >>> report.integer, report.requantized, report.float_ops  # doctest: +SKIP
    (65, 65, 0)
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgecompress.export.errors import UnsupportedExportError
from edgecompress.export.tvm.int8_blocked import (
    BLOCKED_CONV_PREFIX,
    BLOCKED_MATMUL_PREFIX,
    BlockLayout,
    blocked_conv,
    blocked_matmul,
)

log = logging.getLogger(__name__)

#: The operators that are counted as integer or float kernels.
KERNEL_OPS = ("relax.nn.conv2d", "relax.matmul")
#: Name prefixes of the TIR functions of blocked (dot-product layout) kernels.
BLOCKED_PREFIXES = (BLOCKED_CONV_PREFIX, BLOCKED_MATMUL_PREFIX)
_ACTIVATION_DTYPES = ("uint8", "int8")
_QUANT_RANGE = {"uint8": (0, 255), "int8": (-128, 127)}


@dataclass
class Int8KernelReport:
    """What the rewrite did.

    Attributes:
        integer: convolutions and matrix products computing on 8-bit inputs with int32 accumulators.
        requantized: those of them whose bias and following ``quantize`` were folded into integer
            requantization (the rest convert the accumulator to float).
        float_ops: convolutions and matrix products still computed in float.
        reasons: why operators stayed float (reason -> count); those whose inputs are not
            dequantized 8-bit tensors at all (layers left unquantized) count as "not quantized".
        unsigned_activations: int8 activations were shifted into uint8.
        layout: the blocked layout of the target's dot-product instruction (``x86-vnni``,
            ``arm-dotprod``), or ``nchw`` when there is none.
        blocked: convolutions and matrix products written in that blocked layout.
        unfolded_reasons: why integer kernels kept a float requantization (reason -> count).
    """

    integer: int = 0
    requantized: int = 0
    float_ops: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    unsigned_activations: bool = False
    layout: str = "nchw"
    blocked: int = 0
    unfolded_reasons: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The manifest's record: ``{"integer", "requantized", "float", "float_reasons", ...}``."""
        return {"integer": self.integer, "requantized": self.requantized, "float": self.float_ops,
                "float_reasons": dict(sorted(self.reasons.items())), "unsigned_activations": self.unsigned_activations,
                "vnni_layout": self.blocked if self.layout == "x86-vnni" else 0,
                "dotprod_layout": self.blocked if self.layout == "arm-dotprod" else 0,
                "not_requantized_reasons": dict(sorted(self.unfolded_reasons.items()))}  # fmt: skip


def lower_qdq_to_integer(
    mod: Any, params: list[Any], *, unsigned_activations: bool = False, vnni_layout: bool = False,
    dotprod_layout: bool = False,
) -> tuple[Any, list[Any], Int8KernelReport]:
    """Rewrite ``dequantize -> conv2d/matmul [-> + bias -> quantize]`` in ``mod["main"]`` into integer kernels.

    Args:
        mod: a Relax module as imported from ONNX, whose ``main`` takes ``(inputs..., *weights)``
            (attribute ``num_input``).
        params: the values of ``main``'s weight parameters, in order (``tvm.runtime.Tensor``).
        unsigned_activations: shift int8 activations into uint8 (the operand type of x86 VNNI).
        vnni_layout: write convolutions with ``groups == 1`` in the blocked layouts that MetaSchedule
            tensorizes with x86 VNNI (:mod:`edgecompress.export.tvm.int8_x86`); implies
            ``unsigned_activations``.
        dotprod_layout: write convolutions with ``groups == 1`` and matrix products in the blocked
            layouts that MetaSchedule tensorizes with ARM64's ``sdot``
            (:mod:`edgecompress.export.tvm.int8_arm`), their activations shifted into int8.

    Returns:
        (module, weights, report): ``main`` takes its inputs, then the original weights it still
        uses (in their order), then the per-channel constants the rewrite computed (zero-point
        corrections, multipliers); ``weights`` are their values in that order.

    Raises:
        UnsupportedExportError: both ``vnni_layout`` and ``dotprod_layout`` (one target has one).
    """
    import tvm
    from tvm import relax
    from tvm.relax.dpl import rewrite_call

    from edgecompress.export.tvm.int8_arm import DOTPROD_LAYOUT
    from edgecompress.export.tvm.int8_x86 import VNNI_LAYOUT

    if vnni_layout and dotprod_layout:
        raise UnsupportedExportError("one blocked layout per target: x86 VNNI or ARM dot product, not both")
    main = mod["main"]
    unsigned_activations = unsigned_activations or vnni_layout
    layout = VNNI_LAYOUT if vnni_layout else DOTPROD_LAYOUT if dotprod_layout else None
    lowering = _Lowering(main, params, unsigned_activations, layout)
    p = _Patterns()
    func = main
    for kind in ("conv2d", "matmul"):
        kernel = p.conv if kind == "conv2d" else p.matmul
        for root, folded in ((p.quantized(kernel, biased=True), True), (p.quantized(kernel, biased=False), True),
                             (kernel, False)):  # fmt: skip
            func = relax.analysis.remove_all_unused(rewrite_call(root, lowering.callback(p, kind, folded), func))
    # main takes the inputs, then the weights still used: the original ones in their order, then the new ones
    num_input = len(main.params) - len(params)
    used = {v for v in relax.analysis.free_vars(func.body)}
    weights = [(v, t) for v, t in zip([*main.params[num_input:], *lowering.new_vars], [*params, *lowering.new_values],
                                      strict=True) if v in used]  # fmt: skip
    func = relax.Function([*main.params[:num_input], *(v for v, _ in weights)], func.body, func.ret_ty, func.is_pure,
                          func.attrs)  # fmt: skip
    out = tvm.IRModule({"main": func})
    for gv in mod.functions:
        if gv.name_hint != "main":
            out[gv] = mod[gv]
    for gv, prim in lowering.functions.items():
        out[gv] = prim
    out = relax.transform.DeadCodeElimination(["main"])(out)  # TIR functions of convs dropped after all
    report = Int8KernelReport(unsigned_activations=unsigned_activations, layout=layout.name if layout else "nchw")
    report.integer, report.float_ops = count_kernels(out["main"])
    report.requantized = lowering.requantized
    report.blocked = sum(getattr(c.op, "name", "") == "relax.call_tir" for c in _kernel_calls(out["main"], blocked=True))
    still_float = [reason for call, reason in lowering.refused.items() if call in _kernel_calls(out["main"])]
    report.reasons = dict(Counter(still_float))
    report.unfolded_reasons = dict(Counter(r for call, r in lowering.unfolded.items() if call not in lowering.refused))
    if report.float_ops > len(still_float):
        report.reasons["not quantized"] = report.float_ops - len(still_float)
    log.info("int8 kernels: %d integer (%d requantized), %d float %s", report.integer, report.requantized,
             report.float_ops, report.reasons or "")  # fmt: skip
    return out, [t for _, t in weights], report


def count_kernels(func: Any) -> tuple[int, int]:
    """(integer, float) counts of the convolutions and matrix products in a Relax function (the
    blocked kernels, TIR functions called with ``call_tir``, count as integer)."""
    counts = Counter("float" if _dtype(call).startswith("float") else "integer" for call in _kernel_calls(func, blocked=True))
    return counts["integer"], counts["float"]


def _kernel_calls(func: Any, *, blocked: bool = False) -> list[Any]:
    from tvm import relax

    calls: list[Any] = []

    def visit(expr: Any) -> None:
        if not isinstance(expr, relax.Call):
            return
        name = getattr(expr.op, "name", "")
        if name in KERNEL_OPS or (blocked and name == "relax.call_tir"
                                  and expr.args[0].name_hint.startswith(BLOCKED_PREFIXES)):  # fmt: skip
            calls.append(expr)

    relax.analysis.post_order_visit(func.body, visit)
    return calls


def _dtype(expr: Any) -> str:
    return str(expr.ty.dtype.dtype)


class _Patterns:
    """The dataflow patterns the rewrite matches (named wildcards are read back from the matchings)."""

    def __init__(self) -> None:
        from tvm.relax.dpl import is_op, wildcard

        self.xq, self.sx, self.zx, self.wq, self.sw, self.zw = (wildcard() for _ in range(6))
        self.bq, self.sb, self.zb, self.sy, self.zy = (wildcard() for _ in range(5))
        self.dq_x = is_op("relax.dequantize")(self.xq, self.sx, self.zx)
        self.dq_w = is_op("relax.dequantize")(self.wq, self.sw, self.zw)
        self.transposed = is_op("relax.permute_dims")(self.dq_w)
        self.conv = is_op("relax.nn.conv2d")(self.dq_x, self.dq_w)
        self.matmul = is_op("relax.matmul")(self.dq_x, self.dq_w | self.transposed)
        self.dq_b = is_op("relax.dequantize")(self.bq, self.sb, self.zb)
        self.bias = self.dq_b | is_op("relax.reshape")(self.dq_b, wildcard())

    def quantized(self, kernel: Any, *, biased: bool) -> Any:
        from tvm.relax.dpl import is_op

        body = is_op("relax.add")(kernel, self.bias) if biased else kernel
        return is_op("relax.quantize")(body, self.sy, self.zy)

    def read(self, matchings: Any) -> dict[str, Any]:
        names = ("xq", "sx", "zx", "wq", "sw", "zw", "bq", "sb", "zb", "sy", "zy", "dq_x", "dq_w", "transposed",
                 "conv", "matmul", "bias")  # fmt: skip
        return {n: matchings.get(getattr(self, n)) for n in names}


@dataclass
class _Operands:
    """A matched operator's values, checked: what its integer form needs."""

    kernel: Any  # the float conv2d / matmul call
    zx: int
    out_axis: int  # the weight's output-channel axis (0: OIHW or [N, K]; 1: [K, N])
    multiplier: np.ndarray  # sx * sw (float32, one or per output channel)
    wq: np.ndarray
    channels: int


@dataclass
class _Accumulator:
    """An operator's int32 accumulator, its zero-point correction (per output channel), the shape
    per-channel vectors take to broadcast over it, and how its layout returns to the graph's."""

    expr: Any
    correction: np.ndarray
    vector_shape: list[int]
    finish: Callable[[Any], Any] = lambda expr: expr
    pad_vector: Callable[[np.ndarray], np.ndarray] = lambda values: values


class _Refused(Exception):
    """An operator that stays float (the message says why)."""


class _Lowering:
    """The state of one rewrite: the known weight values, the vectors it adds, why ops stayed float."""

    def __init__(self, main: Any, params: list[Any], unsigned_activations: bool, layout: BlockLayout | None) -> None:
        self.values: dict[Any, Any] = dict(zip(list(main.params[len(main.params) - len(params):]), params, strict=True))
        self.unsigned = unsigned_activations
        self.layout = layout
        self.new_vars: list[Any] = []
        self.new_values: list[Any] = []
        self.builder: Any = None
        self.refused: dict[Any, str] = {}
        self.requantized = 0
        self.unfolded: dict[Any, str] = {}

    def callback(self, p: _Patterns, kind: str, folded: bool) -> Any:
        def rewrite(orig: Any, matchings: Any) -> Any:
            m = p.read(matchings)
            kernel = m["conv" if kind == "conv2d" else "matmul"]
            try:
                ops = self._check(kernel, m, kind)
                if not folded:
                    return self._float_output(ops, m, kind)
                result = self._requantized(orig, ops, m, kind)
                self.requantized += 1
                return result
            except _Refused as refused:
                if not folded:  # the plain pattern is the last try: the operator stays float
                    self.refused[kernel] = str(refused)
                else:  # it may still become an integer kernel without folded requantization
                    self.unfolded[kernel] = str(refused)
                return orig

        return rewrite

    def value(self, expr: Any) -> np.ndarray | None:
        """The compile-time value of a weight parameter or constant (None: computed at run time)."""
        import tvm

        if expr is None:
            return None
        if isinstance(expr, tvm.ir.expr.Constant):
            return np.asarray(expr.value.numpy())
        tensor = self.values.get(expr)
        return None if tensor is None else np.asarray(tensor.numpy())

    def add(self, name: str, array: np.ndarray) -> Any:
        """A new ``main`` parameter holding ``array``."""
        import tvm
        from tvm import relax

        var = relax.Var(f"int8_{name}_{len(self.new_vars)}", relax.TensorType(list(array.shape), str(array.dtype)))
        self.new_vars.append(var)
        self.new_values.append(tvm.runtime.tensor(np.array(array, order="C")))  # ascontiguousarray makes 0-d 1-d
        return var

    def add_function(self, name: str, func: Any) -> Any:
        """A TIR function of the module (one per distinct function: convolutions of equal shapes share it)."""
        from tvm import relax

        if self.builder is None:
            self.builder = relax.BlockBuilder()
        return self.builder.add_func(func.without_attr("global_symbol"), name)

    @property
    def functions(self) -> dict[Any, Any]:
        """The TIR functions added, by their global variables."""
        return {} if self.builder is None else dict(self.builder.get().functions.items())

    def _check(self, kernel: Any, m: dict[str, Any], kind: str) -> _Operands:
        if _dtype(kernel) != "float32":
            raise _Refused("not float32")
        if any(str(m[dq].attrs.out_dtype) != "float32" for dq in ("dq_x", "dq_w")):
            raise _Refused("dequantizes to another float type")
        x_dtype, w_dtype = _dtype(m["xq"]), _dtype(m["wq"])
        if x_dtype not in _ACTIVATION_DTYPES:
            raise _Refused(f"activation type {x_dtype}")
        if w_dtype != "int8":
            raise _Refused(f"weight type {w_dtype}")
        sx, zx, sw, zw, wq = (self.value(m[k]) for k in ("sx", "zx", "sw", "zw", "wq"))
        if sx is None or zx is None or sw is None or zw is None or wq is None:
            raise _Refused("weights or quantization parameters computed at run time")
        if sx.size != 1 or zx.size != 1:
            raise _Refused("per-channel activation quantization")
        if np.any(zw != 0):
            raise _Refused("asymmetric weights (nonzero weight zero point)")
        out_axis = self._weight_out_axis(kernel, m, kind, wq)
        channels = int(wq.shape[out_axis])
        if sw.size != 1 and (sw.size != channels or int(m["dq_w"].attrs.axis) % wq.ndim != out_axis):
            raise _Refused("weight scales neither per tensor nor per output channel")
        multiplier = (sx.astype(np.float32).reshape(()) * sw.astype(np.float32).reshape(-1)).astype(np.float32)
        return _Operands(kernel, int(zx.reshape(())), out_axis, multiplier, wq, channels)

    @staticmethod
    def _weight_out_axis(kernel: Any, m: dict[str, Any], kind: str, wq: np.ndarray) -> int:
        if kind == "conv2d":
            a = kernel.attrs
            if (str(a.data_layout), str(a.kernel_layout), str(a.out_layout)) != ("NCHW", "OIHW", "NCHW"):
                raise _Refused(f"layout {a.data_layout}/{a.kernel_layout}")
            return 0
        if wq.ndim != 2:
            raise _Refused("matmul weight is not a matrix")
        if m["transposed"] is not None:
            axes = m["transposed"].attrs.axes
            if axes is not None and [int(v) for v in axes] != [1, 0]:
                raise _Refused("matmul weight permuted other than transposed")
            return 0
        return 1

    def _accumulator(self, ops: _Operands, m: dict[str, Any], kind: str) -> _Accumulator:
        """The int32 accumulator of the operator on the 8-bit inputs and the zero-point correction
        to subtract from it (int64, per output channel)."""
        from tvm import relax

        x = _Activation(m["xq"], _dtype(m["xq"]), ops.zx)
        if self.unsigned:
            x = x.shifted("uint8")
        wq = ops.wq.astype(np.int64)
        layout, shape = self.layout, _static_shape(m["xq"])
        if kind == "matmul":
            correction_per_column = wq.sum(axis=1 - ops.out_axis)
            if layout is not None and layout.matmul and shape is not None:
                x = x.shifted(layout.x_dtype)
                w_nk = ops.wq if ops.out_axis == 0 else ops.wq.T
                mm = blocked_matmul(x.expr, shape, x.zero, w_nk, self.add, self.add_function, layout)
                return _Accumulator(mm.accumulator, x.zero * correction_per_column, mm.vector_shape, mm.to_rows,
                                    mm.pad_vector)  # fmt: skip
            weight = m["wq"] if ops.out_axis == 1 else relax.op.permute_dims(m["wq"], [1, 0])
            acc = relax.op.matmul(x.expr, weight, out_dtype="int32")
            return _Accumulator(acc, x.zero * correction_per_column, [ops.channels])
        a = ops.kernel.attrs
        if layout is not None and int(a.groups) == 1 and shape is not None:
            x = x.shifted(layout.x_dtype)
            conv = blocked_conv(x.expr, shape, x.zero, ops.wq, a, self.add, self.add_function, layout)
            correction = x.zero * wq.reshape(ops.channels, -1).sum(axis=1)
            return _Accumulator(conv.accumulator, correction, conv.vector_shape, conv.to_nchw, conv.pad_vector)
        correction = x.zero * wq.reshape(ops.channels, -1).sum(axis=1)
        zero, data = x.zero, x.expr
        padding = [int(v) for v in a.padding]
        if zero != 0 and any(padding):  # pad with the zero point: 0.0 in the float graph
            top, left, bottom, right = padding
            data = relax.op.nn.pad(data, [0, 0, 0, 0, top, bottom, left, right], pad_value=float(zero))
            padding = [0, 0, 0, 0]
        acc = relax.op.nn.conv2d(data, m["wq"], strides=[int(v) for v in a.strides], padding=padding,
                                 dilation=[int(v) for v in a.dilation], groups=int(a.groups), data_layout="NCHW",
                                 kernel_layout="OIHW", out_layout="NCHW", out_dtype="int32")  # fmt: skip
        return _Accumulator(acc, correction, [1, ops.channels, 1, 1])

    def _per_channel(self, name: str, values: np.ndarray, acc: _Accumulator) -> Any:
        values = acc.pad_vector(values)
        return self.add(name, values.reshape(acc.vector_shape) if values.size > 1 else values.reshape(()))

    def _float_output(self, ops: _Operands, m: dict[str, Any], kind: str) -> Any:
        """``float(acc - correction) * sx * sw``: the operator's float result, from integer arithmetic."""
        from tvm import relax

        acc = self._accumulator(ops, m, kind)
        out = acc.expr
        if np.any(acc.correction != 0):
            out = relax.op.subtract(out, self._per_channel("corr", _int32(acc.correction), acc))
        return acc.finish(relax.op.multiply(relax.op.astype(out, "float32"), self._per_channel("scale", ops.multiplier, acc)))

    def _requantized(self, orig: Any, ops: _Operands, m: dict[str, Any], kind: str) -> Any:
        """``clip(round((acc + bq - correction) * sx * sw / sy) + zy)`` in the quantize's output type."""
        from tvm import relax

        out_dtype = _dtype(orig)
        sy, zy = self.value(m["sy"]), self.value(m["zy"])
        if out_dtype not in _QUANT_RANGE or sy is None or zy is None or sy.size != 1 or zy.size != 1:
            raise _Refused("output not quantized per tensor to 8 bits")
        if str(orig.attrs.out_dtype) != out_dtype:
            raise _Refused("quantize output type")
        bias = np.zeros(ops.channels, np.int64)
        if m["bq"] is not None:
            bq, sb, zb = self.value(m["bq"]), self.value(m["sb"]), self.value(m["zb"])
            if bq is None or sb is None or zb is None or _dtype(m["bq"]) != "int32" or np.any(zb != 0):
                raise _Refused("bias not int32 with zero points 0")
            if bq.size != ops.channels or not _per_channel_shape(m["bias"], ops.kernel, kind, ops.channels):
                raise _Refused("bias not one value per output channel")
            if not np.allclose(sb.astype(np.float32).reshape(-1), ops.multiplier, rtol=1e-6, atol=0):
                raise _Refused("bias scale is not input scale x weight scale")
            bias = bq.astype(np.int64).reshape(-1)
        acc = self._accumulator(ops, m, kind)
        out = acc.expr
        offset = bias - acc.correction
        if np.any(offset != 0):
            out = relax.op.add(out, self._per_channel("offset", _int32(offset), acc))
        # onnxruntime's QLinearConv/QGemm: output scale = sx * sw / sy in float32, then round half to even
        requant = (ops.multiplier / sy.astype(np.float32).reshape(())).astype(np.float32)
        scaled = relax.op.round(relax.op.multiply(relax.op.astype(out, "float32"), self._per_channel("requant", requant, acc)))
        low, high = _QUANT_RANGE[out_dtype]
        # the zero point as a weight, not a constant: layers of equal shapes then share one TIR function
        # (one tuning task) whatever their zero points
        shifted = relax.op.add(scaled, self.add("zero", np.asarray(float(int(zy.reshape(()))), np.float32)))
        clipped = relax.op.minimum(relax.op.maximum(shifted, relax.const(float(low), "float32")), relax.const(float(high), "float32"))
        return acc.finish(relax.op.astype(clipped, out_dtype))


def _per_channel_shape(bias: Any, kernel: Any, kind: str, channels: int) -> bool:
    """Whether ``bias`` broadcasts over the operator's output along its channel axis only (axis 1 of
    a convolution, the last axis of a matrix product)."""
    shape = getattr(bias.ty, "shape", None)
    rank = int(kernel.ty.ndim)
    if shape is None or not hasattr(shape, "values") or len(shape.values) > rank:
        return False
    dims = [1] * (rank - len(shape.values)) + [int(v) for v in shape.values]
    axis = 1 if kind == "conv2d" else rank - 1
    return dims[axis] == channels and all(d == 1 for i, d in enumerate(dims) if i != axis)


@dataclass(frozen=True)
class _Activation:
    """An 8-bit activation expression, its type and its zero point."""

    expr: Any
    dtype: str
    zero: int

    def shifted(self, dtype: str) -> _Activation:
        """The activation moved by 128 into ``dtype`` (uint8 <-> int8), its zero point moved with it:
        the differences ``x - zero`` the kernel computes with are unchanged, so the shift is exact."""
        from tvm import relax

        if self.dtype == dtype:
            return self
        step = 128 if dtype == "uint8" else -128
        wide = relax.op.add(relax.op.astype(self.expr, "int16"), relax.const(step, "int16"))
        return _Activation(relax.op.astype(wide, dtype), dtype, self.zero + step)


def _static_shape(expr: Any) -> list[int] | None:
    """The static shape of a tensor expression (None when a dimension is symbolic)."""
    shape = getattr(expr.ty, "shape", None)
    values = getattr(shape, "values", None)
    if values is None:
        return None
    try:
        return [int(v) for v in values]
    except TypeError:  # a symbolic dimension
        return None


def _int32(values: np.ndarray) -> np.ndarray:
    if np.abs(values).max(initial=0) >= 2**31:
        raise _Refused("zero-point correction overflows int32")
    return values.astype(np.int32)


@dataclass
class Int8Kernels:
    """How an export uses the rewrite: whether it is on, and what it did (for the manifest).

    Attributes:
        enabled: rewrite QDQ graphs into integer kernels.
        vnni_layout: blocked layouts for x86 VNNI (see :func:`lower_qdq_to_integer`).
        dotprod_layout: blocked layouts for ARM64's dot-product instructions.
        off_reason: why the rewrite is off, for the manifest (``--no-int8-kernels``, a fallback).
        report: what the rewrite did, once it ran.
    """

    enabled: bool
    vnni_layout: bool = False
    dotprod_layout: bool = False
    off_reason: str = ""
    report: Int8KernelReport | None = None

    @classmethod
    def for_target(cls, tvm_target: Any, *, enabled: bool, off_reason: str = "") -> Int8Kernels:
        """The rewrite for a TVM target: blocked VNNI layouts when its CPU has VNNI, blocked
        dot-product layouts when it is an ARM64 CPU with the dot-product extension, else NCHW."""
        from edgecompress.export.tvm.int8_arm import target_has_dotprod
        from edgecompress.export.tvm.int8_x86 import target_has_vnni

        vnni = enabled and target_has_vnni(tvm_target)
        dotprod = enabled and not vnni and target_has_dotprod(tvm_target)
        return cls(enabled=enabled, vnni_layout=vnni, dotprod_layout=dotprod, off_reason=off_reason)

    def rewrite(self, mod: Any, params: list[Any]) -> tuple[Any, list[Any]]:
        """The ``graph_rewrite`` hook of :func:`export.tvm.compile.import_onnx`."""
        mod, params, self.report = lower_qdq_to_integer(mod, params, vnni_layout=self.vnni_layout,
                                                        dotprod_layout=self.dotprod_layout)  # fmt: skip
        return mod, params

    @property
    def applied(self) -> bool:
        """Some operator runs as an integer kernel."""
        return self.report is not None and self.report.integer > 0

    @property
    def exact(self) -> bool:
        """Every convolution and matrix product is an integer kernel with integer requantization: the
        model then computes what onnxruntime's QLinearConv/QGemm kernels compute."""
        r = self.report
        return r is not None and r.integer > 0 and r.float_ops == 0 and r.requantized == r.integer

    def manifest(self) -> dict[str, Any]:
        """``extra["int8_kernels"]`` of a QDQ model's artifact."""
        if self.report is None:
            return {"enabled": False, "reason": self.off_reason or "disabled"}
        return {"enabled": True, **self.report.to_dict()}

    def notes(self) -> list[str]:
        if self.report is None:
            return [f"int8 kernels off: {self.off_reason}"] if self.off_reason else []
        r = self.report
        total = r.integer + r.float_ops
        note = f"int8 kernels: {r.integer} of {total} convolutions/matrix products run on 8-bit integers"
        if r.integer:
            note += f" ({r.requantized} with integer requantization"
            where = {"x86-vnni": "x86 VNNI", "arm-dotprod": "ARM dot-product"}.get(r.layout, r.layout)
            note += f", {r.blocked} in {where} layouts)" if r.blocked else ")"
        if r.reasons:
            note += "; float: " + ", ".join(f"{n} {reason}" for reason, n in sorted(r.reasons.items()))
        return [note]
