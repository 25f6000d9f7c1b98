"""Neuron grouping and permutation folding (JLCM step 1, Yvinec et al., ICLR 2024).

Each output neuron (a row of W, or an output channel of a conv) is described by statistics of
its weight distribution; k-means (scikit-learn) clusters the neurons into G groups, and rows are
reordered so that every group is contiguous. The permutation is folded into the consumer of the
layer's output where the graph allows: through channel-wise modules (BatchNorm, activations,
pooling, dropout), a ``Flatten`` (each channel then owns a block of features) and into the input
columns of the next Linear or dense Conv2d. Otherwise the layer keeps the permutation and undoes it
with one gather, and the accounting counts it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.Dropout,
                nn.Identity)  # fmt: skip
_CHANNELWISE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
_CHANNELWISE_FUNCS = {torch.relu, torch.nn.functional.relu, torch.nn.functional.gelu, torch.sigmoid, torch.tanh}


def neuron_descriptors(weight_2d: torch.Tensor, kind: str = "quantiles") -> np.ndarray:
    """Per-row statistics of the weight distribution, standardised column-wise.

    ``quantiles``: mean, std, max |w| and the 5/25/50/75/95 % quantiles; ``moments``: mean, std, max |w|.
    """
    w = weight_2d.detach().double()
    feats = [w.mean(1), w.std(1, unbiased=False), w.abs().amax(1)]
    if kind == "quantiles" and w.shape[1] > 1:
        q = torch.quantile(w, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=w.dtype), dim=1)
        feats += list(q)
    x = torch.stack(feats, dim=1).numpy()
    std = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)


def group_neurons(weight_2d: torch.Tensor, groups: int, *, mode: str = "kmeans", descriptor: str = "quantiles",
                  seed: int = 0) -> tuple[torch.Tensor, list[int]]:  # fmt: skip
    """Cluster rows into groups and return ``(order, group_sizes)``.

    ``order[k]`` is the original row stored at position ``k``; groups are contiguous in ``order``
    and sorted by their mean row scale (so neighbouring groups have similar magnitudes).
    ``mode``: ``kmeans`` (JLCM), ``none`` (one group, identity order), ``rows`` (one group per row).
    """
    out = weight_2d.shape[0]
    if mode == "none" or groups <= 1 or out == 1:
        return torch.arange(out), [out]
    if mode == "rows":
        return torch.arange(out), [1] * out
    from sklearn.cluster import KMeans

    g = min(groups, out)
    feats = neuron_descriptors(weight_2d, descriptor)
    labels = KMeans(n_clusters=g, n_init=4, random_state=seed).fit_predict(feats)
    scale = weight_2d.detach().abs().mean(1).numpy()
    present = sorted(set(labels.tolist()), key=lambda c: float(scale[labels == c].mean()))
    order: list[int] = []
    sizes: list[int] = []
    for c in present:
        rows = np.flatnonzero(labels == c).tolist()
        order += rows
        sizes.append(len(rows))
    return torch.tensor(order, dtype=torch.int64), sizes


@dataclass
class FoldPlan:
    """How to fold a row permutation of one layer into the graph that follows it."""

    channelwise: list[Any] = field(default_factory=list)  # modules whose channel params get permuted
    consumer: Any = None  # Linear / Conv2d whose input columns get permuted
    block: int = 1  # input features per channel of the consumer (Flatten of C x H x W: H * W)


def fold_plans(model: nn.Module, names: list[str], example: Any) -> dict[str, FoldPlan]:
    """For every layer in ``names``, a :class:`FoldPlan` when its output permutation can be folded.

    Uses ``torch.fx`` to follow each layer's single consumer chain; models that do not trace get no
    plans (every permutation is then stored). A Flatten's block size comes from shape propagation
    on ``example`` (one tensor, or a tuple of the model's inputs).
    """
    import torch.fx as fx
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        gm = fx.symbolic_trace(model)
        ShapeProp(gm).propagate(*(example if isinstance(example, tuple) else (example,)))
    except Exception as exc:  # tracing arbitrary user models fails in many ways; folding is optional
        log.info("permutation folding disabled: the model does not trace with torch.fx (%s)", exc)
        return {}
    modules = dict(gm.named_modules())
    plans: dict[str, FoldPlan] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target not in names:
            continue
        plan = FoldPlan()
        producer_is_conv = isinstance(modules[node.target], nn.Conv2d)
        flattened = False
        cur = node
        while True:
            users = list(cur.users)
            if len(users) != 1:
                break
            nxt = users[0]
            mod = modules.get(nxt.target) if nxt.op == "call_module" else None
            if isinstance(mod, _ACTIVATIONS) or (nxt.op == "call_function" and nxt.target in _CHANNELWISE_FUNCS):
                cur = nxt  # element-wise: any layout
                continue
            rank = len(cur.meta["tensor_meta"].shape) if cur.meta.get("tensor_meta") is not None else 0
            if isinstance(mod, _CHANNELWISE) and not flattened and (producer_is_conv or rank == 2):
                # channel-wise on dim 1: a conv's channels, or a Linear's features of a 2-D tensor
                if isinstance(mod, nn.BatchNorm1d | nn.BatchNorm2d):
                    plan.channelwise.append(mod)
                cur = nxt
                continue
            flat = isinstance(mod, nn.Flatten) and mod.start_dim == 1 and mod.end_dim == -1
            flat = flat or (nxt.op == "call_function" and nxt.target is torch.flatten and nxt.args[1:] == (1,))
            if flat and producer_is_conv and not flattened and rank >= 2:
                plan.block = math.prod(cur.meta["tensor_meta"].shape[2:])
                flattened = True
                cur = nxt
                continue
            linear_ok = isinstance(mod, nn.Linear) and (flattened or not producer_is_conv)
            conv_ok = isinstance(mod, nn.Conv2d) and mod.groups == 1 and producer_is_conv and not flattened
            if linear_ok or conv_ok:
                plan.consumer = mod
            break
        if plan.consumer is not None:
            plans[node.target] = plan
    return plans


@torch.no_grad()
def apply_fold(plan: FoldPlan, order: torch.Tensor) -> None:
    """Permute the channel-wise modules and the consumer's input columns by ``order`` (in place)."""
    for bn in plan.channelwise:
        for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
            if t is not None:
                t.copy_(t[order])
    consumer = plan.consumer
    if consumer is None:
        return
    cols = (order[:, None] * plan.block + torch.arange(plan.block)[None, :]).reshape(-1)
    consumer.weight.copy_(consumer.weight[:, cols])
