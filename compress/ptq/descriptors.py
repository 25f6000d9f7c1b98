"""Model descriptors from the ONNX graph: the model half of a Quantune trial's features.

Quantune (Lee et al., 2022, section 3.2) describes a network by counts of its layer kinds and its
size so that a cost model trained on some networks transfers to another. We count on the fp32
ONNX graph: nodes, convs, depthwise convs (``group == channels > 1``), pointwise convs (1x1, one
group), grouped convs, batch norms, activations, skip connections (``Add``/``Concat`` of two
computed tensors), fully connected layers, parameters and their size.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

ACTIVATION_OPS = {"Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "LeakyRelu", "PRelu", "Gelu", "Elu",
                  "Selu", "Softplus", "Mish", "Swish"}  # fmt: skip
DESCRIPTOR_NAMES = (
    "nodes", "convs", "depthwise_convs", "pointwise_convs", "grouped_convs", "batch_norms", "activations",
    "skip_adds", "concats", "fully_connected", "pools", "reshapes", "log_params", "size_mb", "depthwise_fraction",
)  # fmt: skip


def _attr(node: Any, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            import onnx

            return onnx.helper.get_attribute_value(a)
    return default


def model_descriptors(model_or_path: Any) -> dict[str, float]:
    """The descriptor vector of an ONNX model (a ``ModelProto`` or a path).

    Example:
        >>> model_descriptors("model.onnx")["depthwise_convs"]  # doctest: +SKIP
        7.0
    """
    import onnx

    model = onnx.load(str(model_or_path)) if isinstance(model_or_path, str | Path) else model_or_path
    inits = {i.name: i for i in model.graph.initializer}
    params = sum(math.prod(i.dims) for i in inits.values())
    size_bytes = sum(len(i.raw_data) if i.raw_data else math.prod(i.dims) * 4 for i in inits.values())
    d = dict.fromkeys(DESCRIPTOR_NAMES, 0.0)
    d["nodes"] = float(len(model.graph.node))
    for node in model.graph.node:
        op = node.op_type
        if op == "Conv":
            d["convs"] += 1
            group = int(_attr(node, "group", 1))
            w = inits.get(node.input[1]) if len(node.input) > 1 else None
            dims = list(w.dims) if w is not None else []
            if group > 1 and dims and dims[1] == 1:
                d["depthwise_convs"] += 1
            elif group > 1:
                d["grouped_convs"] += 1
            elif len(dims) == 4 and dims[2] == 1 and dims[3] == 1:
                d["pointwise_convs"] += 1
        elif op == "BatchNormalization":
            d["batch_norms"] += 1
        elif op in ACTIVATION_OPS:
            d["activations"] += 1
        elif op in ("Add", "Sum") and len([i for i in node.input if i not in inits]) >= 2:
            d["skip_adds"] += 1
        elif op == "Concat":
            d["concats"] += 1
        elif op in ("Gemm", "MatMul"):
            d["fully_connected"] += 1
        elif "Pool" in op:
            d["pools"] += 1
        elif op in ("Reshape", "Transpose", "Flatten"):
            d["reshapes"] += 1
    d["log_params"] = math.log10(max(params, 1))
    d["size_mb"] = size_bytes / 2**20
    d["depthwise_fraction"] = d["depthwise_convs"] / d["convs"] if d["convs"] else 0.0
    return d
