"""Exporting a codebook model as an ``onnx-codebook`` artifact and checking what it promises.

Checks (JLCM, Yvinec et al., ICLR 2024, claims memory footprint, so we measure it):
the ONNX file size against the bits-per-weight accounting, onnxruntime against the torch
codebook model (SQNR, done by :func:`export.export_onnx`), and the peak resident memory of an
onnxruntime session load against the float32 model, measured in a fresh child process.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_MEMORY_PROBE = r"""
import json, sys
import numpy as np, onnxruntime, psutil
from edgecompress.export.ort_session import ort_session
proc = psutil.Process()
path, level = sys.argv[1], sys.argv[2]
before = proc.memory_info().rss
sess = ort_session(path, optimization={"all": "all", "none": "disabled"}[level])
loaded = proc.memory_info().rss
types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
         "tensor(int32)": np.int32, "tensor(bool)": np.bool_}
# every graph input at batch 1 (dynamic dims at 1), zeros of its dtype
sess.run(None, {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], dtype=types.get(i.type, np.float32))
                for i in sess.get_inputs()})
ran = proc.memory_info().rss
# VmHWM (peak RSS of this process image); ru_maxrss would carry the parent's peak across exec
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"rss_before": before, "rss_after_load": loaded, "rss_after_run": ran, "peak_rss": peak}))
"""


def session_memory(onnx_path: str | Path, *, optimization: str = "all") -> dict[str, int]:
    """RSS of a fresh process before/after creating an onnxruntime session and running it once.

    ``load_bytes`` = RSS after load minus RSS before (what the session holds), ``peak_bytes`` =
    peak RSS minus RSS before. ``optimization="all"`` lets onnxruntime constant-fold the in-graph
    weight reconstruction (dense weights then live in memory); ``"none"`` keeps the packed form.
    """
    cmd = [sys.executable, "-c", _MEMORY_PROBE, str(onnx_path), optimization]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
    m = json.loads(res.stdout.strip().splitlines()[-1])
    return {**m, "load_bytes": m["rss_after_load"] - m["rss_before"], "peak_bytes": m["peak_rss"] - m["rss_before"]}


def export_codebook_artifact(bundle: Any, dest: str | Path, report: dict[str, Any], *, target: Any = None,
                             verify_inputs: Any = None, measure_memory: bool = True) -> Any:  # fmt: skip
    """Export ``bundle`` (holding codebook layers) to ``dest`` and record the checks in its manifest.

    Returns the :class:`export.Artifact`; its metrics hold ``size_check`` (file bytes vs accounted
    bytes), ``bits_per_weight`` and, when ``measure_memory``, ``memory`` (codebook vs float32).
    """
    from edgecompress.compress.codebook.layers import model_accounting
    from edgecompress.compress.exporting import export_torch_onnx
    from edgecompress.export import StageRecord

    acct = model_accounting(bundle.module)
    stage = StageRecord(stage="codebook", config=report.get("config", {}),
                        metrics={"bits_per_weight": acct["bits_per_weight"]})  # fmt: skip
    layers = [{k: v for k, v in layer.items() if k != "layer"} | {"layer": layer["layer"]} for layer in acct["layers"]]
    art = export_torch_onnx(bundle, dest, target=target, stages=[stage], verify_inputs=verify_inputs,
                            extra={"codebook_layers": layers})  # fmt: skip
    size = size_check(art.model_path, acct)
    metrics: dict[str, Any] = {"bits_per_weight": acct["bits_per_weight"], "size_check": size,
                               "file_bits_per_weight": size["file_bytes"] * 8 / acct["weights"]}  # fmt: skip
    if measure_memory:
        metrics["memory"] = compare_memory(art.model_path, bundle, report)
    art.update_metrics(**metrics)
    return art


def size_check(onnx_path: str | Path, accounting: dict[str, Any]) -> dict[str, Any]:
    """Compare an ONNX file with the accounting.

    ``tensor_bytes`` (the initializers' data in the file) must equal ``accounted_bytes`` (the
    accounting's payload); ``graph_bytes`` is the file with tensor data removed (operators, names,
    shapes: the container). ``relative_difference`` compares the file size with
    ``accounted_bytes + graph_bytes``.
    """
    import onnx

    model = onnx.load(str(onnx_path))
    tensor_bytes = sum(len(t.raw_data) if t.raw_data else t.ByteSize() for t in model.graph.initializer)
    for t in model.graph.initializer:
        t.ClearField("raw_data")
    graph_bytes = model.ByteSize()
    file_bytes = Path(onnx_path).stat().st_size
    predicted = accounting["payload_bytes"] + graph_bytes
    return {"file_bytes": file_bytes, "tensor_bytes": tensor_bytes, "accounted_bytes": accounting["payload_bytes"],
            "tensor_difference_bytes": tensor_bytes - accounting["payload_bytes"], "graph_bytes": graph_bytes,
            "relative_difference": (file_bytes - predicted) / predicted,
            "fp32_payload_bytes": accounting["fp32_bytes"]}  # fmt: skip


def fp32_onnx(module: Any, spec: Any, path: Path) -> Path:
    """Export a float model with torch's exporter (for size and memory comparisons); ``spec`` is the
    bundle's ``ModelSpec``."""
    from edgecompress.export.onnx_export import torch_onnx_export
    from edgecompress.export.torch_io import ExportIO, model_spec_for

    spec = model_spec_for(module.eval(), spec)
    torch_onnx_export(module, ExportIO.build(spec, spec.example_feeds(1)), path, 17)
    return path


def compare_memory(codebook_path: Path, bundle: Any, report: dict[str, Any]) -> dict[str, Any]:
    """Session-load memory of the codebook model and of its float32 reconstruction, both optimisation levels."""
    import copy

    from edgecompress.compress.codebook.layers import CODEBOOK_LAYERS

    dense = copy.deepcopy(bundle.module).eval()
    _densify(dense, CODEBOOK_LAYERS)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        fp_path = fp32_onnx(dense, bundle.spec, Path(tmp) / "fp32.onnx")
        out["fp32_file_bytes"] = fp_path.stat().st_size
        for level in ("all", "none"):
            out[f"fp32_{level}"] = session_memory(fp_path, optimization=level)
            out[f"codebook_{level}"] = session_memory(codebook_path, optimization=level)
    return out


def _densify(model: Any, layer_types: tuple[type, ...]) -> None:
    """Replace codebook layers by float Linear/Conv2d holding the reconstructed weights (in place)."""
    import torch
    from torch import nn

    for name, candidate in list(model.named_modules()):
        if not isinstance(candidate, layer_types):
            continue
        mod: Any = candidate
        w = mod.weight_store().detach()
        bias = mod.bias is not None
        if w.dim() == 2:
            new: nn.Module = nn.Linear(w.shape[1], w.shape[0], bias=bias)
        else:
            new = nn.Conv2d(mod.in_channels, mod.out_channels, tuple(w.shape[2:]), mod.stride, mod.padding,
                            mod.dilation, mod.groups, bias=bias)  # fmt: skip
        dense: Any = new
        with torch.no_grad():
            dense.weight.copy_(w)
            if bias:
                dense.bias.copy_(mod.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
