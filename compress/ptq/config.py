"""Configs of Quantune post-training quantization (Lee et al., FGCS 132, 2022, arXiv 2202.05048).

:class:`PTQConfig` is one point of the search space: how onnxruntime's static QDQ quantizer
calibrates and quantizes a model. :class:`QuantuneSearchConfig` says how to search that space
(strategy, budgets, executor, tuning database). Both are pydantic models with ``extra="forbid"``.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgecompress.compress.errors import ConfigError

SpacePreset = Literal["tiny", "bench", "default", "full"]
SPACE_PRESETS: tuple[str, ...] = get_args(SpacePreset)


#: the brevitas algorithm sets the search space offers (``PTQConfig.brevitas``)
ALGORITHM_SETS = ("equalize", "bias_correction", "equalize+bias_correction", "gptq", "equalize+gptq", "gpfq",
                  "equalize+gpfq")  # fmt: skip
#: the version of how brevitas configurations are built (2: brevitas' weights, onnxruntime's QDQ graph)
BREVITAS_FLOW = 2


class PTQConfig(BaseModel):
    """One static post-training quantization configuration (onnxruntime ``quantize_static``, QDQ).

    Attributes:
        calibration: how activation ranges are found: ``minmax``, ``entropy`` (KL), ``percentile``
            or ``distribution`` (meant for float8; Quantune's paper shows such cliffs in the space).
        percentile: the percentile of ``percentile`` calibration (ignored otherwise).
        calib_size: calibration samples (capped by what the calibration split holds).
        per_channel: per-output-channel weight scales (needed by depthwise convs) vs per-tensor.
        activation_symmetric: symmetric int8 activations (else asymmetric uint8).
        weight_symmetric: symmetric weights (zero point 0) vs asymmetric.
        reduce_range: 7-bit weights, for CPUs without VNNI.
        weight_bits: 8, or 4 (``QInt4`` through QDQ; onnxruntime runs it, slowly on CPU convs).
        keep_float: nodes left in float: ``none``, ``first_last`` (first and last weighted layers),
            ``sensitive`` (the ``keep_float_k`` most sensitive weighted layers), ``depthwise`` (every
            depthwise convolution, for runtimes whose int8 depthwise kernels are slow; each trial's
            measured latency says whether it pays: on onnxruntime's x86 CPU provider it does not) or
            ``slow`` (the layers whose int8 kernel took longer than their float kernel in a per-node
            profile of both models on this runtime: :mod:`compress.ptq.layer_speed`).
        keep_float_k: how many sensitive layers stay in float (``sensitive`` only).
        exclude_nodes: ONNX node names always left in float.
        brevitas: ``none`` (onnxruntime's ``quantize_static`` on the model as given) or brevitas'
            post-training algorithms applied to the torch model first
            (:mod:`edgecompress.compress.ptq.brevitas_backend`): ``equalize`` (cross-layer equalization),
            ``bias_correction``, ``gptq``, ``gpfq`` or ``+``-joined sets of them. Their int8 symmetric
            weights (per channel or per tensor) are brevitas'; activations are calibrated by onnxruntime
            as the other fields say; no layer is kept in float.
        op_types: ``all`` (every operator onnxruntime can quantize, its default) or ``weighted`` (only
            Conv/MatMul/Gemm: the rest stays float, with Q/DQ pairs between).
        activation_bits: 8 (uint8/int8 activations) or 16 (uint16/int16: A16W8, closer to fp32; onnxruntime's
            CPU provider has no 16-bit kernels, so it runs dequantized and is slower: for accuracy-bound
            targets and runtimes with 16-bit kernels).
        matmul_4bit: MatMul weights in 4 bits (onnxruntime's ``MatMulNBits``, block 32, symmetric,
            int8 activations inside the kernel: W4A8); the other layers as configured. Only for models
            with constant-weight MatMuls (transformers); Conv and Gemm are not converted.

    Example:
        >>> PTQConfig(calibration="percentile", percentile=99.99, per_channel=True).key()[:8]  # doctest: +SKIP
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    calibration: Literal["minmax", "entropy", "percentile", "distribution"] = "minmax"
    percentile: float = Field(99.999, gt=50.0, lt=100.0)
    calib_size: int = Field(100, ge=1)
    per_channel: bool = True
    activation_symmetric: bool = False
    weight_symmetric: bool = True
    reduce_range: bool = False
    weight_bits: Literal[8, 4] = 8
    keep_float: Literal["none", "first_last", "sensitive", "depthwise", "slow"] = "none"
    keep_float_k: int = Field(0, ge=0)
    exclude_nodes: tuple[str, ...] = ()
    brevitas: str = "none"
    op_types: Literal["all", "weighted"] = "all"
    matmul_4bit: bool = False
    activation_bits: Literal[8, 16] = 8

    @model_validator(mode="after")
    def _cross_field(self) -> PTQConfig:
        if self.brevitas != "none":
            if self.brevitas not in ALGORITHM_SETS:
                raise ValueError(f"unknown brevitas algorithms {self.brevitas!r}; valid: none, {', '.join(ALGORITHM_SETS)}")
            fixed = {"weight_symmetric": True, "reduce_range": False, "weight_bits": 8, "keep_float": "none"}
            wrong = [f"{k}={getattr(self, k)!r}" for k, v in fixed.items() if getattr(self, k) != v]
            if wrong:
                raise ValueError(f"brevitas configurations fix {', '.join(f'{k}={v!r}' for k, v in fixed.items())} "
                                 f"(brevitas rounds int8 symmetric weights); got {', '.join(wrong)}")  # fmt: skip
        if self.keep_float == "sensitive" and self.keep_float_k < 1:
            raise ValueError("keep_float='sensitive' needs keep_float_k >= 1 (how many layers stay in float)")
        if self.keep_float != "sensitive" and self.keep_float_k:
            raise ValueError(f"keep_float_k={self.keep_float_k} only applies with keep_float='sensitive'")
        return self

    def canonical(self) -> dict[str, Any]:
        """The fields that change the quantized model (``percentile`` only for percentile calibration)."""
        d = self.model_dump(mode="json")
        if self.calibration != "percentile":
            d.pop("percentile")
        for name, default in (("op_types", "all"), ("matmul_4bit", False), ("activation_bits", 8)):  # added later
            if d[name] == default:
                d.pop(name)
        if self.brevitas == "none":  # onnxruntime configurations keep the keys they had before brevitas
            d.pop("brevitas")
        else:  # brevitas' weights through onnxruntime's quantizer: trials of the retired QCDQ path never match
            d["brevitas_flow"] = BREVITAS_FLOW
        return d

    @classmethod
    def from_canonical(cls, stored: dict[str, Any]) -> PTQConfig:
        """The configuration of a stored :meth:`canonical` dict.

        Raises:
            ValueError: (pydantic's ValidationError included) not a configuration of this space, e.g. a
                brevitas trial of the retired QCDQ flow.
        """
        d = dict(stored)
        flow = d.pop("brevitas_flow", None)
        if d.get("brevitas", "none") != "none" and flow != BREVITAS_FLOW:
            raise ValueError(f"brevitas configuration of flow {flow!r}, not {BREVITAS_FLOW}")
        return cls(**d)

    def key(self) -> str:
        """A stable identifier of the configuration (cache and database key)."""
        return hashlib.sha256(json.dumps(self.canonical(), sort_keys=True).encode()).hexdigest()[:20]

    def calibration_key(self) -> str:
        """Configurations with equal calibration keys share one calibration pass."""
        d: dict[str, Any] = {"calibration": self.calibration, "calib_size": self.calib_size}
        if self.calibration == "percentile":
            d["percentile"] = self.percentile
        if self.matmul_4bit:  # calibrated on the model with 4-bit MatMuls
            d["matmul_4bit"] = True
        return json.dumps(d, sort_keys=True)

    def label(self) -> str:
        """A short human description, e.g. ``percentile99.99/n100/pc/aA/wS/int8/first_last``."""
        cal = f"percentile{self.percentile:g}" if self.calibration == "percentile" else self.calibration
        parts = [
            cal,
            f"n{self.calib_size}",
            "pc" if self.per_channel else "pt",
            "aS" if self.activation_symmetric else "aA",
            "wS" if self.weight_symmetric else "wA",
            f"int{self.weight_bits}",
        ]
        if self.reduce_range:
            parts.append("rr")
        if self.keep_float != "none":
            parts.append(self.keep_float + (str(self.keep_float_k) if self.keep_float == "sensitive" else ""))
        if self.op_types != "all":
            parts.append(f"ops:{self.op_types}")
        if self.matmul_4bit:
            parts.append("matmul4")
        if self.activation_bits != 8:
            parts.append(f"a{self.activation_bits}")
        if self.brevitas != "none":
            parts.insert(0, f"brevitas:{self.brevitas}")
        return "/".join(parts)


# onnxruntime's own default for static quantization: MinMax, per-tensor weights (the benchmark's baseline).
ORT_DEFAULT = PTQConfig(calibration="minmax", per_channel=False, activation_symmetric=False, weight_symmetric=True)


class SearchSpace(BaseModel):
    """The dimensions of the search: each a list of values; the space is their product.

    ``calibration`` entries are ``minmax``, ``entropy``, ``distribution`` or ``percentile<P>``
    (e.g. ``percentile99.99``). ``keep_float`` entries are ``none``, ``first_last``, ``depthwise`` or
    ``sensitive<K>``. Dimension order is the grid-search order (first = outermost loop).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    calibration: tuple[str, ...] = ("minmax", "entropy", "percentile99.99", "percentile99.999", "distribution")
    calib_size: tuple[int, ...] = (1, 100, 500)
    per_channel: tuple[bool, ...] = (False, True)
    activation_symmetric: tuple[bool, ...] = (False, True)
    weight_symmetric: tuple[bool, ...] = (True, False)
    reduce_range: tuple[bool, ...] = (False,)
    weight_bits: tuple[int, ...] = (8,)
    keep_float: tuple[str, ...] = ("none", "first_last")
    op_types: tuple[str, ...] = ("all",)
    matmul_4bit: tuple[bool, ...] = (False,)
    activation_bits: tuple[int, ...] = (8,)
    # brevitas algorithm sets, added (per weight scheme and calibration size) when the torch model is at hand
    brevitas: tuple[str, ...] = ()

    @field_validator("calibration")
    @classmethod
    def _check_calibration(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for item in v:
            if item not in ("minmax", "entropy", "distribution") and not re.fullmatch(r"percentile\d+(\.\d+)?", item):
                raise ValueError(f"unknown calibration {item!r}; valid: minmax, entropy, distribution, percentile<P>")
        return v

    @field_validator("keep_float")
    @classmethod
    def _check_keep_float(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for item in v:
            if item not in ("none", "first_last", "depthwise", "slow") and not re.fullmatch(r"sensitive[1-9]\d*", item):
                raise ValueError(f"unknown keep_float {item!r}; valid: none, first_last, depthwise, slow, sensitive<K>")
        return v

    @field_validator("op_types")
    @classmethod
    def _check_op_types(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for item in v:
            if item not in ("all", "weighted"):
                raise ValueError(f"unknown op_types {item!r}; valid: all, weighted")
        return v

    @model_validator(mode="after")
    def _non_empty(self) -> SearchSpace:
        for name in type(self).model_fields:
            if name != "brevitas" and not getattr(self, name):
                raise ValueError(f"search space dimension {name!r} is empty")
        return self

    def dimensions(self) -> dict[str, tuple[Any, ...]]:
        """The onnxruntime dimensions (their product is that part of the space)."""
        return {name: tuple(getattr(self, name)) for name in type(self).model_fields if name != "brevitas"}


def space_preset(name: str) -> SearchSpace:
    """A named search space.

    ``tiny`` (8 configs, tests), ``bench`` (80 onnxruntime configurations, the MNIST benchmark's trimmed
    space: 5 calibrations x 2 sizes x per-channel x activation symmetry x first/last in float), ``default``
    (640 onnxruntime configurations: 5 calibrations x 2 sizes x weight granularity x activation scheme x 4
    float-layer choices x 2 operator sets x 4-bit MatMuls or not), ``full`` (every dimension of ALGORITHMS.md section 4 and more: 6
    calibrations x 3 sizes x weight/activation schemes x reduce_range x int8/int4 x 6 float-layer choices x
    operator sets x 4-bit MatMuls x 8/16-bit activations). Each preset but ``tiny`` adds the brevitas algorithm sets (with each
    calibration, size, granularity and activation scheme) when the torch model is at hand; choices that
    change nothing for a model (4-bit MatMuls without MatMul weights, depthwise convs in float without
    depthwise convs) are dropped for it (:func:`compress.ptq.space.applies_to`).

    Raises:
        ConfigError: unknown preset (lists the valid ones).
    """
    if name == "tiny":
        return SearchSpace(calibration=("minmax", "distribution"), calib_size=(16,), per_channel=(False, True),
                           activation_symmetric=(False, True), weight_symmetric=(True,), keep_float=("none",))  # fmt: skip
    if name == "bench":
        return SearchSpace(calib_size=(1, 100), weight_symmetric=(True,), brevitas=ALGORITHM_SETS)
    if name == "default":
        return SearchSpace(calib_size=(100, 500), weight_symmetric=(True,),
                           keep_float=("none", "first_last", "depthwise", "slow"), op_types=("all", "weighted"),
                           matmul_4bit=(False, True), brevitas=ALGORITHM_SETS)  # fmt: skip
    if name == "full":
        return SearchSpace(
            calibration=("minmax", "entropy", "percentile99.9", "percentile99.99", "percentile99.999", "distribution"),
            calib_size=(1, 100, 1000), reduce_range=(False, True), weight_bits=(8, 4),
            keep_float=("none", "first_last", "depthwise", "slow", "sensitive2", "sensitive4"),
            op_types=("all", "weighted"), matmul_4bit=(False, True), activation_bits=(8, 16), brevitas=ALGORITHM_SETS,
        )  # fmt: skip
    raise ConfigError(f"unknown search space {name!r}; valid: {', '.join(SPACE_PRESETS)}")


class QuantuneSearchConfig(BaseModel):
    """How to find a PTQ configuration (the ``ptq`` recipe stage and ``compress quantize`` take this).

    Attributes:
        search: ``quantune`` (XGBoost cost model with a transfer prior), ``random``, ``grid``,
            ``genetic``, or ``none`` (apply ``config`` as given).
        config: the configuration used with ``search: none``.
        space: a preset name (``tiny``, ``bench``, ``default``, ``full``) or explicit dimensions.
        budget_trials: the most configurations measured.
        budget_time_s: wall-time budget in seconds; the best measured config is still written.
        target_accuracy: stop as soon as a measured config reaches this top-1 accuracy (%).
        seed: seeds random / genetic search and the cost model.
        workers: trials in flight at once: with ``executor: local`` a process pool when > 1 (default
            1); with ``ray`` concurrent Ray tasks (default: the cluster's CPUs).
        executor: ``local`` (this machine) or ``ray`` (a Ray cluster; needs the ``cluster`` extra).
        ray_address: the Ray cluster's ``HOST:PORT`` (default ``RAY_ADDRESS``, else a private Ray on
            this machine bound to 127.0.0.1).
        database: SQLite tuning database (default: the user cache's ``quantune/trials.sqlite``).
        use_seed_database: add the shipped seed trials to the transfer prior.
        sensitivity: write the per-layer sensitivity table of the chosen config.
        val_samples: validation samples per trial (capped by the val split).
        metric: what a trial scores: ``top1`` (labels), ``agreement`` (top-1 agreement with fp32),
            ``cosine`` (100 x mean cosine similarity of the outputs with fp32) or ``sqnr`` (dB);
            default: top1 with labels, else agreement for logits, else cosine.
        xgb_rounds, xgb_eta, xgb_gamma: the cost model's hyper-parameters (the paper's 200, 0.15, 3).
        objective: what is returned: ``latency`` (the fastest configuration within ``max_drop``
            points of fp32; fp32 itself when no quantized one is faster), ``accuracy`` (the most
            accurate) or ``pareto`` (the ``latency`` pick, with the accuracy/latency front written).
        max_drop: points of the metric below fp32 that ``latency``/``pareto`` accept (default:
            the target's accuracy budget, else 1 point).
        require_quantized: with ``latency``/``pareto``, fail (exit 4) instead of returning fp32.
        min_sqnr_db: with the ``sqnr`` metric, the SQNR the latency objective accepts (fp32 against
            itself has no finite score to drop from).
        latency_seconds: timing per trial after the warm-up (batch 1, the target's threads).
    """

    model_config = ConfigDict(extra="forbid")

    search: Literal["quantune", "random", "grid", "genetic", "none"] = "quantune"
    config: PTQConfig = PTQConfig()
    space: str | SearchSpace = "default"
    budget_trials: int | None = Field(20, ge=1)
    budget_time_s: float | None = Field(None, gt=0)
    target_accuracy: float | None = Field(None, gt=0, le=100)
    seed: int = 0
    workers: int | None = Field(None, ge=1)
    executor: Literal["local", "ray"] = "local"
    ray_address: str | None = None
    database: str | None = None
    use_seed_database: bool = True
    sensitivity: bool = True
    val_samples: int = Field(500, ge=1)
    metric: Literal["top1", "agreement", "cosine", "sqnr"] | None = None
    xgb_rounds: int = Field(200, ge=1)
    xgb_eta: float = Field(0.15, gt=0)
    xgb_gamma: float = Field(3.0, ge=0)
    objective: Literal["latency", "accuracy", "pareto"] = "latency"
    max_drop: float | None = Field(None, ge=0)
    require_quantized: bool = False
    min_sqnr_db: float = 30.0
    latency_seconds: float = Field(0.5, gt=0)

    @field_validator("space")
    @classmethod
    def _check_space(cls, v: str | SearchSpace) -> str | SearchSpace:
        if isinstance(v, str) and v not in SPACE_PRESETS:
            raise ValueError(f"unknown search space {v!r}; valid: {', '.join(SPACE_PRESETS)} or explicit dimensions")
        return v

    def resolved_space(self) -> SearchSpace:
        return space_preset(self.space) if isinstance(self.space, str) else self.space


def parse_duration(text: str | float | int | None) -> float | None:
    """``"10m"`` -> 600.0, ``"90s"`` -> 90.0, ``"1h"`` -> 3600.0, ``"45"`` -> 45.0.

    Raises:
        ConfigError: not a duration.
    """
    if text is None or text == "":
        return None
    if isinstance(text, int | float):
        return float(text)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
    if not m:
        raise ConfigError(f"duration {text!r} is not valid; use seconds or a unit: 90s, 10m, 1h")
    value = float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]
    if value <= 0:
        raise ConfigError(f"duration {text!r} must be positive")
    return value
