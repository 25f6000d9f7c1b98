"""Configuration of N:M structured sparsity (:class:`NMSparsityConfig`).

Methods (ALGORITHMS.md section 3):

* ``oneshot``: magnitude pruning to N:M, no training (for PTQ-only pipelines).
* ``srste``: SR-STE, Zhou et al., "Learning N:M fine-grained structured sparse neural networks
  from scratch", ICLR 2021: hard mask forward, straight-through backward plus the sparse-refined
  decay ``lambda_W * (1 - m) * W`` on the pruned weights.
* ``mdgf``: masked decaying gradient flow, Bambhaniya et al., "Progressive Gradient Flow for
  Robust N:M Sparsity Training in Transformers", arXiv 2402.04744: forward with
  ``W * (m + alpha_t (1 - m))``, ``alpha_t`` decaying from 1 to 0 (linear or exponential).
* ``sdgf``: structure decaying gradient flow (same paper): binary masks whose pattern gets
  sparser in equal intervals, stepwise ((M-1):M, M/2:M, ..., N:M) or geometric
  (8N:8M, 4N:4M, 2N:2M, N:M).

Training follows dense -> decay (sparse) -> fine-tune phases, expressed as fractions of
``max_steps``. The decay rate ``kappa`` defaults to the value that makes ``alpha`` reach
``alpha_target`` (0.05) at ``alpha_target_fraction`` (30%) of training.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgecompress.compress.errors import ConfigError
from edgecompress.compress.scope import Scope

MAX_GROUP = 32
METHODS = ("oneshot", "srste", "mdgf", "sdgf")

# Layers that count as the feed-forward part of a transformer block (default transformer scope).
FEED_FORWARD_PATTERN = r"re:(^|\.)(mlp|ffn|feed_forward|feedforward|fc\d*)(\.|$)"
ATTENTION_PATTERN = r"re:(^|\.)(attn|attention|self_attn)(\.|$)"


def parse_pattern(text: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``.

    Raises:
        ConfigError: not ``N:M`` with ``1 <= N < M <= 32``.
    """
    parts = str(text).strip().split(":")
    try:
        n, m = (int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"sparsity pattern {text!r} must look like N:M, e.g. 2:4, 1:8, 1:16") from None
    if not 1 <= n < m <= MAX_GROUP:
        raise ConfigError(
            f"sparsity pattern {text!r} needs 1 <= N < M <= {MAX_GROUP}; e.g. 2:4, 1:4, 1:8, 1:16, 1:32"
        )
    return n, m


METADATA_KEY = "nm_sparsity"
"""Where a sparse model's N:M record (pattern, layers, method) lives in its checkpoint metadata."""


class NMSparsityConfig(BaseModel):
    """How to make a model N:M sparse.

    Attributes:
        pattern: ``N:M``: at most N non-zeros in every group of M consecutive weights along the
            input dimension (M <= 32).
        method: ``oneshot``, ``srste``, ``mdgf`` or ``sdgf``.
        decay: MDGF alpha decay, ``exp`` (``exp(-kappa t)``) or ``linear`` (``max(0, 1 - kappa t)``).
        sdgf_schedule: SDGF pattern sequence, ``stepwise`` or ``geometric``.
        kappa: MDGF decay rate per optimizer step; None chooses it from ``max_steps``.
        alpha_target, alpha_target_fraction: the default kappa makes alpha equal ``alpha_target``
            at this fraction of all training steps.
        dense_fraction: share of steps trained dense first (None: 0.1 for mdgf/sdgf, 0 for srste).
        finetune_fraction: share of final steps with a frozen hard mask (None: 0.2 for mdgf/sdgf,
            0 for srste, which recomputes its mask to the end as in the paper).
        sparse_refined_decay: lambda_W added to the pruned weights' gradient (None: 2e-4 for srste,
            0 otherwise, i.e. plain straight-through for MDGF/SDGF).
        scope: layers to sparsify; None picks Linear+Conv2d for CNNs and the feed-forward Linear
            layers for transformers (attention projections with ``include_attention``).
        include_attention: with the automatic transformer scope, also sparsify attention projections.
        indivisible: a layer whose input dimension is not a multiple of M: ``pad`` (treat the row
            as zero-padded to a multiple of M; the last partial group of r weights keeps
            ``ceil(N r / M)`` <= N), ``skip`` (leave the layer dense, reported) or ``error``.
        lock_pattern: the ``sparsify`` stage hands its model on with the zero pattern locked
            (:func:`compress.sparsity.lock.lock_nm_pattern`), so a following ``qat`` stage cannot
            train pruned weights back. Leave it off before ``codebook`` (it rewrites weights in place).
        max_steps, batch_size, lr, optimizer, weight_decay, eval_every, checkpoint_every, seed:
            training hyper-parameters (ignored by ``oneshot``).
    """

    model_config = ConfigDict(extra="forbid")

    pattern: str = "2:4"
    method: Literal["oneshot", "srste", "mdgf", "sdgf"] = "mdgf"
    decay: Literal["exp", "linear"] = "exp"
    sdgf_schedule: Literal["stepwise", "geometric"] = "stepwise"
    kappa: float | None = Field(default=None, gt=0)
    alpha_target: float = Field(default=0.05, gt=0, lt=1)
    alpha_target_fraction: float = Field(default=0.3, gt=0, lt=1)
    dense_fraction: float | None = Field(default=None, ge=0, lt=1)
    finetune_fraction: float | None = Field(default=None, ge=0, lt=1)
    sparse_refined_decay: float | None = Field(default=None, ge=0)
    scope: Scope | None = None
    include_attention: bool = False
    indivisible: Literal["pad", "skip", "error"] = "pad"
    lock_pattern: bool = False
    max_steps: int = Field(default=600, ge=1)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=5e-4, gt=0)
    optimizer: Literal["adam", "adamw", "sgd"] = "adamw"
    weight_decay: float = Field(default=0.0, ge=0)
    eval_every: int = Field(default=100, ge=1)
    checkpoint_every: int = Field(default=100, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _cross_field_rules(self) -> NMSparsityConfig:
        try:
            parse_pattern(self.pattern)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        dense, finetune = self.resolved_dense_fraction, self.resolved_finetune_fraction
        if dense + finetune >= 1:
            raise ValueError(
                f"dense_fraction ({dense}) + finetune_fraction ({finetune}) must leave steps for the sparse phase (< 1)"
            )
        if self.method == "mdgf" and self.kappa is None and not dense < self.alpha_target_fraction:
            raise ValueError(
                f"alpha_target_fraction ({self.alpha_target_fraction}) must come after the dense phase ({dense})"
            )
        return self

    @property
    def n_m(self) -> tuple[int, int]:
        return parse_pattern(self.pattern)

    @property
    def resolved_dense_fraction(self) -> float:
        if self.dense_fraction is not None:
            return self.dense_fraction
        return 0.1 if self.method in ("mdgf", "sdgf") else 0.0

    @property
    def resolved_finetune_fraction(self) -> float:
        if self.finetune_fraction is not None:
            return self.finetune_fraction
        return 0.2 if self.method in ("mdgf", "sdgf") else 0.0

    @property
    def resolved_sparse_refined_decay(self) -> float:
        if self.sparse_refined_decay is not None:
            return self.sparse_refined_decay
        return 2e-4 if self.method == "srste" else 0.0

    def resolved(self) -> dict:
        """The config with every None default replaced by the value used (for manifests)."""
        data = self.model_dump(mode="json")
        data.update(
            dense_fraction=self.resolved_dense_fraction,
            finetune_fraction=self.resolved_finetune_fraction,
            sparse_refined_decay=self.resolved_sparse_refined_decay,
        )
        return data
