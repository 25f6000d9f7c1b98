"""Schedules: kappa from total steps, alpha decay, SDGF pattern order, phases, config validation."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from edgecompress.compress.errors import ConfigError
from edgecompress.compress.sparsity.config import NMSparsityConfig, parse_pattern
from edgecompress.compress.sparsity.schedule import NMSchedule, default_kappa, mdgf_alpha, sdgf_patterns


@pytest.mark.parametrize("decay", ["exp", "linear"])
@pytest.mark.parametrize("total", [100, 1000, 20000])
def test_default_kappa_puts_alpha_at_005_at_30_percent(decay: str, total: int) -> None:
    sched = NMSchedule(NMSparsityConfig(pattern="1:8", method="mdgf", decay=decay), total)
    assert sched.at(int(0.3 * total)).alpha == pytest.approx(0.05, abs=0.01)
    assert sched.at(sched.dense_end - 1).alpha == 1.0  # dense phase
    assert 0.5 < sched.at(sched.dense_end + int(0.02 * total)).alpha < 1.0  # decaying, not a jump


def test_alpha_decays_monotonically_to_zero() -> None:
    kappa = default_kappa("linear", 1000, 0.1)
    values = [mdgf_alpha("linear", kappa, t) for t in range(0, 900, 10)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert values[0] == 1.0 and values[-1] == 0.0
    assert mdgf_alpha("exp", 0.01, 100) == pytest.approx(math.exp(-1))
    assert mdgf_alpha("exp", 0.01, -5) == 1.0


def test_finetune_phase_has_hard_frozen_mask() -> None:
    sched = NMSchedule(NMSparsityConfig(pattern="2:4", method="mdgf"), 100)
    last = sched.at(99)
    assert (last.phase, last.alpha, last.freeze_mask) == ("finetune", 0.0, True)
    assert sched.at(79).phase == "sparse" and sched.at(80).phase == "finetune"


@pytest.mark.parametrize(
    ("pattern", "kind", "expected"),
    [
        ("1:8", "stepwise", [(7, 8), (4, 8), (2, 8), (1, 8)]),
        ("2:4", "stepwise", [(3, 4), (2, 4)]),
        ("1:16", "stepwise", [(15, 16), (8, 16), (4, 16), (2, 16), (1, 16)]),
        ("1:8", "geometric", [(8, 64), (4, 32), (2, 16), (1, 8)]),
        ("2:4", "geometric", [(16, 32), (8, 16), (4, 8), (2, 4)]),
    ],
)
def test_sdgf_pattern_lists(pattern: str, kind: str, expected: list[tuple[int, int]]) -> None:
    assert sdgf_patterns(*parse_pattern(pattern), kind) == expected


@pytest.mark.parametrize("kind", ["stepwise", "geometric"])
def test_sdgf_schedule_visits_the_patterns_in_order_in_equal_intervals(kind: str) -> None:
    total = 200
    cfg = NMSparsityConfig(pattern="1:8", method="sdgf", sdgf_schedule=kind)
    sched = NMSchedule(cfg, total)
    seen: list[tuple[int, int]] = []
    lengths: dict[tuple[int, int], int] = {}
    for step in range(sched.dense_end, sched.finetune_start):
        st = sched.at(step)
        assert st.alpha == 0.0
        if not seen or seen[-1] != (st.n, st.m):
            seen.append((st.n, st.m))
        lengths[(st.n, st.m)] = lengths.get((st.n, st.m), 0) + 1
    assert seen == sdgf_patterns(1, 8, kind)
    assert max(lengths.values()) - min(lengths.values()) <= 1
    assert (sched.at(total - 1).n, sched.at(total - 1).m) == (1, 8)


def test_srste_defaults_follow_the_paper() -> None:
    cfg = NMSparsityConfig(pattern="2:4", method="srste")
    assert cfg.resolved_sparse_refined_decay == 2e-4
    assert cfg.resolved_dense_fraction == 0.0 and cfg.resolved_finetune_fraction == 0.0
    sched = NMSchedule(cfg, 50)
    assert all(sched.at(s).alpha == 0.0 and not sched.at(s).freeze_mask for s in range(50))
    assert NMSparsityConfig(method="mdgf").resolved_sparse_refined_decay == 0.0


@pytest.mark.parametrize("bad", ["2-4", "4:4", "0:4", "1:64", "a:b"])
def test_bad_patterns_name_the_value(bad: str) -> None:
    with pytest.raises(ConfigError, match="pattern"):
        parse_pattern(bad)
    with pytest.raises(ValidationError, match="pattern"):
        NMSparsityConfig(pattern=bad)


def test_config_rejects_unknown_fields_and_bad_phases() -> None:
    with pytest.raises(ValidationError):
        NMSparsityConfig(patern="2:4")  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="sparse phase"):
        NMSparsityConfig(dense_fraction=0.6, finetune_fraction=0.5)
    with pytest.raises(ValidationError, match="alpha_target_fraction"):
        NMSparsityConfig(method="mdgf", dense_fraction=0.4)
