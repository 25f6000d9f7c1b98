"""Initialisation and joint learning of codebooks, scales and mappings (JLCM steps 2-5).

Yvinec, Dapogny, Bailly, "Network Memory Footprint Compression Through Jointly Learnable
Codebooks and Mappings", ICLR 2024 (arXiv 2309.17361).

A :class:`TrainableCodebookLayer` holds one layer during learning: codebook(s) and group scales
are parameters, the mapping ``I`` is an integer tensor. Codebooks, scales and bias follow Adam
on the loss; the mapping follows one of two rules (``JLCMConfig.update``):

- ``proximal`` (JLCM, our reading): an exponential moving average ``m`` of ``dL/dw`` is kept per
  element; moving element i from codeword ``c_a`` to ``c_j`` scores
  ``m_i * (c_j - c_a) * exp(-|c_j - c_a| / (t * gap))`` (``gap``: mean distance between consecutive
  codewords); candidates are the two neighbours of ``c_a`` in sorted order (or all codewords), and
  per step only the ``move_fraction`` most negative scores move. Assignments therefore walk to
  nearby codewords instead of jumping to extreme ones.
- ``ste``: a continuous latent weight per element receives the gradient straight through
  (``w_hat = C[I] + u - stopgrad(u)``), and ``I`` is re-assigned to the nearest codeword of ``u``.

Keeping an N:M pattern (``zero_mask``, the pruned elements of a sparse layer): every codebook then
reserves one codeword that is exactly 0 (pinned: it gets no gradient and is reset after each step).
The masked elements point to it and never move; k-means places the other ``K - 1`` codewords on the
unmasked weights only. Nothing extra is stored: the zero is an ordinary fp16 codebook entry, so the
reconstruction (torch and ONNX) is exactly 0 there.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from edgecompress.compress.codebook.config import JLCMConfig
from edgecompress.compress.codebook.layers import CodebookConv2d, CodebookLinear, CodebookWeight
from edgecompress.compress.layer_forward import apply_layer


def kmeans_1d(x: torch.Tensor, k: int, *, iters: int = 30, max_points: int = 65536, seed: int = 0) -> torch.Tensor:
    """Sorted 1-D k-means (Lloyd) centres of ``x``, initialised at quantiles (deterministic)."""
    x = x.detach().reshape(-1).float()
    if x.numel() > max_points:
        gen = torch.Generator().manual_seed(seed)
        x = x[torch.randperm(x.numel(), generator=gen)[:max_points]]
    centres = torch.quantile(x, (torch.arange(k, dtype=torch.float32) + 0.5) / k)
    for _ in range(iters):
        assign = nearest_codeword(x, centres)
        sums = torch.zeros(k).index_add_(0, assign, x)
        counts = torch.zeros(k).index_add_(0, assign, torch.ones_like(x))
        centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
    centres, _ = torch.sort(centres)
    # identical centres (tiny or constant layers) are spread so that the codebook stays sortable
    return centres + torch.arange(k, dtype=torch.float32) * 1e-6


def kmeans_with_zero(x: torch.Tensor, k: int, *, seed: int = 0) -> torch.Tensor:
    """Sorted codebook of ``k`` codewords: an exact 0 plus ``k - 1`` k-means centres of ``x`` (the unmasked weights)."""
    x = x.detach().reshape(-1).float()
    if k == 1:
        return torch.zeros(1)
    centres = kmeans_1d(x if x.numel() else torch.zeros(1), k - 1, seed=seed)
    centres = torch.where(centres == 0, torch.full_like(centres, 1e-6), centres)  # keep the zero unique
    return torch.sort(torch.cat([centres, torch.zeros(1)])).values


def nearest_codeword(x: torch.Tensor, sorted_codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codeword of a sorted 1-D codebook for every element of ``x``."""
    mids = (sorted_codebook[1:] + sorted_codebook[:-1]) / 2
    return torch.bucketize(x.contiguous(), mids.contiguous())


class TrainableCodebookLayer(nn.Module):
    """A Linear/Conv2d layer under JLCM learning (rows in stored order, groups contiguous).

    Args:
        layer: the float layer (its hyper-parameters are kept).
        weight_2d: (out, D) float weight in stored row order.
        group_sizes: rows per group.
        row_gather: (out,) stored row of each original row, or None.
        config: the JLCM config.
        zero_mask: (out, D) bool, True where the weight must stay exactly 0 (the pruned elements
            of an N:M sparse layer, stored order), or None. With a mask every codebook reserves an
            exact-zero codeword (``zero_pos``) that the masked elements keep.
    """

    gid: torch.Tensor
    row_gather: torch.Tensor
    idx: torch.Tensor
    zero_mask: torch.Tensor
    zero_pos: torch.Tensor
    grad_ema: torch.Tensor
    template: Any
    conv_args: Any

    def __init__(self, layer: Any, weight_2d: torch.Tensor, group_sizes: list[int],
                 row_gather: torch.Tensor | None, config: JLCMConfig,
                 zero_mask: torch.Tensor | None = None):  # fmt: skip
        super().__init__()
        self.config = config
        self.is_conv = isinstance(layer, nn.Conv2d)
        self.conv_args = (layer.stride, layer.padding, layer.dilation, layer.groups) if self.is_conv else None
        self.template = layer
        self.weight_shape = tuple(layer.weight.shape)
        self.group_sizes = list(group_sizes)
        w = weight_2d.detach().float()
        gid = torch.repeat_interleave(torch.arange(len(group_sizes)), torch.tensor(group_sizes))
        self.register_buffer("gid", gid)
        self.register_buffer("row_gather", row_gather if row_gather is not None else torch.zeros(0, dtype=torch.int64))
        k = config.num_codewords
        keep = zero_mask is not None
        mask = zero_mask.to(torch.bool) if zero_mask is not None else torch.zeros(0, dtype=torch.bool)
        self.register_buffer("zero_mask", mask)
        kept = ~mask if keep else torch.ones_like(w, dtype=torch.bool)

        def centres(x: torch.Tensor) -> torch.Tensor:
            return kmeans_with_zero(x, k, seed=config.seed) if keep else kmeans_1d(x, k, seed=config.seed)

        if config.variant == "scales":
            if config.codebook_init == "uniform":  # the signed levels already hold an exact 0 (index K/2)
                half = 2 ** (config.bits - 1)
                levels = torch.arange(k, dtype=torch.float32) - half
                gmax = torch.zeros(len(group_sizes)).scatter_reduce(0, gid, w.abs().amax(1), "amax", include_self=False)
                scales = gmax.clamp(min=1e-8) / max(half - 1, 1)
                codebook = levels[None, :]
            else:
                counts = kept.sum(1).clamp(min=1).float()
                sq = torch.zeros(len(group_sizes)).index_add_(0, gid, (w * kept).pow(2).sum(1) / counts)
                scales = (sq / torch.tensor(group_sizes, dtype=torch.float32)).sqrt().clamp(min=1e-8)
                codebook = centres((w / scales[gid][:, None])[kept])[None, :]
            self.scales: nn.Parameter | None = nn.Parameter(scales)
        else:
            codebook = torch.stack([centres(w[gid == g][kept[gid == g]]) for g in range(len(group_sizes))])
            self.scales = None
        zero_pos = (codebook == 0).to(torch.int64).argmax(1) if keep else torch.zeros(0, dtype=torch.int64)
        if keep and not bool((codebook.gather(1, zero_pos[:, None]) == 0).all()):
            raise RuntimeError("a zero-keeping codebook lacks its exact-zero codeword")
        self.register_buffer("zero_pos", zero_pos)
        self.codebook = nn.Parameter(codebook.clone(), requires_grad=config.learn_codebook)
        if keep and config.learn_codebook:
            self.codebook.register_hook(self._no_zero_grad)
        bias = getattr(layer, "bias", None)
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.register_buffer("idx", self._assign(self._normalised(w)))
        self.latent = nn.Parameter(self._normalised(w).clone()) if config.update == "ste" else None
        self.register_buffer("grad_ema", torch.zeros_like(w) if config.update == "proximal" else torch.zeros(0))
        self._last_weight: torch.Tensor | None = None
        self._previous: tuple[torch.Tensor, torch.Tensor] | None = None
        self.move_fraction = config.move_fraction  # adapted: halved when a move batch is rejected

    # -- kept zeros ------------------------------------------------------------------------------
    @property
    def keeps_zeros(self) -> bool:
        return bool(self.zero_mask.numel())

    def _no_zero_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """Codebook gradient hook: the reserved zero codewords get none (Adam then leaves them at 0)."""
        return grad.scatter(1, self.zero_pos[:, None], 0.0)

    @torch.no_grad()
    def pin_zeros(self) -> None:
        """Reset the reserved codewords to exactly 0 and point every masked element at its codebook's zero."""
        if not self.keeps_zeros:
            return
        self.codebook.data.scatter_(1, self.zero_pos[:, None], 0.0)
        zero_of_row = self.zero_pos[0] if self.scales is not None else self.zero_pos[self.gid][:, None]
        self.idx = torch.where(self.zero_mask, zero_of_row, self.idx)

    # -- representation ------------------------------------------------------------------------
    def _row_scale(self) -> torch.Tensor:
        return self.scales[self.gid][:, None] if self.scales is not None else torch.ones(1)

    def _normalised(self, w: torch.Tensor) -> torch.Tensor:
        return w / self._row_scale().detach() if self.scales is not None else w

    def _row_codebook(self) -> torch.Tensor:
        """(rows or 1, K) codebook seen by every row."""
        return self.codebook if self.scales is not None else self.codebook[self.gid]

    def _assign(self, u: torch.Tensor) -> torch.Tensor:
        cb = self.codebook.detach()
        if self.scales is not None:
            idx = nearest_codeword(u, cb[0])
        else:
            idx = torch.empty(u.shape, dtype=torch.int64)
            for g in range(cb.shape[0]):
                rows = self.gid == g
                idx[rows] = nearest_codeword(u[rows], cb[g])
        if self.keeps_zeros:
            zero_of_row = self.zero_pos[0] if self.scales is not None else self.zero_pos[self.gid][:, None]
            idx = torch.where(self.zero_mask, zero_of_row, idx)
        return idx

    def quantised_2d(self) -> torch.Tensor:
        """(out, D) reconstructed weight in stored order (differentiable in codebook and scales)."""
        cb = self._row_codebook()
        q = cb[0][self.idx] if self.scales is not None else torch.gather(cb, 1, self.idx)
        if self.latent is not None:  # straight-through: value C[I], gradient also to the latent
            q = q + self.latent - self.latent.detach()
        return q * self._row_scale()

    def weight(self) -> torch.Tensor:
        w = self.quantised_2d()
        if self.training and w.requires_grad:
            w.retain_grad()
            self._last_weight = w
        if self.row_gather.numel():
            w = w[self.row_gather]
        return w.reshape(self.weight_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the original layer's computation: its padding_mode, or a subclass's own forward (padding, ...)
        return apply_layer(self.template, x, self.weight(), self.bias)

    # -- learning -----------------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        cfg = self.config
        groups: list[dict[str, Any]] = []
        if cfg.learn_codebook:
            groups.append({"params": [self.codebook], "lr": cfg.lr_codebook})
            if self.scales is not None:
                groups.append({"params": [self.scales], "lr": cfg.lr_scale})
        if self.bias is not None and cfg.lr_bias > 0:
            groups.append({"params": [self.bias], "lr": cfg.lr_bias})
        if self.latent is not None:
            groups.append({"params": [self.latent], "lr": cfg.lr_latent})
        return groups

    @torch.no_grad()
    def keep_sorted(self) -> None:
        """Re-sort codewords that crossed during optimisation and remap the indices accordingly."""
        self.pin_zeros()
        cb = self.codebook.data
        order = torch.argsort(cb, dim=1)
        if bool((order == torch.arange(cb.shape[1])).all()):
            return
        rank = torch.argsort(order, dim=1)
        self.codebook.data = torch.gather(cb, 1, order)
        if self.keeps_zeros:
            self.zero_pos = torch.gather(rank, 1, self.zero_pos[:, None])[:, 0]
        if self.scales is not None:
            self.idx = rank[0][self.idx]
        else:
            self.idx = torch.gather(rank[self.gid], 1, self.idx)

    @torch.no_grad()
    def mapping_step(self) -> int:
        """Update the mapping after an optimiser step; returns how many indices changed."""
        self.keep_sorted()
        if self.config.update == "ste" and self.latent is not None:
            new = self._assign(self.latent.data)
            moved = int((new != self.idx).sum())
            self.idx = new
            return moved
        if self.config.update != "proximal" or self._last_weight is None or self._last_weight.grad is None:
            return 0
        return self._proximal_step(self._last_weight.grad)

    def _proximal_step(self, grad_w: torch.Tensor) -> int:
        cfg = self.config
        grad = grad_w * self._row_scale().detach()  # gradient w.r.t. the normalised weight
        self.grad_ema.mul_(0.9).add_(grad, alpha=0.1)
        cb = self._row_codebook().detach()  # (1 or out, K), sorted
        k = cb.shape[1]
        gap = ((cb[:, -1] - cb[:, 0]) / max(k - 1, 1)).clamp(min=1e-12)[:, None]  # (1 or out, 1)
        current = torch.gather(cb.expand(self.idx.shape[0], k), 1, self.idx)
        steps = (-1, 1) if cfg.neighbours_only else tuple(s for s in range(-(k - 1), k) if s)
        best_score = torch.zeros_like(current)
        best_idx = self.idx.clone()
        for s in steps:
            cand = (self.idx + s).clamp(0, k - 1)
            delta = torch.gather(cb.expand(self.idx.shape[0], k), 1, cand) - current
            score = self.grad_ema * delta * torch.exp(-delta.abs() / (cfg.proximal_temperature * gap))
            better = (score < best_score) & (cand != self.idx)
            if self.keeps_zeros:
                better &= ~self.zero_mask  # kept zeros never move
            best_score = torch.where(better, score, best_score)
            best_idx = torch.where(better, cand, best_idx)
        budget = max(1, int(self.move_fraction * best_score.numel()))
        candidates = int((best_score < 0).sum())
        if candidates == 0:
            return 0
        threshold = torch.topk(best_score.reshape(-1), min(budget, candidates), largest=False).values[-1]
        move = (best_score <= threshold) & (best_score < 0)
        self._previous = (self.idx, self.grad_ema.clone())
        self.idx = torch.where(move, best_idx, self.idx)
        self.grad_ema[move] = 0.0
        return int(move.sum())

    @torch.no_grad()
    def judge_moves(self, accepted: bool) -> None:
        """Keep or undo the last proximal moves (a trust region on the mapping)."""
        prev = getattr(self, "_previous", None)
        if prev is None:
            return
        if accepted:
            self.move_fraction = min(self.move_fraction * 1.25, self.config.move_fraction)
        else:
            self.idx, self.grad_ema = prev
            self.move_fraction = max(self.move_fraction * 0.5, 1e-5)
        self._previous = None

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A copy of everything learning changes (for keeping the best state)."""
        state = {"idx": self.idx.clone(), "codebook": self.codebook.detach().clone(), "zero_pos": self.zero_pos.clone()}
        if self.scales is not None:
            state["scales"] = self.scales.detach().clone()
        if self.bias is not None:
            state["bias"] = self.bias.detach().clone()
        return state

    @torch.no_grad()
    def restore(self, state: dict[str, torch.Tensor]) -> None:
        self.idx = state["idx"].clone()
        self.zero_pos = state["zero_pos"].clone()
        self.codebook.copy_(state["codebook"])
        if self.scales is not None:
            self.scales.copy_(state["scales"])
        if self.bias is not None:
            self.bias.copy_(state["bias"])

    # -- result ---------------------------------------------------------------------------------
    def finalize(self) -> nn.Module:
        """The frozen :class:`CodebookLinear` / :class:`CodebookConv2d` with packed indices."""
        self.keep_sorted()
        dtype = torch.float16 if self.config.codebook_dtype == "float16" else torch.float32
        store = CodebookWeight(
            self.idx, self.codebook.detach(), self.scales.detach() if self.scales is not None else None,
            self.group_sizes, self.row_gather if self.row_gather.numel() else None, self.weight_shape,
            self.config.bits, dtype,
        )  # fmt: skip
        bias = self.bias.detach() if self.bias is not None else None
        if self.is_conv:
            return CodebookConv2d(store, bias, self.template)
        return CodebookLinear(store, bias, self.template)


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Relative squared error ``||Y - Y_hat||^2 / ||Y||^2`` (the layer-wise objective)."""
    return (pred - target).pow(2).sum() / target.pow(2).sum().clamp(min=1e-12)


def learn_layer(layer: TrainableCodebookLayer, inputs: torch.Tensor, targets: torch.Tensor, *,
                steps: int, batch_size: int, seed: int) -> dict[str, float]:  # fmt: skip
    """Minimise the layer's output reconstruction error on calibration inputs (JLCM step 4)."""
    gen = torch.Generator().manual_seed(seed)
    layer.train()
    with torch.no_grad():
        before = float(reconstruction_loss(layer(inputs), targets))
    groups = layer.param_groups()
    moved = 0
    if steps and groups:
        opt = torch.optim.Adam(groups)
        n = inputs.shape[0]
        check_every = max(steps // 5, 1)
        best = (before, layer.snapshot())
        for step in range(1, steps + 1):
            batch = torch.randint(0, n, (min(batch_size, n),), generator=gen)
            loss = reconstruction_loss(layer(inputs[batch]), targets[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            moved += _mapping_step_checked([layer], lambda b=batch: reconstruction_loss(layer(inputs[b]), targets[b]))
            if step % check_every == 0 or step == steps:
                with torch.no_grad():
                    layer.eval()
                    current = float(reconstruction_loss(layer(inputs), targets))
                    layer.train()
                if current < best[0]:
                    best = (current, layer.snapshot())
        layer.restore(best[1])  # keep the best state seen on the whole calibration set
    layer.eval()
    with torch.no_grad():
        after = float(reconstruction_loss(layer(inputs), targets))
    numel = max(layer.idx.numel(), 1)
    return {"loss_init": before, "loss_final": after, "index_moves_per_weight": moved / numel,
            "steps": float(steps)}  # fmt: skip


def distill(model: nn.Module, teacher: nn.Module, inputs: Any, layers: list[TrainableCodebookLayer], *,
            steps: int, batch_size: int, lr_scale: float = 0.3, seed: int = 0, temperature: float = 1.0,
            logits: bool = True) -> float:  # fmt: skip
    """End-to-end phase: all layers jointly, distilled from the original model's outputs.

    ``inputs`` is one tensor or a tuple of the model's inputs; no labels are used. The loss is
    :func:`compress.training.distillation_loss`: KL on logits (``logits=True``, a classifier), and
    normalised MSE + cosine on every other output (an embedding model passes ``logits=False``).
    """
    from edgecompress.compress.training import (
        batch_length,
        distillation_loss,
        forward,
        take_batch,
        teacher_outputs,
    )

    gen = torch.Generator().manual_seed(seed)
    groups = [{**g, "lr": g["lr"] * lr_scale} for layer in layers for g in layer.param_groups()]
    if not groups or steps == 0:
        return math.nan
    opt = torch.optim.Adam(groups)
    teacher.eval()
    model.eval()
    for layer in layers:
        layer.train()
    loss = torch.zeros(())
    n = batch_length(inputs)

    def batch_loss(b: Any, t: list[torch.Tensor]) -> torch.Tensor:
        return distillation_loss(forward(model, b), t, temperature, logits=logits)

    for _ in range(steps):
        batch = take_batch(inputs, torch.randint(0, n, (min(batch_size, n),), generator=gen))
        target = teacher_outputs(teacher, batch)
        loss = batch_loss(batch, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _mapping_step_checked(layers, lambda b=batch, t=target: batch_loss(b, t))
    for layer in layers:
        layer.eval()
    return float(loss.detach())


def _mapping_step_checked(layers: list[TrainableCodebookLayer], batch_loss: Any) -> int:
    """Mapping updates of ``layers``; proximal moves are kept only if the batch loss does not rise."""
    for layer in layers:
        layer.pin_zeros()  # Adam momentum may have nudged a reserved zero codeword
    proximal = [layer for layer in layers if layer.config.update == "proximal"]
    if not proximal:
        return sum(layer.mapping_step() for layer in layers)
    with torch.no_grad():
        for layer in layers:
            layer.eval()
        before = float(batch_loss())
        moved = sum(layer.mapping_step() for layer in layers)
        after = float(batch_loss()) if moved else before
        for layer in layers:
            layer.judge_moves(after <= before)
            layer.train()
    return moved if after <= before else 0
