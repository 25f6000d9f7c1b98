"""One call that makes a model N:M sparse: :func:`apply_nm_sparsity`."""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

from edgecompress.compress.checkpoint import ModelBundle
from edgecompress.compress.data import Splits
from edgecompress.compress.sparsity.config import METADATA_KEY, NMSparsityConfig
from edgecompress.compress.sparsity.sparsifier import NMSparsifier, NMSparsityHooks

log = logging.getLogger(__name__)



def apply_nm_sparsity(
    bundle: ModelBundle,
    config: NMSparsityConfig,
    splits: Splits | None = None,
    *,
    out_dir: str | Path | None = None,
    resume: bool = False,
) -> tuple[ModelBundle, dict[str, Any]]:
    """Make a copy of ``bundle``'s model N:M sparse with the configured method.

    Args:
        bundle: the dense model (not modified).
        config: pattern, method, schedule and training hyper-parameters.
        splits: the data (train/val for training methods; val/test for the reported accuracy).
            Needed by every method except ``oneshot``.
        out_dir: training checkpoints and log (``resume=True`` continues a killed run there).

    Returns:
        ``(sparse_bundle, metrics)``: the bundle's ``metadata["nm_sparsity"]`` holds the pattern
        and per-layer sparsity; metrics hold the accuracies, the overall sparsity and wall time.

    Raises:
        ConfigError: bad pattern or scope, or training without data.

    Example:
        >>> sparse, metrics = apply_nm_sparsity(bundle, NMSparsityConfig(pattern="2:4", method="srste"), splits)
    """
    from edgecompress.compress.errors import ConfigError
    from edgecompress.compress.training import TrainConfig, Trainer, evaluate_accuracy

    if config.method != "oneshot" and splits is None:
        raise ConfigError(
            f"method {config.method!r} trains the model and needs data; pass --data (or use 'oneshot')"
        )
    model = copy.deepcopy(bundle.module)
    sparsifier = NMSparsifier(model, config)
    t0 = time.perf_counter()
    metrics: dict[str, Any] = {"method": config.method, "pattern": config.pattern}
    # Unlabelled data: train by distillation from the dense model and score agreement/similarity with it.
    teacher = bundle.module if splits is not None and splits.train.y is None else None
    if splits is not None:
        splits = splits.for_model(bundle.spec)
        metrics["dense_val_accuracy"] = evaluate_accuracy(bundle.module, splits.val, teacher=teacher, task=bundle.task)
        metrics["objective"] = "distillation from the dense model" if teacher is not None else "labels"
    if config.method == "oneshot":
        sparsifier.prune_oneshot()
    else:
        from edgecompress.compress.sparsity.schedule import NMSchedule

        assert splits is not None  # checked above
        sparsifier.attach()
        schedule = NMSchedule(config, config.max_steps)
        train_cfg = TrainConfig(
            max_steps=config.max_steps, batch_size=config.batch_size, lr=config.lr, optimizer=config.optimizer,
            weight_decay=config.weight_decay, seed=config.seed, eval_every=config.eval_every,
            checkpoint_every=config.checkpoint_every, early_stop_patience=None, lr_schedule="cosine", log_every=10,
        )  # fmt: skip
        hooks = NMSparsityHooks(sparsifier, schedule)
        result = Trainer(model, splits.train, splits.val, train_cfg, out_dir, hooks, teacher=teacher,
                         task=bundle.task).fit(resume=resume)
        metrics.update(train_steps=result.steps, resumed_from=result.resumed_from, kappa=schedule.kappa,
                       dense_steps=schedule.dense_end, finetune_start=min(schedule.finetune_start, config.max_steps))  # fmt: skip
    record = sparsifier.finalize()
    model.eval()
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    total = sum(int(mod.weight.numel()) for mod in sparsifier.layers.values())
    zeros = sum(int((mod.weight == 0).sum()) for mod in sparsifier.layers.values())
    metrics["sparsity_in_scope"] = round(zeros / max(1, total), 6)
    metrics["sparse_layers"] = len(record["layers"])
    if splits is not None:
        metrics["val_accuracy"] = evaluate_accuracy(model, splits.val, teacher=teacher, task=bundle.task)
        metrics["test_accuracy"] = evaluate_accuracy(model, splits.test, teacher=teacher, task=bundle.task)
    record["config"] = config.resolved()
    from edgecompress.compress.sparsity.export import mark_sparse_module

    mark_sparse_module(model, record)
    metadata = dict(bundle.metadata)
    metadata[METADATA_KEY] = record
    sparse = bundle.derive(model, metadata=metadata, preprocessing=dict(bundle.preprocessing))
    log.info("N:M %s (%s): %d layers, %.1f%% zeros in scope", config.pattern, config.method, len(record["layers"]),
             100 * metrics["sparsity_in_scope"])  # fmt: skip
    return sparse, metrics


def check_module_pattern(
    module: Any, record: dict[str, Any], *, weights: dict[str, Any] | None = None
) -> dict[str, int]:
    """Count N:M violations of a torch model's layers named in ``record`` (``metadata["nm_sparsity"]``).

    Args:
        module: the model (for example after a later QAT stage).
        record: the pattern record written by :func:`apply_nm_sparsity`.
        weights: optional name -> tensor overriding the weights read from ``module`` (e.g. the
            quantized integer weights of a QAT model).

    Returns:
        layer name -> number of groups with more than N non-zeros (all zero when the pattern holds).

    Raises:
        UnsupportedError: a recorded layer no longer exists in ``module``.
    """
    from edgecompress.compress.errors import UnsupportedError
    from edgecompress.compress.sparsity.masks import nm_violations

    mods = dict(module.named_modules())
    out = {}
    for name in record["layers"]:
        if weights is not None and name in weights:
            w = weights[name]
        elif name in mods and hasattr(mods[name], "weight"):
            w = mods[name].weight
        else:
            raise UnsupportedError(
                f"sparse layer {name!r} is not in the model any more; cannot check its N:M pattern"
            )
        arr = w.detach().cpu().float().numpy() if hasattr(w, "detach") else w
        out[name] = nm_violations(arr, record["n"], record["m"], group_axis=1)
    return out
