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
from pathlib import Path
from typing import Any

from edgecompress.compress.qat.quantizers import is_quantized
from edgecompress.export.onnx_export import OnnxExporter

log = logging.getLogger(__name__)

QDQ_FORMAT = "onnx-qdq"
QDQ_MIN_SQNR_DB = 20.0  # random-input check in export_onnx; rounding ties may flip a code or two


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


EXPORTER = OnnxExporter("lsq-qdq", is_quantized, export_qdq_onnx, QDQ_FORMAT, QDQ_MIN_SQNR_DB)
"""LSQ-quantized modules export as QDQ graphs (registered in :mod:`edgecompress.compress.registry`)."""
