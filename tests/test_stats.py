"""Exact statistics: Wilson intervals, mean intervals, McNemar's exact test."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fgo_actors._core.stats import mcnemar_exact, mean_interval, paired, wilson_interval


@given(n=st.integers(1, 500), data=st.data())
def test_wilson_interval_is_a_proper_interval_around_the_rate(n: int, data: st.DataObject) -> None:
    k = data.draw(st.integers(0, n))
    lo, hi = wilson_interval(k, n)
    assert 0.0 <= lo <= k / n <= hi <= 1.0
    assert hi - lo < 1.0


def test_wilson_known_values() -> None:
    lo, hi = wilson_interval(5, 20)  # a textbook case: 0.25 with n = 20
    assert lo == pytest.approx(0.1119, abs=1e-3)
    assert hi == pytest.approx(0.4687, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="between 0 and n"):
        wilson_interval(3, 2)


def test_mcnemar_exact_known_values() -> None:
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(10, 0) == pytest.approx(2 / 2**10)
    # 1 vs 9 discordant pairs: 2 * (1 + 10) / 1024
    assert mcnemar_exact(1, 9) == pytest.approx(22 / 1024)


@given(a=st.integers(0, 60), b=st.integers(0, 60))
def test_mcnemar_is_symmetric_and_a_probability(a: int, b: int) -> None:
    p = mcnemar_exact(a, b)
    assert p == mcnemar_exact(b, a)
    assert 0.0 < p <= 1.0
    if a != b:  # more lopsided means smaller p
        assert mcnemar_exact(max(a, b) + 1, min(a, b)) <= p


def test_paired_counts_only_common_tasks() -> None:
    a = {"t1": True, "t2": True, "t3": False, "t4": False, "t5": True}
    b = {"t1": True, "t2": False, "t3": True, "t4": False, "t9": True}
    cmp = paired(a, b)
    assert (cmp.pairs, cmp.both, cmp.only_a, cmp.only_b, cmp.neither) == (4, 1, 1, 1, 1)
    assert cmp.p_value == 1.0


def test_mean_interval() -> None:
    mean, lo, hi = mean_interval([0.0, 1.0, 0.5, 0.5])
    assert mean == 0.5
    assert lo < 0.5 < hi
    assert hi - 0.5 == pytest.approx(0.5 - lo)
    assert mean_interval([]) == (0.0, 0.0, 0.0)
    assert mean_interval([0.3]) == (0.3, 0.3, 0.3)
    assert math.isclose(mean_interval([1.0, 1.0])[1], 1.0)
