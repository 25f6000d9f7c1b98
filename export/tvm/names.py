"""Make an ONNX graph's tensor names valid C identifiers before TVM imports it.

TVM's CUDA code generator uses the names of a function's parameters as the names of kernel
arguments. Weights kept as inputs (``keep_params_in_input``) carry their ONNX initializer names,
and torch's exporter names constants after module paths (``/blocks/blocks_0/attn/Pow_output_0``),
which is no C identifier: ``nvcc`` then rejects the kernels of every transformer model. CPU
code generation does not care, so the renaming is only visible in CUDA source.
"""

from __future__ import annotations

import re
from typing import Any

_VALID = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def sanitize_onnx_names(model: Any) -> Any:
    """A copy of ``model`` whose initializer and intermediate tensor names are C identifiers.

    Graph inputs and outputs keep their names (callers feed and read them by name). Names are
    made unique (``_2``, ``_3`` suffixes) so two names that sanitize alike stay distinct. Graphs
    with subgraphs (If/Loop bodies can refer to outer names) are returned unchanged.
    """
    import onnx

    graph = model.graph
    if any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for attr in n.attribute):
        return model
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    names = [i.name for i in graph.initializer] + [o for n in graph.node for o in n.output]
    taken = set(keep) | {n for n in names if _VALID.match(n)}
    mapping: dict[str, str] = {}
    for name in names:
        if not name or name in keep or name in mapping or _VALID.match(name):
            continue
        base = re.sub(r"[^A-Za-z0-9_]", "_", name).strip("_") or "t"
        if base[0].isdigit():
            base = f"t_{base}"
        candidate, k = base, 1
        while candidate in taken:
            k += 1
            candidate = f"{base}_{k}"
        taken.add(candidate)
        mapping[name] = candidate
    if not mapping:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    for init in g.initializer:
        init.name = mapping.get(init.name, init.name)
    for node in g.node:
        node.input[:] = [mapping.get(i, i) for i in node.input]
        node.output[:] = [mapping.get(o, o) for o in node.output]
    for vi in g.value_info:
        vi.name = mapping.get(vi.name, vi.name)
    return out
