"""Pure merge scheduling: a forest of merge trees kept like a base-F counter.

Trees are known by node id and rank. A finished leaf has rank 0. Whenever
``fan_in`` trees of one rank are available they are merged into a tree of
rank r+1 (a "carry"); the merge is handed out as a :class:`MergeJob` and runs
elsewhere. When input ends (:meth:`MergeForest.close`), the remaining trees are
folded together, lowest ranks first, until one root is left.

The class does no I/O and knows nothing of LLMs or trio, so it can be driven
by a test (or a daemon replaying its store) one event at a time. Each leaf
costs amortised O(1) merges and the depth is O(log n).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
from collections.abc import Sequence

import attrs


@attrs.frozen
class MergeJob:
    """A merge the forest wants run: merge ``children`` into the tree ``id`` of ``rank``."""

    id: str
    children: tuple[str, ...]
    rank: int


@attrs.frozen
class ForestStatistics:
    """Snapshot of a forest: trees waiting, merges in flight, started and done."""

    trees: int
    in_flight: int
    merges_started: int
    merges_done: int
    closed: bool


class MergeForest:
    """Schedules merges of finished trees. ``eager=False`` waits for :meth:`close`
    before any merge (the barrier baseline used by benchmarks)."""

    def __init__(
        self, fan_in: int = 2, *, eager: bool = True, id_prefix: str = "m", first_id: int = 1
    ) -> None:
        if fan_in < 2:
            raise ValueError("fan_in must be at least 2")
        self.fan_in = fan_in
        self.eager = eager
        self._available: dict[int, list[str]] = {}
        self._in_flight: dict[str, MergeJob] = {}
        self._closed = False
        self._ids = (f"{id_prefix}{n}" for n in itertools.count(first_id))
        self._started = 0
        self._done = 0

    @classmethod
    def restore(
        cls,
        trees: Sequence[tuple[str, int]],
        *,
        fan_in: int = 2,
        id_prefix: str = "m",
        first_id: int = 1,
    ) -> tuple[MergeForest, list[MergeJob]]:
        """A forest holding the finished ``(node id, rank)`` trees, in the order
        given, and the merges that can start now.

        This is how a daemon resumes from its store: merges that were in flight
        when it stopped were never recorded as done, so their children are
        still trees, and the same carries are scheduled again. ``first_id``
        continues the merge numbering past the ids already used.
        """
        forest = cls(fan_in, id_prefix=id_prefix, first_id=first_id)
        for node_id, rank in trees:
            if rank < 0:
                raise ValueError(f"tree {node_id!r} has a negative rank")
            forest._available.setdefault(rank, []).append(node_id)
        return forest, forest._schedule()

    # -- events -----------------------------------------------------------
    def add_leaf(self, node_id: str) -> list[MergeJob]:
        """A subset finished optimizing; returns the merges that can start now."""
        if self._closed:
            raise RuntimeError("cannot add a leaf after close()")
        return self._add(node_id, 0)

    def complete(self, job: MergeJob, node_id: str | None = None) -> list[MergeJob]:
        """A merge finished; its result is the tree ``node_id`` (default: ``job.id``)."""
        if self._in_flight.pop(job.id, None) is None:
            raise KeyError(f"merge job {job.id!r} is not in flight")
        self._done += 1
        return self._add(node_id or job.id, job.rank)

    def close(self) -> list[MergeJob]:
        """No more leaves will come; returns the merges that can start now."""
        self._closed = True
        return self._schedule()

    # -- queries ----------------------------------------------------------
    @property
    def done(self) -> bool:
        """True once closed, nothing is in flight and at most one tree is left."""
        return self._closed and not self._in_flight and self._tree_count() <= 1

    def root(self) -> str | None:
        if not self.done:
            raise RuntimeError("the forest is not finished")
        trees = self.trees()
        return trees[0] if trees else None

    def trees(self) -> list[str]:
        """Finished trees not being merged, lowest rank first."""
        return [n for r in sorted(self._available) for n in self._available[r]]

    def ranked_trees(self) -> list[tuple[str, int]]:
        """``(node id, rank)`` of the finished trees not being merged, lowest rank first."""
        return [(n, r) for r in sorted(self._available) for n in self._available[r]]

    def in_flight(self) -> list[MergeJob]:
        return list(self._in_flight.values())

    def statistics(self) -> ForestStatistics:
        return ForestStatistics(
            trees=self._tree_count(),
            in_flight=len(self._in_flight),
            merges_started=self._started,
            merges_done=self._done,
            closed=self._closed,
        )

    # -- internals --------------------------------------------------------
    def _tree_count(self) -> int:
        return sum(len(v) for v in self._available.values())

    def _add(self, node_id: str, rank: int) -> list[MergeJob]:
        self._available.setdefault(rank, []).append(node_id)
        return self._schedule()

    def _start(self, children: list[str], rank: int) -> MergeJob:
        job = MergeJob(id=next(self._ids), children=tuple(children), rank=rank)
        self._in_flight[job.id] = job
        self._started += 1
        return job

    def _schedule(self) -> list[MergeJob]:
        jobs: list[MergeJob] = []
        if self.eager or self._closed:
            # Carries: F trees of equal rank merge into one of the next rank.
            for rank in sorted(self._available):
                queue = self._available[rank]
                while len(queue) >= self.fan_in:
                    children = queue[: self.fan_in]
                    del queue[: self.fan_in]
                    jobs.append(self._start(children, rank + 1))
        if self._closed:
            # Fold: merge what is left, lowest ranks first. Wait while a merge
            # in flight could still supply a partner for a lone tree.
            while True:
                trees = [(r, n) for r in sorted(self._available) for n in self._available[r]]
                if len(trees) < 2:
                    break
                if len(trees) < self.fan_in and self._in_flight:
                    break
                chosen = trees[: self.fan_in]
                for r, n in chosen:
                    self._available[r].remove(n)
                jobs.append(self._start([n for _, n in chosen], max(r for r, _ in chosen) + 1))
        for rank in [r for r, q in self._available.items() if not q]:
            del self._available[rank]
        return jobs


@functools.cache  # progress displays ask for it several times a second
def expected_merges(leaves: int, fan_in: int = 2) -> int:
    """How many merges a forest makes for ``leaves`` leaves finishing one at a time."""
    forest = MergeForest(fan_in)
    pending: list[MergeJob] = []
    for i in range(leaves):
        pending.extend(forest.add_leaf(f"l{i}"))
        while pending:
            pending.extend(forest.complete(pending.pop(0)))
    pending.extend(forest.close())
    while pending:
        pending.extend(forest.complete(pending.pop(0)))
    return forest.statistics().merges_done


def fold_plan(trees: Sequence[tuple[str, int]], fan_in: int = 2) -> list[MergeJob]:
    """The merges that fold ``trees`` (``(node id, rank)``) into one, highest
    rank first, as a chain: the biggest trees, which change least often, come
    first, so folding again after a new leaf repeats the same first merges.

    Each merge's id is derived from its children's ids (``f`` and a digest),
    so the same merge always has the same id: a caller that keeps finished
    nodes by id reruns only the merges after the first tree that changed.
    Ties in rank keep the given order. Returns [] for fewer than two trees.
    """
    if fan_in < 2:
        raise ValueError("fan_in must be at least 2")
    ordered = sorted(trees, key=lambda t: -t[1])
    if len(ordered) < 2:
        return []
    jobs: list[MergeJob] = []
    acc, rank = ordered[0]
    rest = ordered[1:]
    while rest:
        group, rest = rest[: fan_in - 1], rest[fan_in - 1 :]
        children = (acc, *(node for node, _ in group))
        digest = hashlib.sha256("\n".join(children).encode()).hexdigest()[:16]
        rank = max(rank, *(r for _, r in group)) + 1
        job = MergeJob(id=f"f{digest}", children=children, rank=rank)
        jobs.append(job)
        acc = job.id
    return jobs


class Sequencer:
    r"""Puts events back in the order a run recorded them in.

    A pure scheduler such as :class:`MergeForest` schedules the same merges
    from the same events in the same order, so a rerun that applies its
    events in the recorded order rebuilds the same merge tree, with the same
    merge prompts: a response cache then answers every call the first run
    paid for, however differently the rerun's calls are timed.

    An event that arrives is held until every recorded event before it has
    been released. Once the recording is used up, or :meth:`abandon`\ ed (a
    recorded event that will not come again), events are released in the
    order they arrive. Events are unique names.
    """

    def __init__(self, recorded: Sequence[str] = ()) -> None:
        self._recorded = list(recorded)
        self._next = 0
        self._held: dict[str, None] = {}  # arrival order
        self._seen: set[str] = set()

    @property
    def replaying(self) -> bool:
        """Whether recorded events are still to be released."""
        return self._next < len(self._recorded)

    @property
    def held(self) -> list[str]:
        return list(self._held)

    def arrive(self, event: str) -> list[str]:
        """``event`` happened; returns the events to apply now, in order."""
        if event in self._seen:
            raise ValueError(f"event {event!r} arrived twice")
        self._seen.add(event)
        self._held[event] = None
        return self._drain()

    def abandon(self) -> list[str]:
        """Give up the rest of the recording; returns the events held, in arrival order."""
        self._next = len(self._recorded)
        return self._drain()

    def _drain(self) -> list[str]:
        out: list[str] = []
        while self.replaying and self._recorded[self._next] in self._held:
            event = self._recorded[self._next]
            del self._held[event]
            out.append(event)
            self._next += 1
        if not self.replaying:
            out.extend(self._held)
            self._held.clear()
        return out
