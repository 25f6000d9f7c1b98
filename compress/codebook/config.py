"""The JLCM configuration (Yvinec et al., "Network Memory Footprint Compression Through Jointly
Learnable Codebooks and Mappings", ICLR 2024).

Where the paper is silent we take a reading behind a switch (see ALGORITHMS.md section 2):
``update="proximal"`` moves a mapping only to nearby codewords with a score
``<dL/dw, c_j - c_a> * exp(-|c_j - c_a| / t)``; ``update="ste"`` is the plain straight-through
latent-weight update kept for the ablation.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgecompress.compress.scope import Scope

MAX_BITS = 6  # 8 indices of b bits are packed into b bytes and rebuilt as one int64 in the ONNX graph


class JLCMConfig(BaseModel):
    """Codebook compression of Linear/Conv2d weights with jointly learned codebooks and mappings.

    Attributes:
        bits: bits per index (K = 2**bits codewords); 2, 3 and 4 are the studied settings.
        groups: number of neuron groups G (k-means over per-neuron distribution descriptors).
        variant: ``scales`` one codebook per tensor and one scale per group;
            ``codebooks`` one codebook per group, no scales.
        grouping: ``kmeans`` (JLCM), ``none`` (one group), ``rows`` (each neuron its own group:
            with ``codebook_init="uniform"`` this is per-channel round-to-nearest).
        codebook_init: ``kmeans`` (1-D Lloyd on the weights) or ``uniform`` (signed integer levels).
        update: mapping update: ``proximal`` (JLCM), ``ste`` (straight-through latent weights) or
            ``none`` (keep the initial nearest-codeword mapping; codebooks/scales still learn).
        steps: optimisation steps per layer on the layer-wise output reconstruction loss (0: init only).
        e2e_steps: steps of the final end-to-end distillation phase (from the original model's outputs:
            KL on a classifier's logits, normalised MSE + cosine on embeddings and maps; no labels).
        fold_permutation: fold each layer's row permutation into the next layer where the graph allows;
            otherwise (or when False) the permutation is stored and undone by one gather.
        min_weights: layers with fewer weights stay in float32 (counted as 32 bits per weight).
        codebook_dtype: storage type of codebooks and scales (counted with this width).
    """

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    bits: int = Field(3, ge=1, le=MAX_BITS)
    groups: int = Field(8, ge=1, le=4096)
    variant: Literal["scales", "codebooks"] = "scales"
    grouping: Literal["kmeans", "none", "rows"] = "kmeans"
    descriptor: Literal["quantiles", "moments"] = "quantiles"
    codebook_init: Literal["kmeans", "uniform"] = "kmeans"
    update: Literal["proximal", "ste", "none"] = "proximal"
    steps: int = Field(150, ge=0)
    e2e_steps: int = Field(0, ge=0)
    calib_samples: int = Field(256, ge=1)
    batch_size: int = Field(64, ge=1)
    lr_codebook: float = Field(1e-3, gt=0)
    lr_scale: float = Field(1e-3, gt=0)
    lr_bias: float = Field(1e-4, ge=0)
    lr_latent: float = Field(1e-3, gt=0)
    move_fraction: float = Field(0.01, gt=0, le=1)
    proximal_temperature: float = Field(1.0, gt=0)
    neighbours_only: bool = True
    learn_codebook: bool = True
    fold_permutation: bool = True
    min_weights: int = Field(0, ge=0)
    codebook_dtype: Literal["float16", "float32"] = "float16"
    scope: Scope = Scope()
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> JLCMConfig:
        if self.grouping == "rows" and self.variant == "codebooks":
            raise ValueError("grouping='rows' gives every neuron its own group; use variant='scales' with it")
        if self.codebook_init == "uniform" and self.variant == "codebooks":
            raise ValueError("codebook_init='uniform' needs variant='scales' (the levels are scaled integers)")
        return self

    @property
    def num_codewords(self) -> int:
        return 2**self.bits


def rtn_config(bits: int, **overrides: object) -> JLCMConfig:
    """Uniform per-channel round-to-nearest expressed as a codebook config (a baseline)."""
    base: dict[str, object] = {"bits": bits, "grouping": "rows", "codebook_init": "uniform", "steps": 0,
                               "update": "none", "learn_codebook": False}  # fmt: skip
    base.update(overrides)
    return JLCMConfig.model_validate(base)


def kmeans_config(bits: int, **overrides: object) -> JLCMConfig:
    """Per-tensor k-means codebook (Deep Compression style, no fine-tuning): a baseline."""
    base: dict[str, object] = {"bits": bits, "grouping": "none", "variant": "codebooks", "steps": 0,
                               "update": "none", "learn_codebook": False}  # fmt: skip
    base.update(overrides)
    return JLCMConfig.model_validate(base)
