"""Quantune's objectives: the fastest accurate configuration, fp32 when no int8 one is faster, the front.

Latencies come from a fake timer here (the real one is exercised by every other Quantune test);
the choice and the fp32 fallback must follow the numbers, whatever this machine's speed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgecompress.compress.ptq.config import PTQConfig
from edgecompress.compress.ptq.evaluator import TrialResult
from edgecompress.compress.ptq.objective import choose, pareto_front

A = PTQConfig(calibration="minmax", calib_size=16, per_channel=True)
B = PTQConfig(calibration="minmax", calib_size=16, per_channel=False)
C = PTQConfig(calibration="entropy", calib_size=16, per_channel=True)


def _r(config: PTQConfig, acc: float, ms: float) -> TrialResult:
    return TrialResult(config, acc, sqnr_db=30.0, latency_ms=ms)


def test_latency_objective_picks_the_faster_of_two_equally_accurate_configs() -> None:
    trials = [_r(A, 97.0, 2.0), _r(B, 97.0, 1.2), _r(C, 90.0, 0.5)]  # C is fastest but 7 points down
    pick = choose(trials, objective="latency", fp32_accuracy=97.5, fp32_latency_ms=3.0, max_drop=1.0)
    assert pick.trial is trials[1] and "fastest configuration within 1 points" in pick.reason
    assert choose(trials, objective="accuracy", fp32_accuracy=97.5, fp32_latency_ms=3.0, max_drop=1.0).trial is trials[0]
    loose = choose(trials, objective="latency", fp32_accuracy=97.5, fp32_latency_ms=3.0, max_drop=10.0)
    assert loose.trial is trials[2]


def test_no_faster_quantized_config_returns_fp32_with_the_reason() -> None:
    trials = [_r(A, 97.0, 4.0), _r(B, 96.9, 3.5)]
    pick = choose(trials, objective="latency", fp32_accuracy=97.2, fp32_latency_ms=3.0, max_drop=1.0)
    assert pick.is_fp32 and "faster than fp32" in pick.reason and "1.17x" in pick.reason
    none_close = choose(trials, objective="latency", fp32_accuracy=99.9, fp32_latency_ms=9.0, max_drop=0.5)
    assert none_close.is_fp32 and "within 0.5 points" in none_close.reason


def test_pareto_front_keeps_only_undominated_points_with_fp32() -> None:
    trials = [_r(A, 97.0, 2.0), _r(B, 96.0, 2.5), _r(C, 90.0, 0.5)]  # B is dominated by A
    front = pareto_front(trials, 97.5, 3.0)
    assert [p["label"] for p in front] == [C.label(), A.label(), "fp32"]
    pick = choose(trials, objective="pareto", fp32_accuracy=97.5, fp32_latency_ms=3.0, max_drop=1.0)
    assert pick.trial is trials[0] and len(pick.front) == 3


@pytest.fixture()
def fake_timer(monkeypatch: pytest.MonkeyPatch):
    """Trials take ``ms["int8"]``, the fp32 model ``ms["fp32"]``; side by side returns ``ms["side"]``."""
    from edgecompress.compress.ptq import evaluator as ev
    from edgecompress.compress.ptq import finalize as fin

    ms = {"fp32": 1.0, "int8": 2.0, "side": None}

    def time_model(path, feeds, spec):
        return ms["int8"] if Path(path).name == "q.onnx" else ms["fp32"]

    def side_by_side(paths, feeds, spec, seconds):
        assert ms["side"] is not None, "the fp32 model needs no side-by-side run"
        return list(ms["side"])

    monkeypatch.setattr(ev, "time_model", time_model)
    monkeypatch.setattr(fin, "side_by_side", side_by_side)
    return ms


def test_a_model_with_no_faster_int8_config_returns_fp32(cli, cnn_onnx: Path, tmp_path: Path, fake_timer) -> None:
    from edgecompress.export import load_artifact

    args = ["quantize", cnn_onnx, "--data", "mnist", "--space", "tiny", "--budget-trials", "2", "--no-sensitivity",
            "--val-samples", "100", "--database", tmp_path / "db.sqlite"]  # fmt: skip
    code, out, err = cli(*args, "-o", tmp_path / "q", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["chosen"] == "fp32" and res["format"] == "onnx" and "faster than fp32" in res["reason"]
    assert res["latency_ms"] == res["fp32_latency_ms"] == 1.0 and res["speedup_vs_fp32"] == 1.0
    assert res["objective"] == "latency" and res["ptq_algorithms"] == []
    assert load_artifact(tmp_path / "q").manifest.format == "onnx"
    code, _, err = cli(*args, "--require-quantized", "-o", tmp_path / "q2")
    assert code == 4 and "faster than fp32" in err and not (tmp_path / "q2").exists()


def test_the_chosen_int8_model_is_timed_side_by_side_and_its_speedup_reported(cli, cnn_onnx: Path, tmp_path: Path,
                                                                               fake_timer) -> None:  # fmt: skip
    fake_timer.update(int8=0.5, side=[1.0, 0.4])
    args = ["quantize", cnn_onnx, "--data", "mnist", "--space", "tiny", "--budget-trials", "2", "--no-sensitivity",
            "--val-samples", "100", "--database", tmp_path / "db.sqlite", "--json"]  # fmt: skip
    code, out, err = cli(*args, "-o", tmp_path / "q")
    assert code == 0, err
    res = json.loads(out)
    assert res["format"] == "onnx-qdq" and res["chosen"] == res["config"] != "fp32"
    assert res["latency_ms"] == 0.4 and res["fp32_latency_ms"] == 1.0 and res["speedup_vs_fp32"] == 2.5
    assert "side by side" in res["latency_timing"] and any("calibration" in a for a in res["ptq_algorithms"])
    trials = json.loads((tmp_path / "q" / "trials.json").read_text())
    assert all(t["latency_ms"] == 0.5 for t in trials["trials"]) and trials["fp32_latency_ms"] == 1.0
    # the search's numbers said faster, side by side it is slower: fp32 is returned and the output says why
    fake_timer.update(side=[1.0, 1.3])
    code, out, err = cli(*args, "--database", tmp_path / "db2.sqlite", "-o", tmp_path / "q3")
    assert code == 0, err
    res = json.loads(out)
    assert res["chosen"] == "fp32" and "side by side" in res["reason"] and "1.30x" in res["reason"]


def test_a_tiny_validation_set_is_called_out(cli, cnn_onnx: Path, tmp_path: Path, fake_timer) -> None:
    code, out, err = cli("quantize", cnn_onnx, "--data", "mnist", "--space", "tiny", "--budget-trials", "1",
                         "--no-sensitivity", "--val-samples", "8", "--database", tmp_path / "db.sqlite",
                         "-o", tmp_path / "q", "--json")  # fmt: skip
    assert code == 0, err
    notes = json.loads(out)["notes"]
    assert any("8 samples (one sample is 12.50 points)" in n for n in notes), notes


def test_calibration_samples_never_score_trials(cli, cnn_onnx: Path, tmp_path: Path, fake_timer) -> None:
    import numpy as np

    from edgecompress.compress.ptq.evaluator import disjoint_validation

    rng = np.random.default_rng(0)
    x = rng.standard_normal((20, 1, 28, 28)).astype(np.float32)
    val, y, dropped = disjoint_validation({"x": x[:12]}, {"x": x[8:]}, np.arange(12))
    assert dropped == 4 and len(val["x"]) == 8 and list(y) == list(range(4, 12))  # type: ignore[arg-type]
    calib, evald = tmp_path / "calib.npz", tmp_path / "eval.npz"
    np.savez(calib, x=x[:12])
    np.savez(evald, x=x[8:])  # 4 samples in both files
    code, out, err = cli("quantize", cnn_onnx, "--calib-data", calib, "--eval-data", evald, "--metric", "sqnr",
                         "--no-sensitivity", "--space", "tiny", "--budget-trials", "1", "--json", "-o", tmp_path / "q")  # fmt: skip
    assert code == 0, err
    res = json.loads(out)
    assert res["val_samples"] == 8 and any("4 validation sample(s) also in the calibration set" in n for n in res["notes"])
    with pytest.raises(Exception, match="every validation sample is also a calibration sample"):
        disjoint_validation({"x": x}, {"x": x[:5]}, None)


def test_quantune_proposes_the_predicted_fastest_accurate_config_first() -> None:
    from edgecompress.compress.ptq.config import space_preset
    from edgecompress.compress.ptq.database import PriorRow
    from edgecompress.compress.ptq.space import enumerate_space
    from edgecompress.compress.ptq.strategies import QuantuneSearch

    space = enumerate_space(space_preset("bench"))
    desc = {"convs": 3.0}

    def row(c: PTQConfig) -> PriorRow:  # another model: per-tensor loses 5 points but is fastest
        delta = 0.0 if c.per_channel else -5.0
        ratio = 0.3 if not c.per_channel else 0.6 if c.activation_symmetric else 1.2
        return PriorRow("other", "other", desc, c.canonical(), delta, ratio)

    prior = [row(c) for c in space]
    fast = QuantuneSearch(space, descriptors=desc, fp32_accuracy=97.0, prior=prior, rounds=50, objective="latency",
                          max_drop=1.0, fp32_latency_ms=1.0).propose(4)  # fmt: skip
    assert all(c.per_channel and c.activation_symmetric for c in fast), [c.label() for c in fast]
    accurate = QuantuneSearch(space, descriptors=desc, fp32_accuracy=97.0, prior=prior, rounds=50).propose(4)
    assert all(c.per_channel for c in accurate) and not all(c.activation_symmetric for c in accurate)


def test_sqnr_scored_trials_neither_poison_the_prior_nor_the_cost_model(tmp_path: Path) -> None:
    from edgecompress.compress.ptq.config import space_preset
    from edgecompress.compress.ptq.database import StoredTrial, TuningDatabase
    from edgecompress.compress.ptq.space import enumerate_space
    from edgecompress.compress.ptq.strategies import QuantuneSearch

    db = TuningDatabase(tmp_path / "t.sqlite")
    db.put_model("m", "encoder", {"convs": 0.0})
    db.put_trial(StoredTrial("m", "d", A.key(), A.canonical(), 24.0, float("inf"), 24.0, None, 1.0, 0.0, False))
    assert db.prior_rows() == []  # fp32's SQNR against itself is unbounded: no accuracy change to learn
    space = enumerate_space(space_preset("tiny"))
    s = QuantuneSearch(space, descriptors={}, fp32_accuracy=float("inf"), rounds=10, objective="latency",
                       fp32_latency_ms=1.0)  # fmt: skip
    s.observe([_r(c, 20.0 + i, 1.0 + i) for i, c in enumerate(s.propose(3))])
    assert len(s.propose(2)) == 2  # fits on the raw scores, no NaN labels
