"""The ``ptq`` recipe stage: Quantune PTQ search on onnxruntime (Lee et al., FGCS 2022).

Consumes a PyTorch model (exported to fp32 ONNX first) or an fp32 ONNX artifact, produces an
``onnx-qdq`` artifact. The stage config is :class:`compress.ptq.config.QuantuneSearchConfig`::

    stages:
      - ptq: {search: quantune, budget_trials: 20, space: default}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgecompress.compress.checkpoint import ModelBundle
from edgecompress.compress.ptq.config import QuantuneSearchConfig
from edgecompress.compress.stages import StageContext, StageOutput, StageSpec

ARTIFACT_DIR = "artifact"


def _fp32_artifact(source: Any, work: Path) -> Any:
    if isinstance(source, ModelBundle):
        from edgecompress.compress.exporting import export_model

        return export_model(source, "onnx", None, work)
    fmt = getattr(getattr(source, "manifest", None), "format", None)
    if fmt != "onnx":
        from edgecompress.compress.errors import UnsupportedError

        raise UnsupportedError(f"the ptq stage needs a PyTorch model or an fp32 'onnx' artifact, got {fmt or type(source).__name__!r}")
    return source


def run_ptq_stage(source: Any, config: QuantuneSearchConfig, ctx: StageContext) -> StageOutput:
    """Search and write the quantized artifact into ``ctx.out_dir/artifact``."""
    from edgecompress.compress.ptq.search import quantize_artifact

    fp32 = _fp32_artifact(source, ctx.out_dir / "fp32")
    target = ctx.targets[0] if ctx.targets else None
    module = source.module if isinstance(source, ModelBundle) else None  # brevitas configurations need it
    result = quantize_artifact(fp32, ctx.splits, config, ctx.out_dir / ARTIFACT_DIR, target=target, module=module)
    art = result.artifact
    return StageOutput(
        artifact=art,
        metrics=dict(result.metrics),
        files={name: str(art.path / name) for name in ("trials.json", "sensitivity.json", "sensitivity.md")},
    )


def load_ptq_stage(out_dir: Path, source: Any, config: QuantuneSearchConfig) -> StageOutput:
    """The finished stage's artifact (hash-verified)."""
    from edgecompress.export import load_artifact

    art = load_artifact(Path(out_dir) / ARTIFACT_DIR)
    return StageOutput(artifact=art, metrics=dict(art.manifest.metrics.get("ptq", {})))


STAGE = StageSpec(
    name="ptq",
    description="Quantune post-training int8 quantization search on onnxruntime (QDQ): grid/random/genetic/XGBoost",
    config_cls=QuantuneSearchConfig,
    run=run_ptq_stage,
    load=load_ptq_stage,
    consumes="module",
    produces="onnx",
)
