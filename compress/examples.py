"""Built-in examples: train a registered model on the built-in MNIST and cache the checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

from compress.cache import cache_dir
from compress.checkpoint import ModelBundle, save_checkpoint
from compress.data import load_splits
from compress.models import create_model
from compress.training import TrainConfig, Trainer, evaluate_accuracy

log = logging.getLogger(__name__)

# Steps that reach good accuracy on the 3,000 MNIST training digits in about a minute on 2 cores.
DEFAULT_STEPS = {"cnn": 600, "mobilenetv2": 700, "resnet": 600, "squeezenet": 900, "shufflenet": 700, "vit": 900}


def train_example(
    name: str,
    out_dir: str | Path,
    *,
    steps: int | None = None,
    seed: int = 0,
    data: str = "mnist",
) -> Path:
    """Train the built-in model ``name`` on ``data`` and write ``out_dir/<name>.pt``.

    The checkpoint records the model name, input shape, preprocessing, and the measured
    validation and test accuracy.

    Returns:
        Path of the written checkpoint.
    """
    import torch

    torch.manual_seed(seed)
    splits = load_splits(data, seed=0)
    model = create_model(name, num_classes=10, in_chans=splits.train.input_shape[0])
    cfg = TrainConfig(
        max_steps=steps or DEFAULT_STEPS.get(name, 600),
        batch_size=64,
        lr=3e-3 if name != "vit" else 1e-3,
        weight_decay=1e-4,
        optimizer="adamw",
        seed=seed,
        eval_every=100,
        checkpoint_every=10**9,
        early_stop_patience=4,
    )
    result = Trainer(model, splits.train, splits.val, cfg).fit()
    test_acc = evaluate_accuracy(model, splits.test)
    log.info("%s: val %.2f%%, test %.2f%% after %d steps (%.1fs)", name, result.best_val_accuracy or 0, test_acc,
             result.steps, result.wall_seconds)  # fmt: skip
    bundle = ModelBundle(
        model,
        name,
        splits.train.input_shape,
        splits.train.preprocessing,
        10,
        {
            "trained_on": data,
            "steps": result.steps,
            "seed": seed,
            "val_accuracy": result.best_val_accuracy,
            "test_accuracy": test_acc,
            "train_seconds": round(result.wall_seconds, 1),
        },
    )
    return save_checkpoint(bundle, Path(out_dir) / f"{name}.pt", model_kwargs={"num_classes": 10})


def example_checkpoint(name: str, *, seed: int = 0) -> Path:
    """The cached checkpoint of a built-in example, trained on first use."""
    folder = cache_dir("examples", f"seed{seed}")
    path = folder / f"{name}.pt"
    if not path.exists():
        log.info("training example %s (cached in %s)", name, folder)
        train_example(name, folder, seed=seed)
    return path
