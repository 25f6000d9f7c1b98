"""The ``sparsify`` recipe stage: N:M sparsity (one-shot, SR-STE, MDGF, SDGF) on a PyTorch model.

Its output bundle keeps ``metadata["nm_sparsity"]`` (pattern, per-layer sparsity), so later stages
(``qat``, ``ptq``, ``codebook``) and exports can check that the pattern survived
(:func:`compress.sparsity.api.check_module_pattern`, :func:`compress.sparsity.export.verify_onnx_nm`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgecompress.compress.sparsity.config import NMSparsityConfig
from edgecompress.compress.stages import StageContext, StageOutput, StageSpec

CHECKPOINT = "sparse.pt"
METRICS = "sparsity_metrics.json"


def run_sparsify(bundle: Any, config: NMSparsityConfig, ctx: StageContext) -> StageOutput:
    """Sparsify ``bundle`` and write ``sparse.pt`` and the metrics into ``ctx.out_dir``."""
    from edgecompress.compress.checkpoint import save_checkpoint
    from edgecompress.compress.sparsity.api import apply_nm_sparsity

    sparse, metrics = apply_nm_sparsity(
        bundle, config, ctx.splits, out_dir=ctx.out_dir / "train", resume=ctx.resume
    )
    path = save_checkpoint(
        sparse, ctx.out_dir / CHECKPOINT, model_kwargs={"num_classes": sparse.num_classes or 10}
    )
    (ctx.out_dir / METRICS).write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    sparse.source = str(path)
    if config.lock_pattern:
        from edgecompress.compress.sparsity.lock import lock_nm_pattern

        lock_nm_pattern(sparse.module, sparse.metadata["nm_sparsity"])
    return StageOutput(bundle=sparse, metrics=metrics, files={"checkpoint": str(path)})


def load_sparsify(out_dir: Path, input_bundle: Any, config: NMSparsityConfig) -> StageOutput:
    """Rebuild a finished stage's output from its folder (weights into a copy of the input model)."""
    import copy

    import torch


    state = torch.load(out_dir / CHECKPOINT, map_location="cpu", weights_only=True)
    module = copy.deepcopy(input_bundle.module)
    module.load_state_dict(state["state_dict"])
    module.eval()
    metadata = json.loads(state.get("metadata_json", "{}"))
    bundle = input_bundle.derive(module, metadata=metadata, source=str(out_dir / CHECKPOINT),
                                 preprocessing=dict(input_bundle.preprocessing))  # fmt: skip
    from edgecompress.compress.sparsity.export import mark_sparse_module

    mark_sparse_module(module, metadata["nm_sparsity"])
    if config.lock_pattern:
        from edgecompress.compress.sparsity.lock import lock_nm_pattern

        lock_nm_pattern(module, metadata["nm_sparsity"])
    metrics = json.loads((out_dir / METRICS).read_text()) if (out_dir / METRICS).exists() else {}
    return StageOutput(bundle=bundle, metrics=metrics, files={"checkpoint": str(out_dir / CHECKPOINT)})


STAGE = StageSpec(
    name="sparsify",
    description="N:M structured sparsity: one-shot, SR-STE, MDGF (exp/linear), SDGF (stepwise/geometric)",
    config_cls=NMSparsityConfig,
    run=run_sparsify,
    load=load_sparsify,
    consumes="module",
    produces="module",
)
