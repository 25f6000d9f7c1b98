"""Prepare an ONNX graph for TVM's Relax frontend.

The rewrites are exact (the graph computes the same outputs). Model-local functions (how the
codebook layers are written) are inlined, since the frontend converts only standard operators.

* **Names.** TVM's CUDA code generator uses the names of a function's parameters as the names of kernel
arguments. Weights kept as inputs (``keep_params_in_input``) carry their ONNX initializer names,
and torch's exporter names constants after module paths (``/blocks/blocks_0/attn/Pow_output_0``),
which is no C identifier: ``nvcc`` then rejects the kernels of every transformer model. CPU
code generation does not care, so the renaming is only visible in CUDA source.
* **Small integer initializers become constants.** The weights are imported as function
  parameters (``keep_params_in_input``) so that they can be saved apart from the code; an integer
  initializer used as a shape, an axis list or a bound is then a run-time value too, and every
  shape computed from it is unknown at compile time. The codebook graphs (JLCM) unpack their
  codes with such shapes, which left TVM with dynamic shapes it could not compile.
"""

from __future__ import annotations

import re
from typing import Any

_VALID = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SMALL_CONSTANT_ELEMENTS = 64


FOLD_MAX_ELEMENTS = 1 << 16


def prepare_for_tvm(model: Any) -> Any:
    """All rewrites: model-local functions inlined (the codebook layers are such functions), small
    integer initializers as constants, constant shape arithmetic folded, valid names."""
    if model.functions:
        import onnx.inliner

        model = onnx.inliner.inline_local_functions(model)
    return sanitize_onnx_names(fold_constant_nodes(small_integer_initializers_as_constants(model)))


def _has_subgraph(node: Any) -> bool:
    """Whether ``node`` carries a graph attribute (an If/Loop/Scan body)."""
    import onnx

    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _copy_with(model: Any, *, nodes: list[Any], initializers: list[Any] | None = None) -> Any:
    """A copy of ``model`` with its graph's nodes (and, if given, initializers) replaced."""
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    if initializers is not None:
        del out.graph.initializer[:]
        out.graph.initializer.extend(initializers)
    return out


def fold_constant_nodes(model: Any, max_elements: int = FOLD_MAX_ELEMENTS) -> Any:
    """A copy of ``model`` where every standard node whose inputs are all ``Constant`` outputs is
    replaced by ``Constant`` nodes holding its results (onnx's reference evaluator computes them).

    This is the shape arithmetic (``ReduceProd``, ``Slice``, ``Range``, ...): TVM's frontend keeps
    such nodes as run-time computations, which makes the shapes after them unknown. Results over
    ``max_elements`` values are left to run time (they would bloat the compiled code).
    """
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    known: dict[str, Any] = {}
    nodes: list[Any] = []
    changed = False
    for node in model.graph.node:
        standard = node.domain in ("", "ai.onnx")
        inputs = [i for i in node.input if i]
        if standard and not _has_subgraph(node) and all(i in known for i in inputs):
            try:
                values = ReferenceEvaluator(node).run(None, {i: known[i] for i in inputs})
            except Exception:  # an operator the reference evaluator lacks: leave it to TVM
                values = None
            if values is not None and all(getattr(v, "size", max_elements + 1) <= max_elements for v in values):
                known.update(zip(node.output, values, strict=True))
                if node.op_type == "Constant":
                    nodes.append(node)
                else:
                    nodes.extend(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(v, name))
                                 for name, v in zip(node.output, values, strict=True))  # fmt: skip
                    changed = True
                continue
        nodes.append(node)
    return _copy_with(model, nodes=nodes) if changed else model


def small_integer_initializers_as_constants(model: Any, max_elements: int = SMALL_CONSTANT_ELEMENTS) -> Any:
    """A copy of ``model`` where integer initializers of at most ``max_elements`` values are
    ``Constant`` nodes (shapes, axes, bounds); float weights and large code tables stay initializers."""
    import math

    import onnx
    from onnx import helper

    ints = {onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
            onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64}  # fmt: skip
    graph_inputs = {v.name for v in model.graph.input}
    small = [i for i in model.graph.initializer
             if i.data_type in ints and math.prod(i.dims) <= max_elements and i.name not in graph_inputs]  # fmt: skip
    if not small:
        return model
    names = {i.name for i in small}
    constants = [helper.make_node("Constant", [], [i.name], value=i) for i in small]
    return _copy_with(model, nodes=constants + list(model.graph.node),
                      initializers=[i for i in model.graph.initializer if i.name not in names])  # fmt: skip


def sanitize_onnx_names(model: Any) -> Any:
    """A copy of ``model`` whose initializer and intermediate tensor names are C identifiers.

    Graph inputs and outputs keep their names (callers feed and read them by name). Names are
    made unique (``_2``, ``_3`` suffixes) so two names that sanitize alike stay distinct. Graphs
    with subgraphs (If/Loop bodies can refer to outer names) are returned unchanged.
    """
    import onnx

    graph = model.graph
    if any(_has_subgraph(n) for n in graph.node):
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
