"""Stages: the techniques as steps of a pipeline, registered by name (``sparsify``, ``qat``, ...).

A stage takes a model (a :class:`ModelBundle`, or an ONNX :class:`Artifact` for ONNX stages),
its validated config and a :class:`StageContext`, and returns a :class:`StageOutput`. It writes
only inside ``ctx.out_dir``; the pipeline does progress, timing, caching and manifests around it.
Each technique registers its stage in its own ``compress/<technique>/stage.py``.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from edgecompress.compress.checkpoint import ModelBundle
from edgecompress.compress.data import Splits
from edgecompress.compress.errors import ConfigError

# Technique packages whose stage.py registers a stage (imported on first use, when present).
STAGE_MODULES = (
    "edgecompress.compress.sparsity.stage",
    "edgecompress.compress.qat.stage",
    "edgecompress.compress.codebook.stage",
    "edgecompress.compress.ptq.stage",
)


@dataclass
class StageContext:
    """What a stage may use: its own output folder, the data splits, the targets, the seed."""

    out_dir: Path
    splits: Splits
    targets: list[Any] = field(default_factory=list)
    seed: int = 0
    resume: bool = False


@dataclass
class StageOutput:
    """What a stage produced: a model (module stages) or an ONNX artifact (ONNX stages), and metrics."""

    bundle: ModelBundle | None = None
    artifact: Any = None
    metrics: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StageSpec:
    """A registered stage.

    Attributes:
        name: the recipe key (``sparsify``, ``qat``, ``codebook``, ``ptq``).
        description: one line for ``compress list techniques``.
        config_cls: the pydantic config (``extra="forbid"``).
        run: ``run(model, config, ctx) -> StageOutput``.
        load: ``load(out_dir, input_bundle, config) -> StageOutput`` rebuilds a finished stage's output
            from its folder (for resume and caching).
        consumes: ``module`` (needs an nn.Module) or ``onnx`` (needs an ONNX artifact or a module to export).
        produces: ``module`` or ``onnx``.
    """

    name: str
    description: str
    config_cls: type[BaseModel]
    run: Callable[[Any, Any, StageContext], StageOutput]
    load: Callable[[Path, Any, Any], StageOutput]
    consumes: str = "module"
    produces: str = "module"


_STAGES: dict[str, StageSpec] = {}
_loaded = False


def register_stage(spec: StageSpec) -> StageSpec:
    _STAGES[spec.name] = spec
    return spec


def _load_stage_modules() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in STAGE_MODULES:
        if importlib.util.find_spec(mod.rsplit(".", 1)[0]) is not None and importlib.util.find_spec(mod) is not None:
            importlib.import_module(mod)


def get_stage(name: str) -> StageSpec:
    """The stage called ``name``.

    Raises:
        ConfigError: unknown stage (lists the known ones).
    """
    _load_stage_modules()
    if name not in _STAGES:
        raise ConfigError(f"unknown stage {name!r}; known: {', '.join(sorted(_STAGES)) or '(none installed)'}")
    return _STAGES[name]


def list_stages() -> list[StageSpec]:
    _load_stage_modules()
    return [_STAGES[k] for k in sorted(_STAGES)]
