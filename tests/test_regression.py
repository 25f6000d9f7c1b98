"""Judging a run against a baseline: the noise band, each measure's verdict, the gates, the outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgecompress.compress.errors import ConfigError
from edgecompress.compress.regression import (
    REGRESSED,
    compare_runs,
    latency_change,
    load_run,
    parse_percent,
    thin_samples,
)


def _drifting(n: int, median: float, seed: int) -> list[float]:
    """Latency samples in run order: lognormal jitter on a slow random walk (correlated neighbours)."""
    rng = np.random.default_rng(seed)
    walk = np.cumsum(rng.normal(0, 0.002, n))
    return list(median * np.exp(walk - walk.mean() + rng.normal(0, 0.05, n)))


def _summary(acc: float = 97.0, p50: float = 1.0, size: int = 1000, samples: list[float] | None = None,
             h: str = "a" * 64, gates: dict | None = None, metric: str = "top1") -> dict:  # fmt: skip
    s = samples if samples is not None else _drifting(400, p50, 1)
    return {"results": [{"target": "x86-64", "format": "onnx", "artifact": "/nowhere", "artifact_hash": h,
                         "gates": gates or {}, "metrics": {"metric": metric, "accuracy": acc, "samples": 1000,
                         "latency_p50_ms": float(np.median(s)), "latency_p90_ms": float(np.quantile(s, 0.9)),
                         "latency_samples_ms": s, "size_bytes": size}}]}  # fmt: skip


def test_the_noise_band_holds_one_for_the_same_distribution_and_excludes_it_for_a_real_shift() -> None:
    same = latency_change(_drifting(400, 1.0, 1), _drifting(400, 1.0, 2))
    assert same["low"] <= 1.0 <= same["high"] and same["high"] - same["low"] < 0.2
    slower = latency_change(_drifting(400, 1.0, 1), _drifting(400, 1.3, 2))
    assert 1.15 < slower["low"] <= slower["ratio"] <= slower["high"]
    assert latency_change([1.0] * 5, [1.2] * 5)["low"] is None  # too few samples: no band claimed


def test_the_block_bootstrap_widens_the_band_when_neighbouring_samples_are_correlated() -> None:
    rng = np.random.default_rng(0)
    steps = np.repeat(rng.normal(0, 0.1, 20), 20)  # 20 plateaus of 20 runs: drift, not independent jitter
    a, b = list(np.exp(steps)), list(np.exp(rng.permutation(steps)))
    band = latency_change(a, b)
    assert band["high"] - band["low"] > 0.05  # an iid bootstrap would see ~400 independent samples


def test_verdicts_per_measure_and_the_gates_that_fail() -> None:
    gates = {"max_accuracy_regression": 0.5, "max_latency_regression": 10.0, "max_size_regression": 5.0}
    base = _summary()
    worse = _summary(acc=96.0, size=1100, samples=_drifting(400, 1.5, 3), h="b" * 64, gates=gates)
    res = compare_runs(base, worse)
    rows = {r["measure"]: r for r in res["rows"]}
    assert rows["top1"]["verdict"] == REGRESSED and rows["top1"]["change"] == "-1.00 pt"
    assert rows["p50 ms"]["verdict"] == REGRESSED and rows["size B"]["verdict"] == REGRESSED
    assert rows["p90 ms"]["verdict"] == "slower (not gated)" and rows["artifact"]["verdict"] == "changed"
    assert sorted(f["gate"] for f in res["failures"]) == sorted(gates) and not res["passed"]
    # Options override the recipe's gates; without gates, worse is reported, not failed.
    assert compare_runs(base, worse, gates={"max_accuracy_regression": 2.0})["rows"][1]["verdict"] == "worse, within gate"
    ungated = compare_runs(base, _summary(acc=96.0, size=1100, samples=_drifting(400, 1.5, 3)))
    assert ungated["passed"] and {r["verdict"] for r in ungated["rows"]} >= {"worse (no gate)", "slower (no gate)"}


def test_noise_alone_and_an_identical_artifact_pass() -> None:
    gates = {"max_latency_regression": 10.0}
    res = compare_runs(_summary(), _summary(samples=_drifting(400, 1.0, 9), gates=gates))
    rows = {r["measure"]: r for r in res["rows"]}
    assert res["passed"] and rows["p50 ms"]["verdict"] in ("within noise", "faster", "slower, within gate")
    assert rows["artifact"]["verdict"].startswith("identical") and rows["top1"]["verdict"] == "unchanged"


def test_the_side_by_side_timing_is_used_only_against_its_own_baseline() -> None:
    gates = {"max_latency_regression": 10.0}
    base = _summary(samples=_drifting(400, 0.5, 1))  # recorded on a faster machine: 2x "slower" across runs
    cur = _summary(samples=_drifting(400, 1.0, 2), h="b" * 64, gates=gates)
    assert compare_runs(base, cur)["failures"]
    side = _drifting(400, 1.0, 3)
    cur["results"][0]["baseline_latency"] = {"artifact_hash": "a" * 64, "latency_p50_ms": float(np.median(side)),
                                             "latency_p90_ms": float(np.quantile(side, 0.9)), "latency_samples_ms": side}  # fmt: skip
    res = compare_runs(base, cur)
    assert res["passed"] and res["rows"][0]["change"] == "timed side by side"
    cur["results"][0]["baseline_latency"]["artifact_hash"] = "c" * 64  # timed beside another baseline
    assert not compare_runs(base, cur)["passed"]


def test_one_artifact_timed_twice_side_by_side_is_never_a_regression() -> None:
    """Byte-identical artifacts timed side by side run the same bytes on the same runtime: a gap
    between the two sessions is the measurement's. Recorded in separate runs it stays gated (a runtime
    or machine change can slow the same bytes)."""
    gates = {"max_latency_regression": 10.0}
    base = _summary(samples=_drifting(400, 1.0, 1))
    cur = _summary(samples=_drifting(400, 1.3, 2), gates=gates)  # same hash as the baseline
    assert not compare_runs(base, cur)["passed"]  # timed in each run: gated
    side = _drifting(400, 1.0, 3)
    cur["results"][0]["baseline_latency"] = {"artifact_hash": "a" * 64, "latency_p50_ms": float(np.median(side)),
                                             "latency_p90_ms": float(np.quantile(side, 0.9)), "latency_samples_ms": side}  # fmt: skip
    res = compare_runs(base, cur)
    p50 = next(r for r in res["rows"] if r["measure"] == "p50 ms")
    assert res["passed"] and p50["verdict"].endswith("(not the change's)") and p50["value"] > 10.0


def test_rows_that_cannot_be_compared_say_so() -> None:
    res = compare_runs(_summary(metric="agreement"), _summary(metric="top1"))
    assert next(r for r in res["rows"] if r["measure"] == "top1")["verdict"].startswith("not comparable")
    base, cur = _summary(), _summary()
    cur["results"][0]["format"] = "tvm"
    verdicts = {r["verdict"] for r in compare_runs(base, cur)["rows"]}
    assert {"new: not in the baseline", "removed: in the baseline only"} <= verdicts


def test_percentages_and_thinning() -> None:
    assert parse_percent("10%") == parse_percent("10 %") == parse_percent(10) == 10.0 and parse_percent(None) is None
    with pytest.raises(ValueError, match="not a percentage"):
        parse_percent("ten")
    assert thin_samples(list(range(5000)), 2000) == list(range(0, 5000, 3)) and thin_samples(None) == []


def test_recipe_gates_take_percentages() -> None:
    from edgecompress.compress.recipe import GateSpec

    g = GateSpec(max_latency_regression="10%", max_size_regression=5, max_accuracy_regression=0.5)
    assert (g.max_latency_regression, g.max_size_regression) == (10.0, 5.0)
    with pytest.raises(ValueError):
        GateSpec(max_latency_regression="fast")


def test_load_run_names_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no run summary"):
        load_run(tmp_path)
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(ConfigError, match="no 'results' list"):
        load_run(tmp_path)


def test_compare_and_github_report_from_the_cli(tmp_path: Path, cli) -> None:
    for name, s in (("a", _summary()), ("b", _summary(acc=95.0, h="b" * 64, gates={"max_accuracy_regression": 0.5}))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps({"recipe": "r", "passed": True, **s}))
    code, out, err = cli("compare", tmp_path / "a", tmp_path / "b", "--json")
    assert code == 4 and json.loads(out)["failures"][0]["gate"] == "max_accuracy_regression"
    code, out, err = cli("compare", tmp_path / "a", tmp_path / "b", "--max-accuracy-regression", "3")
    assert code == 0, err
    code, _, err = cli("compare", tmp_path / "a", tmp_path / "nowhere")
    assert code == 2 and "no run summary" in err
    code, out, _ = cli("report", tmp_path / "b", "--format", "github")
    assert code == 0 and out.startswith("### ✅ edgecompress `r`: passed") and "| x86-64 | onnx | top1 |" in out
    assert (tmp_path / "b" / "summary.github.md").read_text() == out
