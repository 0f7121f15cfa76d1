"""Tests for the pure merge scheduler (MergeForest), including a stateful model test."""

from __future__ import annotations

import hashlib
import itertools
import math
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from fgo_actors import MergeForest, MergeJob
from fgo_actors._core.forest import Sequencer, expected_merges, fold_plan


def drain(forest: MergeForest, jobs: list[MergeJob], *, lifo: bool = False) -> list[MergeJob]:
    """Complete jobs (and the jobs they unlock) until none are in flight; return all of them."""
    seen: list[MergeJob] = []
    pending = list(jobs)
    while pending:
        job = pending.pop() if lifo else pending.pop(0)
        seen.append(job)
        pending.extend(forest.complete(job))
    return seen


def leaves_under(node: str, children: dict[str, tuple[str, ...]]) -> list[str]:
    if node not in children:
        return [node]
    return [leaf for c in children[node] for leaf in leaves_under(c, children)]


class ForestMachine(RuleBasedStateMachine):
    """Drives a MergeForest one event at a time and checks it against a simple model."""

    def __init__(self) -> None:
        super().__init__()
        self.fan_in = 2
        self.eager = True
        self.forest = MergeForest(2)
        self.closed = False
        self.leaves: list[str] = []
        # Trees not being merged, with their rank.
        self.available: dict[str, int] = {}
        self.in_flight: dict[str, MergeJob] = {}
        # Every tree made by a merge -> its children (a job's id or the node id given).
        self.tree_children: dict[str, tuple[str, ...]] = {}
        self.job_ids: set[str] = set()
        self.used_as_child: set[str] = set()
        self.merges_done = 0

    @initialize(fan_in=st.integers(min_value=2, max_value=4), eager=st.booleans())
    def start(self, fan_in: int, eager: bool) -> None:
        self.fan_in = fan_in
        self.eager = eager
        self.forest = MergeForest(fan_in, eager=eager)

    # -- bookkeeping -------------------------------------------------------
    def receive(self, jobs: list[MergeJob]) -> None:
        if not self.eager and not self.closed:
            assert jobs == [], "a lazy forest must not merge before close()"
        for job in jobs:
            assert 2 <= len(job.children) <= self.fan_in, job
            assert len(set(job.children)) == len(job.children), job
            assert job.id not in self.job_ids, f"job id {job.id} reused"
            assert job.id not in self.leaves
            if len(job.children) < self.fan_in:
                # A partial merge only folds the end of input, and only when no merge in
                # flight could still supply another partner.
                assert self.closed, job
                assert not self.in_flight, (job, self.in_flight)
            self.job_ids.add(job.id)
            ranks = []
            for child in job.children:
                assert child not in self.used_as_child, f"{child} merged twice"
                assert child in self.available, f"{child} is not an available tree"
                ranks.append(self.available.pop(child))
                self.used_as_child.add(child)
            assert job.rank == max(ranks) + 1, (job, ranks)
            self.in_flight[job.id] = job

    # -- rules -------------------------------------------------------------
    @precondition(lambda self: not self.closed)
    @rule()
    def add_leaf(self) -> None:
        leaf = f"leaf{len(self.leaves)}"
        self.leaves.append(leaf)
        self.available[leaf] = 0
        self.receive(self.forest.add_leaf(leaf))

    @precondition(lambda self: bool(self.in_flight))
    @rule(index=st.integers(min_value=0), rename=st.booleans())
    def complete(self, index: int, rename: bool) -> None:
        job = list(self.in_flight.values())[index % len(self.in_flight)]
        del self.in_flight[job.id]
        node = f"node-{job.id}" if rename else job.id
        self.tree_children[node] = job.children
        self.available[node] = job.rank
        self.merges_done += 1
        self.receive(self.forest.complete(job, node if rename else None))

    @rule()
    def close(self) -> None:
        self.closed = True
        self.receive(self.forest.close())

    # -- invariants --------------------------------------------------------
    @invariant()
    def matches_model(self) -> None:
        assert Counter(self.forest.trees()) == Counter(list(self.available))
        assert {j.id for j in self.forest.in_flight()} == set(self.in_flight)
        stats = self.forest.statistics()
        assert stats.trees == len(self.available)
        assert stats.in_flight == len(self.in_flight)
        assert stats.merges_started == len(self.job_ids)
        assert stats.merges_done == self.merges_done
        assert stats.closed == self.closed

    @invariant()
    def trees_listed_lowest_rank_first(self) -> None:
        ranks = [self.available[t] for t in self.forest.trees()]
        assert ranks == sorted(ranks)

    @invariant()
    def carries_happen_eagerly(self) -> None:
        if self.eager or self.closed:
            per_rank = Counter(self.available.values())
            assert all(n < self.fan_in for n in per_rank.values()), per_rank

    @invariant()
    def fold_makes_progress_after_close(self) -> None:
        if self.closed:
            n = len(self.available)
            # Only a lone tree, or a few trees waiting for a merge in flight, may wait.
            assert n <= 1 or (self.in_flight and n < self.fan_in), (n, self.in_flight)
            assert self.forest.done == (not self.in_flight and n <= 1)
        else:
            assert not self.forest.done

    def teardown(self) -> None:
        if not self.closed:
            self.close()
        while self.in_flight:
            self.complete(0, False)
            self.matches_model()
            self.fold_makes_progress_after_close()
        assert self.forest.done
        root = self.forest.root()
        n = len(self.leaves)
        if n == 0:
            assert root is None
            assert self.merges_done == 0
            return
        assert root is not None
        assert self.forest.trees() == [root]
        assert list(self.available) == [root]
        under = leaves_under(root, self.tree_children)
        assert sorted(under) == sorted(self.leaves)
        assert len(under) == len(set(under))
        # Every tree except the root was a child of exactly one merge.
        assert self.used_as_child == (set(self.leaves) | set(self.tree_children)) - {root}
        if self.fan_in == 2:
            assert self.merges_done == n - 1
        else:
            assert math.ceil((n - 1) / (self.fan_in - 1)) <= self.merges_done <= n - 1


TestForestMachine = settings(max_examples=150, stateful_step_count=40, deadline=None)(
    ForestMachine
).TestCase


# -- plain unit tests ----------------------------------------------------------


def test_eager_merge_as_soon_as_fan_in_leaves_exist() -> None:
    forest = MergeForest(2)
    assert forest.add_leaf("a") == []
    jobs = forest.add_leaf("b")
    assert jobs == [MergeJob(id="m1", children=("a", "b"), rank=1)]
    assert forest.in_flight() == jobs
    assert forest.trees() == []


def test_eager_fan_in_three_waits_for_three() -> None:
    forest = MergeForest(3)
    assert forest.add_leaf("a") == []
    assert forest.add_leaf("b") == []
    jobs = forest.add_leaf("c")
    assert len(jobs) == 1
    assert jobs[0].children == ("a", "b", "c")
    assert jobs[0].rank == 1


def test_eager_carry_chains_like_a_binary_counter() -> None:
    forest = MergeForest(2)
    forest.add_leaf("a")
    [j1] = forest.add_leaf("b")
    assert forest.complete(j1) == []
    forest.add_leaf("c")
    [j2] = forest.add_leaf("d")
    [j3] = forest.complete(j2)  # two rank-1 trees carry into rank 2
    assert j3.children == (j1.id, j2.id)
    assert j3.rank == 2
    assert forest.close() == []
    assert forest.complete(j3) == []
    assert forest.done
    assert forest.root() == j3.id


def test_lazy_forest_merges_only_after_close() -> None:
    forest = MergeForest(2, eager=False)
    for i in range(5):
        assert forest.add_leaf(f"l{i}") == []
    assert forest.in_flight() == []
    jobs = forest.close()
    assert jobs
    done = drain(forest, jobs)
    assert forest.done
    assert len(done) == 4
    assert forest.root() is not None


def test_fold_waits_for_in_flight_partner() -> None:
    forest = MergeForest(2)
    forest.add_leaf("a")
    [j1] = forest.add_leaf("b")
    forest.add_leaf("c")
    # "c" is alone but a merge is in flight: wait for it rather than merge "c" alone.
    assert forest.close() == []
    assert not forest.done
    [j2] = forest.complete(j1)
    assert set(j2.children) == {"c", j1.id}
    assert forest.complete(j2) == []
    assert forest.root() == j2.id


def test_fold_fan_in_three_waits_for_a_third_partner() -> None:
    forest = MergeForest(3)
    forest.add_leaf("a")
    forest.add_leaf("b")
    [j1] = forest.add_leaf("c")
    forest.add_leaf("d")
    forest.add_leaf("e")
    # Two trees are left but a merge is in flight: merge all three once it lands.
    assert forest.close() == []
    [j2] = forest.complete(j1)
    assert j2.children == ("d", "e", j1.id)
    assert j2.rank == 2
    assert forest.complete(j2) == []
    assert forest.root() == j2.id


def test_complete_with_custom_node_id() -> None:
    forest = MergeForest(2)
    forest.add_leaf("a")
    [job] = forest.add_leaf("b")
    forest.close()
    assert forest.complete(job, "merged-ab") == []
    assert forest.root() == "merged-ab"


def test_close_without_leaves() -> None:
    forest = MergeForest(2)
    assert forest.close() == []
    assert forest.done
    assert forest.root() is None


def test_single_leaf_is_the_root() -> None:
    forest = MergeForest(3)
    forest.add_leaf("only")
    assert forest.close() == []
    assert forest.root() == "only"


def test_complete_unknown_job_raises_key_error() -> None:
    forest = MergeForest(2)
    with pytest.raises(KeyError, match="merge job 'nope' is not in flight"):
        forest.complete(MergeJob(id="nope", children=("a", "b"), rank=1))


def test_complete_twice_raises_key_error() -> None:
    forest = MergeForest(2)
    forest.add_leaf("a")
    [job] = forest.add_leaf("b")
    forest.complete(job)
    with pytest.raises(KeyError, match="m1"):
        forest.complete(job)


def test_add_leaf_after_close_raises() -> None:
    forest = MergeForest(2)
    forest.add_leaf("a")
    forest.close()
    with pytest.raises(RuntimeError, match=r"^cannot add a leaf after close\(\)$"):
        forest.add_leaf("b")


@pytest.mark.parametrize("fan_in", [1, 0, -3])
def test_fan_in_below_two_rejected(fan_in: int) -> None:
    with pytest.raises(ValueError, match=r"^fan_in must be at least 2$"):
        MergeForest(fan_in)
    with pytest.raises(ValueError, match=r"^fan_in must be at least 2$"):
        fold_plan([("a", 0), ("b", 0)], fan_in)


def test_root_before_done_raises() -> None:
    forest = MergeForest(2)
    forest.add_leaf("a")
    with pytest.raises(RuntimeError, match=r"^the forest is not finished$"):
        forest.root()


def test_id_prefix() -> None:
    forest = MergeForest(2, id_prefix="e1-m")
    forest.add_leaf("a")
    [job] = forest.add_leaf("b")
    assert job.id == "e1-m1"


# -- whole runs in random completion orders -------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(min_value=0, max_value=40),
    fan_in=st.integers(min_value=2, max_value=4),
    eager=st.booleans(),
    completions=st.lists(st.booleans(), min_size=1, max_size=40),
    lifo=st.booleans(),
)
def test_every_run_ends_in_one_root_over_all_leaves(
    n: int, fan_in: int, eager: bool, completions: list[bool], lifo: bool
) -> None:
    forest = MergeForest(fan_in, eager=eager)
    children: dict[str, tuple[str, ...]] = {}
    pending: list[MergeJob] = []
    leaves = [f"x{i}" for i in range(n)]
    for i, leaf in enumerate(leaves):
        pending.extend(forest.add_leaf(leaf))
        if completions[i % len(completions)] and pending:
            job = pending.pop() if lifo else pending.pop(0)
            children[job.id] = job.children
            pending.extend(forest.complete(job))
    if not eager:
        assert forest.statistics().merges_started == 0
    pending.extend(forest.close())
    for job in drain(forest, pending, lifo=lifo):
        children[job.id] = job.children
        assert 2 <= len(job.children) <= fan_in
    assert forest.done
    root = forest.root()
    if n == 0:
        assert root is None
        return
    assert root is not None
    assert sorted(leaves_under(root, children)) == sorted(leaves)
    stats = forest.statistics()
    assert stats.merges_started == stats.merges_done == len(children)
    if fan_in == 2:
        assert len(children) == n - 1
    all_children = [c for cs in children.values() for c in cs]
    assert len(all_children) == len(set(all_children))


# -- expected_merges ----------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 8, 33])
def test_expected_merges_binary(n: int) -> None:
    assert expected_merges(n) == max(n - 1, 0)
    assert expected_merges(n, 2) == max(n - 1, 0)


@settings(max_examples=100, deadline=None)
@given(n=st.integers(min_value=1, max_value=200), fan_in=st.integers(min_value=2, max_value=6))
def test_expected_merges_bounds(n: int, fan_in: int) -> None:
    merges = expected_merges(n, fan_in)
    assert math.ceil((n - 1) / (fan_in - 1)) <= merges <= n - 1


@pytest.mark.parametrize(
    ("n", "fan_in", "merges"),
    [(9, 3, 4), (16, 4, 5), (27, 3, 13), (64, 4, 21), (125, 5, 31), (5, 4, 2)],
)
def test_expected_merges_examples(n: int, fan_in: int, merges: int) -> None:
    assert expected_merges(n, fan_in) == merges


@given(
    ranks=st.lists(st.integers(0, 12), min_size=0, max_size=20),
    fan_in=st.integers(2, 4),
    new_rank=st.integers(0, 12),
)
def test_fold_plan_is_a_chain_whose_prefix_survives_a_new_small_tree(
    ranks: list[int], fan_in: int, new_rank: int
) -> None:
    trees = [(f"t{i}", r) for i, r in enumerate(ranks)]
    plan = fold_plan(trees, fan_in)
    if len(trees) < 2:
        assert plan == []
        return
    # Every tree is folded in exactly once, and the last merge is the root.
    leaves = [c for job in plan for c in job.children if not c.startswith("f")]
    assert sorted(leaves) == sorted(t for t, _ in trees)
    assert all(job.children[0] == prev.id for prev, job in itertools.pairwise(plan))
    assert len(plan) == -(-(len(trees) - 1) // (fan_in - 1))
    assert fold_plan(trees, fan_in) == plan  # ids come from the children
    # A new tree no bigger than any other goes last: the old chain is reused
    # whole when the last group was full, else all but its last merge.
    if new_rank <= min(ranks):
        again = fold_plan([*trees, ("new", new_rank)], fan_in)
        full = (len(trees) - 1) % (fan_in - 1) == 0
        kept = plan if full else plan[:-1]
        assert again[: len(kept)] == kept


# ---------------------------------------------------------------- Sequencer


@given(
    n=st.integers(0, 30),
    recorded_len=st.integers(0, 30),
    data=st.data(),
)
def test_sequencer_releases_the_recording_first_then_arrival_order(
    n: int, recorded_len: int, data: st.DataObject
) -> None:
    events = [f"e{i}" for i in range(n)]
    recorded = data.draw(st.permutations(events))[: min(recorded_len, n)]
    arrivals = data.draw(st.permutations(events))
    seq = Sequencer(recorded)
    released: list[str] = []
    for event in arrivals:
        out = seq.arrive(event)
        # Nothing goes before the recorded events ahead of it.
        released += out
        assert released[: len(recorded)] == recorded[: len(released)]
    rest = [e for e in arrivals if e not in recorded]
    assert released == [*recorded, *rest]
    assert not seq.replaying
    assert seq.held == []


def test_sequencer_abandon_releases_what_is_held() -> None:
    seq = Sequencer(["a", "b", "c"])
    assert seq.arrive("c") == []
    assert seq.arrive("x") == []
    assert seq.arrive("a") == ["a"]
    assert seq.replaying
    assert seq.abandon() == ["c", "x"]
    assert seq.arrive("y") == ["y"]
    with pytest.raises(ValueError, match="twice"):
        seq.arrive("a")


def _forest_run(
    leaves: int, fan_in: int, order: st.DataObject, recorded: list[str]
) -> tuple[list[tuple[str, tuple[str, ...]]], list[tuple[str, int]]]:
    """Drive a MergeForest whose events (leaves in any order, merges finishing
    in any order, then close) go through a Sequencer replaying ``recorded``.
    Returns the merges in the order started, and each event as applied with
    the number of merges started once it was."""
    forest = MergeForest(fan_in)
    seq = Sequencer(recorded)
    jobs: dict[str, MergeJob] = {}
    running: list[str] = []
    started: list[tuple[str, tuple[str, ...]]] = []
    applied: list[tuple[str, int]] = []
    waiting = [f"leaf:l{i}" for i in range(leaves)]

    def apply(events: list[str]) -> None:
        for event in events:
            kind, _, name = event.partition(":")
            if kind == "leaf":
                new = forest.add_leaf(name)
            elif kind == "close":
                new = forest.close()
            else:
                new = forest.complete(jobs[name], name)
            for job in new:
                jobs[job.id] = job
                running.append(job.id)
                started.append((job.id, job.children))
            applied.append((event, len(started)))

    closed = False
    while waiting or running or seq.replaying:
        choices = [*waiting, *(f"merge:{j}" for j in running)]
        if not choices:  # only "close" can still come
            assert not closed
            closed = True
            apply(seq.arrive("close"))
            continue
        event = choices[order.draw(st.integers(0, len(choices) - 1))]
        if event in waiting:
            waiting.remove(event)
        else:
            running.remove(event.partition(":")[2])
        apply(seq.arrive(event))
        if not waiting and not closed:
            closed = True
            apply(seq.arrive("close"))
    assert forest.done
    return started, applied


@settings(max_examples=100, deadline=None)
@given(
    leaves=st.integers(1, 24),
    fan_in=st.integers(2, 4),
    cut=st.floats(0, 1),
    data=st.data(),
)
def test_a_replayed_recording_schedules_the_same_merges(
    leaves: int, fan_in: int, cut: float, data: st.DataObject
) -> None:
    """A run records its events; a rerun (other timing) replaying all of
    them, or the part written before a kill, starts the same merges with the
    same children, in the same order, as far as the recording goes."""
    first, applied = _forest_run(leaves, fan_in, data, [])
    events = [e for e, _ in applied]
    k = round(cut * len(events))
    prefix = events[:k]
    again, _ = _forest_run(leaves, fan_in, data, prefix)
    merges_in_prefix = applied[k - 1][1] if k else 0
    assert again[:merges_in_prefix] == first[:merges_in_prefix]
    full, _ = _forest_run(leaves, fan_in, data, events)
    assert full == first


def test_the_default_fan_in_is_two() -> None:
    forest = MergeForest()
    assert forest.add_leaf("a") == []
    [job] = forest.add_leaf("b")
    assert job.children == ("a", "b")


def test_fold_plan_ids_and_ranks_are_pinned() -> None:
    """A fold's ids are what the daemon's store finds its earlier folds by, so
    they must not change between versions: ``f`` and the first 16 hex digits
    of the sha256 of the children's ids, one per line. A fold merge's rank is
    one above its highest child's."""
    first, second = fold_plan([("a", 3), ("b", 1), ("c", 0)], 2)
    assert first.children == ("a", "b")
    assert first.id == "f" + hashlib.sha256(b"a\nb").hexdigest()[:16]
    assert first.rank == 4
    assert second.children == (first.id, "c")
    assert second.id == "f" + hashlib.sha256(f"{first.id}\nc".encode()).hexdigest()[:16]
    assert second.rank == 5
    assert len(fold_plan([("a", 0), ("b", 0), ("c", 0)])) == 2  # fan_in 2 by default
    (only,) = fold_plan([("x", 0), ("y", 6), ("z", 2)], 3)
    assert only.children == ("y", "z", "x")
    assert only.rank == 7
