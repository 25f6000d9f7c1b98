"""Recipes: one YAML file (``version: 1``) naming the model, data, targets, stages, exports and gates.

Example::

    version: 1
    model: {example: cnn}            # or {checkpoint: ex/cnn.pt, factory: cnn, input_shape: [1, 28, 28]}
                                     # or {checkpoint: enc.pt, inputs: ["input_ids:64:int64", "attention_mask:64:int64"]}
    data: mnist                      # split four ways; or calib_data: / eval_data: used whole
    metric: top1                     # optional: top1, agreement, cosine or sqnr (default from data and task)
    targets: [x86-64]
    stages:
      - sparsify: {pattern: "2:4", method: mdgf}
    export:
      - {format: onnx, target: x86-64}
    gates:
      x86-64: {max_accuracy_drop: 1.0, max_latency_ms: 5.0, max_size_mb: 1.0,
               max_accuracy_regression: 0.5, max_latency_regression: 10%, max_size_regression: 5%}

The ``*_regression`` gates judge a run against a baseline run (``compress run --baseline``).
Unknown keys are rejected with the valid ones listed. A recipe never imports Python code unless
the user passes ``--allow-code`` (needed for ``factory: package.module:function``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgecompress.compress.errors import ConfigError, describe_validation

RECIPE_VERSION = 1


class ModelSpec(BaseModel):
    """Where the model comes from: a built-in example, or a checkpoint (+ factory)."""

    model_config = ConfigDict(extra="forbid")

    example: str | None = None
    checkpoint: str | None = None
    factory: str | None = None
    input_shape: list[int] | None = None
    inputs: list[str] = []
    trust_pickle: bool = False

    @field_validator("inputs")
    @classmethod
    def _inputs(cls, v: list[str]) -> list[str]:
        from edgecompress.export.spec import parse_input_option

        for text in v:
            parse_input_option(text)  # SpecError (a ValueError) names the bad entry
        return v

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.example is None) == (self.checkpoint is None):
            raise ValueError("model needs exactly one of 'example' (a built-in model) or 'checkpoint' (a path)")
        if self.inputs and self.input_shape:
            raise ValueError("give the model's inputs either as inputs: [NAME:SHAPE:DTYPE, ...] or as input_shape "
                             "(one float input), not both")  # fmt: skip
        return self

    def input_specs(self) -> list[Any] | None:
        """``inputs`` as ``TensorSpec`` (None when not given)."""
        from edgecompress.export.spec import parse_input_option

        return [parse_input_option(t) for t in self.inputs] or None


class ExportSpec(BaseModel):
    """One artifact to export. ``rpc`` or ``tracker`` (with ``key``) name the device that times TVM
    tuning candidates (``options: {tune: 10m}``); targets whose code runs elsewhere (ARM64, GPUs)
    are tuned only on their device.

    Example::

        - {format: tvm, target: arm64-linux, rpc: "192.168.1.20:9090", key: pi5, options: {tune: 10m}}
        - {format: tvm, target: x86-64, options: {tune: 20m, executor: ray, ray_address: "10.0.0.5:6379"}}

    ``options.executor: ray`` compiles the tuning candidates on a Ray cluster (timing stays local or
    on the device).
    """

    model_config = ConfigDict(extra="forbid")

    format: str = "onnx"
    target: str
    options: dict[str, Any] = {}
    rpc: str | None = None
    tracker: str | None = None
    key: str | None = None
    timeout: float = Field(60.0, gt=0)

    @model_validator(mode="after")
    def _device(self) -> ExportSpec:
        inside = sorted(set(self.options) & {"rpc", "tracker", "key", "timeout"})
        if inside:
            raise ValueError(f"{', '.join(inside)} belong to the export entry itself, not to its options")
        if self.rpc is None and self.tracker is None:
            if self.key is not None:
                raise ValueError("key names a device: give it with rpc: HOST:PORT or tracker: HOST:PORT")
            if self.format == "tvm" and self.options.get("tune") is not None and _runs_elsewhere(self.target):
                raise ValueError(f"tuning for {self.target} measures on the device: add rpc: HOST:PORT (or tracker: "
                                 "HOST:PORT) and key: to this export entry, or drop options.tune")  # fmt: skip
            return self
        if self.rpc is not None and self.tracker is not None:
            raise ValueError("give either rpc (one device server) or tracker (a TVM tracker of devices), not both")
        if self.format != "tvm" or self.options.get("tune") is None:
            raise ValueError("rpc/tracker name the device that times TVM tuning: use them with format: tvm and "
                             "options: {tune: 10m}")  # fmt: skip
        if self.tracker is not None and not self.key:
            raise ValueError("a tracker hands out devices by key: add key")
        return self

    def export_options(self) -> dict[str, Any]:
        """The options for :func:`compress.exporting.export_model`, the device fields included."""
        device: dict[str, Any] = {"rpc": self.rpc, "tracker": self.tracker, "key": self.key}
        if self.rpc or self.tracker:
            device["timeout"] = self.timeout
        return {**self.options, **{k: v for k, v in device.items() if v is not None}}


def _runs_elsewhere(target_name: str) -> bool:
    """Whether the target's code runs on another device (ARM64, GPUs); unknown targets are reported elsewhere."""
    from edgecompress.targets import get_target
    from edgecompress.targets.errors import UnknownTargetError

    try:
        target = get_target(target_name)
    except UnknownTargetError:  # Recipe._cross_checks names it with the known ones
        return False
    from edgecompress.export.tvm.compile import is_cross

    return is_cross(target)


class GateSpec(BaseModel):
    """Per-target gates; None disables a gate. Unset fields take the target's default budget."""

    model_config = ConfigDict(extra="forbid")

    max_accuracy_drop: float | None = None
    max_latency_ms: float | None = None
    max_size_mb: float | None = None
    # Against a baseline run (``compress run --baseline``): points of the metric, percent ("10%").
    max_accuracy_regression: float | None = Field(None, ge=0)
    max_latency_regression: float | None = Field(None, ge=0)
    max_size_regression: float | None = Field(None, ge=0)

    @field_validator("max_latency_regression", "max_size_regression", mode="before")
    @classmethod
    def _percent(cls, v: Any) -> float | None:
        from edgecompress.compress.regression import parse_percent

        return parse_percent(v)


class CandidateSpec(BaseModel):
    """One chain of stages that ``--auto`` tries."""

    model_config = ConfigDict(extra="forbid")

    name: str
    stages: list[dict[str, Any]] = []


class AutoSpec(BaseModel):
    """Settings of ``compress run --auto``.

    ``candidates`` left empty means: chosen from the budgets and the targets (fp32; int8 PTQ via
    Quantune; QAT when PTQ misses the accuracy budget; a codebook when the size budget needs it;
    2:4 sparsity + PTQ for targets with sparse tensor cores).
    """

    model_config = ConfigDict(extra="forbid")

    time_budget_s: float = Field(1800.0, gt=0)
    objective: str = Field("latency", pattern="^(latency|size|accuracy)$")
    candidates: list[CandidateSpec] = []
    ptq_trials: int = Field(8, ge=1)
    qat_steps: int = Field(300, ge=1)


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = RECIPE_VERSION
    name: str = "recipe"
    model: ModelSpec
    data: str | None = "mnist"
    calib_data: str | None = None
    eval_data: str | None = None
    metric: str | None = None
    seed: int = 0
    targets: list[str] = Field(default_factory=lambda: ["x86-64"])
    stages: list[dict[str, Any]] = []
    export: list[ExportSpec] = []
    gates: dict[str, GateSpec] = {}
    profile: dict[str, Any] = Field(default_factory=lambda: {"batch": 1, "min_runs": 30, "min_seconds": 2.0})
    auto: AutoSpec = Field(default_factory=AutoSpec)

    @field_validator("version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != RECIPE_VERSION:
            raise ValueError(f"recipe version {v} is not supported; this edgecompress reads version {RECIPE_VERSION}")
        return v

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str | None) -> str | None:
        from edgecompress.runtimes.measure import METRICS

        if v is not None and v not in METRICS:
            raise ValueError(f"unknown metric {v!r}; use one of {', '.join(METRICS)}")
        return v

    @field_validator("stages")
    @classmethod
    def _stage_shape(cls, stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, s in enumerate(stages):
            if not isinstance(s, dict) or len(s) != 1:
                raise ValueError(f"stage {i} must be a mapping with one key, the stage name (e.g. '- qat: {{bits: 4}}')")
        return stages

    @model_validator(mode="after")
    def _cross_checks(self) -> Recipe:
        from edgecompress.targets import get_target

        if self.data is None and self.calib_data is None:
            raise ValueError("the recipe needs data: (split four ways) or calib_data: (with eval_data:)")
        for t in self.targets:
            get_target(t)
        for e in self.export:
            if e.target not in self.targets:
                raise ValueError(f"export target {e.target!r} is not in targets {self.targets}")
        for t in self.gates:
            if t not in self.targets:
                raise ValueError(f"gates name target {t!r}, which is not in targets {self.targets}")
        return self

    def data_label(self) -> str:
        """The data in a line: ``mnist``, or ``calib: a.npz, eval: b.npz``."""
        roles = [("", self.data), ("calib: ", self.calib_data), ("eval: ", self.eval_data)]
        return ", ".join(f"{k}{v}" for k, v in roles if v)

    def resolved_stages(self) -> list[tuple[str, BaseModel]]:
        """(stage name, validated config) for every stage, in order.

        Raises:
            ConfigError: an unknown stage or an invalid stage config (naming the stage and the field).
        """
        from edgecompress.compress.stages import get_stage

        out = []
        for i, entry in enumerate(self.stages):
            name, cfg = next(iter(entry.items()))
            spec = get_stage(name)
            cfg = dict(cfg or {})
            if self.metric and "metric" in spec.config_cls.model_fields:
                cfg.setdefault("metric", self.metric)  # the recipe's metric is what its stages optimise
            try:
                out.append((name, spec.config_cls.model_validate(cfg)))
            except ValidationError as exc:
                raise ConfigError(f"stage {i} ({name}): {describe_validation(exc, spec.config_cls)}") from None
        return out


def _model_at(loc: tuple[str, ...]) -> type[BaseModel] | None:
    """The recipe model an unknown key at ``loc`` (its parent's location) belongs to."""
    models: dict[tuple[str, ...], type[BaseModel]] = {(): Recipe, ("model",): ModelSpec, ("auto",): AutoSpec}
    if loc in models:
        return models[loc]
    nested: dict[str, type[BaseModel]] = {"gates": GateSpec, "export": ExportSpec}
    return nested.get(loc[0]) if loc else None


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate a recipe given as a dict.

    Raises:
        ConfigError: with every problem, its location and (for unknown keys) the valid keys.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a recipe must be a YAML mapping")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {describe_validation(exc, model_at=_model_at)}") from None
    from edgecompress.compress.compat import check_stage_order, check_targets
    from edgecompress.targets import get_target

    names = [name for name, _ in recipe.resolved_stages()]
    check_stage_order(names)
    check_targets(names, [get_target(t) for t in recipe.targets])
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p} is not valid YAML: {exc}") from None
    return parse_recipe(data, str(p))


def resolved_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe with every default and every stage config filled in (written beside the outputs)."""
    d = recipe.model_dump(mode="json")
    d["stages"] = [{name: cfg.model_dump(mode="json")} for name, cfg in recipe.resolved_stages()]
    return d
