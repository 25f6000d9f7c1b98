"""Quantune's XGBoost cost model and its tuning database (no quantization runs here)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from edgecompress.compress.errors import ConfigError
from edgecompress.compress.ptq.config import PTQConfig, space_preset
from edgecompress.compress.ptq.database import PriorRow, StoredTrial, TuningDatabase, load_prior
from edgecompress.compress.ptq.space import enumerate_space

DESC_A = {"nodes": 40.0, "convs": 17.0, "depthwise_convs": 7.0, "log_params": 4.5, "depthwise_fraction": 0.4}
DESC_B = {"nodes": 30.0, "convs": 12.0, "depthwise_convs": 0.0, "log_params": 5.0, "depthwise_fraction": 0.0}


def _synthetic_delta(c: PTQConfig, desc: dict[str, float]) -> float:
    """A known landscape: distribution is a cliff; per-tensor hurts depthwise models; 1 sample hurts."""
    d = -1.0
    if c.calibration == "distribution":
        d -= 80.0
    if not c.per_channel:
        d -= 20.0 * desc.get("depthwise_fraction", 0.0) + 1.0
    if c.calib_size == 1:
        d -= 3.0
    return d


def _rows(desc: dict[str, float], name: str, n: int, seed: int) -> list[PriorRow]:
    space = enumerate_space(space_preset("default"))
    rng = random.Random(seed)
    return [PriorRow(name, name, desc, c.canonical(), _synthetic_delta(c, desc) + rng.gauss(0, 0.2))
            for c in rng.sample(space, n)]  # fmt: skip


def test_cost_model_ranks_known_better_config_above_known_worse() -> None:
    from edgecompress.compress.ptq.cost_model import CostModel, feature_vector

    rows = _rows(DESC_A, "a", 60, 0) + _rows(DESC_B, "b", 60, 1)
    model = CostModel(rounds=200, eta=0.15, gamma=3.0).fit(
        [feature_vector(PTQConfig(**r.config), r.descriptors) for r in rows], [r.accuracy_delta for r in rows]
    )
    better = PTQConfig(calibration="percentile", percentile=99.99, calib_size=100, per_channel=True)
    worse = PTQConfig(calibration="distribution", calib_size=100, per_channel=True)
    pt = PTQConfig(calibration="minmax", calib_size=100, per_channel=False)
    pc = PTQConfig(calibration="minmax", calib_size=100, per_channel=True)
    p = model.predict([feature_vector(c, DESC_A) for c in (better, worse, pt, pc)])
    assert p[0] > p[1] + 20  # the cliff is learned
    assert p[3] > p[2]  # per-channel beats per-tensor on the depthwise-heavy model


def test_quantune_transfer_prior_finds_the_best_first() -> None:
    """With other models' trials as prior, Quantune's first proposal is already near the optimum."""
    from edgecompress.compress.ptq.strategies import QuantuneSearch

    space = enumerate_space(space_preset("default"))
    prior = _rows(DESC_B, "b", 120, 2)
    target = {**DESC_A, "depthwise_fraction": 0.5}
    q = QuantuneSearch(space, descriptors=target, fp32_accuracy=99.0, prior=prior, rounds=100)
    first = q.propose(3)
    best = max(_synthetic_delta(c, target) for c in space)
    assert all(_synthetic_delta(c, target) >= best - 0.5 for c in first)


def _trial(h: str, key: str, acc: float | None, err: str | None = None) -> StoredTrial:
    return StoredTrial(h, "data1", key, PTQConfig(per_channel=key.endswith("pc")).canonical(), acc, 98.0, 30.0, err,
                       0.5, 2.0, True)  # fmt: skip


def test_database_round_trip_and_leave_this_model_out(tmp_path: Path) -> None:
    db = TuningDatabase(tmp_path / "t.sqlite")
    db.put_model("m1", "mobilenetv2", DESC_A)
    db.put_model("m2", "resnet", DESC_B)
    db.put_trial(_trial("m1", "k-pc", 97.5))
    db.put_trial(_trial("m2", "k-pt", None, "ValueError: boom"))
    again = TuningDatabase(tmp_path / "t.sqlite")  # reopened from disk
    got = again.get_trial("m1", "data1", "k-pc")
    assert got is not None and got.accuracy == 97.5 and got.config["per_channel"] is True and got.calibrated
    failed = again.get_trial("m2", "data1", "k-pt")
    assert failed is not None and failed.accuracy is None and failed.error == "ValueError: boom"
    assert again.get_trial("m1", "data2", "k-pc") is None  # other data: not a cache hit
    rows = again.prior_rows(exclude_hashes={"m1"})
    assert [(r.model_name, r.accuracy_delta) for r in rows] == [("resnet", -98.0)]
    assert again.models()["m1"] == ("mobilenetv2", DESC_A)
    assert [r.model_name for r in load_prior(again, use_seed=False, exclude_names={"resnet"})] == ["mobilenetv2"]
    ro = TuningDatabase(tmp_path / "t.sqlite", read_only=True)
    assert len(ro.trials()) == 2
    merged = TuningDatabase(tmp_path / "m.sqlite")
    assert merged.merge_from(ro) == 2 and len(merged.prior_rows()) == 2


def test_database_rejects_a_file_that_is_not_one(tmp_path: Path) -> None:
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"not sqlite at all, just text" * 100)
    with pytest.raises(ConfigError, match="not a Quantune tuning database"):
        TuningDatabase(bad)


def test_shipped_seed_database_is_readable_when_present() -> None:
    from edgecompress.compress.ptq.database import SEED_DATABASE

    if not SEED_DATABASE.is_file():
        pytest.skip("seed database not built yet (bench/quantune.py writes it)")
    db = TuningDatabase(SEED_DATABASE, read_only=True)
    models = db.models()
    assert len(models) >= 3
    assert len(db.trials()) >= 3 * 10
    assert all(t.model_hash in models for t in db.trials())


def test_every_dimension_of_the_space_is_a_feature_of_the_cost_model() -> None:
    """A configuration choice the cost model cannot see is one it cannot learn (op_types, 4-bit MatMuls and
    keep_float=slow were once missing from the features): changing any dimension changes the features."""
    from edgecompress.compress.ptq.config import PTQConfig, space_preset
    from edgecompress.compress.ptq.space import config_features

    base = PTQConfig(calibration="minmax", calib_size=100)
    for name, values in space_preset("full").dimensions().items():
        for value in values:
            if name in ("calibration", "keep_float"):
                continue  # strings with parameters: covered below
            other = base.model_copy(update={name: value})
            if other == base:
                continue
            assert config_features(other) != config_features(base), (name, value)
    for kf, k in (("first_last", 0), ("depthwise", 0), ("slow", 0), ("sensitive", 2)):
        assert config_features(base.model_copy(update={"keep_float": kf, "keep_float_k": k})) != config_features(base), kf
    for brevitas in ("equalize", "gptq"):
        assert config_features(base.model_copy(update={"brevitas": brevitas})) != config_features(base)
