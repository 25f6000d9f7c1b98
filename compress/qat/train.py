"""One call from a float model to a trained, exported and verified QDQ model: :func:`run_qat`."""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgecompress.compress.checkpoint import ModelBundle
from edgecompress.compress.data import Dataset, Splits
from edgecompress.compress.qat.config import GAQATConfig
from edgecompress.compress.qat.gaqat import QATHooks
from edgecompress.compress.qat.prepare import describe_quantization, initialize_activation_scales, prepare
from edgecompress.compress.training import Trainer, TrainResult, batch_inputs, dist_info, evaluate_accuracy

log = logging.getLogger(__name__)

QAT_STATE_FILE = "qat_model.pt"


@dataclass
class QATResult:
    """A trained quantized model and what its training measured."""

    model: nn.Module
    train: TrainResult
    metrics: dict[str, Any] = field(default_factory=dict)


def quantize_model(module: nn.Module, config: GAQATConfig, calibration: np.ndarray | Dataset) -> nn.Module:
    """A quantized copy of ``module`` with LSQ scales initialised from one batch of ``calibration``
    (an array of samples, or a dataset of any inputs in forward order)."""
    model = prepare(copy.deepcopy(module), config)
    if isinstance(calibration, Dataset):
        batch = batch_inputs(calibration, slice(0, config.batch_size))
    else:
        batch = torch.from_numpy(calibration[: config.batch_size])
    initialize_activation_scales(model, batch)
    return model


def train_quantized(
    model: nn.Module, train: Dataset, val: Dataset | None, config: GAQATConfig, out_dir: str | Path | None,
    *, resume: bool = False, hooks: QATHooks | None = None, teacher: nn.Module | None = None, task: str | None = None,
) -> TrainResult:  # fmt: skip
    """Train an already prepared model with the shared trainer and :class:`QATHooks` (unlabelled data:
    distillation from ``teacher``, the float model)."""
    hooks = hooks or QATHooks(config)
    return Trainer(model, train, val, config.train_config(), out_dir, hooks, teacher=teacher, task=task).fit(resume=resume)


def keep_nm_pattern(bundle: ModelBundle) -> None:
    """A checkpoint made N:M sparse (``compress sparsify``, or earlier in a recipe) keeps its zeros
    through QAT: the mask is locked in place on ``bundle.module`` (the CLI and the stage both call this)."""
    record = bundle.metadata.get("nm_sparsity")
    if record:
        from edgecompress.compress.sparsity.lock import lock_nm_pattern

        lock_nm_pattern(bundle.module, record)


def run_qat(
    module: nn.Module, splits: Splits, config: GAQATConfig, out_dir: str | Path, *, resume: bool = False,
    task: str | None = None,
) -> QATResult:
    """Quantize ``module`` (a copy), train it, save its state and measure it on the test split.

    Writes ``out_dir/train/`` (checkpoints, ``train_log.jsonl``), ``out_dir/qat_model.pt`` (the
    quantized state dict with the config) and, on rank 0, ``out_dir/gaqat_conflict.png``. Unlabelled
    data trains by distillation from ``module``; ``task`` (the model's) says whether a 2-d output is
    logits (KL, agreement) or features (MSE + cosine).
    """
    out = Path(out_dir)
    model = quantize_model(module, config, splits.train)
    # Unlabelled data: distil from the float model (KL on logits, MSE + cosine on other outputs).
    teacher = module if splits.train.y is None else None
    result = train_quantized(model, splits.train, splits.val, config, out / "train", resume=resume, teacher=teacher,
                             task=task)  # fmt: skip
    metrics: dict[str, Any] = {
        "method": config.method, "bits": config.bits, "act_bits": config.activation_bits,
        "steps": result.steps, "wall_seconds": round(result.wall_seconds, 1),
        "val_accuracy": result.final_val_accuracy,
        "fake_quant_test_accuracy": evaluate_accuracy(model, splits.test, teacher=teacher, task=task),
        "objective": "distillation from the float model" if teacher is not None else "labels",
        "layers": describe_quantization(model),
    }  # fmt: skip
    if dist_info()[0] == 0:
        torch.save(
            {"config": config.model_dump(mode="json"), "state_dict": model.state_dict()}, out / QAT_STATE_FILE
        )
        if result.log_path is not None and result.log_path.exists():
            from edgecompress.compress.qat.report import conflict_summary, plot_conflicts

            metrics["conflict"] = conflict_summary(result.log_path)
            plot = plot_conflicts(result.log_path, out / "gaqat_conflict.png")
            if plot is not None:
                metrics["plot"] = str(plot)
    return QATResult(model, result, metrics)


def load_quantized(module: nn.Module, folder: str | Path) -> tuple[nn.Module, GAQATConfig]:
    """Rebuild a trained quantized model from ``folder/qat_model.pt`` on a copy of its float model."""
    saved = torch.load(Path(folder) / QAT_STATE_FILE, map_location="cpu", weights_only=True)
    config = GAQATConfig.model_validate(saved["config"])
    model = prepare(copy.deepcopy(module), config)
    model.load_state_dict(saved["state_dict"])
    model.eval()
    return model, config


def quantized_bundle(
    model: nn.Module, source: ModelBundle, config: GAQATConfig, metrics: dict[str, Any]
) -> ModelBundle:
    """The trained quantized model as a :class:`ModelBundle` (its lineage in ``metadata``)."""
    meta = copy.deepcopy(source.metadata)
    meta["qat"] = {
        "config": config.model_dump(mode="json"),
        "metrics": {k: v for k, v in metrics.items() if k != "layers"},
    }
    return source.derive(model, metadata=meta, preprocessing=dict(source.preprocessing))


def onnx_agreement(model: nn.Module, onnx_path: str | Path, ds: Dataset, spec: Any = None) -> dict[str, float]:
    """onnxruntime vs the fake-quantized torch model on a whole split: top-1 agreement, SQNR and cosine
    of every output, and both accuracies when the split has labels. ``spec`` is the model's
    ``ModelSpec`` (default: one input), ``ds`` in its forward order."""
    from edgecompress.export.spec import ModelSpec
    from edgecompress.export.verify import compare_all_outputs
    from edgecompress.runtimes.measure import run_all_batched, top1_accuracy
    from edgecompress.runtimes.ort_runtime import OrtSession
    from edgecompress.runtimes.torch_runtime import TorchSession

    spec = spec if spec is not None else ModelSpec.single(ds.input_shape)
    model.eval()
    ref = run_all_batched(TorchSession(model, spec=spec), ds.inputs)
    got = run_all_batched(OrtSession(str(onnx_path), ["CPUExecutionProvider"], 2), ds.inputs)
    cmp = compare_all_outputs(ref, got)
    if ds.y is not None:
        cmp["torch_accuracy"] = top1_accuracy(ref[0], ds.y)
        cmp["onnxruntime_accuracy"] = top1_accuracy(got[0], ds.y)
    return cmp


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
