"""The recipe stage ``qat``: LSQ QAT / QAT+SAM / QAT+SAGM / GAQAT on the pipeline's model.

Example recipe entry::

    stages:
      - qat: {bits: 4, method: gaqat, freeze: task, max_steps: 2000}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgecompress.compress.qat.config import GAQATConfig
from edgecompress.compress.stages import StageContext, StageOutput, StageSpec


def _run(bundle: Any, config: GAQATConfig, ctx: StageContext) -> StageOutput:
    from edgecompress.compress.qat.train import keep_nm_pattern, quantized_bundle, run_qat

    keep_nm_pattern(bundle)
    result = run_qat(bundle.module, ctx.splits.for_model(bundle.spec), config, ctx.out_dir, resume=ctx.resume,
                     task=bundle.task)
    metrics = {k: v for k, v in result.metrics.items() if k not in ("layers", "plot")}
    files = {"train_log": str(Path(ctx.out_dir) / "train" / "train_log.jsonl")}
    if "plot" in result.metrics:
        files["conflict_plot"] = result.metrics["plot"]
    return StageOutput(
        bundle=quantized_bundle(result.model, bundle, config, metrics), metrics=metrics, files=files
    )


def _load(out_dir: Path, bundle: Any, config: GAQATConfig) -> StageOutput:
    import json

    from edgecompress.compress.qat.train import keep_nm_pattern, load_quantized, quantized_bundle

    keep_nm_pattern(bundle)
    model, _ = load_quantized(bundle.module, out_dir)
    done = Path(out_dir) / "done.json"
    metrics = json.loads(done.read_text()).get("metrics", {}) if done.exists() else {}
    return StageOutput(bundle=quantized_bundle(model, bundle, config, metrics), metrics=metrics)


STAGE = StageSpec(
    name="qat",
    description="LSQ quantization-aware training (QAT, QAT+SAM, QAT+SAGM, GAQAT) to a QDQ ONNX model",
    config_cls=GAQATConfig,
    run=_run,
    load=_load,
)
