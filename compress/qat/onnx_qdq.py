"""Export of LSQ-quantized models as a standard QDQ ONNX graph (QuantizeLinear/DequantizeLinear).

Weights become integer initializers (``int8`` holding values in ``[-Q_N, Q_P]`` of the trained
bit-width) followed by ``DequantizeLinear`` (per-channel on axis 0 or per-tensor). Activations
become ``QuantizeLinear -> DequantizeLinear`` with zero point 0 (``uint8`` after ReLU, ``int8``
otherwise). Below 8 bits a ``Clip`` to ``[-Q_N * s, Q_P * s]`` precedes ``QuantizeLinear``, so the
8-bit container holds exactly the sub-8-bit grid; onnxruntime runs this graph on every execution
provider, unlike opset-21 ``int4`` tensors, which only some kernels accept and which STACK.md
measured as 5x slower than fp32 on CPU convolutions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

QDQ_FORMAT = "onnx-qdq"
QDQ_MIN_SQNR_DB = 20.0  # random-input check in export_onnx; rounding ties may flip a code or two


@dataclass
class _Consts:
    """Constants handed to the symbolic functions (python objects pass through unchanged)."""

    fake: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    q_n: int
    q_p: int
    codes: torch.Tensor | None = None
    axis: int | None = None


def _const(g: Any, t: torch.Tensor) -> Any:
    return g.op("Constant", value_t=t)


class _WeightDQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, fake: torch.Tensor, consts: _Consts) -> torch.Tensor:  # type: ignore[override]
        # tensors used here must be arguments: the tracer rejects tensors hidden in a python holder
        return fake.clone()

    @staticmethod
    def symbolic(g: Any, w: Any, fake: Any, consts: _Consts) -> Any:
        assert consts.codes is not None  # internal invariant: weight constants always carry codes
        args = [_const(g, consts.codes), _const(g, consts.scale), _const(g, consts.zero_point)]
        if consts.axis is None:
            return g.op("DequantizeLinear", *args)
        return g.op("DequantizeLinear", *args, axis_i=consts.axis)


class _ActQDQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, consts: _Consts) -> torch.Tensor:  # type: ignore[override]
        return torch.clamp(torch.round(x / scale), -consts.q_n, consts.q_p) * scale

    @staticmethod
    def symbolic(g: Any, x: Any, scale: Any, consts: _Consts) -> Any:
        s = consts.scale
        lo, hi = (-128, 127) if consts.zero_point.dtype == torch.int8 else (0, 255)
        if (-consts.q_n, consts.q_p) != (lo, hi):
            x = g.op("Clip", x, _const(g, -consts.q_n * s), _const(g, consts.q_p * s))
        q = g.op("QuantizeLinear", x, _const(g, s), _const(g, consts.zero_point))
        return g.op("DequantizeLinear", q, _const(g, s), _const(g, consts.zero_point))


def _untraced(t: torch.Tensor) -> torch.Tensor:
    # a fresh tensor the ONNX tracer has never seen, so it can live inside a python constant holder
    return torch.from_numpy(t.detach().cpu().numpy().copy())


def qdq_for_export(
    v: torch.Tensor, scale: torch.Tensor, q_n: int, q_p: int, per_channel: bool, kind: str
) -> torch.Tensor:
    """The export-time graph of one LSQ quantizer (called from ``LSQQuantizer.forward``)."""
    s = _untraced(scale).float()
    if kind == "weight":
        codes = torch.clamp(torch.round(_untraced(v) / s), -q_n, q_p)
        fake = codes * s
        if per_channel:
            s1 = s.reshape(-1)
            consts = _Consts(
                fake, s1, torch.zeros(s1.shape, dtype=torch.int8), q_n, q_p, codes.to(torch.int8), 0
            )
        else:
            consts = _Consts(
                fake, s.reshape(()), torch.tensor(0, dtype=torch.int8), q_n, q_p, codes.to(torch.int8)
            )
        return _WeightDQ.apply(v, fake, consts)
    zp = torch.tensor(0, dtype=torch.int8 if q_n > 0 else torch.uint8)
    return _ActQDQ.apply(v, scale, _Consts(s, s.reshape(()), zp, q_n, q_p))


def _constants_to_initializers(model: Any) -> None:
    # QDQ tools (onnxruntime's quantizer, brevitas) keep weights, scales and zero points as
    # initializers; the TorchScript exporter leaves our symbolic constants as Constant nodes.
    keep = []
    for node in model.graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            tensor = node.attribute[0].t
            tensor.name = node.output[0]
            model.graph.initializer.append(tensor)
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)


def _prune_unused_initializers(model: Any) -> None:
    used = {i for node in model.graph.node for i in node.input} | {o.name for o in model.graph.output}
    init_names = {init.name for init in model.graph.initializer}
    keep = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    graph_inputs = [i for i in model.graph.input if i.name in used or i.name not in init_names]
    del model.graph.input[:]
    model.graph.input.extend(graph_inputs)


def export_qdq_onnx(module: Any, io: Any, path: Path, opset: int) -> None:
    """Write ``module`` (holding LSQ quantizers) as a QDQ ONNX file at ``path`` (``io``: the model's
    example inputs and names, an ``export.torch_io.ExportIO``)."""
    import onnx

    from edgecompress.export.onnx_export import torch_onnx_export

    module.eval()
    torch_onnx_export(module, io, path, opset)
    model = onnx.load(str(path))
    _constants_to_initializers(model)
    _prune_unused_initializers(model)
    onnx.save(model, str(path))


_registered = False


def register_qdq_exporter() -> None:
    """Make ``export.export_onnx`` use :func:`export_qdq_onnx` for LSQ-quantized modules (idempotent)."""
    global _registered
    if _registered:
        return
    from edgecompress.compress.qat.quantizers import is_quantized
    from edgecompress.export import OnnxExporter, register_onnx_exporter

    register_onnx_exporter(
        OnnxExporter("lsq-qdq", is_quantized, export_qdq_onnx, QDQ_FORMAT, QDQ_MIN_SQNR_DB)
    )
    _registered = True
