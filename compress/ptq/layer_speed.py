"""Per-layer speed: which weighted layers run slower in int8 than in float on this runtime.

A quantized layer is not always faster: an int8 depthwise convolution can lose to the float kernel
the runtime fuses it into, and a small layer can cost more in requantization than it saves. The
search's ``keep_float='slow'`` leaves exactly those layers in float. They are found by profiling
(onnxruntime's per-node profiler, the target's providers and threads, batch 1) the fp32 model and an
int8 model of the same graph, and comparing each weighted layer's kernel time in both.

Profiled node names differ from the graph's: onnxruntime names a fused QDQ node after the original
node plus ``_token_<n>``, a float convolution fused with its activation into the NCHWc layout after
the activation's output plus ``_nchwc``, and a float Gemm fused with its activation ``fused <name>``;
:func:`layer_aliases` maps every such name back to its layer.
"""

from __future__ import annotations

import json
import logging
import os
import re
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: ops a runtime fuses into the preceding layer's kernel (their time is the layer's)
FUSED_ACTIVATIONS = ("Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "Tanh", "HardSwish")
#: profiled runs per model after the warm-up
PROFILE_RUNS = 30
#: a layer is slow in int8 when its int8 kernel takes this much longer than the float one (timer noise)
SLOWER_BY = 1.05


def layer_aliases(model: Any, layers: tuple[str, ...] | list[str]) -> dict[str, str]:
    """Every name a profiled node of ``layers`` can carry -> the layer: the node's name and output, and
    the output and name of an activation fused into it."""
    wanted = set(layers)
    consumers: dict[str, list[Any]] = defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            consumers[name].append(node)
    aliases: dict[str, str] = {}
    for node in model.graph.node:
        if node.name not in wanted:
            continue
        aliases[node.name] = aliases[node.output[0]] = node.name
        after = consumers.get(node.output[0], [])
        if len(after) == 1 and after[0].op_type in FUSED_ACTIVATIONS:
            aliases[after[0].name] = aliases[after[0].output[0]] = node.name
    return aliases


def _base_name(profiled: str) -> str:
    name = re.sub(r"^fused ", "", profiled)  # a node fused with its activation (FusedGemm, FusedConv)
    name = re.sub(r"_token_\d+$", "", name)
    return re.sub(r"_nchwc$", "", name)


def profile_nodes(model_path: Path | str, feeds: dict[str, np.ndarray], providers: list[str], threads: int,
                  runs: int = PROFILE_RUNS) -> dict[str, float]:  # fmt: skip
    """Median kernel time (microseconds) of every node onnxruntime ran, by profiled node name."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="edgecompress-profile-") as tmp:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tmp, "profile")
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        session = ort.InferenceSession(str(model_path), options, providers=providers)
        for _ in range(5):  # warm-up (profiled too; dropped below)
            session.run(None, feeds)
        for _ in range(runs):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    times: dict[str, list[float]] = defaultdict(list)
    for e in events:
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time"):
            times[e["name"][: -len("_kernel_time")]].append(float(e["dur"]))
    return {name: statistics.median(durs[-runs:]) for name, durs in times.items()}


def layer_times(profile: dict[str, float], aliases: dict[str, str]) -> dict[str, float]:
    """Kernel time per layer: the profiled nodes that map to it, summed."""
    out: dict[str, float] = defaultdict(float)
    for name, us in profile.items():
        layer = aliases.get(name) or aliases.get(_base_name(name))
        if layer is not None:
            out[layer] += us
    return dict(out)


def slow_layers(prepared: Any, int8_path: Path, feeds: dict[str, np.ndarray], providers: list[str],
                threads: int) -> tuple[list[str], list[dict[str, Any]]]:  # fmt: skip
    """The weighted layers of ``prepared`` whose int8 kernel in ``int8_path`` is slower than their float
    kernel, and the per-layer table (``{"node", "float_us", "int8_us"}``, layers profiled in both).

    ``feeds`` is one batch-1 sample. Layers the profiler does not name in one of the models (fused
    away) are left out of the table and never called slow.
    """
    import onnx

    aliases = layer_aliases(onnx.load(str(prepared.path), load_external_data=False), prepared.weighted_nodes)
    fp32 = layer_times(profile_nodes(prepared.path, feeds, providers, threads), aliases)
    int8 = layer_times(profile_nodes(int8_path, feeds, providers, threads), aliases)
    table = [{"node": n, "float_us": round(fp32[n], 2), "int8_us": round(int8[n], 2)}
             for n in prepared.weighted_nodes if n in fp32 and n in int8]  # fmt: skip
    slow = [r["node"] for r in table if r["int8_us"] > SLOWER_BY * r["float_us"]]
    log.info("per-layer timing: %d of %d layers profiled in both models, %d slower in int8", len(table),
             len(prepared.weighted_nodes), len(slow))  # fmt: skip
    return slow, table
