"""Property tests for the pure partition logic, subset packing and trajectory rendering."""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from collections.abc import Sequence

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fgo_actors import Outcome, Step, Trajectory, default_counter
from fgo_actors._core.model import RenderedTrajectory
from fgo_actors._core.partition import (
    StreamPacker,
    _by_score,
    interleave,
    item_budget,
    order_for_packing,
    pack,
    spread,
)
from fgo_actors._core.prompts import MIN_RENDER_TOKENS, PER_ITEM_SLACK, render_trajectory
from fgo_actors.actors.partitioner import make_subsets

SETTINGS = settings(max_examples=150, deadline=None)


# -- helpers -----------------------------------------------------------------


def plain_next_fit_bins(sizes: Sequence[int], budget: int) -> int:
    """Reference next-fit: open a new bin whenever the next item does not fit."""
    bins = 0
    used = 0
    for s in sizes:
        if bins == 0 or used + s > budget:
            bins += 1
            used = 0
        used += s
    return bins


def assert_runs_cover(runs: Sequence[range], n: int) -> None:
    """Every index 0..n-1 in exactly one run, in order, runs contiguous and non-empty."""
    flat = [i for run in runs for i in run]
    assert flat == list(range(n))
    for run in runs:
        assert run.step == 1
        assert len(run) >= 1
    for a, b in itertools.pairwise(runs):
        assert a.stop == b.start


def assert_stratified(flags: Sequence[bool], total_successes: int) -> None:
    """Each prefix holds successes in about the overall ratio (off by at most one)."""
    n = len(flags)
    if n == 0:
        return
    ratio = total_successes / n
    seen = 0
    for k, flag in enumerate(flags, start=1):
        seen += flag
        assert abs(seen - k * ratio) <= 1, (k, seen, k * ratio, flags)


@st.composite
def sizes_and_budget(draw: st.DrawFn, max_size: int = 80) -> tuple[list[int], int]:
    budget = draw(st.integers(min_value=1, max_value=400))
    sizes = draw(st.lists(st.integers(min_value=0, max_value=budget), max_size=max_size))
    return sizes, budget


scores = st.one_of(
    st.none(),
    st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]),
    st.floats(min_value=0, max_value=1),
)

rendered_items = st.lists(
    st.tuples(
        st.sampled_from(["", "alpha", "beta", "gamma"]),
        st.booleans(),
        st.integers(min_value=0, max_value=300),
        scores,
    ),
    max_size=60,
).map(
    lambda rows: [
        RenderedTrajectory(
            id=f"t{i}", text=f"text {i}", tokens=tok, success=ok, group=g, score=score
        )
        for i, (g, ok, tok, score) in enumerate(rows)
    ]
)


def spread_bound(n: int) -> float:
    """How far from its share a score band may be in any prefix of ``n`` spread items:
    half an item per level of halving, one level more for uneven halves."""
    return 1 + math.log2(max(n, 1)) / 2


def assert_spread(values: Sequence[float | None]) -> None:
    """Every band of top values (all values at or above a threshold) holds about its
    share of every prefix: the high and the low values are spread over the order."""
    n = len(values)
    ranked = [-math.inf if v is None else v for v in values]
    for threshold in set(ranked):
        flags = [v >= threshold for v in ranked]
        total = sum(flags)
        seen = 0
        for k, flag in enumerate(flags, start=1):
            seen += flag
            assert abs(seen - k * total / n) <= spread_bound(n), (threshold, k, values)


# -- interleave --------------------------------------------------------------


@SETTINGS
@given(n_s=st.integers(min_value=0, max_value=60), n_f=st.integers(min_value=0, max_value=60))
def test_interleave_is_an_order_preserving_stratified_merge(n_s: int, n_f: int) -> None:
    successes = [f"s{i}" for i in range(n_s)]
    failures = [f"f{i}" for i in range(n_f)]
    out = interleave(successes, failures)
    assert len(out) == n_s + n_f
    assert Counter(out) == Counter(successes + failures)
    # Each input keeps its own order.
    assert [x for x in out if x.startswith("s")] == successes
    assert [x for x in out if x.startswith("f")] == failures
    assert_stratified([x.startswith("s") for x in out], n_s)


def test_interleave_examples() -> None:
    assert interleave([], []) == []
    assert interleave(["s"], []) == ["s"]
    assert interleave([], ["f1", "f2"]) == ["f1", "f2"]
    assert interleave(["s1", "s2"], ["f1", "f2"]) in (
        ["s1", "f1", "s2", "f2"],
        ["f1", "s1", "f2", "s2"],
    )
    out = interleave(["s1"], ["f1", "f2", "f3", "f4", "f5", "f6", "f7", "f8"])
    # One success among nine goes in the middle, not at an end.
    assert 2 <= out.index("s1") <= 6


def test_interleave_breaks_ties_toward_the_success() -> None:
    """When successes are exactly at their share ((i + 0.5) * n == (i + j + 1) * n_s),
    the success goes first: [s, f], not [f, s] (a strict < would swap them)."""
    assert interleave(["s"], ["f"]) == ["s", "f"]
    assert interleave(["s1", "s2"], ["f1", "f2"]) == ["s1", "f1", "s2", "f2"]
    # 2 successes in 6, step by step: 3 <= 2 no (f), 3 <= 4 (s), 9 <= 6 no (f),
    # 9 <= 8 no (f), 9 <= 10 (s), then the last failure.
    assert interleave(["s1", "s2"], ["f1", "f2", "f3", "f4"]) == [
        "f1",
        "s1",
        "f2",
        "f3",
        "s2",
        "f4",
    ]


# -- order_for_packing -------------------------------------------------------


@SETTINGS
@given(items=rendered_items, seed=st.integers(min_value=0, max_value=2**32))
def test_order_for_packing_is_a_grouped_stratified_permutation(
    items: list[RenderedTrajectory], seed: int
) -> None:
    out = order_for_packing(items, seed)
    assert sorted(i.id for i in out) == sorted(i.id for i in items)
    assert Counter(out) == Counter(items)

    # Groups are contiguous and appear in sorted order.
    groups_in_order = [
        g for k, g in enumerate(i.group for i in out) if k == 0 or out[k - 1].group != g
    ]
    assert len(groups_in_order) == len(set(groups_in_order))
    assert groups_in_order == sorted(groups_in_order)

    # Within a group, outcomes are stratified, and within an outcome, scores are spread.
    for g in set(groups_in_order):
        members = [i.success for i in out if i.group == g]
        assert_stratified(members, sum(members))
        for outcome in (True, False):
            assert_spread([i.score for i in out if i.group == g and i.success == outcome])

    # Deterministic for a seed.
    assert order_for_packing(items, seed) == out


def test_order_for_packing_seed_only_shuffles_within_outcome() -> None:
    items = [
        RenderedTrajectory(id=f"t{i}", text="", tokens=1, success=i % 2 == 0, group="g")
        for i in range(20)
    ]
    a = order_for_packing(items, 1)
    b = order_for_packing(items, 2)
    assert [i.success for i in a] == [i.success for i in b]
    assert a != b


@SETTINGS
@given(n=st.integers(min_value=0, max_value=200))
def test_spread_puts_every_band_of_ranks_in_every_prefix(n: int) -> None:
    out = spread(list(range(n)))
    assert sorted(out) == list(range(n))
    # The upper half, exactly as interleave stratifies: off by at most one.
    assert_stratified([r < (n + 1) // 2 for r in out], (n + 1) // 2)
    # Any top band, within half an item per level of halving.
    assert_spread([float(n - r) for r in out])


def test_order_for_packing_spreads_partial_progress_over_the_subsets() -> None:
    """Three near misses among twelve failures: one in each of three subsets,
    where sorting by score would put them all in one."""
    items = [
        RenderedTrajectory(
            id=f"f{i}", text="", tokens=10, success=False, group="", score=0.5 if i < 3 else 0.0
        )
        for i in range(12)
    ]
    for seed in range(20):
        subsets = make_subsets(items, 4 * (10 + PER_ITEM_SLACK), seed)
        assert [len(s.items) for s in subsets] == [4, 4, 4]
        assert [sum(t.score == 0.5 for t in s.items) for s in subsets] == [1, 1, 1]


def test_by_score_ranks_highest_first_and_no_score_last() -> None:
    """Ranked 0.9, 0.5, 0.1, None, then spread: [0.9, 0.1, 0.5, None]. Sorting
    lowest first, or None as the best score, gives another order."""

    def item(i: int, score: float | None) -> RenderedTrajectory:
        return RenderedTrajectory(
            id=f"t{i}", text="", tokens=1, success=False, group="", score=score
        )

    items = [item(0, 0.1), item(1, 0.9), item(2, None), item(3, 0.5)]
    assert [t.score for t in _by_score(items)] == [0.9, 0.1, 0.5, None]
    # All scores equal: the (shuffled) order is kept as it is, not spread.
    same = [item(i, 0.5) for i in range(5)]
    assert _by_score(same) == same


def test_order_for_packing_default_seed_is_zero() -> None:
    items = [
        RenderedTrajectory(id=f"t{i}", text="", tokens=1, success=i % 2 == 0, group="g")
        for i in range(20)
    ]
    assert order_for_packing(items) == order_for_packing(items, 0)
    assert order_for_packing(items) != order_for_packing(items, 1)


def test_order_for_packing_leaves_equal_scores_in_shuffled_order() -> None:
    plain = [
        RenderedTrajectory(id=f"t{i}", text="", tokens=1, success=i % 3 == 0, group="g")
        for i in range(30)
    ]
    scored = [attrs.evolve(t, score=1.0 if t.success else 0.0) for t in plain]
    for seed in range(5):
        assert [t.id for t in order_for_packing(scored, seed)] == [
            t.id for t in order_for_packing(plain, seed)
        ]


# -- pack --------------------------------------------------------------------


@SETTINGS
@given(sb=sizes_and_budget())
def test_pack_covers_every_index_once_within_budget(sb: tuple[list[int], int]) -> None:
    sizes, budget = sb
    runs = pack(sizes, budget)
    assert_runs_cover(runs, len(sizes))
    for run in runs:
        assert sum(sizes[i] for i in run) <= budget
    assert len(runs) <= plain_next_fit_bins(sizes, budget)
    # Next-fit on a fixed order is optimal for contiguous runs, so no fewer either.
    assert len(runs) == plain_next_fit_bins(sizes, budget)


def test_pack_balances_the_last_subset() -> None:
    runs = pack([10] * 11, 100)
    assert_runs_cover(runs, 11)
    assert sorted(len(r) for r in runs) == [5, 6]


def test_pack_small_items_terminate_with_next_fit_bins() -> None:
    """The balancing target only grows (by 5% and a token) until it reaches the
    budget: with items this small a shrinking target would never end."""
    assert pack([3, 3, 3], 7) == [range(0, 2), range(2, 3)]
    assert pack([1, 1, 1, 1, 1], 3) == [range(0, 3), range(3, 5)]


def test_pack_balancing_target_schedule() -> None:
    """The first target that keeps the bin count wins: for [67, 12, 66] in 89,
    t0 = 72.5 gives 3 bins, 77.1 gives 3, 82.0 gives [67, 12] [66] (79 and 66).
    A schedule with bigger steps would stop elsewhere."""
    assert pack([67, 12, 66], 89) == [range(0, 2), range(2, 3)]
    assert pack([76, 10, 75], 90) == [range(0, 1), range(1, 3)]


def test_pack_edge_cases() -> None:
    assert pack([], 10) == []
    assert pack([10], 10) == [range(0, 1)]
    assert pack([0, 0, 0], 1) == [range(0, 3)]
    assert pack([5, 5, 5], 5) == [range(0, 1), range(1, 2), range(2, 3)]


@SETTINGS
@given(sb=sizes_and_budget(max_size=20), extra=st.integers(min_value=1, max_value=50))
def test_pack_rejects_an_item_larger_than_the_budget(sb: tuple[list[int], int], extra: int) -> None:
    sizes, budget = sb
    sizes = [*sizes, budget + extra]
    with pytest.raises(ValueError, match=r"^an item is larger than the budget; truncate it first$"):
        pack(sizes, budget)


@pytest.mark.parametrize("budget", [0, -1])
def test_pack_rejects_a_nonpositive_budget(budget: int) -> None:
    with pytest.raises(ValueError, match=r"^budget must be positive$"):
        pack([], budget)


# -- item_budget -------------------------------------------------------------


@SETTINGS
@given(
    subset=st.integers(min_value=0, max_value=200_000),
    overhead=st.integers(min_value=0, max_value=200_000),
)
def test_item_budget(subset: int, overhead: int) -> None:
    if subset - overhead >= 64:
        assert item_budget(subset, overhead) == subset - overhead
    else:
        with pytest.raises(ValueError, match=str(subset)):
            item_budget(subset, overhead)


def test_item_budget_boundary() -> None:
    assert item_budget(1064, 1000) == 64
    with pytest.raises(ValueError, match="leaves only 63 tokens"):
        item_budget(1063, 1000)


def test_item_budget_error_names_the_settings_by_default() -> None:
    with pytest.raises(ValueError, match=r"^the subset budget") as caught:
        item_budget(1063, 1000)
    assert str(caught.value) == (
        "the subset budget (1063 tokens) leaves only 63 tokens for trajectories after "
        "the prompt template, the module and the re-ask room (1000 tokens); "
        "raise subset_tokens/context_tokens, or lower module_tokens (or the initial "
        "module's size)"
    )


# -- make_subsets ------------------------------------------------------------


@SETTINGS
@given(
    items=rendered_items,
    headroom=st.integers(min_value=0, max_value=1500),
    seed=st.integers(min_value=0, max_value=1000),
)
def test_make_subsets_covers_every_trajectory_once(
    items: list[RenderedTrajectory], headroom: int, seed: int
) -> None:
    budget = max((i.tokens for i in items), default=0) + PER_ITEM_SLACK + headroom
    subsets = make_subsets(items, budget, seed)

    ids = [t.id for s in subsets for t in s.items]
    assert sorted(ids) == sorted(i.id for i in items)
    assert len(ids) == len(set(ids))
    # The subsets are consecutive slices of the packing order.
    assert [t for s in subsets for t in s.items] == order_for_packing(items, seed)

    for s in subsets:
        assert s.items
        assert sum(t.tokens + PER_ITEM_SLACK for t in s.items) <= budget

    subset_ids = [s.id for s in subsets]
    assert len(subset_ids) == len(set(subset_ids))
    width = max(3, len(str(len(subsets))))
    assert subset_ids == [f"s{n:0{width}d}" for n in range(1, len(subsets) + 1)]


def test_make_subsets_ids_widen_past_999() -> None:
    items = [
        RenderedTrajectory(id=f"t{i}", text="", tokens=10, success=True, group="")
        for i in range(1000)
    ]
    subsets = make_subsets(items, 10 + PER_ITEM_SLACK, seed=0)
    assert len(subsets) == 1000
    assert subsets[0].id == "s0001"
    assert subsets[-1].id == "s1000"


def test_make_subsets_rejects_an_item_over_budget() -> None:
    items = [
        RenderedTrajectory(id="a", text="", tokens=10, success=True, group=""),
        RenderedTrajectory(id="b", text="", tokens=100, success=False, group=""),
    ]
    with pytest.raises(ValueError, match="larger than the budget"):
        make_subsets(items, 100, seed=0)  # 100 + slack > 100
    assert [t.id for s in make_subsets(items, 100 + PER_ITEM_SLACK, 0) for t in s.items] in (
        ["a", "b"],
        ["b", "a"],
    )


# -- render_trajectory -------------------------------------------------------

COUNTER = default_counter()

# Words, digits, punctuation and some multi-byte characters (no surrogates).
TEXT_ALPHABET = st.sampled_from(list("abcdefghij KLMNO 0123456789 .,;:!?-_()[]{}\"'\né漢字🙂\t"))
texts = st.text(alphabet=TEXT_ALPHABET, max_size=200)
words = st.lists(
    st.sampled_from(["search", "the", "file", "error", "retry", "ok", "42", "é", "漢字", "🙂"]),
    max_size=60,
).map(" ".join)

steps = st.lists(
    st.builds(
        Step,
        role=st.sampled_from(["system", "user", "assistant", "tool"]),
        content=st.one_of(st.none(), texts, words),
        name=st.one_of(st.none(), st.sampled_from(["search", "read_file"])),
    ),
    max_size=25,
)

trajectories = st.builds(
    Trajectory,
    id=st.text(alphabet="abcdefxyz0123456789-_", min_size=1, max_size=12),
    task=st.text(alphabet=TEXT_ALPHABET, min_size=1, max_size=60),
    steps=steps.map(tuple),
    outcome=st.builds(
        Outcome,
        success=st.booleans(),
        feedback=st.one_of(st.none(), st.sampled_from(["wrong answer", "great"])),
    ),
    metadata=st.one_of(st.none(), st.just({"task_type": "qa"})),
)


def outcome_line(traj: Trajectory) -> str:
    line = "Outcome: " + ("SUCCESS" if traj.outcome.success else "FAILURE")
    if traj.outcome.feedback:
        line += f". Feedback: {traj.outcome.feedback}"
    return line


def header_of(traj: Trajectory) -> str:
    header = f"### Trajectory {traj.id}\nTask: {traj.task}"
    if traj.task_type:
        header += f"\nTask type: {traj.task_type}"
    return header


@SETTINGS
@given(traj=trajectories, margin=st.integers(min_value=30, max_value=400))
def test_render_trajectory_truncation_keeps_header_task_and_outcome(
    traj: Trajectory, margin: int
) -> None:
    full = render_trajectory(traj, COUNTER, 10**9)
    assert not full.truncated
    assert full.tokens == COUNTER.count(full.text)

    fixed = COUNTER.count(f"{header_of(traj)}\nSteps:\n\n{outcome_line(traj)}")
    max_tokens = fixed + margin
    out = render_trajectory(traj, COUNTER, max_tokens)

    assert out.id == traj.id
    assert out.success == traj.outcome.success
    assert out.tokens == COUNTER.count(out.text)
    assert out.tokens <= max_tokens
    assert out.truncated == (full.tokens > max_tokens)
    if not out.truncated:
        assert out.text == full.text
    assert out.text.startswith(f"### Trajectory {traj.id}\nTask: {traj.task}")
    assert out.text.startswith(header_of(traj) + "\nSteps:\n")
    assert out.text.endswith("\n" + outcome_line(traj))


@SETTINGS
@given(traj=trajectories, max_tokens=st.integers(min_value=MIN_RENDER_TOKENS, max_value=250))
def test_render_trajectory_always_fits_max_tokens(traj: Trajectory, max_tokens: int) -> None:
    full = render_trajectory(traj, COUNTER, 10**9)
    out = render_trajectory(traj, COUNTER, max_tokens)
    assert out.tokens == COUNTER.count(out.text)
    assert out.tokens <= max_tokens
    assert out.truncated == (full.tokens > max_tokens)
    if not out.truncated:
        assert out.text == full.text


def test_render_trajectory_rejects_a_budget_too_small_for_any_text() -> None:
    traj = Trajectory(id="t", task="x" * 500, steps=(), outcome=Outcome(success=True))
    with pytest.raises(ValueError, match="max_tokens must be at least"):
        render_trajectory(traj, COUNTER, MIN_RENDER_TOKENS - 1)


def test_render_trajectory_long_example() -> None:
    traj = Trajectory(
        id="traj-7",
        task="Find the cheapest flight from Oslo to Lima.",
        steps=tuple(
            Step(role="assistant" if i % 2 else "user", content=f"step {i} " + "lorem " * 40)
            for i in range(30)
        ),
        outcome=Outcome(success=False, score=0.25, feedback="booked the wrong date"),
        metadata={"task_type": "travel"},
    )
    out = render_trajectory(traj, COUNTER, 300)
    assert out.truncated
    assert out.group == "travel"
    assert out.tokens == COUNTER.count(out.text) <= 300
    assert out.text.startswith(
        "### Trajectory traj-7\nTask: Find the cheapest flight from Oslo to Lima.\n"
        "Task type: travel\nSteps:\n[user] step 0 "
    )
    assert re.search(r"\[\.\.\. 30 steps, middle omitted to fit budget \.\.\.\]", out.text)
    assert out.text.endswith("\nOutcome: FAILURE (score 0.25). Feedback: booked the wrong date")
    # The tail of the last step survives.
    assert "lorem \nOutcome:" in out.text


def test_render_trajectory_shows_the_score_changes_of_recorded_turns() -> None:
    def turn(content: str, score: object) -> list[Step]:
        return [
            Step(role="user", content="You see a mug.", extra={"valid_actions": ["take mug"]}),
            Step(role="assistant", content=content, extra={"played": [content], "score": score}),
        ]

    steps = (
        Step(role="system", content="Tidy up."),
        *turn("look around", 0.0),
        *turn("take mug", 0.0),
        *turn("put mug in cupboard", 0.25),
        *turn("inventory", 0.25),
        *turn("take mug from cupboard", 0),
        *turn("oops", True),  # not a score
        *turn("put mug in cupboard", 0.25),
        *turn("put plate in rack", 1),
        Step(role="user", content="Done."),
    )
    traj = Trajectory(id="e", task="tidy", steps=steps, outcome=Outcome(success=True, score=1.0))
    lines = render_trajectory(traj, COUNTER, 10**6).text.splitlines()
    replies = [line for line in lines if line.startswith("[assistant]")]
    assert replies == [
        "[assistant] look around",
        "[assistant] take mug",
        "[assistant] put mug in cupboard [score +0.25 -> 0.25]",
        "[assistant] inventory",
        "[assistant] take mug from cupboard [score -0.25 -> 0]",
        "[assistant] oops",
        "[assistant] put mug in cupboard [score +0.25 -> 0.25]",
        "[assistant] put plate in rack [score +0.75 -> 1]",
    ]
    assert "[user] You see a mug." in lines  # user steps are unchanged
    # Without the extra fields, the same steps render as they always did.
    bare = attrs.evolve(traj, steps=tuple(attrs.evolve(s, extra={}) for s in steps))
    text = render_trajectory(bare, COUNTER, 10**6).text
    assert "[score" not in text
    assert text.splitlines()[4:6] == ["[user] You see a mug.", "[assistant] look around"]


def test_render_trajectory_group_key() -> None:
    traj = Trajectory(
        id="t",
        task="x",
        steps=(),
        outcome=Outcome(success=True),
        metadata={"task_type": "qa", "domain": 3},
    )
    assert render_trajectory(traj, COUNTER, 1000).group == "qa"
    assert render_trajectory(traj, COUNTER, 1000, group_key="domain").group == "3"
    assert render_trajectory(traj, COUNTER, 1000, group_key="missing").group == ""


# -- StreamPacker ------------------------------------------------------------


def test_stream_packer_refuses_settings_that_cannot_pack() -> None:
    with pytest.raises(ValueError, match=r"^budget must be positive$"):
        StreamPacker(0, 1.0)
    with pytest.raises(ValueError, match=r"^max_wait must not be negative$"):
        StreamPacker(10, -0.5)
    # The smallest settings that can: a budget of one token, no waiting.
    packer = StreamPacker(1, 0.0)
    assert packer.add("a", 1, 0.0) == [("a",)]


def test_stream_packer_refuses_an_empty_item() -> None:
    packer = StreamPacker(10, 1.0)
    with pytest.raises(ValueError, match=r"^item 'a' has 0 tokens; must be 1\.\.10$"):
        packer.add("a", 0, 0.0)
    assert packer.pending == ()
