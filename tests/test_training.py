from __future__ import annotations

import contextlib
import json

import torch

from edgecompress.compress.models import create_model
from edgecompress.compress.training import TrainConfig, Trainer, TrainingHooks


class _Interrupt(TrainingHooks):
    """Simulates a kill: raises after a given step (the checkpoint before it is on disk)."""

    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, model, step):
        if step == self.at:
            raise KeyboardInterrupt
        return {}


def _small(mnist_splits):
    return mnist_splits.train.subset(torch.arange(512).numpy()), mnist_splits.val.subset(torch.arange(128).numpy())


def test_resume_equals_uninterrupted(mnist_splits, tmp_path):
    train, val = _small(mnist_splits)
    cfg = TrainConfig(max_steps=24, batch_size=32, seed=3, eval_every=8, checkpoint_every=8)
    torch.manual_seed(0)
    ref = create_model("cnn")
    Trainer(ref, train, val, cfg, tmp_path / "a").fit()

    torch.manual_seed(0)
    m = create_model("cnn")
    with contextlib.suppress(KeyboardInterrupt):
        Trainer(m, train, val, cfg, tmp_path / "b", hooks=_Interrupt(at=13)).fit()
    torch.manual_seed(123)  # a fresh process would not share RNG state
    resumed = create_model("cnn")
    result = Trainer(resumed, train, val, cfg, tmp_path / "b").fit(resume=True)
    assert result.resumed_from == 8 and result.steps == 24
    for k, v in ref.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    records = [json.loads(ln) for ln in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("event") == "resumed"] == [8]
    steps = [r["step"] for r in records if "event" not in r]
    assert steps == sorted(steps) and len(steps) == len(set(steps))


def test_early_stop_restores_best(mnist_splits, tmp_path, monkeypatch):
    """Validation scores 50, 80, 60, 55: training stops after two evaluations without gain and hands
    back the weights of the 80 evaluation (step 10), not the last ones."""
    import edgecompress.compress.training as training

    train, val = _small(mnist_splits)
    scores, snapshots = iter([50.0, 80.0, 60.0, 55.0]), []

    def scripted(model, ds, **_):
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return next(scores)

    monkeypatch.setattr(training, "evaluate_accuracy", scripted)
    cfg = TrainConfig(max_steps=400, batch_size=32, lr=1e-2, optimizer="sgd", eval_every=5, early_stop_patience=2)
    model = create_model("cnn")
    result = Trainer(model, train, val, cfg, tmp_path).fit()
    assert result.stopped_early and result.steps == 20
    assert (result.best_val_accuracy, result.final_val_accuracy) == (80.0, 55.0)
    best, last = snapshots[1], snapshots[3]
    weights = model.state_dict()
    assert any(not torch.equal(best[k], last[k]) for k in best)  # training moved the weights on
    assert all(torch.equal(weights[k], best[k]) for k in best)  # and the best ones were restored


def test_learns(mnist_splits):
    train, val = _small(mnist_splits)
    m = create_model("cnn")
    result = Trainer(m, train, val, TrainConfig(max_steps=60, batch_size=32, eval_every=60, lr=3e-3)).fit()
    assert result.final_val_accuracy is not None and result.final_val_accuracy > 70
