"""``apply_jlcm``: compress a model's Linear/Conv2d weights into packed codebooks (JLCM).

Yvinec, Dapogny, Bailly, "Network Memory Footprint Compression Through Jointly Learnable
Codebooks and Mappings", ICLR 2024 (arXiv 2309.17361). The steps follow ALGORITHMS.md section 2:
neuron grouping and reordering (permutation folded where the graph allows), k-means
initialisation, layer-wise joint learning of codebooks, scales and mappings on calibration data,
an optional end-to-end distillation phase, then freezing into packed layers.

After an N:M ``sparsify`` stage, ``keep_zeros`` names the sparse layers: their pruned weights stay
exactly 0 (a reserved zero codeword per codebook, see :mod:`edgecompress.compress.codebook.learn`), and no row
permutation is folded into a sparse layer's input columns (that would move its N:M groups).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgecompress.compress.codebook.config import JLCMConfig
from edgecompress.compress.codebook.grouping import fold_permutations, fold_plans, group_neurons
from edgecompress.compress.codebook.layers import (
    CODEBOOK_LAYERS,
    CodebookConv2d,
    CodebookLinear,
    CodebookWeight,
    model_accounting,
)
from edgecompress.compress.codebook.learn import TrainableCodebookLayer, distill, learn_layer
from edgecompress.compress.errors import CheckpointError

log = logging.getLogger(__name__)


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


Batch = torch.Tensor | tuple[torch.Tensor, ...]
"""Model inputs: one tensor, or a tuple of tensors in ``forward``'s order (token ids and mask, ...)."""


@torch.no_grad()
def _capture(model: nn.Module, name: str, inputs: Batch, *, want: str, batch: int = 64) -> torch.Tensor:
    """The input (``want="input"``) or output of sub-module ``name`` over all ``inputs``."""
    from edgecompress.compress.training import batch_length, forward, take_batch

    mod = model.get_submodule(name)
    got: list[torch.Tensor] = []

    def hook(_m: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
        got.append((args[0] if want == "input" else out).detach())

    handle = mod.register_forward_hook(hook)
    try:
        for i in range(0, batch_length(inputs), batch):
            forward(model, take_batch(inputs, slice(i, i + batch)))
    finally:
        handle.remove()
    return torch.cat(got)


def select_layers(model: nn.Module, config: JLCMConfig) -> list[str]:
    """Names of the Linear/Conv2d layers the config's scope selects (and big enough)."""
    chosen = config.scope.layers(model, (nn.Linear, nn.Conv2d), "codebook",
                                 keep=lambda _, mod: mod.weight.numel() >= config.min_weights,
                                 why=f" with at least {config.min_weights} weights")  # fmt: skip
    return [name for name, _ in chosen]


@torch.no_grad()
def group_and_fold(model: nn.Module, names: list[str], config: JLCMConfig, example: Batch,
                   keep_zeros: Collection[str] = ()) -> dict[str, Any]:  # fmt: skip
    """JLCM step 1 on a float model, in place: group neurons, reorder rows, fold permutations.

    Folded layers get their rows (and bias) permuted in place together with the input columns of
    every layer reading them (:func:`~compress.codebook.grouping.fold_plans` says where that is
    provably exact; :func:`~compress.codebook.grouping.fold_permutations` checks it on ``example``),
    so the model's function is unchanged. A permutation is never folded into a layer of
    ``keep_zeros`` (N:M sparse: permuting its input columns would break its groups); it is stored.
    Returns per layer ``(weight_2d in stored order, group_sizes, row_gather or None, folded)``.
    """
    plans = fold_plans(model, names, example) if config.fold_permutation and config.grouping == "kmeans" else {}
    sparse_ids = {id(model.get_submodule(n)) for n in keep_zeros}
    plans = {k: p for k, p in plans.items() if not any(id(c) in sparse_ids for c, _ in p.consumers)}
    groupings: dict[str, tuple[torch.Tensor, list[int]]] = {}
    for name in names:
        weight = _weight_of(model, name)
        groupings[name] = group_neurons(weight.reshape(weight.shape[0], -1), config.groups, mode=config.grouping,
                                        descriptor=config.descriptor, seed=config.seed)  # fmt: skip
    orders = {n: order for n, (order, _) in groupings.items() if not torch.equal(order, torch.arange(len(order)))}
    folded = fold_permutations(model, plans, orders, example)
    result: dict[str, Any] = {}
    for name in names:  # after every fold: a fold into this layer permuted its columns
        weight = _weight_of(model, name)
        w2d = weight.reshape(weight.shape[0], -1).clone()
        order, sizes = groupings[name]
        if name in orders and name not in folded:
            result[name] = (w2d[order], sizes, torch.argsort(order), False)
        else:
            result[name] = (w2d, sizes, None, name in folded)
    return result


def _weight_of(model: nn.Module, name: str) -> torch.Tensor:
    layer: Any = model.get_submodule(name)
    return layer.weight.detach()


def apply_jlcm(model: nn.Module, calib_inputs: Batch, config: JLCMConfig, *, keep_zeros: Collection[str] = (),
               task: str = "classification") -> tuple[nn.Module, dict[str, Any]]:  # fmt: skip
    """Compress ``model`` with JLCM; the input model is not modified.

    Args:
        model: a float model (eval mode is used throughout).
        calib_inputs: calibration inputs, one tensor or a tuple in ``forward``'s order (at most
            ``config.calib_samples`` are used); no labels are needed.
        config: the :class:`JLCMConfig`.
        keep_zeros: names of layers whose exact zeros must survive (the N:M sparse layers,
            ``metadata["nm_sparsity"]["layers"]``): each of their codebooks reserves an exact-zero
            codeword that the zero weights keep. Costs no stored bit; the other weights get
            ``K - 1`` codewords.
        task: the model's task; the end-to-end phase distils logits of a ``"classification"``
            model with KL and every other output (embeddings, maps) with normalised MSE + cosine.

    Returns:
        ``(compressed_model, report)``; the report holds the per-layer learning losses, the
        bits-per-weight accounting and the layout needed to reload a checkpoint.

    Raises:
        ConfigError: no layer in scope.

    Example:
        >>> small, report = apply_jlcm(model, calib_x, JLCMConfig(bits=3, groups=8))
        >>> report["accounting"]["bits_per_weight"]
    """
    # Deterministic kernels (the codebook gradient's index accumulation is not, on several threads):
    # the same inputs give bit-identical weights, whether called from the CLI, a recipe or Python.
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _apply_jlcm(model, calib_inputs, config, keep_zeros, task)
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def _apply_jlcm(model: nn.Module, calib_inputs: Batch, config: JLCMConfig, keep_zeros: Collection[str],
                task: str) -> tuple[nn.Module, dict[str, Any]]:  # fmt: skip
    from edgecompress.compress.training import take_batch

    t0 = time.perf_counter()
    torch.manual_seed(config.seed)
    student = copy.deepcopy(model).eval()
    if keep_zeros:
        from edgecompress.compress.sparsity.lock import unlock_nm_pattern

        unlock_nm_pattern(student)  # plain weights (holding the zeros), so grouping can permute them in place
    for p in student.parameters():
        p.requires_grad_(False)
    calib = _as_float(take_batch(calib_inputs, slice(0, config.calib_samples)))
    names = select_layers(student, config)
    keep = set(keep_zeros) & set(names)
    stored = group_and_fold(student, names, config, take_batch(calib, slice(0, 2)), keep)
    teacher = copy.deepcopy(student).eval()  # function-identical to ``model`` (folding is exact)
    trainables: list[TrainableCodebookLayer] = []
    layer_reports: list[dict[str, Any]] = []
    for i, name in enumerate(names):
        w2d, sizes, row_gather, folded = stored[name]
        mask = (w2d == 0) if name in keep else None
        layer = TrainableCodebookLayer(student.get_submodule(name), w2d, sizes, row_gather, config, mask)
        if config.steps and layer.param_groups():
            x = _capture(student, name, calib, want="input")
            y = _capture(teacher, name, calib, want="output")
            stats = learn_layer(layer, x, y, steps=config.steps, batch_size=config.batch_size, seed=config.seed + i)
            stats["sqnr_db"] = _output_sqnr(layer, x, y)  # the layer alone, against the (folded) fp32 layer
        else:  # initialisation only (the k-means / RTN baselines): no calibration pass needed
            layer.eval()
            stats = {"loss_init": float("nan"), "loss_final": float("nan"), "index_moves_per_weight": 0.0,
                     "steps": 0.0}  # fmt: skip
        _set_module(student, name, layer)
        trainables.append(layer)
        layer_reports.append({"layer": name, "groups": len(sizes), "permutation": "folded" if folded else
                              ("stored" if row_gather is not None else "none"), "keeps_zeros": name in keep,
                              **stats})  # fmt: skip
        log.info("JLCM %s: reconstruction error %.4g -> %.4g", name, stats["loss_init"], stats["loss_final"])
    e2e_loss = None
    if config.e2e_steps:
        e2e_loss = distill(student, teacher, calib, trainables, steps=config.e2e_steps, batch_size=config.batch_size,
                           seed=config.seed, logits=task == "classification")  # fmt: skip
    for name, layer in zip(names, trainables, strict=True):
        _set_module(student, name, layer.finalize())
    student.eval()
    accounting = model_accounting(student, requested_bits=config.bits)  # overhead_note: > bits + 10 %
    report = {
        "config": config.model_dump(mode="json"),
        "layers": layer_reports,
        "e2e_loss": e2e_loss,
        "accounting": accounting,
        "layout": codebook_layout(student),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return student, report


@torch.no_grad()
def _output_sqnr(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    from edgecompress.export.verify import sqnr_db

    layer.eval()
    return round(sqnr_db(y.numpy(), layer(x).numpy()), 2)


def _as_float(batch: Batch) -> Batch:
    """Floating inputs as float32 (integer token ids stay as they are)."""
    if isinstance(batch, tuple):
        return tuple(t.float() if t.is_floating_point() else t for t in batch)
    return batch.float() if batch.is_floating_point() else batch


def codebook_layout(model: nn.Module) -> list[dict[str, Any]]:
    """What is needed to rebuild the codebook layers' structure before loading a state dict."""
    layout = []
    for name, mod in model.named_modules():
        if isinstance(mod, CODEBOOK_LAYERS):
            st = mod.weight_store
            entry: dict[str, Any] = {
                "name": name, "kind": "conv2d" if isinstance(mod, CodebookConv2d) else "linear",
                "weight_shape": list(st.weight_shape), "bits": st.bits, "variant": st.variant,
                "codebook_shape": list(st.codebook.shape), "dtype": str(st.codebook.dtype).removeprefix("torch."),
                "group_sizes": _group_sizes(st), "permutation_stored": bool(st.row_gather.numel()),
                "has_bias": mod.bias is not None,
            }  # fmt: skip
            layout.append(entry)
    return layout


def _group_sizes(store: CodebookWeight) -> list[int]:
    edges = [0, *store.bounds.tolist(), store.rows]
    return [b - a for a, b in zip(edges[:-1], edges[1:], strict=True)]


def rebuild_codebook_model(base: nn.Module, layout: list[dict[str, Any]]) -> nn.Module:
    """Replace ``base``'s layers by empty codebook layers shaped as ``layout`` says (then load a state dict)."""
    for entry in layout:
        try:
            layer: Any = base.get_submodule(entry["name"])
        except AttributeError:
            raise CheckpointError(f"codebook layout names layer {entry['name']!r}, which the model lacks") from None
        shape = tuple(entry["weight_shape"])
        out, d = shape[0], int(torch.tensor(shape[1:]).prod())
        dtype = getattr(torch, entry["dtype"])
        gsizes = entry["group_sizes"]
        scales = torch.ones(len(gsizes)) if entry["variant"] == "scales" else None
        gather = torch.arange(out) if entry["permutation_stored"] else None
        store = CodebookWeight(torch.zeros(out, d, dtype=torch.int64), torch.zeros(entry["codebook_shape"]), scales,
                               gsizes, gather, shape, entry["bits"], dtype)  # fmt: skip
        bias = torch.zeros(out) if entry["has_bias"] else None
        new: nn.Module = (CodebookConv2d if entry["kind"] == "conv2d" else CodebookLinear)(store, bias, layer)
        _set_module(base, entry["name"], new)
    return base


def save_codebook_checkpoint(bundle: Any, path: str | Path, layout: list[dict[str, Any]],
                             model_kwargs: dict[str, Any] | None = None) -> Path:  # fmt: skip
    """Write a compressed model as a checkpoint whose metadata carries the codebook layout."""
    from edgecompress.compress.checkpoint import save_checkpoint

    out = bundle.derive(bundle.module, metadata={**bundle.metadata, "codebook_layout": layout})
    return save_checkpoint(out, path, model_kwargs=model_kwargs or {"num_classes": bundle.num_classes})


def load_codebook_checkpoint(path: str | Path, *, base_module: nn.Module | None = None) -> Any:
    """Load a checkpoint written by :func:`save_codebook_checkpoint`.

    ``base_module`` is the uncompressed architecture (default: the built-in model the checkpoint names).
    """
    import json

    from edgecompress.compress.checkpoint import ModelBundle
    from edgecompress.compress.models import create_model
    from edgecompress.export.spec import ModelSpec

    try:
        raw = torch.load(str(path), map_location="cpu", weights_only=True)
        meta = json.loads(raw["metadata_json"])
        layout = meta["codebook_layout"]
    except (OSError, KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a codebook checkpoint: {exc}") from None
    base = base_module if base_module is not None else create_model(raw["model"], **raw.get("model_kwargs", {}))
    module = rebuild_codebook_model(base, layout)
    module.load_state_dict(raw["state_dict"])
    module.eval()
    spec = ModelSpec.from_json(json.loads(raw["model_spec_json"])) if raw.get("model_spec_json") else ModelSpec([])
    return ModelBundle(module, raw["model"], input_shape=tuple(raw["input_shape"]), preprocessing=raw["preprocessing"],
                       num_classes=raw["num_classes"], metadata=meta, source=str(path), spec=spec)  # fmt: skip


def restore_codebook_layers(module: Any, metadata: dict[str, Any], state: dict[str, Any]) -> Any:
    """A codebook checkpoint: rebuild the codebook layers its layout records before the weights load."""
    return rebuild_codebook_model(module, metadata["codebook_layout"]) if metadata.get("codebook_layout") else module
