"""Brevitas' post-training algorithms as Quantune configurations: brevitas computes the weights,
onnxruntime quantizes the activations and runs the graph.

What brevitas adds to onnxruntime's ``quantize_static``: cross-layer (graph) equalization
(``EqualizeGraph`` inside ``preprocess_for_quantize``), bias correction (``bias_correction_mode``) and
error-correcting weight rounding, GPTQ (``gptq_mode``) or GPFQ (``gpfq_mode``). The flow:

1. the torch model is traced (brevitas' FX tracer; convolutions called functionally inside a conv
   subclass, as in TensorFlow-"same"-padded EfficientNets, become modules first), its batch norms are
   merged and, for ``equalize``, the graph is equalized: a float model computing the same function;
2. for ``bias_correction``/``gptq``/``gpfq`` brevitas quantizes that model's weights (int8, symmetric,
   per channel or per tensor: ``layerwise_quantize``, no activation quantizers) and runs the
   algorithm on the calibration samples; the rounded weights (on their int8 grid) and the corrected
   biases go back into the float model;
3. the float model is exported to ONNX and onnxruntime's ``quantize_static`` quantizes it with the
   configuration's activation calibration, its weights pinned to brevitas' scales
   (``TensorQuantOverrides``), so the int8 weights in the QDQ graph are exactly brevitas' (checked).

Brevitas' own QCDQ export is not used: on unseen architectures it needs brevitas' activation
quantizers, which change the function (ReLU6 becomes ReLU while calibrating; an int32 bias overflows
on a channel a batch norm switched off), and onnxruntime then computes something else than brevitas
simulated. Only models given as checkpoints have these configurations (an ONNX file has no torch
graph); a model brevitas cannot trace or quantize makes them failed trials, named.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from edgecompress.compress.errors import first_line

#: the algorithms that round or correct quantized weights (the others only transform the float model)
WEIGHT_ALGORITHMS = ("bias_correction", "gptq", "gpfq")
EQUALIZE_ITERS = 20
BATCH = 16
#: a rounded weight may not grow past this multiple of the layer's float weights (else the algorithm diverged)
MAX_WEIGHT_GROWTH = 2.0


class BrevitasError(RuntimeError):
    """Brevitas could not quantize this model with this configuration (a failed trial)."""


def _tensors(feeds: dict[str, np.ndarray], names: tuple[str, ...], start: int, stop: int) -> tuple[Any, ...]:
    import torch

    return tuple(torch.from_numpy(np.ascontiguousarray(feeds[n][start:stop])) for n in names)


def _passes(model: Any, calib: dict[str, np.ndarray], names: tuple[str, ...], n: int) -> None:
    for i in range(0, n, BATCH):
        model(*_tensors(calib, names, i, min(i + BATCH, n)))


def _attr(graph_module: Any, node: Any) -> Any:
    """The parameter a ``get_attr`` node reads (None for anything else)."""
    import torch

    if getattr(node, "op", None) != "get_attr":
        return None
    value: Any = graph_module
    for part in str(node.target).split("."):
        value = getattr(value, part, None)
    return value if isinstance(value, torch.nn.Parameter) else None


def _layer_for_call(graph_module: Any, node: Any) -> Any:
    """An ``nn.Conv1d/2d/3d`` or ``nn.Linear`` computing the functional call ``node`` with its own
    parameters (shared, not copied), or None when the call is not of that form."""
    import torch
    import torch.nn.functional as F  # noqa: N812
    from torch import nn

    convs = {torch.conv1d: nn.Conv1d, F.conv1d: nn.Conv1d, torch.conv2d: nn.Conv2d, F.conv2d: nn.Conv2d,
             torch.conv3d: nn.Conv3d, F.conv3d: nn.Conv3d}  # fmt: skip
    linear = node.target in (F.linear, torch._C._nn.linear)
    if node.op != "call_function" or not (linear or node.target in convs):
        return None
    names = ("input", "weight", "bias") if linear else ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    args = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
    weight, bias = _attr(graph_module, args.get("weight")), args.get("bias")
    bias_param = _attr(graph_module, bias) if bias is not None else None
    if weight is None or (bias is not None and bias_param is None):
        return None
    if linear:
        layer: Any = nn.Linear(weight.shape[1], weight.shape[0], bias=bias_param is not None)
    else:
        rest: dict[str, Any] = {k: args[k] for k in ("stride", "padding", "dilation", "groups") if k in args}
        if not all(isinstance(v, int | tuple | list | str) for v in rest.values()):
            return None  # a computed stride or padding: leave the call alone
        groups = int(rest.pop("groups", 1))
        conv: Any = convs[node.target]
        layer = conv(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), groups=groups,
                                   bias=bias_param is not None, **{k: tuple(v) if isinstance(v, list) else v
                                                                   for k, v in rest.items()})  # fmt: skip
    layer.weight = weight
    if bias_param is not None:
        layer.bias = bias_param
    return layer


def functional_layers_to_modules(graph_module: Any) -> Any:
    """Turn ``torch.conv2d(x, self.weight, ...)`` / ``F.linear(x, self.weight, self.bias)`` calls into
    ``nn.Conv2d`` / ``nn.Linear`` modules over the same parameters.

    Tracing goes through the ``forward`` of a conv subclass that pads by itself (EfficientNet's
    TensorFlow "same" convs, timm's ``Conv2dSame``), leaving a functional call brevitas neither quantizes
    nor merges batch norms into: its weights would stay float. As modules they are quantized like any
    other layer, and the padding stays where the subclass put it.
    """
    changed = 0
    for node in list(graph_module.graph.nodes):
        layer = _layer_for_call(graph_module, node)
        if layer is None:
            continue
        name = f"functional_layer_{changed}"
        while hasattr(graph_module, name):
            name += "_"
        graph_module.add_module(name, layer)
        with graph_module.graph.inserting_before(node):
            call = graph_module.graph.call_module(name, (node.args[0] if node.args else node.kwargs["input"],))
        node.replace_all_uses_with(call)
        graph_module.graph.erase_node(node)
        changed += 1
    if changed:
        graph_module.graph.eliminate_dead_code()
        graph_module.recompile()
    return graph_module


def float_model(module: Any, algorithms: set[str]) -> Any:
    """The traced float model with batch norms merged (and equalized for ``equalize``): the same function
    as ``module``, with the layers brevitas quantizes as modules. A model FX cannot trace is used as it
    is (bias correction, GPTQ and GPFQ work layer by layer), except for ``equalize``, which needs the graph.

    Raises:
        BrevitasError: ``equalize`` on a model brevitas cannot trace.
    """
    from brevitas.fx import symbolic_trace
    from brevitas.graph.quantize import preprocess_for_quantize

    model = copy.deepcopy(module).eval()
    try:
        traced = functional_layers_to_modules(symbolic_trace(model))
    except Exception as exc:  # FX raises many types on dynamic control flow
        if "equalize" in algorithms:
            raise BrevitasError(f"brevitas cannot trace this model for graph equalization: {type(exc).__name__}: "
                                f"{first_line(exc)}") from None  # fmt: skip
        return model
    # ReLU6 stays ReLU6 (brevitas' default turns it into ReLU, another function)
    return preprocess_for_quantize(traced, trace_model=False, relu6_to_relu=False,
                                   equalize_iters=EQUALIZE_ITERS if "equalize" in algorithms else 0).eval()  # fmt: skip


def _weight_map(per_channel: bool) -> dict[Any, Any]:
    """Conv and Linear layers with int8 symmetric weights only (no activation or bias quantizers)."""
    import brevitas.nn as qnn
    from brevitas.quant import Int8WeightPerChannelFloat, Int8WeightPerTensorFloat
    from torch import nn

    weight = Int8WeightPerChannelFloat if per_channel else Int8WeightPerTensorFloat
    layers = {nn.Conv1d: qnn.QuantConv1d, nn.Conv2d: qnn.QuantConv2d, nn.Conv3d: qnn.QuantConv3d,
              nn.Linear: qnn.QuantLinear}  # fmt: skip
    return {cls: (qcls, {"weight_quant": weight, "bias_quant": None, "input_quant": None, "output_quant": None,
                         "return_quant_tensor": False}) for cls, qcls in layers.items()}  # fmt: skip


def quantize_weights(model: Any, config: Any, calib: dict[str, np.ndarray], names: tuple[str, ...]) -> dict[str, Any]:
    """Run ``config``'s weight algorithms on a weight-quantized copy of ``model`` and write the rounded
    weights and corrected biases back into ``model`` (in place).

    Returns:
        ``{layer name: scale}``: brevitas' weight scale of every layer it quantized (per output channel,
        or one value), which the ONNX graph's int8 weights must use.

    Raises:
        BrevitasError: an algorithm diverged (a rounded weight grew past :data:`MAX_WEIGHT_GROWTH` times
            the layer's largest float weight: seen with brevitas' GPFQ on small Linear layers).
    """
    import torch
    from brevitas.graph.calibrate import bias_correction_mode
    from brevitas.graph.quantize import layerwise_quantize
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer as QuantLayer

    algorithms = set(config.brevitas.split("+"))
    n = min(config.calib_size, len(next(iter(calib.values()))))
    quant = layerwise_quantize(copy.deepcopy(model), compute_layer_map=_weight_map(config.per_channel)).eval()
    if "bias_correction" in algorithms:
        with bias_correction_mode(quant):
            _passes(quant, calib, names, n)
    for name in ("gptq", "gpfq"):
        if name in algorithms:
            _round_weights(quant, name, calib, names, n)
    scales: dict[str, Any] = {}
    for layer_name, layer in quant.named_modules():
        if not isinstance(layer, QuantLayer) or not layer.weight_quant.is_quant_enabled:
            continue
        qw = layer.quant_weight()
        target = model.get_submodule(layer_name)
        before, after = float(target.weight.abs().max()), float(qw.value.abs().max())
        if after > MAX_WEIGHT_GROWTH * max(before, 1e-12):
            raise BrevitasError(f"brevitas {config.brevitas} diverged on layer {layer_name!r}: its largest weight went "
                                f"from {before:.3g} to {after:.3g}")  # fmt: skip
        target.weight.data = qw.value.detach().clone().to(target.weight.dtype)
        if layer.bias is not None:
            target.bias = torch.nn.Parameter(layer.bias.detach().clone())
        scales[layer_name] = qw.scale.detach().reshape(-1).double().numpy()
    if not scales:
        raise BrevitasError("brevitas found no Conv or Linear layer to quantize in this model")
    return scales


def _round_weights(model: Any, name: str, calib: dict[str, np.ndarray], names: tuple[str, ...], n: int) -> None:
    from brevitas.graph.gpfq import gpfq_mode
    from brevitas.graph.gptq import gptq_mode

    mode = gptq_mode if name == "gptq" else gpfq_mode
    with mode(model, use_quant_activations=False) as g:
        for _ in range(g.num_layers):
            _passes(g.model, calib, names, n)
            g.update()


def weight_overrides(onnx_model: Any, model: Any, scales: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """onnxruntime ``TensorQuantOverrides`` pinning each brevitas-quantized weight initializer of
    ``onnx_model`` to brevitas' scale (zero point 0). Initializers are matched to layers by value (the
    exporter may rename them; a Linear's weight may be stored transposed for a MatMul); a weight found
    in no initializer is left to onnxruntime."""
    from onnx import helper, numpy_helper

    def digest(a: np.ndarray) -> bytes:
        return hashlib.sha256(np.ascontiguousarray(a).tobytes() + str(a.shape).encode()).digest()

    # the axis of each weight initializer's output channels, from the node that consumes it
    axes: dict[str, int] = {}
    for node in onnx_model.graph.node:
        if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1:
            axes.setdefault(node.input[1], 0 if node.op_type == "Conv" else 1)
        elif node.op_type == "Gemm" and len(node.input) > 1:
            trans_b = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "transB"), 0)
            axes.setdefault(node.input[1], 0 if trans_b else 1)
        elif node.op_type == "MatMul" and len(node.input) > 1:
            axes.setdefault(node.input[1], 1)
    by_digest: dict[bytes, tuple[str, bool]] = {}
    for init in onnx_model.graph.initializer:
        if init.name not in axes:
            continue
        arr = numpy_helper.to_array(init)
        if arr.dtype == np.float32:
            by_digest.setdefault(digest(arr), (init.name, False))
            if arr.ndim == 2:
                by_digest.setdefault(digest(arr.T), (init.name, True))
    overrides: dict[str, list[dict[str, Any]]] = {}
    for layer_name, scale in scales.items():
        weight = model.get_submodule(layer_name).weight.detach().numpy().astype(np.float32)
        hit = by_digest.get(digest(weight))
        if hit is None:
            continue
        name, transposed = hit
        axis = axes[name]
        if transposed != (axis == 1 and weight.ndim == 2):
            continue  # the stored layout does not put brevitas' output channels on the consumer's channel axis
        entries: list[dict[str, Any]] = [{"scale": np.float32(s), "zero_point": np.int8(0)} for s in scale]
        if len(entries) > 1:
            entries[0]["axis"] = axis
        overrides[name] = entries
    return overrides


def brevitas_onnx(module: Any, config: Any, calib: dict[str, np.ndarray], spec: Any, folder: Path) -> tuple[Any, dict]:
    """The pre-processed float ONNX model of ``config``'s brevitas algorithms and its weight overrides,
    cached in ``folder`` by configuration (the activation calibration is onnxruntime's: configurations
    that differ only in it share one brevitas pass).

    Returns:
        ``(PreparedModel, overrides)`` with ``overrides`` as stored (:func:`override_options` makes
        onnxruntime's form of them).

    Raises:
        BrevitasError: the model cannot be traced, quantized or exported this way.
    """
    import shutil

    import onnx
    import torch

    from edgecompress.compress.ptq.ort_backend import calibration_samples, feeds_hash, prepare_model
    from edgecompress.export.errors import ExportError
    from edgecompress.export.onnx_export import export_onnx

    names = tuple(spec.input_names)
    algorithms = set(config.brevitas.split("+"))
    weights = bool(algorithms & set(WEIGHT_ALGORITHMS))
    samples = calibration_samples(calib, config.calib_size) if weights else {}
    key = hashlib.sha256(json.dumps([config.brevitas, config.per_channel if weights else None,
                                     feeds_hash(samples) if weights else None, _module_digest(module)]).encode())  # fmt: skip
    stem = key.hexdigest()[:24]
    path, meta = folder / f"{stem}.onnx", folder / f"{stem}.json"
    if not (path.is_file() and meta.is_file()):
        folder.mkdir(parents=True, exist_ok=True)
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = float_model(module, algorithms)
                scales = quantize_weights(model, config, samples, names) if weights else {}
        except BrevitasError:
            raise
        except Exception as exc:  # FX tracing and brevitas' handlers raise many types on unseen architectures
            raise BrevitasError(f"brevitas cannot quantize this model ({config.brevitas}): {type(exc).__name__}: "
                                f"{first_line(exc)}") from None  # fmt: skip
        tmp = folder / f".export-{uuid.uuid4().hex}"
        try:
            art = export_onnx(model, spec, tmp, verify_inputs={k: v[:4] for k, v in calib.items()})
            os.replace(art.model_path, folder / f".{stem}-{uuid.uuid4().hex}.onnx")
        except ExportError as exc:
            raise BrevitasError(f"the brevitas-processed model does not export to ONNX: {first_line(exc)}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        exported = next(folder.glob(f".{stem}-*.onnx"))
        prepared = prepare_model(exported, folder / "prepared")
        overrides = weight_overrides(onnx.load(str(prepared.path)), model, scales)
        stored = {"overrides": {k: [{key: float(x) if key == "scale" else int(x) for key, x in e.items()
                                     if key != "zero_point"} for e in v] for k, v in overrides.items()},
                  "layers": len(scales), "prepared": str(prepared.path.relative_to(folder))}  # fmt: skip
        os.replace(exported, path)
        meta.write_text(json.dumps(stored))
    stored = json.loads(meta.read_text())
    return prepare_model(path, folder / "prepared"), stored


def _module_digest(module: Any) -> str:
    """The torch model's weights (a different model never shares cached brevitas graphs)."""
    h = hashlib.sha256(type(module).__qualname__.encode())
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(np.ascontiguousarray(tensor.detach().cpu().numpy()).tobytes())
    return h.hexdigest()


def override_options(stored: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The stored weight overrides as onnxruntime takes them (float32 scales, int8 zero points, the
    first channel's entry naming the axis)."""
    return {name: [{**({"axis": e["axis"]} if "axis" in e else {}), "scale": np.float32(e["scale"]),
                    "zero_point": np.int8(0)} for e in entries]
            for name, entries in stored["overrides"].items()}  # fmt: skip


def check_pinned_weights(quantized: Path, source: Path, overrides: dict[str, list[dict[str, Any]]]) -> None:
    """Every pinned weight of the QDQ graph dequantizes to brevitas' rounded weight (else the int8 model
    would not be what brevitas computed).

    Raises:
        BrevitasError: a weight came out different.
    """
    import onnx
    from onnx import numpy_helper

    src = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(source)).graph.initializer if i.name in overrides}
    model = onnx.load(str(quantized))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    found = 0
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        for name, weight in src.items():
            if node.input[0] not in (f"{name}_quantized", name):
                continue
            q = inits[node.input[0]].astype(np.float64)
            scale = inits[node.input[1]].astype(np.float64)
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            if scale.size > 1:
                shape = [1] * q.ndim
                shape[axis] = scale.size
                scale = scale.reshape(shape)
            if not np.allclose(q * scale, weight, rtol=1e-5, atol=1e-7 * float(np.abs(weight).max() or 1.0)):
                raise BrevitasError(f"onnxruntime's int8 weight {name!r} differs from brevitas' rounded weight")
            found += 1
    if overrides and not found:
        raise BrevitasError("none of brevitas' weights reached the quantized graph")


