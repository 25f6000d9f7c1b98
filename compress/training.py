"""The one training loop shared by example training, GAQAT/QAT and N:M sparsity training.

Features: explicit seeds and a deterministic batch order, checkpoints every N steps written
atomically, ``resume`` after a kill that continues exactly where the run stopped, early
stopping on a validation split, a JSONL log, progress, and DistributedDataParallel when launched
under ``torchrun`` (gloo on CPU) with no separate code path for the techniques.

A technique customises training through a :class:`TrainingHooks` object: how the optimizer is
built, what one step does (SAGM needs two passes; SR-STE changes the gradients), what happens
after a step (mask and schedule updates), and what extra state must survive a resume.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edgecompress.compress.data import Dataset
from edgecompress.compress.progress import progress

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
LOG_FILE = "train_log.jsonl"


class TrainConfig(BaseModel):
    """Hyper-parameters of the shared training loop."""

    model_config = ConfigDict(extra="forbid")

    max_steps: int = Field(1000, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: str = Field("adam", pattern="^(adam|adamw|sgd)$")
    momentum: float = 0.9
    lr_schedule: str = Field("cosine", pattern="^(cosine|constant)$")
    seed: int = 0
    eval_every: int = Field(100, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    early_stop_patience: int | None = Field(None, ge=1)
    log_every: int = Field(10, ge=1)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def dist_info() -> tuple[int, int]:
    """(rank, world size) when launched under torchrun, else (0, 1)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


class TrainingHooks:
    """Default behaviour: cross-entropy, one backward pass, the configured optimizer.

    Subclasses override what their technique changes. Everything returned by
    :meth:`state_dict` must be loadable with ``torch.load(weights_only=True)``.
    """

    #: The model's task when distilling (set by the trainer): 2-d outputs of ``classification``
    #: models are logits (KL), of ``embedding``/``other`` models features (MSE + cosine).
    task: str | None = None

    def make_optimizer(self, model: Any, config: TrainConfig) -> Any:
        import torch

        params = [p for p in model.parameters() if p.requires_grad]
        if config.optimizer == "sgd":
            return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
        cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
        return cls(params, lr=config.lr, weight_decay=config.weight_decay)

    def loss(self, model: Any, x: Any, y: Any) -> Any:
        """Cross-entropy on labels; with teacher outputs instead of labels (unlabelled data),
        distillation from the fp32 model (:func:`distillation_loss`)."""
        import torch.nn.functional as F

        out = forward(model, x)
        if isinstance(y, list):
            return distillation_loss(out, y, logits=self.task not in ("embedding", "other"))
        return F.cross_entropy(out, y)

    def training_step(self, model: Any, optimizer: Any, x: Any, y: Any, step: int) -> float:
        """One optimisation step; returns the loss before the update."""
        optimizer.zero_grad(set_to_none=True)
        loss = self.loss(model, x, y)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    def on_train_start(self, model: Any, total_steps: int) -> None:
        """Called once before the first step (also after a resume)."""

    def on_step_end(self, model: Any, step: int) -> dict[str, Any]:
        """Called after each step; the returned dict is merged into the step's log record."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def forward(model: Any, x: Any) -> Any:
    """``model(x)``, or ``model(*x)`` for a tuple of inputs (several named inputs, in forward order)."""
    return model(*x) if isinstance(x, tuple) else model(x)


def take_batch(x: Any, index: Any) -> Any:
    """Rows ``index`` of a batch: one tensor, or a tuple of tensors (one per input)."""
    return tuple(t[index] for t in x) if isinstance(x, tuple) else x[index]


def batch_length(x: Any) -> int:
    """Samples in a batch: one tensor, or a tuple of tensors (one per input)."""
    return int((x[0] if isinstance(x, tuple) else x).shape[0])


def dataset_tensors(ds: Dataset, n: int | None = None) -> Any:
    """The first ``n`` samples of ``ds`` (all with ``None``) as one batch: see :func:`batch_inputs`."""
    return batch_inputs(ds, slice(0, n))


DISTILL_TEMPERATURE = 2.0


def distillation_loss(student: Any, teacher: list[Any], temperature: float = DISTILL_TEMPERATURE, *,
                      logits: bool = True) -> Any:  # fmt: skip
    """Knowledge distillation from the fp32 model's outputs (training without labels).

    Logits (``(N, classes)``) use the KL divergence of the softened distributions (Hinton et al.,
    scaled by ``T**2``); any other output (embeddings, maps) the mean squared error normalised by
    the teacher's mean square plus ``1 - cosine`` per sample. Several outputs add up. With
    ``logits=False`` (an embedding model) 2-d outputs are features too.
    """
    import torch
    import torch.nn.functional as F

    from edgecompress.export.torch_io import flatten_outputs

    outs = [t for _, t in flatten_outputs(student)]
    if len(outs) != len(teacher):
        raise ValueError(f"student has {len(outs)} outputs, the teacher {len(teacher)}")
    total = torch.zeros((), dtype=torch.float32)
    for s, t in zip(outs, teacher, strict=True):
        s, t = s.float(), t.float()
        if logits and s.ndim == 2 and s.shape[1] > 1:
            kl = F.kl_div(F.log_softmax(s / temperature, 1), F.log_softmax(t / temperature, 1), log_target=True,
                          reduction="batchmean")  # fmt: skip
            total = total + kl * temperature**2
        else:
            flat_s, flat_t = s.reshape(len(s), -1), t.reshape(len(t), -1)
            mse = F.mse_loss(flat_s, flat_t) / (flat_t.pow(2).mean() + 1e-8)
            cos = 1.0 - F.cosine_similarity(flat_s, flat_t, dim=1, eps=1e-8).mean()
            total = total + mse + cos
    return total


def teacher_outputs(teacher: Any, x: Any) -> list[Any]:
    """The fp32 teacher's outputs for a batch (no gradients), flattened."""
    import torch

    from edgecompress.export.torch_io import flatten_outputs

    with torch.no_grad():
        return [t.detach() for _, t in flatten_outputs(forward(teacher, x))]


@dataclass
class TrainResult:
    """What a training run produced."""

    steps: int
    best_val_accuracy: float | None
    final_val_accuracy: float | None
    wall_seconds: float
    resumed_from: int
    stopped_early: bool
    log_path: Path | None


def batch_inputs(ds: Dataset, index: Any) -> Any:
    """The samples at ``index`` as torch tensors: one tensor for a single-input dataset, else a
    tuple in the dataset's input order (``Dataset.for_model`` puts it in forward order)."""
    import torch

    arrays = [torch.from_numpy(np.ascontiguousarray(a[index])) for a in ds.inputs.values()]
    return arrays[0] if len(arrays) == 1 else tuple(arrays)


def evaluate_accuracy(model: Any, ds: Dataset, batch_size: int = 256, teacher: Any = None,
                      task: str | None = None, metric: str | None = None) -> float:  # fmt: skip
    """Top-1 accuracy (in %) of a torch model on a labelled dataset, in eval mode.

    Without labels, the score against ``teacher`` (the fp32 model): top-1 agreement % for logits
    (``task`` not ``embedding``/``other``), else 100 x the mean cosine similarity of the outputs.
    ``metric`` (``top1``, ``agreement``, ``cosine``, ``sqnr``) chooses the score instead; all but
    ``top1`` compare with ``teacher``, labels or not.

    Raises:
        DataError: no labels and no teacher, or a metric the data cannot give.
    """
    import torch

    from edgecompress.compress.errors import DataError
    from edgecompress.export.torch_io import flatten_outputs
    from edgecompress.runtimes.measure import default_metric, score

    if metric == "top1" and ds.y is None:
        raise DataError(f"metric 'top1' needs labels; dataset {ds.name!r} has none")
    compare = teacher is not None and (ds.y is None or metric not in (None, "top1"))
    if (ds.y is None or metric not in (None, "top1")) and teacher is None:
        raise DataError(f"scoring dataset {ds.name!r} by {metric or 'agreement/cosine'} needs the fp32 model to compare with")
    was_training = model.training
    model.eval()
    outs: list[list[np.ndarray]] = []
    refs: list[list[np.ndarray]] = []
    with torch.no_grad():
        for i in range(0, len(ds), batch_size):
            xb = batch_inputs(ds, slice(i, i + batch_size))
            outs.append([t.numpy() for _, t in flatten_outputs(forward(model, xb))])
            if compare:
                refs.append([t.numpy() for t in teacher_outputs(teacher, xb)])
    model.train(was_training)
    out = [np.concatenate([o[k] for o in outs]) for k in range(len(outs[0]))]
    if not compare:
        return score("top1", out, labels=ds.y)
    ref = [np.concatenate([r[k] for r in refs]) for k in range(len(refs[0]))]
    return score(metric or default_metric(False, ref, task), out, reference=ref)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    import torch

    from edgecompress.export.fileio import atomic_path

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


class Trainer:
    """Runs :class:`TrainConfig` over a model with :class:`TrainingHooks`.

    Args:
        model: the ``nn.Module`` to train (updated in place).
        train: training split.
        val: validation split for early stopping (None: no evaluation).
        config: the hyper-parameters.
        out_dir: where checkpoints and the log go (None: keep nothing on disk).
        hooks: technique-specific behaviour.
        teacher: the fp32 model; with unlabelled data (``train.y is None``) training distils from it
            (:func:`distillation_loss`) and validation scores agreement or similarity with it.
        task: the model's task (``classification``, ``embedding``, ``other``) for distillation.

    Example:
        >>> result = Trainer(model, splits.train, splits.val, TrainConfig(max_steps=200), "run/").fit()
    """

    def __init__(
        self,
        model: Any,
        train: Dataset,
        val: Dataset | None,
        config: TrainConfig,
        out_dir: str | Path | None = None,
        hooks: TrainingHooks | None = None,
        teacher: Any = None,
        task: str | None = None,
    ):
        from edgecompress.compress.errors import DataError

        if train.y is None and teacher is None:
            raise DataError(
                f"training data {train.name!r} has no labels ('y'); training without labels distils from the fp32 "
                "model, and none was given"
            )
        self.teacher = teacher.eval() if teacher is not None else None
        self.task = task
        self.model = model
        self.train_ds = train
        self.val_ds = val
        self.config = config
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.hooks = hooks or TrainingHooks()
        self.hooks.task = task
        self.rank, self.world = dist_info()

    # --- batching: deterministic from (seed, epoch), so a resume sees the same batches ---
    def _batch_indices(self, step: int) -> np.ndarray:
        n = len(self.train_ds)
        per_step = self.config.batch_size * self.world
        steps_per_epoch = max(1, n // per_step)
        epoch, within = divmod(step, steps_per_epoch)
        order = np.random.default_rng([self.config.seed, epoch]).permutation(n)
        start = within * per_step + self.rank * self.config.batch_size
        return order[start : start + self.config.batch_size]

    def _lr_at(self, step: int) -> float:
        if self.config.lr_schedule == "constant":
            return self.config.lr
        return 0.5 * self.config.lr * (1 + math.cos(math.pi * step / self.config.max_steps))

    def fit(self, resume: bool = False) -> TrainResult:
        """Train for ``config.max_steps`` steps (or until early stopping).

        Args:
            resume: continue from ``out_dir/train_state.pt`` if it exists.
        """
        import torch

        cfg = self.config
        seed_everything(cfg.seed)
        train_model = self.model
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("gloo")
            train_model = torch.nn.parallel.DistributedDataParallel(self.model)
        optimizer = self.hooks.make_optimizer(train_model, cfg)
        start, best_acc, best_state, patience, last_acc = 0, None, None, 0, None
        state_path = self.out_dir / STATE_FILE if self.out_dir else None
        log_path = self.out_dir / LOG_FILE if self.out_dir else None
        if self.out_dir and self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume and state_path is not None and state_path.exists():
            state = torch.load(state_path, map_location="cpu", weights_only=True)
            self.model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            self.hooks.load_state_dict(state["hooks"])
            torch.set_rng_state(state["torch_rng"])
            start, best_acc, patience = int(state["step"]), state["best_acc"], int(state["patience"])
            best_state = state.get("best_model")
            log.info("resumed from step %d of %s", start, state_path)
            if log_path is not None and self.rank == 0:
                old = log_path.read_text().splitlines() if log_path.exists() else []
                kept = [ln for ln in old if ln and json.loads(ln)["step"] <= start]
                kept.append(json.dumps({"step": start, "event": "resumed"}))
                log_path.write_text("".join(ln + "\n" for ln in kept))
        elif log_path is not None and log_path.exists() and self.rank == 0:
            log_path.unlink()
        self.hooks.on_train_start(train_model, cfg.max_steps)
        t0 = time.perf_counter()
        stopped_early = False
        train_model.train()
        step = start
        with progress("training", total=cfg.max_steps) as bar:
            bar.advance(start)
            while step < cfg.max_steps:
                idx = self._batch_indices(step)
                x = batch_inputs(self.train_ds, idx)
                y = (torch.from_numpy(self.train_ds.y[idx]) if self.train_ds.y is not None
                     else teacher_outputs(self.teacher, x))  # fmt: skip
                for group in optimizer.param_groups:
                    group["lr"] = self._lr_at(step) * group.get("lr_scale", 1.0)
                loss = self.hooks.training_step(train_model, optimizer, x, y, step)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"training diverged at step {step}: loss is {loss}; lower the learning rate")
                step += 1
                record: dict[str, Any] = {"step": step, "loss": loss, "lr": self._lr_at(step - 1)}
                record.update(self.hooks.on_step_end(train_model, step))
                if self.val_ds is not None and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                    last_acc = evaluate_accuracy(self.model, self.val_ds, teacher=self.teacher, task=self.task)
                    record["val_accuracy"] = last_acc
                    if best_acc is None or last_acc > best_acc:
                        best_acc, patience = last_acc, 0
                        best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                    else:
                        patience += 1
                    train_model.train()
                if log_path is not None and self.rank == 0 and (step % cfg.log_every == 0 or len(record) > 3):
                    with log_path.open("a") as fh:
                        fh.write(json.dumps(record) + "\n")
                bar.advance(1)
                stop = cfg.early_stop_patience is not None and patience >= cfg.early_stop_patience
                if state_path is not None and self.rank == 0 and (step % cfg.checkpoint_every == 0 or stop):
                    _atomic_torch_save(
                        {
                            "step": step,
                            "model": self.model.state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "hooks": self.hooks.state_dict(),
                            "torch_rng": torch.get_rng_state(),
                            "best_acc": best_acc,
                            "best_model": best_state,
                            "patience": patience,
                        },
                        state_path,
                    )
                if stop:
                    stopped_early = True
                    log.info("early stop at step %d: no val improvement in %d evaluations", step, patience)
                    break
        if best_state is not None and cfg.early_stop_patience is not None:
            self.model.load_state_dict(best_state)
        self.model.eval()
        return TrainResult(
            steps=step,
            best_val_accuracy=best_acc,
            final_val_accuracy=last_acc,
            wall_seconds=time.perf_counter() - t0,
            resumed_from=start,
            stopped_early=stopped_early,
            log_path=log_path,
        )
