"""N:M export: dense weights with exact zeros, the pattern verified on the exported ONNX file.

The verifier reads the ONNX file itself (not the torch model): it finds every weight initializer
consumed by ``Conv``/``Gemm``/``MatMul`` (directly or through ``DequantizeLinear``, and the
integer ``QLinearConv``/``QLinearMatMul``/``ConvInteger``/``MatMulInteger``), derives its
grouping axis from the consuming node (Conv ``(O, I, kH, kW)``: axis 1; Gemm ``transB=1``:
axis 1; MatMul ``B (I, O)``: axis 0), maps it back to the sparse layer, and counts the groups
with more than N non-zeros. Layers are mapped by initializer name (``<layer>.weight``, also with
a ``_quantized`` suffix) and otherwise by content: equal values (float), or the same zero
positions and shape (integer weights of a quantized graph).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgecompress.compress.sparsity.masks import layer_compressed_size, nm_violations, sparsity_of
from edgecompress.export.onnx_export import OnnxExporter

log = logging.getLogger(__name__)

# op type -> (index of the weight input, how to find the grouping axis)
_WEIGHT_INPUT = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3, "Gemm": 1, "MatMul": 1, "MatMulInteger": 1,
                 "QLinearMatMul": 3}  # fmt: skip


class NMVerificationError(ValueError):
    """The exported file does not follow the N:M pattern (or a sparse layer cannot be found in it)."""


@dataclass
class WeightInit:
    """A weight initializer of the ONNX graph with the axis its N:M groups run along."""

    name: str
    array: np.ndarray
    op_type: str
    group_axis: int


def _attr(node: Any, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(a.i)
    return default


def _minus_zero_point(arr: np.ndarray, zero_point: np.ndarray, axis: int) -> np.ndarray:
    """Integer weights relative to their zero point (an asymmetric quantizer stores 0.0 as the zero point)."""
    if not zero_point.any():
        return arr
    zp = zero_point.astype(np.int32)
    if zp.ndim == 1 and arr.ndim > 1:
        shape = [1] * arr.ndim
        shape[axis] = -1
        zp = zp.reshape(shape)
    return arr.astype(np.int32) - zp


def weight_initializers(model: Any) -> list[WeightInit]:
    """Every weight initializer feeding a Conv/Gemm/MatMul-like node (through DequantizeLinear too)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    dq_nodes = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    found: dict[str, WeightInit] = {}
    for node in model.graph.node:
        idx = _WEIGHT_INPUT.get(node.op_type)
        if idx is None or len(node.input) <= idx:
            continue
        name = node.input[idx]
        dq = dq_nodes.get(name)
        name = dq.input[0] if dq is not None else name
        if name not in inits or name in found:
            continue
        arr = numpy_helper.to_array(inits[name])
        if dq is not None and len(dq.input) > 2 and dq.input[2] in inits:
            arr = _minus_zero_point(arr, numpy_helper.to_array(inits[dq.input[2]]), _attr(dq, "axis", 1))
        if node.op_type in ("Gemm",):
            axis = 1 if _attr(node, "transB", 0) else 0
        elif "MatMul" in node.op_type:
            if arr.ndim != 2:
                continue
            axis = 0
        else:
            axis = 1
        found[name] = WeightInit(name, arr, node.op_type, axis)
    return list(found.values())


def _as_torch_layout(init: WeightInit) -> np.ndarray:
    """The initializer in torch's (O, I, ...) layout."""
    return init.array.T if init.array.ndim == 2 and init.group_axis == 0 else init.array


def map_layers_to_initializers(
    model: Any, record: dict[str, Any], weights: dict[str, np.ndarray] | None = None
) -> dict[str, str]:
    """Sparse layer name -> initializer name (by name, then by content when ``weights`` are given)."""
    inits = weight_initializers(model)
    by_name = {w.name: w for w in inits}
    mapping: dict[str, str] = {}
    used: set[str] = set()
    for layer in record["layers"]:
        for cand in (f"{layer}.weight", f"{layer}.weight_quantized"):
            if cand in by_name:
                mapping[layer] = cand
                used.add(cand)
                break
    for layer in record["layers"]:
        if layer in mapping or weights is None or layer not in weights:
            continue
        ref = np.asarray(weights[layer])
        best, best_score = None, 0.0
        for w in inits:
            arr = _as_torch_layout(w)
            if w.name in used or arr.shape != ref.shape:
                continue
            # Exact values first; else the same zero positions (BatchNorm folded into a Conv scales
            # each output channel, quantization rounds): the file's non-zeros inside the layer's.
            if np.issubdtype(arr.dtype, np.floating) and np.array_equal(arr, ref.astype(arr.dtype)):
                score = 3.0
            elif np.all((arr != 0) <= (ref != 0)) and (arr != 0).any():
                score = 1.0 + float((arr != 0).sum()) / max(1, int((ref != 0).sum()))
            else:
                continue
            if score > best_score:
                best, best_score = w.name, score
        if best is not None:
            mapping[layer] = best
            used.add(best)
    return mapping


def verify_onnx_nm(onnx_path: str | Path, record: dict[str, Any], *, weights: dict[str, np.ndarray] | None = None,
                   mapping: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Check the N:M pattern of every sparse layer on the exported ONNX file.

    Args:
        onnx_path: the ``.onnx`` file.
        record: ``metadata["nm_sparsity"]`` of the sparse model (pattern and layers).
        weights: layer -> torch-layout weight array, for mapping by content.
        mapping: layer -> initializer name (e.g. from a manifest); found automatically if None.

    Returns:
        ``{"pattern", "verified", "layers": {layer: {"initializer", "violations", "sparsity"}}}``.

    Raises:
        NMVerificationError: a layer cannot be found in the file, or a group has more than N non-zeros.
    """
    import onnx

    model = onnx.load(str(onnx_path))
    n, m = int(record["n"]), int(record["m"])
    mapping = mapping or map_layers_to_initializers(model, record, weights)
    inits = {w.name: w for w in weight_initializers(model)}
    missing = [layer for layer in record["layers"] if mapping.get(layer) not in inits]
    if missing:
        raise NMVerificationError(
            f"{onnx_path}: cannot find the weights of sparse layers {missing} in the ONNX graph"
        )
    layers: dict[str, Any] = {}
    bad = []
    for layer in record["layers"]:
        init = inits[mapping[layer]]
        violations = nm_violations(init.array, n, m, init.group_axis)
        layers[layer] = {"initializer": init.name, "op_type": init.op_type, "group_axis": init.group_axis,
                         "violations": violations, "sparsity": round(sparsity_of(init.array), 6)}  # fmt: skip
        if violations:
            bad.append(f"{layer} ({init.name}): {violations} groups with more than {n} non-zeros")
    if bad:
        raise NMVerificationError(f"{onnx_path} breaks the {n}:{m} pattern: " + "; ".join(bad))
    return {"pattern": f"{n}:{m}", "verified": True, "layers": layers}


def compressed_size_report(module: Any, record: dict[str, Any], *, value_bits: int = 32) -> dict[str, Any]:
    """Model bytes dense vs N:M-compressed (kept values + ceil(log2 M)-bit indices); other tensors dense."""
    n, m = int(record["n"]), int(record["m"])
    sparse_names = {f"{layer}.weight" for layer in record["layers"]}
    dense_bytes = compressed = 0
    for name, t in module.state_dict().items():
        if not t.is_floating_point():
            continue
        nbytes = t.numel() * value_bits // 8
        dense_bytes += nbytes
        if name in sparse_names:
            # A layer whose N:M storage would not pay off (e.g. 1 input channel) is stored dense.
            compressed += min(
                nbytes, layer_compressed_size(tuple(t.shape), n, m, value_bits=value_bits)["compressed_bytes"]
            )
        else:
            compressed += nbytes
    return {"value_bits": value_bits, "dense_bytes": dense_bytes, "compressed_bytes": compressed,
            "ratio": round(dense_bytes / max(1, compressed), 3)}  # fmt: skip


def export_sparse_onnx(
    bundle: Any, dest: str | Path, *, target: Any = None, stages: list[Any] | None = None
) -> Any:
    """Export a sparse bundle to an ONNX artifact, verify the pattern on the file, record it in the manifest.

    Returns:
        The artifact; ``manifest.metrics["nm_sparsity"]`` holds the verification, per-layer
        sparsity and initializer names, and the compressed sizes (fp32 and int8 values).

    Raises:
        NMVerificationError: the written file breaks the pattern.
    """
    from edgecompress.compress.exporting import export_torch_onnx
    from edgecompress.compress.sparsity.config import METADATA_KEY
    from edgecompress.export.artifact import StageRecord

    record = bundle.metadata[METADATA_KEY]
    mods = dict(bundle.module.named_modules())
    weights = {layer: mods[layer].weight.detach().cpu().numpy() for layer in record["layers"]}
    recorded = stages if stages is not None else [StageRecord(**s) for s in bundle.metadata.get("stages", [])]
    art = export_torch_onnx(bundle, dest, target=target, stages=recorded, extra={"nm_pattern": record["pattern"]})
    check = verify_onnx_nm(art.model_path, record, weights=weights)
    metrics = {
        **check,
        "method": record.get("method"),
        "skipped_layers": record.get("skipped", {}),
        "compressed_size_fp32": compressed_size_report(bundle.module, record, value_bits=32),
        "compressed_size_int8": compressed_size_report(bundle.module, record, value_bits=8),
    }
    if target is not None and record["pattern"] == "2:4" and target.supports("2:4-sparse"):
        # Sparse tensor cores: TensorRT picks sparse kernels only when asked to (speed-up not measured here).
        metrics["runtime_hint"] = {"TensorrtExecutionProvider": {"trt_sparsity_enable": True},
                                   "note": "GPU 2:4 speed-up not measured by this toolchain yet"}  # fmt: skip
    art.update_metrics(nm_sparsity=metrics)
    log.info("verified %s on %d layers of %s", record["pattern"], len(check["layers"]), art.model_path)
    return art


def verify_artifact_nm(artifact: Any) -> dict[str, Any]:
    """Re-verify an exported artifact from its manifest's record (layer -> initializer mapping)."""
    info = artifact.manifest.metrics.get("nm_sparsity")
    if not info:
        raise NMVerificationError(f"artifact {artifact.path} carries no N:M record in its manifest")
    n, m = (int(v) for v in info["pattern"].split(":"))
    record = {"n": n, "m": m, "layers": {k: {} for k in info["layers"]}}
    mapping = {k: v["initializer"] for k, v in info["layers"].items()}
    return verify_onnx_nm(artifact.model_path, record, mapping=mapping)


MARKER = "_edgecompress_nm_record"


def mark_sparse_module(module: Any, record: dict[str, Any]) -> None:
    """Tag a sparse model so that any ONNX export of it (recipes, ``compress export``) verifies its pattern."""
    setattr(module, MARKER, record)


def mark_loaded_model(module: Any, metadata: dict[str, Any]) -> None:
    """A loaded N:M sparse model is marked again; layers another technique replaced (QAT, codebooks)
    are left to that technique's exporter."""
    record = metadata.get("nm_sparsity")
    if record:
        mark_sparse_module(module, record)


def _is_marked_plain(module: Any) -> bool:
    import torch

    record = getattr(module, MARKER, None)
    if not record:
        return False
    mods = dict(module.named_modules())
    # Another stage (QAT wrappers, codebook layers) replaced the layers: let its exporter handle it.
    return all(isinstance(mods.get(name), torch.nn.Linear | torch.nn.Conv2d) for name in record["layers"])


def _export_and_verify(module: Any, example: Any, path: Path, opset: int) -> None:
    """``torch.onnx.export`` as the standard exporter does, then the N:M check on the written file."""
    from edgecompress.export.errors import ExportError
    from edgecompress.export.onnx_export import torch_onnx_export

    torch_onnx_export(module, example, path, opset)
    record = getattr(module, MARKER)
    mods = dict(module.named_modules())
    weights = {k: mods[k].weight.detach().cpu().numpy() for k in record["layers"]}
    try:
        verify_onnx_nm(path, record, weights=weights)
    except NMVerificationError as exc:
        raise ExportError(str(exc)) from None


EXPORTER = OnnxExporter("nm-sparse", _is_marked_plain, _export_and_verify, "onnx", 40.0)
"""A marked N:M sparse model of plain layers exports with its pattern verified on the written file
(listed in :mod:`edgecompress.compress.registry`)."""
