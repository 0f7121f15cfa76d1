"""Small, exact statistics for comparing agents on the same tasks.

Pure functions, no numpy: success rates get Wilson score intervals (sound at
small n and near 0 or 1), mean scores a normal interval, and two modules run
on the same seeds are compared with McNemar's exact test on the discordant
pairs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import attrs

Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion (95% by default)."""
    if n <= 0:
        return (0.0, 1.0)
    if not 0 <= successes <= n:
        raise ValueError("successes must be between 0 and n")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return (lo, hi)


def mean_interval(values: Sequence[float], z: float = Z95) -> tuple[float, float, float]:
    """(mean, low, high): a normal-approximation interval for the mean."""
    n = len(values)
    if n == 0:
        return (0.0, 0.0, 0.0)
    mean = sum(values) / n
    if n == 1:
        return (mean, mean, mean)
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    half = z * math.sqrt(var / n)
    return (mean, mean - half, mean + half)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pair counts.

    ``only_a``: tasks solved with A but not B; ``only_b``: the reverse.
    Under the null each discordant pair goes either way with probability 1/2.
    """
    if only_a < 0 or only_b < 0:
        raise ValueError("counts must not be negative")
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / (1 << n)
    return min(1.0, 2 * tail)


@attrs.frozen
class PairedComparison:
    pairs: int
    both: int
    only_a: int
    only_b: int
    neither: int
    p_value: float

    def to_json(self) -> dict[str, float | int]:
        return attrs.asdict(self)


def paired(a: Mapping[str, bool], b: Mapping[str, bool]) -> PairedComparison:
    """Compare two outcome maps (task id -> solved) on the tasks both have."""
    common = sorted(set(a) & set(b))
    both = sum(1 for t in common if a[t] and b[t])
    only_a = sum(1 for t in common if a[t] and not b[t])
    only_b = sum(1 for t in common if b[t] and not a[t])
    return PairedComparison(
        pairs=len(common),
        both=both,
        only_a=only_a,
        only_b=only_b,
        neither=len(common) - both - only_a - only_b,
        p_value=mcnemar_exact(only_a, only_b),
    )
