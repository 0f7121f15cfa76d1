"""Pure partition logic: order trajectories so similar ones sit together, then pack.

No I/O and no async here; the Partitioner actor renders and measures the
trajectories and calls these functions.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import TypeVar

import attrs

from .model import RenderedTrajectory

T = TypeVar("T")


def interleave(successes: Sequence[T], failures: Sequence[T]) -> list[T]:
    """Merge two lists so each prefix holds them in about their overall ratio.

    Contiguous slices of the result (which become subsets) are then stratified:
    each holds successes and failures in the proportion of the whole group.
    """
    out: list[T] = []
    n_s, n_f = len(successes), len(failures)
    i = j = 0
    while i < n_s or j < n_f:
        # Take a success when successes are behind their share of the output so far.
        if j >= n_f or (i < n_s and (i + 0.5) * (n_s + n_f) <= (i + j + 1) * n_s):
            out.append(successes[i])
            i += 1
        else:
            out.append(failures[j])
            j += 1
    return out


def spread(ranked: Sequence[T]) -> list[T]:
    """Reorder a ranked list so every prefix samples all of its ranks.

    The upper and the lower half are each spread the same way, then
    interleaved: each prefix holds the upper half in about its share (off by
    at most one), each half's prefix holds its own upper half likewise, and
    so on. So a contiguous slice holds the top ranks, the middle and the
    bottom in about their overall proportions, whatever its length.
    """
    if len(ranked) <= 1:
        return list(ranked)
    half = (len(ranked) + 1) // 2
    return interleave(spread(ranked[:half]), spread(ranked[half:]))


def _by_score(items: Sequence[RenderedTrajectory]) -> list[RenderedTrajectory]:
    """``items`` spread by outcome score (highest first, no score lowest; ties
    keep their order), or as they are when all scores are the same."""
    if len({it.score for it in items}) <= 1:
        return list(items)
    ranked = sorted(items, key=lambda it: -math.inf if it.score is None else it.score, reverse=True)
    return spread(ranked)


def order_for_packing(
    items: Sequence[RenderedTrajectory], seed: int = 0
) -> list[RenderedTrajectory]:
    """Group by ``group`` (sorted), shuffle within a group by ``seed``, stratify by outcome
    and, within an outcome, by score.

    The subsets are contiguous slices of this order, so each holds successes
    and failures in the group's proportions, and its failures span the scores:
    the near misses (partial progress) are spread over the subsets rather
    than packed into a few.
    """
    rng = random.Random(seed)
    groups: dict[str, list[RenderedTrajectory]] = {}
    for it in items:
        groups.setdefault(it.group, []).append(it)
    out: list[RenderedTrajectory] = []
    for key in sorted(groups):
        members = groups[key]
        succ = [m for m in members if m.success]
        fail = [m for m in members if not m.success]
        rng.shuffle(succ)
        rng.shuffle(fail)
        out.extend(interleave(_by_score(succ), _by_score(fail)))
    return out


def _next_fit(sizes: Sequence[int], cap: float) -> list[int]:
    """Start indices of the bins of a next-fit packing with bin capacity ``cap``."""
    starts: list[int] = []
    used = math.inf
    for i, s in enumerate(sizes):
        if used + s > cap:
            starts.append(i)
            used = 0
        used += s
    return starts


def pack(sizes: Sequence[int], budget: int) -> list[range]:
    """Split ``sizes`` (in order) into contiguous runs whose sums are each ≤ ``budget``.

    Uses as few bins as next-fit does, then evens them out: the last subset is
    not left nearly empty. Every index lands in exactly one run. Each size must
    already be ≤ ``budget`` (the Partitioner truncates oversize trajectories).
    """
    if budget <= 0:
        raise ValueError("budget must be positive")
    if any(s > budget for s in sizes):
        raise ValueError("an item is larger than the budget; truncate it first")
    n = len(sizes)
    if n == 0:
        return []
    starts = _next_fit(sizes, budget)
    k = len(starts)
    if k > 1:
        # Try a smaller per-bin target that still yields k bins: balanced subsets.
        target = max(max(sizes), sum(sizes) / k)
        while target < budget:
            balanced = _next_fit(sizes, target)
            if len(balanced) <= k:
                starts = balanced
                break
            target = min(budget, target * 1.05 + 1)
    bounds = [*starts, n]
    return [range(bounds[i], bounds[i + 1]) for i in range(len(starts))]


MIN_ITEM_ROOM = 64


def item_budget(
    subset_tokens: int,
    overhead_tokens: int,
    *,
    what: str = "the subset budget",
    fix: str = "raise subset_tokens/context_tokens, or lower module_tokens (or the initial "
    "module's size)",
) -> int:
    """Tokens left for trajectories once template, module and re-ask room are set aside.

    Errors name the settings (RunConfig and GatewayConfig fields); the CLI
    words them as its flags."""
    room = subset_tokens - overhead_tokens
    if room < MIN_ITEM_ROOM:
        raise ValueError(
            f"{what} ({subset_tokens} tokens) leaves only {room} tokens for trajectories "
            "after the prompt template, the module and the re-ask room "
            f"({overhead_tokens} tokens); "
            f"{fix}"
        )
    return room


@attrs.define
class StreamPacker:
    """Packs items arriving one at a time into subsets of at most ``budget`` tokens.

    The streaming counterpart of :func:`pack` for the daemon, which cannot
    know the sizes to come: next-fit in arrival order. A subset is sealed when
    the next item would not fit, when it is exactly full, or when its oldest
    item has waited ``max_wait`` seconds (see :meth:`due`). Pure: the caller
    passes the clock.
    """

    budget: int
    max_wait: float
    _ids: list[str] = attrs.field(factory=list, init=False)
    _tokens: int = attrs.field(default=0, init=False)
    _oldest: float | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        if self.budget <= 0:
            raise ValueError("budget must be positive")
        if self.max_wait < 0:
            raise ValueError("max_wait must not be negative")

    @property
    def pending(self) -> tuple[str, ...]:
        return tuple(self._ids)

    @property
    def pending_tokens(self) -> int:
        return self._tokens

    def add(self, item_id: str, tokens: int, now: float) -> list[tuple[str, ...]]:
        """Add one item; returns the subsets this seals (zero, one or two)."""
        if not 0 < tokens <= self.budget:
            raise ValueError(f"item {item_id!r} has {tokens} tokens; must be 1..{self.budget}")
        sealed: list[tuple[str, ...]] = []
        if self._ids and self._tokens + tokens > self.budget:
            sealed.append(self._seal())
        if not self._ids:
            self._oldest = now
        self._ids.append(item_id)
        self._tokens += tokens
        if self._tokens == self.budget:
            sealed.append(self._seal())
        return sealed

    def deadline(self) -> float | None:
        """When the pending subset is due (its oldest item's arrival plus
        ``max_wait``), or None when nothing is pending."""
        return None if self._oldest is None else self._oldest + self.max_wait

    def due(self, now: float) -> tuple[str, ...] | None:
        """Seal the pending subset if its deadline has passed."""
        deadline = self.deadline()
        if deadline is None or now < deadline:
            return None
        return self._seal()

    def flush(self) -> tuple[str, ...] | None:
        """Seal whatever is pending, regardless of the clock."""
        return self._seal() if self._ids else None

    def _seal(self) -> tuple[str, ...]:
        subset = tuple(self._ids)
        self._ids.clear()
        self._tokens = 0
        self._oldest = None
        return subset
