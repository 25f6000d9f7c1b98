"""Prepare an ONNX graph for TVM's Relax frontend.

The rewrites are exact (the graph computes the same outputs). Model-local functions (how the
codebook layers are written) are inlined, since the frontend converts only standard operators.

* **Names.** TVM's CUDA code generator uses the names of a function's parameters as the names of kernel
arguments. Weights kept as inputs (``keep_params_in_input``) carry their ONNX initializer names,
and torch's exporter names constants after module paths (``/blocks/blocks_0/attn/Pow_output_0``),
which is no C identifier: ``nvcc`` then rejects the kernels of every transformer model. CPU
code generation does not care, so the renaming is only visible in CUDA source.
* **Zero padding folded into convolutions.** ``Pad`` (constant zero, spatial axes only) whose
  every consumer is a ``Conv`` becomes that convolution's own (possibly asymmetric) padding, as
  onnxruntime's optimizer does. TF-style "same" padding (EfficientNet-Lite, MobileNet ports) is
  exported as such ``Pad`` nodes; fused into the preceding convolution's task, a pad larger than
  its producer is what MetaSchedule schedules wrongly in TVM 0.27 (the padded last row and column
  left unwritten, see :mod:`edgecompress.export.tvm.records`), and a separate pad is a wasted pass anyway.
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
    model = fold_pad_values(fold_constant_nodes(small_integer_initializers_as_constants(model)))
    return sanitize_onnx_names(fold_pad_into_conv(model))


def fold_pad_values(model: Any) -> Any:
    """A copy of ``model`` where a ``Pad`` whose constant value is computed from constants (a QDQ
    graph's ``DequantizeLinear(QuantizeLinear(0))``) gets that value as a ``Constant``: TVM's frontend
    reads the value only from a constant and fails on anything else."""
    from onnx import helper, numpy_helper

    producers = {o: n for n in model.graph.node for o in n.output}
    values = _constant_values(model)
    nodes, changed = [], False
    for node in model.graph.node:
        value = node.input[2] if node.op_type == "Pad" and len(node.input) > 2 else ""
        if value and value not in values:
            result = _evaluate(value, producers, values, depth=8)
            if result is not None:
                name = f"{value}__pad_value"
                nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(result, name)))
                node = _with_input(node, 2, name)
                changed = True
        nodes.append(node)
    return _copy_with(model, nodes=nodes) if changed else model


def _evaluate(name: str, producers: dict[str, Any], values: dict[str, Any], depth: int) -> Any:
    """The value of tensor ``name`` when it is computed from constants alone (a few standard nodes
    deep), else None; ``values`` caches what is computed."""

    if name in values:
        return values[name]
    node = producers.get(name)
    if node is None or depth == 0 or node.domain not in ("", "ai.onnx") or _has_subgraph(node):
        return None
    inputs = [i for i in node.input if i]
    feeds = {i: _evaluate(i, producers, values, depth - 1) for i in inputs}
    if any(v is None for v in feeds.values()):
        return None
    outputs = _run_node(node, feeds)
    if outputs is None:
        return None
    values.update(zip(node.output, outputs, strict=False))
    return values.get(name)


def _run_node(node: Any, feeds: dict[str, Any]) -> list[Any] | None:
    """``node``'s outputs on ``feeds`` by onnx's reference evaluator (None for an operator it lacks)."""
    from onnx.reference import ReferenceEvaluator

    try:
        return list(ReferenceEvaluator(node).run(None, feeds))
    except Exception:  # an operator the reference evaluator lacks: left to TVM at run time
        return None


def _with_input(node: Any, index: int, name: str) -> Any:
    import onnx

    out = onnx.NodeProto()
    out.CopyFrom(node)
    out.input[index] = name
    return out


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

    known: dict[str, Any] = {}
    nodes: list[Any] = []
    changed = False
    for node in model.graph.node:
        standard = node.domain in ("", "ai.onnx")
        inputs = [i for i in node.input if i]
        if standard and not _has_subgraph(node) and all(i in known for i in inputs):
            values = _run_node(node, {i: known[i] for i in inputs})
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


def _constant_values(model: Any) -> dict[str, Any]:
    """Values of ``Constant`` node outputs and initializers, by name."""
    from onnx import numpy_helper

    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            attr = next((a for a in node.attribute if a.name == "value"), None)
            if attr is not None:
                values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def _spatial_zero_pads(node: Any, values: dict[str, Any]) -> list[int] | None:
    """The pads of a ``Pad`` node as [begin..., end...] over all axes when it pads with zeros on
    axes 2.. only (never the batch or channel axis) and by known, non-negative amounts; else None."""
    from onnx import helper

    mode = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "mode"), b"constant")
    inputs = list(node.input) + [""] * 4
    if mode not in (b"constant", "constant") or inputs[3] or inputs[1] not in values:
        return None
    if inputs[2] and (inputs[2] not in values or values[inputs[2]].size and float(values[inputs[2]].reshape(-1)[0]) != 0.0):
        return None
    pads = [int(p) for p in values[inputs[1]].reshape(-1)]
    rank = len(pads) // 2
    if rank < 3 or len(pads) != 2 * rank or min(pads) < 0 or pads[0] or pads[1] or pads[rank] or pads[rank + 1]:
        return None
    return pads


def fold_pad_into_conv(model: Any) -> Any:
    """A copy of ``model`` where a zero ``Pad`` feeding only ``Conv`` nodes is folded into their
    ``pads`` (exact: a convolution pads with zeros). Graphs without such a pad are returned as is."""
    import onnx
    from onnx import helper

    if not any(n.op_type == "Pad" for n in model.graph.node):
        return model
    work = onnx.ModelProto()
    work.CopyFrom(model)  # the Conv nodes are edited in place: never the caller's model
    graph = work.graph
    values = _constant_values(work)
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    folded: set[int] = set()
    for node in graph.node:
        pads = _spatial_zero_pads(node, values) if node.op_type == "Pad" else None
        users = consumers.get(node.output[0], []) if pads is not None else []
        ok = bool(users) and node.output[0] not in outputs and all(
            u.op_type == "Conv" and u.input[0] == node.output[0] and node.output[0] not in u.input[1:]
            and next((helper.get_attribute_value(a) for a in u.attribute if a.name == "auto_pad"), b"NOTSET") == b"NOTSET"
            for u in users
        )  # fmt: skip
        if not ok or pads is None:
            continue
        rank = len(pads) // 2
        spatial = rank - 2
        for conv in users:
            old = next((list(helper.get_attribute_value(a)) for a in conv.attribute if a.name == "pads"), [0] * 2 * spatial)
            new = [old[k] + pads[2 + k] for k in range(spatial)] + [old[spatial + k] + pads[rank + 2 + k] for k in range(spatial)]
            kept = [a for a in conv.attribute if a.name != "pads"]
            del conv.attribute[:]
            conv.attribute.extend([*kept, helper.make_attribute("pads", new)])
            conv.input[0] = node.input[0]
        folded.add(id(node))
    if not folded:
        return model
    nodes = [n for n in graph.node if id(n) not in folded]
    used = {i for n in nodes for i in n.input} | outputs
    return _copy_with(work, nodes=[n for n in nodes if n.op_type != "Constant" or any(o in used for o in n.output)])
