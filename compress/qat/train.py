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

from compress.checkpoint import ModelBundle
from compress.data import Dataset, Splits
from compress.qat.config import GAQATConfig
from compress.qat.gaqat import QATHooks
from compress.qat.prepare import describe_quantization, initialize_activation_scales, prepare
from compress.training import Trainer, TrainResult, dist_info, evaluate_accuracy

log = logging.getLogger(__name__)

QAT_STATE_FILE = "qat_model.pt"


@dataclass
class QATResult:
    """A trained quantized model and what its training measured."""

    model: nn.Module
    train: TrainResult
    metrics: dict[str, Any] = field(default_factory=dict)


def quantize_model(module: nn.Module, config: GAQATConfig, calibration: np.ndarray) -> nn.Module:
    """A quantized copy of ``module`` with LSQ scales initialised from ``calibration`` (one batch)."""
    model = prepare(copy.deepcopy(module), config)
    initialize_activation_scales(model, torch.from_numpy(calibration[: config.batch_size]))
    return model


def train_quantized(
    model: nn.Module, train: Dataset, val: Dataset | None, config: GAQATConfig, out_dir: str | Path | None,
    *, resume: bool = False, hooks: QATHooks | None = None, teacher: nn.Module | None = None,
) -> TrainResult:  # fmt: skip
    """Train an already prepared model with the shared trainer and :class:`QATHooks` (unlabelled data:
    distillation from ``teacher``, the float model)."""
    hooks = hooks or QATHooks(config)
    return Trainer(model, train, val, config.train_config(), out_dir, hooks, teacher=teacher).fit(resume=resume)


def run_qat(
    module: nn.Module, splits: Splits, config: GAQATConfig, out_dir: str | Path, *, resume: bool = False
) -> QATResult:
    """Quantize ``module`` (a copy), train it, save its state and measure it on the test split.

    Writes ``out_dir/train/`` (checkpoints, ``train_log.jsonl``), ``out_dir/qat_model.pt`` (the
    quantized state dict with the config) and, on rank 0, ``out_dir/gaqat_conflict.png``.
    """
    out = Path(out_dir)
    model = quantize_model(module, config, splits.train.x)
    # Unlabelled data: distil from the float model (KL on logits, MSE + cosine on other outputs).
    teacher = module if splits.train.y is None else None
    result = train_quantized(model, splits.train, splits.val, config, out / "train", resume=resume, teacher=teacher)
    metrics: dict[str, Any] = {
        "method": config.method, "bits": config.bits, "act_bits": config.activation_bits,
        "steps": result.steps, "wall_seconds": round(result.wall_seconds, 1),
        "val_accuracy": result.final_val_accuracy,
        "fake_quant_test_accuracy": evaluate_accuracy(model, splits.test, teacher=teacher),
        "objective": "distillation from the float model" if teacher is not None else "labels",
        "layers": describe_quantization(model),
    }  # fmt: skip
    if dist_info()[0] == 0:
        torch.save(
            {"config": config.model_dump(mode="json"), "state_dict": model.state_dict()}, out / QAT_STATE_FILE
        )
        if result.log_path is not None and result.log_path.exists():
            from compress.qat.report import conflict_summary, plot_conflicts

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


def onnx_agreement(
    model: nn.Module, onnx_path: str | Path, ds: Dataset, batch: int = 256
) -> dict[str, float]:
    """onnxruntime vs the fake-quantized torch model on a whole split: top-1 agreement, SQNR, accuracies."""
    import onnxruntime as ort

    from export import compare_outputs

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    model.eval()
    refs, outs = [], []
    with torch.no_grad():
        for i in range(0, len(ds), batch):
            xb = ds.x[i : i + batch]
            refs.append(model(torch.from_numpy(xb)).numpy())
            outs.append(sess.run(None, {name: xb})[0])
    ref, got = np.concatenate(refs), np.concatenate(outs)
    cmp = compare_outputs(ref, got)
    if ds.y is not None:
        cmp["torch_accuracy"] = float(100.0 * np.mean(ref.argmax(1) == ds.y))
        cmp["onnxruntime_accuracy"] = float(100.0 * np.mean(got.argmax(1) == ds.y))
    return cmp


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
