"""The GAQAT/QAT configuration (one pydantic model, every cross-field rule in one validator)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgecompress.compress.scope import Scope

METHODS = ("qat", "qat-sam", "qat-sagm", "gaqat")
FREEZE_MODES = ("task", "smooth", "scale")


class GAQATConfig(BaseModel):
    """How to quantize and train a model with LSQ QAT, optionally with SAM/SAGM and GAQAT freezing.

    Attributes:
        method: ``qat`` (plain optimizer), ``qat-sam``, ``qat-sagm`` (the direct combination the GAQAT
            paper compares with) or ``gaqat`` (SAGM plus conflict-driven freezing of scale gradients).
        bits: weight bit-width (2-8), signed, ``Q_N = 2^(b-1)``, ``Q_P = 2^(b-1) - 1``.
        act_bits: activation bit-width (2-8; default: ``bits``); unsigned after ReLU, signed elsewhere.
        per_channel: per-output-channel weight scales (else one scale per tensor).
        first_last_bits: bit-width of the first and last quantized layer (weights and input
            activations); ``None`` quantizes them like the others.
        scope: which modules get quantizers (Conv2d and Linear by default).
        rho, alpha: SAGM perturbation radius and gradient-alignment coefficient (SAM: alpha = 0).
        freeze: GAQAT's reading of "freeze": the scale's ``task`` gradient (default), its ``smooth``
            gradient, or the whole ``scale``.
        window: n, the sliding window of task-gradient signs for the disorder ``D_l``.
        freeze_every: K, how often (in steps) the freezing test runs.
        tau: freeze a layer when ``D_l < tau`` (D is in [0, 1]; tau > 1 freezes every layer at the first test).
        warmup_steps: no freezing before this step.
        scale_lr_factor: learning-rate multiplier for the quantizer scales.
        max_steps, batch_size, lr, weight_decay, optimizer, seed, eval_every, checkpoint_every,
        early_stop_patience: the shared trainer's settings.
    """

    model_config = ConfigDict(extra="forbid")

    method: str = "gaqat"
    bits: int = Field(4, ge=2, le=8)
    act_bits: int | None = Field(None, ge=2, le=8)
    per_channel: bool = True
    first_last_bits: int | None = Field(8, ge=2, le=8)
    scope: Scope = Scope()
    rho: float = Field(0.05, ge=0)
    alpha: float = Field(0.001, ge=0)
    freeze: str = "task"
    window: int = Field(20, ge=2)
    freeze_every: int = Field(20, ge=1)
    tau: float = Field(0.3, ge=0)
    warmup_steps: int = Field(200, ge=0)
    scale_lr_factor: float = Field(1.0, gt=0)
    max_steps: int = Field(1000, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: str = "adam"
    seed: int = 0
    eval_every: int = Field(100, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    early_stop_patience: int | None = Field(None, ge=1)

    @field_validator("first_last_bits", mode="before")
    @classmethod
    def _same_bits(cls, value: object) -> object:
        return None if value == 0 else value  # 0 (--first-last-bits 0): the same bits as the other layers

    @model_validator(mode="after")
    def _check(self) -> GAQATConfig:
        if self.method not in METHODS:
            raise ValueError(f"unknown QAT method {self.method!r}; valid: {', '.join(METHODS)}")
        if self.freeze not in FREEZE_MODES:
            raise ValueError(f"unknown freeze mode {self.freeze!r}; valid: {', '.join(FREEZE_MODES)}")
        if self.optimizer not in ("adam", "adamw", "sgd"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; valid: adam, adamw, sgd")
        return self

    @property
    def activation_bits(self) -> int:
        """The activation bit-width actually used."""
        return self.act_bits if self.act_bits is not None else self.bits

    @property
    def sharpness_mode(self) -> str | None:
        """``sam``, ``sagm`` or None (plain optimizer)."""
        return {"qat": None, "qat-sam": "sam", "qat-sagm": "sagm", "gaqat": "sagm"}[self.method]

    def train_config(self):  # -> compress.training.TrainConfig (imported lazily: it pulls numpy)
        """The shared trainer's config."""
        from edgecompress.compress.training import TrainConfig

        return TrainConfig(
            max_steps=self.max_steps, batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
            optimizer=self.optimizer, seed=self.seed, eval_every=self.eval_every,
            checkpoint_every=self.checkpoint_every, early_stop_patience=self.early_stop_patience, log_every=1,
        )  # fmt: skip
