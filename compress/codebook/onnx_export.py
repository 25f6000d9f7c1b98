"""The ``onnx-codebook`` exporter: packed indices and codebooks in the file, weights rebuilt in-graph.

Each codebook weight becomes one call of a model-local ONNX function (domain
``edgecompress.codebook``, one function per variant and bit width) whose inputs are the stored
tensors: packed uint8 indices, fp16 codebook(s), fp16 group scales, int32 group boundaries and
the (out, D) shape. The function body unpacks 8 indices from each block of ``b`` bytes with
integer arithmetic (Cast, Mul, ReduceSum, Div, Mod), rebuilds the group id of every row from the
boundaries (Range, GreaterOrEqual, ReduceSum) and gathers the codewords (Gather). Functions keep
the graph small: the body is written once, each layer adds one node. ``onnx.inliner`` turns them
into plain nodes for runtimes without function support (TVM's importer).

JLCM paper: Yvinec, Dapogny, Bailly, ICLR 2024 (arXiv 2309.17361).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from edgecompress.compress.codebook.symbolic import DOMAIN, op_type

log = logging.getLogger(__name__)

FORMAT = "onnx-codebook"


def build_function(variant: str, bits: int, opset: int, permuted: bool = False) -> Any:
    """The ONNX FunctionProto that rebuilds a (out, D) float weight from its stored parts."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    def const(name: str, value: Any) -> Any:
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name))

    n = helper.make_node
    nodes = [
        const("byte_w", np.array([256**k for k in range(bits)], dtype=np.int64)),
        const("shift", np.array([[2 ** (bits * j) for j in range(8)]], dtype=np.int64)),
        const("modulus", np.array(2**bits, dtype=np.int64)),
        const("axis1", np.array([1], dtype=np.int64)),
        const("minus1", np.array([-1], dtype=np.int64)),
        const("zero1", np.array([0], dtype=np.int64)),
        const("one1", np.array([1], dtype=np.int64)),
        const("zero", np.array(0, dtype=np.int64)),
        const("one", np.array(1, dtype=np.int64)),
        n("Cast", ["packed"], ["p64"], to=TensorProto.INT64),
        n("Mul", ["p64", "byte_w"], ["pw"]),
        n("ReduceSum", ["pw", "axis1"], ["block"], keepdims=1),  # (blocks, 1): 8 indices in one int64
        n("Div", ["block", "shift"], ["shifted"]),
        n("Mod", ["shifted", "modulus"], ["idx8"]),
        n("Reshape", ["idx8", "minus1"], ["idx_flat"]),
        n("ReduceProd", ["shape2d"], ["count"], keepdims=1),
        n("Slice", ["idx_flat", "zero1", "count"], ["idx_n"]),
        n("Reshape", ["idx_n", "shape2d"], ["idx"]),
        n("Slice", ["shape2d", "zero1", "one1"], ["rows1"]),
        n("Squeeze", ["rows1"], ["rows"]),
        n("Range", ["zero", "rows", "one"], ["row_ids"]),
        n("Unsqueeze", ["row_ids", "axis1"], ["row_col"]),
        n("Cast", ["bounds"], ["bounds64"], to=TensorProto.INT64),
        n("GreaterOrEqual", ["row_col", "bounds64"], ["past"]),
        n("Cast", ["past"], ["past64"], to=TensorProto.INT64),
        n("ReduceSum", ["past64", "axis1"], ["gid"], keepdims=0),
        n("Reshape", ["codebook", "minus1"], ["cb_flat"]),
    ]
    if variant == "scales":
        inputs = ["packed", "codebook", "scales", "bounds", "shape2d"]
        nodes += [
            n("Gather", ["cb_flat", "idx"], ["w16"]),
            n("Cast", ["w16"], ["w"], to=TensorProto.FLOAT),
            n("Gather", ["scales", "gid"], ["s16"]),
            n("Cast", ["s16"], ["s"], to=TensorProto.FLOAT),
            n("Unsqueeze", ["s", "axis1"], ["s_col"]),
            n("Mul", ["w", "s_col"], ["weight"]),
        ]
    else:
        inputs = ["packed", "codebook", "bounds", "shape2d"]
        nodes += [
            n("Shape", ["codebook"], ["cb_shape"], start=1, end=2),
            n("Mul", ["gid", "cb_shape"], ["offset"]),
            n("Unsqueeze", ["offset", "axis1"], ["offset_col"]),
            n("Add", ["idx", "offset_col"], ["idx_global"]),
            n("Gather", ["cb_flat", "idx_global"], ["w16"]),
            n("Cast", ["w16"], ["weight"], to=TensorProto.FLOAT),
        ]
    if permuted:  # rows back in their original order: one gather (int16 indices widened in-graph)
        inputs.append("row_gather")
        for node in nodes:
            node.output[:] = ["stored" if o == "weight" else o for o in node.output]
        nodes += [n("Cast", ["row_gather"], ["gather64"], to=TensorProto.INT64),
                  n("Gather", ["stored", "gather64"], ["weight"], axis=0)]  # fmt: skip
    # short value names: the body is part of every file, readable names cost ~1 KB per function
    short: dict[str, str] = {}
    for node in nodes:
        for name in [*node.input, *node.output]:
            short.setdefault(name, f"x{len(short)}")
        node.input[:] = [short[x] for x in node.input]
        node.output[:] = [short[x] for x in node.output]
        for attr in node.attribute:
            if attr.HasField("t"):
                attr.t.name = ""
    return helper.make_function(DOMAIN, op_type(variant, bits, permuted), [short.get(x, x) for x in inputs],
                                [short["weight"]], nodes, [helper.make_opsetid("", opset)])  # fmt: skip


def _shorten_names(model: Any) -> None:
    """Rename tensors to short names: names are container overhead, not weights."""
    graph = model.graph
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    mapping = {init.name: f"t{i}" for i, init in enumerate(graph.initializer) if init.name not in keep}
    for node in graph.node:
        for out in node.output:
            if out not in keep and out not in mapping:
                mapping[out] = f"v{len(mapping)}"
    for init in graph.initializer:
        init.name = mapping.get(init.name, init.name)
    for node in graph.node:
        node.input[:] = [mapping.get(x, x) for x in node.input]
        node.output[:] = [mapping.get(x, x) for x in node.output]
        node.name = ""
        node.doc_string = ""
    del graph.value_info[:]
    graph.doc_string = ""


def export_codebook_onnx(module: Any, example: Any, path: Path, opset: int) -> None:
    """Export a model holding codebook layers to ONNX with in-graph weight reconstruction."""
    import onnx

    from edgecompress.export.onnx_export import torch_onnx_export

    torch_onnx_export(module.eval(), example, path, opset, custom_opsets={DOMAIN: 1})
    model = onnx.load(str(path))
    used = sorted({node.op_type for node in model.graph.node if node.domain == DOMAIN})
    for op in used:
        variant = "scales" if op.startswith("CodebookWeightScales") else "codebooks"
        bits = int(op[len(op.rstrip("0123456789")) :])
        model.functions.append(build_function(variant, bits, opset, permuted="Permuted" in op))
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    _shorten_names(model)
    onnx.save(model, str(path))
    log.info("codebook ONNX export: %d weight functions (%s)", len(used), ", ".join(used))
