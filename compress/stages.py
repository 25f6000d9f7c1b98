"""Stages: the techniques as steps of a pipeline, registered by name (``sparsify``, ``qat``, ...).

A stage takes a model (a :class:`ModelBundle`, or an ONNX :class:`Artifact` for ONNX stages),
its validated config and a :class:`StageContext`, and returns a :class:`StageOutput`. It writes
only inside ``ctx.out_dir``; the pipeline does progress, timing, caching and manifests around it.
Each technique defines its ``STAGE`` in ``compress/<technique>/stage.py``; :mod:`edgecompress.compress.registry`
lists them (imported when first used).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from edgecompress.compress.checkpoint import ModelBundle
from edgecompress.compress.data import Splits
from edgecompress.compress.errors import ConfigError


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


def get_stage(name: str) -> StageSpec:
    """The stage called ``name``.

    Raises:
        ConfigError: unknown stage (lists the known ones).
    """
    from edgecompress.compress import registry

    spec = registry.stage(name)
    if spec is None:
        raise ConfigError(f"unknown stage {name!r}; known: {', '.join(registry.stage_names())}")
    return spec  # type: ignore[no-any-return]


def list_stages() -> list[StageSpec]:
    from edgecompress.compress import registry

    return [registry.stage(name) for name in registry.stage_names()]
