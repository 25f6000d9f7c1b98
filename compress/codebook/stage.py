"""The ``codebook`` recipe stage and the ``onnx-codebook`` exporter (listed in :mod:`edgecompress.compress.registry`).

JLCM: Yvinec, Dapogny, Bailly, ICLR 2024 (arXiv 2309.17361).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgecompress.compress.codebook.config import JLCMConfig
from edgecompress.compress.stages import StageContext, StageOutput, StageSpec
from edgecompress.export.onnx_export import OnnxExporter

MODEL_FILE = "model.pt"
REPORT_FILE = "codebook_report.json"



def _has_codebook_layers(module: Any) -> bool:
    modules = getattr(module, "modules", None)
    if modules is None:
        return False
    return any(type(m).__name__ in ("CodebookLinear", "CodebookConv2d") for m in modules())


def _export(module: Any, example: Any, path: Path, opset: int) -> None:
    from edgecompress.compress.codebook.onnx_export import export_codebook_onnx

    export_codebook_onnx(module, example, path, opset)


EXPORTER = OnnxExporter("jlcm-codebook", _has_codebook_layers, _export, "onnx-codebook", 40.0)
"""Models holding codebook layers export as ``onnx-codebook`` graphs (see :mod:`edgecompress.compress.registry`)."""


def run_codebook_stage(bundle: Any, config: JLCMConfig, ctx: StageContext) -> StageOutput:
    """Compress ``bundle`` with JLCM on the calibration split; writes the checkpoint and a report."""
    from edgecompress.compress.codebook.api import apply_jlcm, save_codebook_checkpoint
    from edgecompress.compress.training import dataset_tensors, evaluate_accuracy

    cfg = config.model_copy(update={"seed": config.seed or ctx.seed})
    calib = dataset_tensors(ctx.splits.calib.for_model(bundle.spec), cfg.calib_samples)
    keep = sparse_layers(bundle)
    module, report = apply_jlcm(bundle.module, calib, cfg, keep_zeros=keep, task=bundle.task)
    if keep:
        check_nm_kept(module, bundle.metadata["nm_sparsity"], report)
    val = ctx.splits.val.for_model(bundle.spec)
    acc = evaluate_accuracy(module, val, teacher=bundle.module if val.y is None else None, task=bundle.task)
    out = bundle.derive(module, metadata={**bundle.metadata,
                                          "codebook": {"bits_per_weight": report["accounting"]["bits_per_weight"]}})  # fmt: skip
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    save_codebook_checkpoint(out, ctx.out_dir / MODEL_FILE, report["layout"])
    (ctx.out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str))
    acct = report["accounting"]
    metrics = {"val_accuracy": acc, "bits_per_weight": acct["bits_per_weight"], "payload_bytes": acct["payload_bytes"],
               "fp32_bytes": acct["fp32_bytes"], "seconds": report["seconds"]}  # fmt: skip
    return StageOutput(bundle=out, metrics=metrics, files={"model": MODEL_FILE, "report": REPORT_FILE})


def sparse_layers(bundle: Any) -> list[str]:
    """The N:M sparse layers of a checkpoint made by ``sparsify`` (their pruned weights stay exactly 0)."""
    record = bundle.metadata.get("nm_sparsity")
    return list(record["layers"]) if record else []


def check_nm_kept(module: Any, record: dict[str, Any], report: dict[str, Any]) -> None:
    """Verify the codebook model kept the N:M pattern (recorded in ``report["nm_violations"]``).

    Raises:
        CompressError: a sparse layer's reconstructed weights break the pattern.
    """
    report["nm_violations"] = nm_pattern_violations(module, record)
    if any(report["nm_violations"].values()):
        from edgecompress.compress.errors import CompressError

        raise CompressError(f"codebook compression broke the N:M pattern: {report['nm_violations']}")


def nm_pattern_violations(module: Any, record: dict[str, Any]) -> dict[str, int]:
    """N:M violations of the reconstructed weights of ``module``'s layers named in ``record`` (all 0 when kept)."""
    from edgecompress.compress.sparsity.api import check_module_pattern

    mods = dict(module.named_modules())
    weights = {name: mods[name].weight_store() for name in record["layers"]
               if name in mods and hasattr(mods[name], "weight_store")}  # fmt: skip
    return check_module_pattern(module, record, weights=weights)


def load_codebook_stage(out_dir: Path, bundle: Any, config: JLCMConfig) -> StageOutput:
    """Rebuild a finished stage's output from its folder (for resume)."""
    import copy

    from edgecompress.compress.codebook.api import load_codebook_checkpoint

    loaded = load_codebook_checkpoint(Path(out_dir) / MODEL_FILE, base_module=copy.deepcopy(bundle.module))
    report = json.loads((Path(out_dir) / REPORT_FILE).read_text())
    acct = report["accounting"]
    metrics = {"bits_per_weight": acct["bits_per_weight"], "payload_bytes": acct["payload_bytes"],
               "fp32_bytes": acct["fp32_bytes"]}  # fmt: skip
    return StageOutput(bundle=loaded, metrics=metrics, files={"model": MODEL_FILE, "report": REPORT_FILE})


STAGE = StageSpec(
    name="codebook",
    description="JLCM: packed codebooks with jointly learned codebooks, scales and mappings (2-4 bits/weight)",
    config_cls=JLCMConfig,
    run=run_codebook_stage,
    load=load_codebook_stage,
)
