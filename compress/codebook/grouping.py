"""Neuron grouping and permutation folding (JLCM step 1, Yvinec et al., ICLR 2024).

Each output neuron (a row of W, or an output channel of a conv) is described by statistics of
its weight distribution; k-means (scikit-learn) clusters the neurons into G groups, and rows are
reordered so that every group is contiguous. The permutation is folded into the readers of the
layer's output only where that provably keeps the function: through operations that commute with a
channel permutation (element-wise activations, BatchNorm permuted too, per-channel pooling, a
``Flatten`` after which each channel owns a block of features) into the input columns of every
plain Linear or dense Conv2d reading it. Anything else on any path (a residual add, a gate's
multiply, a concatenation, a reshape, a grouped conv, a module called twice, a layer with its own
``forward``) refuses the fold: the layer keeps the permutation and undoes it with one gather, and
the accounting counts it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgecompress.compress.layer_forward import has_own_forward

log = logging.getLogger(__name__)


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
    """How to fold a row permutation of one layer into the graph that reads its output.

    Every path from the layer's output ends in a consumer (a Linear/Conv2d whose input columns get
    permuted) after permutation-equivariant operations only; the BatchNorms on the way get their
    channel parameters permuted too.
    """

    channelwise: list[Any] = field(default_factory=list)  # modules whose channel params get permuted
    consumers: list[tuple[Any, int]] = field(default_factory=list)  # (Linear/Conv2d, input features per channel)

    @property
    def consumer(self) -> Any:
        """The first consumer (None without one)."""
        return self.consumers[0][0] if self.consumers else None


# Element-wise on any layout: permuting channels before or after gives the same tensor. Exact types:
# a subclass may do anything in its forward.
_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
                        nn.LeakyReLU, nn.ELU, nn.Mish, nn.Dropout, nn.Identity)  # fmt: skip
_ELEMENTWISE_FUNCS = {torch.relu, F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.mish, F.elu,
                      F.leaky_relu, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh}  # fmt: skip
_ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh"}
# Act on each channel (dim 1 of a conv's NCHW output) separately, without parameters.
_SPATIAL_PER_CHANNEL = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class _Path:
    """The layout of the permuted tensor along one path from the producer."""

    rank: int
    flattened_block: int = 0  # > 0 after a Flatten of C x H x W: H * W features per channel


class _Refused(Exception):
    """A fold that is not proven correct (the reason is logged)."""


def _only_input(node: Any, cur: Any) -> bool:
    """Whether ``cur`` is ``node``'s first argument and no other argument is a graph value."""
    import torch.fx as fx

    if not node.args or node.args[0] is not cur:
        return False
    others = [*node.args[1:], *node.kwargs.values()]
    found: list[Any] = []
    fx.node.map_arg(others, found.append)
    return not found


def _flatten_start(node: Any, modules: dict[str, Any]) -> int | None:
    """``start_dim`` of a flatten-to-2-D node (``nn.Flatten()``, ``torch.flatten(x, s)``, ``x.flatten(s)``), else None."""
    if node.op == "call_module":
        mod = modules.get(node.target)
        if type(mod) is nn.Flatten and mod.end_dim == -1:
            return int(mod.start_dim)
        return None
    if (node.op == "call_function" and node.target is torch.flatten) or (node.op == "call_method"
                                                                          and node.target == "flatten"):  # fmt: skip
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return int(start) if end == -1 and isinstance(start, int) else None
    return None


class _FoldAnalysis:
    """What the graph allows to fold, shared by every producer of one model."""

    def __init__(self, model: nn.Module, gm: Any) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        calls: dict[int, int] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                key = id(self.modules[node.target])
                calls[key] = calls.get(key, 0) + 1
        self.calls = calls
        owners: dict[int, int] = {}
        for _, mod in model.named_modules(remove_duplicate=False):
            for t in [*mod.parameters(recurse=False), *mod.buffers(recurse=False)]:
                owners[id(t)] = owners.get(id(t), 0) + 1
        self.owners = owners
        self.attr_reads = {str(node.target) for node in gm.graph.nodes if node.op == "get_attr"}

    def check_own(self, name: str, mod: nn.Module, role: str) -> None:
        """Refuse a module called at several places, holding tensors shared with another module, or
        whose tensors the graph also reads directly."""
        if self.calls.get(id(mod), 0) != 1:
            raise _Refused(f"{role} {name} is called {self.calls.get(id(mod), 0)} times")
        tensors = [*mod.parameters(recurse=False), *mod.buffers(recurse=False)]
        if any(self.owners.get(id(t), 0) > 1 for t in tensors):
            raise _Refused(f"{role} {name} shares a tensor with another module")
        if any(read == name or read.startswith(name + ".") for read in self.attr_reads):
            raise _Refused(f"the graph reads {role} {name}'s tensors directly")

    def plan(self, node: Any) -> FoldPlan:
        producer = self.modules[node.target]
        if has_own_forward(producer):
            raise _Refused(f"{node.target} ({type(producer).__name__}) has its own forward")
        if isinstance(producer, nn.Conv2d) and producer.groups != 1:
            raise _Refused(f"{node.target} is a grouped conv: its output channels are tied to its input groups")
        self.check_own(str(node.target), producer, "layer")
        plan = FoldPlan()
        self._follow(node, _Path(self._rank(node)), isinstance(producer, nn.Conv2d), plan)
        return plan

    @staticmethod
    def _rank(node: Any) -> int:
        meta = node.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            raise _Refused(f"no tensor shape recorded for {node.name}")
        return len(meta.shape)

    def _follow(self, cur: Any, path: _Path, conv: bool, plan: FoldPlan) -> None:
        """Every reader of ``cur`` must pass the permutation on or absorb it; otherwise refuse."""
        users = list(cur.users)
        if not users:
            raise _Refused(f"{cur.name} is not read")
        for nxt in users:
            if not _only_input(nxt, cur):
                raise _Refused(f"{nxt.name} ({nxt.op} {nxt.target}) combines the permuted tensor with another value")
            self._step(nxt, path, conv, plan)

    def _step(self, nxt: Any, path: _Path, conv: bool, plan: FoldPlan) -> None:
        mod = self.modules.get(nxt.target) if nxt.op == "call_module" else None
        channels_on_dim1 = not path.flattened_block and (path.rank == 4 if conv else path.rank == 2)
        if (mod is not None and type(mod) in _ELEMENTWISE_MODULES) or (
                nxt.op == "call_function" and nxt.target in _ELEMENTWISE_FUNCS) or (
                nxt.op == "call_method" and nxt.target in _ELEMENTWISE_METHODS):  # fmt: skip
            self._follow(nxt, path, conv, plan)
            return
        if mod is not None and type(mod) in _BATCHNORMS and channels_on_dim1:
            self.check_own(str(nxt.target), mod, "BatchNorm")
            plan.channelwise.append(mod)
            self._follow(nxt, path, conv, plan)
            return
        if mod is not None and type(mod) in _SPATIAL_PER_CHANNEL and conv and channels_on_dim1:
            if getattr(mod, "return_indices", False):
                raise _Refused(f"{nxt.target} returns indices")
            self._follow(nxt, path, conv, plan)
            return
        start = _flatten_start(nxt, self.modules)
        if start == 1 and conv and channels_on_dim1:
            shape = nxt.args[0].meta["tensor_meta"].shape
            self._follow(nxt, _Path(2, math.prod(shape[2:])), conv, plan)
            return
        if mod is not None and isinstance(mod, nn.Linear | nn.Conv2d) and not has_own_forward(mod):
            if isinstance(mod, nn.Conv2d) and not (conv and channels_on_dim1 and mod.groups == 1):
                raise _Refused(f"{nxt.target} is a conv that cannot take the permutation (groups={mod.groups})")
            if isinstance(mod, nn.Linear) and conv and not path.flattened_block:
                raise _Refused(f"{nxt.target} is a Linear over a conv's spatial dimension")
            self.check_own(str(nxt.target), mod, "consumer")
            plan.consumers.append((mod, max(path.flattened_block, 1)))
            return
        raise _Refused(f"{nxt.name} ({nxt.op} {getattr(nxt.target, '__name__', nxt.target)}) is not known to "
                       "commute with a channel permutation")  # fmt: skip


def fold_plans(model: nn.Module, names: list[str], example: Any) -> dict[str, FoldPlan]:
    """For every layer in ``names``, a :class:`FoldPlan` when its output permutation can be folded.

    Uses ``torch.fx`` to follow every reader of each layer's output: a fold is planned only when all
    paths reach a plain Linear/dense Conv2d through element-wise activations, BatchNorm (permuted
    too), per-channel pooling and a ``Flatten`` of C x H x W (each channel then owns a block of
    features). A residual add, a gate multiply, a concatenation, a reshape, the model's output, a
    grouped conv, a layer with its own ``forward``, or any module called at several places (shared)
    refuses the fold: the permutation is then stored. Models that do not trace get no plans. Shapes
    come from shape propagation on ``example`` (one tensor, or a tuple of the model's inputs).
    """
    import torch.fx as fx
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        gm = fx.symbolic_trace(model)
        ShapeProp(gm).propagate(*(example if isinstance(example, tuple) else (example,)))
    except Exception as exc:  # tracing arbitrary user models fails in many ways; folding is optional
        log.info("permutation folding disabled: the model does not trace with torch.fx (%s)", exc)
        return {}
    analysis = _FoldAnalysis(model, gm)
    wanted = set(names)
    plans: dict[str, FoldPlan] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target not in wanted:
            continue
        try:
            plans[node.target] = analysis.plan(node)
        except _Refused as why:
            log.info("JLCM: the permutation of %s is stored, not folded: %s", node.target, why)
    return plans


@torch.no_grad()
def apply_fold(plan: FoldPlan, order: torch.Tensor) -> None:
    """Permute the channel-wise modules and every consumer's input columns by ``order`` (in place)."""
    for bn in plan.channelwise:
        for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
            if t is not None:
                t.copy_(t[order])
    for consumer, block in plan.consumers:
        cols = (order[:, None] * block + torch.arange(block)[None, :]).reshape(-1)
        consumer.weight.copy_(consumer.weight[:, cols])


@torch.no_grad()
def _permute(layer: Any, plan: FoldPlan, order: torch.Tensor) -> None:
    layer.weight.copy_(layer.weight[order])
    if layer.bias is not None:
        layer.bias.copy_(layer.bias[order])
    apply_fold(plan, order)


@torch.no_grad()
def _float_outputs(model: nn.Module, example: Any) -> list[torch.Tensor]:
    from edgecompress.compress.training import forward
    from edgecompress.export.torch_io import flatten_outputs

    modes = {m: m.training for m in model.modules()}
    model.eval()  # BatchNorm statistics and dropout as the folded model will be used
    try:
        return [t.detach().clone() for _, t in flatten_outputs(forward(model, example)) if isinstance(t, torch.Tensor)]
    finally:
        for m, mode in modes.items():
            m.training = mode


def _close(reference: list[torch.Tensor], test: list[torch.Tensor], rtol: float = 1e-4) -> bool:
    """Equal up to float reassociation: max error within ``rtol`` of the output's largest magnitude."""
    if len(reference) != len(test):
        return False
    for r, t in zip(reference, test, strict=True):
        if r.shape != t.shape:
            return False
        if not r.is_floating_point():
            if not torch.equal(r, t):
                return False
            continue
        if not bool(torch.isfinite(t).all() == torch.isfinite(r).all()):
            return False
        scale = float(r.abs().max()) if r.numel() else 0.0
        if r.numel() and float((r - t).abs().max()) > rtol * max(scale, 1e-12):
            return False
    return True


@torch.no_grad()
def fold_permutations(model: nn.Module, plans: dict[str, FoldPlan], orders: dict[str, torch.Tensor],
                      example: Any) -> set[str]:  # fmt: skip
    """Reorder the rows of every planned layer by its order and fold the permutation (in place), then
    check on ``example`` that the model's outputs did not change.

    The check guards the rules of :func:`fold_plans`: if the outputs differ, every fold is undone
    (exactly: permutations are gathers) and an empty set is returned, so all permutations are stored.

    Returns:
        The names of the folded layers.
    """
    todo = [name for name in plans if name in orders]
    if not todo:
        return set()
    reference = _float_outputs(model, example)
    for name in todo:
        _permute(model.get_submodule(name), plans[name], orders[name])
    if _close(reference, _float_outputs(model, example)):
        return set(todo)
    log.warning("JLCM: folding the permutations of %s changed the model's outputs; all of them are stored "
                "instead (a graph pattern the folding rules miss, please report it)", ", ".join(todo))  # fmt: skip
    for name in reversed(todo):
        _permute(model.get_submodule(name), plans[name], torch.argsort(orders[name]))
    return set()
