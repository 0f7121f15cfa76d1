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


def test_mcnemar_exact_small_cases_and_bad_counts() -> None:
    # Two-sided exact binomial(n, 1/2) tails, worked by hand.
    assert mcnemar_exact(1, 0) == 1.0  # 2 * 1/2
    assert mcnemar_exact(2, 0) == 0.5  # 2 * 1/4
    assert mcnemar_exact(3, 0) == 0.25
    assert mcnemar_exact(6, 1) == pytest.approx(2 * (1 + 7) / 128)
    assert mcnemar_exact(14, 0) == pytest.approx(0.0001220703125)  # the README's bench figure
    for a, b in ((-1, 3), (3, -1), (-2, -2)):
        with pytest.raises(ValueError, match=r"^counts must not be negative$"):
            mcnemar_exact(a, b)


def test_wilson_interval_at_the_edges() -> None:
    # 0/20 and 20/20: the bound at the edge is exact, the other z^2 / (n + z^2) away.
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0
    assert hi == pytest.approx(0.1611, abs=1e-4)
    lo, hi = wilson_interval(20, 20)
    assert lo == pytest.approx(0.8389, abs=1e-4)
    assert hi == 1.0
    lo, hi = wilson_interval(14, 40)  # the bench's FGO arm: 35% [22%, 50%]
    assert (round(lo, 4), round(hi, 4)) == (0.2213, 0.5049)
    with pytest.raises(ValueError, match=r"^successes must be between 0 and n$"):
        wilson_interval(-1, 5)


def test_mean_interval_known_values() -> None:
    # Sample variance of [0, 1, 0.5, 0.5] is 0.5 / 3; the half-width is z * sqrt(var / 4).
    mean, lo, hi = mean_interval([0.0, 1.0, 0.5, 0.5])
    half = 1.959963984540054 * math.sqrt(0.5 / 3 / 4)
    assert (mean, lo, hi) == pytest.approx((0.5, 0.5 - half, 0.5 + half))
    assert lo == pytest.approx(0.1, abs=1e-3)
    _, lo, hi = mean_interval([0.0, 1.0], z=1.0)
    assert (lo, hi) == pytest.approx((0.5 - math.sqrt(0.5 / 2), 0.5 + math.sqrt(0.5 / 2)))


def test_paired_reports_the_discordant_p_value() -> None:
    a = {f"t{i}": i < 12 for i in range(20)}
    b = {f"t{i}": i < 2 for i in range(20)}
    cmp = paired(a, b)
    assert (cmp.pairs, cmp.both, cmp.only_a, cmp.only_b, cmp.neither) == (20, 2, 10, 0, 8)
    assert cmp.p_value == pytest.approx(2 / 1024)
    assert cmp.to_json()["p_value"] == cmp.p_value
