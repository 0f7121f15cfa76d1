"""Incremental FGO over a stream of trajectories: the engine behind ``fgo serve``
and the embedding API (``open_optimizer``).

Trajectories are validated, rendered, measured and written to the store as
they arrive; from then on only ids and token counts travel. Four kinds of task
run in one nursery, joined by bounded memory channels:

- the packer seals subsets by token budget, or when the oldest trajectory in
  the open subset has waited ``max_wait`` seconds (``StreamPacker``);
- K optimizers optimize each sealed subset from the initial module and store
  the result as a leaf;
- the merger grows the merge forest (the same binary-counter ``MergeForest``
  as batch runs) and runs each merge as soon as its children exist;
- the publisher folds the forest's trees into one candidate whenever the
  forest is quiet and has changed, and publishes it as a new version.

Every state change is one store transaction, and every LLM reply is cached in
the store by request, so a restarted daemon rebuilds the forest and the
queues from the store and replays finished calls instead of paying again.
"""

from __future__ import annotations

import functools
import math
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import structlog
import trio

from .._core.errors import (
    BudgetExhaustedError,
    LLMUnavailableError,
    UnitFailedError,
    leaf_exceptions,
)
from .._core.forest import MergeForest, MergeJob, fold_plan
from .._core.model import MergeNode, Module, Subset, Trajectory
from .._core.partition import StreamPacker
from .._core.playbook import with_plays
from .._core.prompts import PER_ITEM_SLACK
from .._llm.gateway import GatewayConfig, LLMGateway
from .._storage.store import AsyncStore, Store, StoreCache, Version
from ..actors.merger import ForestRunner, merge_modules
from ..actors.optimizer import optimize_subset
from ..actors.run import prompt_budgets
from ..actors.state import RunConfig, RunState
from ..agent.envs import Task
from ..agent.eval import evaluate
from ..agent.executor import Executor
from ..agent.rollout import AgentConfig
from . import defaults
from .events import EventBus
from .flow import Flow
from .ingest import IngestResult, Rejected, parse_body, render_many, validate_records

# Trajectories the feeder reads from the store at once, and the packer's inbox size.
FEED_BATCH = 256
MAX_RETRY_PAUSE = 3600.0  # seconds: the longest wait before a failed subset is tried again


@attrs.frozen
class ValidationConfig:
    """Gate publication on validation tasks: a candidate is published only if
    the reference agent does not do worse with it than with the current
    version (mean score, then success rate); otherwise it is kept as rejected,
    with its scores.

    The episodes are played on ``executor``: by default ``workers`` threads of
    the daemon's process, through its agent gateway; a RayExecutor plays them
    as Ray tasks, whose workers call the LLM themselves."""

    tasks: tuple[Task, ...]
    agent: AgentConfig = attrs.field(factory=lambda: AgentConfig(max_steps=8))
    workers: int = 1
    executor: Executor | None = attrs.field(default=None, eq=False)

    def __attrs_post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("validation needs at least one task")


@attrs.frozen
class DaemonConfig:
    """Knobs of a streaming optimizer. Token numbers are tiktoken cl100k tokens."""

    store: Path
    gateway: GatewayConfig
    run: RunConfig = attrs.field(factory=RunConfig)
    initial: Module = attrs.field(factory=Module)
    # Seconds the oldest trajectory of an open subset waits before the subset
    # is sealed anyway (a quiet stream still gets optimized).
    max_wait: float = defaults.MAX_WAIT
    # Sealed subsets waiting for an optimizer before ingest pushes back (429).
    max_pending_subsets: int = defaults.MAX_PENDING_SUBSETS
    # Trajectories stored but not yet given to the packer, before ingest
    # pushes back (they wait in the store, not in memory).
    max_queued: int = defaults.MAX_QUEUED
    # Seconds to wait before retrying work that failed because the LLM endpoint
    # was unreachable (the daemon keeps running through outages).
    retry_pause: float = defaults.RETRY_PAUSE
    # A subset whose optimize reply stays invalid after the gateway's re-asks
    # is tried again this many times, after retry_pause, then twice that, and
    # so on (at most an hour apart); one still failed is tried again at the
    # next start. Its trajectories are never dropped.
    subset_retries: int = 3
    # Least seconds between two publications: each folds the forest's trees
    # (about log2 of the subsets so far) with LLM merges.
    publish_interval: float = defaults.PUBLISH_INTERVAL
    durable: bool = False  # synchronous=FULL: survive power cuts, not just crashes
    # Start a new store in a file that exists but is empty (refused otherwise:
    # a store truncated to 0 bytes would open as new, its history lost).
    init: bool = False
    validation: ValidationConfig | None = None
    # A stream never ends, so provenance would grow without bound: each rule
    # keeps its most recent subsets and trajectories, this many of each, and a
    # node its most recent subsets. The full lineage stays in the store's
    # forest (each node's children).
    provenance_cap: int = 64

    def __attrs_post_init__(self) -> None:
        if self.max_wait < 0:
            raise ValueError("max_wait must not be negative")
        if self.subset_retries < 0:
            raise ValueError("subset_retries must not be negative")
        if self.max_pending_subsets < 1 or self.max_queued < 1 or self.provenance_cap < 1:
            raise ValueError("max_pending_subsets, max_queued and provenance_cap must be positive")


@attrs.frozen
class DaemonStatistics:
    """A snapshot for ``/metrics``, progress and tests."""

    trajectories: int
    queued: int  # accepted, not yet in a sealed subset
    subsets_pending: int  # sealed, not yet optimized
    subsets_done: int
    subsets_failed: int
    optimizing: int
    merges_in_flight: int
    trees: int
    versions_published: int
    versions_rejected: int
    latest_version: int | None
    llm_in_flight: int
    llm_window: int  # calls allowed in flight now (adaptive), or max_concurrency
    llm_throttled: int  # calls sent again after a 429/503 of our own making
    tokens_by_role: dict[str, dict[str, int]]
    cached_calls: int
    events_dropped: int
    saturated: bool
    publish_pending: bool


class StreamingOptimizer:
    """A running incremental optimizer. Make one with :func:`open_optimizer`."""

    def __init__(
        self,
        config: DaemonConfig,
        store: AsyncStore,
        gateway: LLMGateway,
        nursery: trio.Nursery,
        agent_gateway: LLMGateway | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.gateway = gateway
        self.agent_gateway = agent_gateway or gateway
        self._values: dict[str, dict[str, Any]] = {}  # module key -> validation result
        self.events = EventBus()
        self._nursery = nursery
        self._log = structlog.get_logger()
        self._state = RunState(started_at=trio.current_time(), fan_in=config.run.fan_in)
        self._module_tokens, budget = prompt_budgets(
            gateway, config.run, config.initial, streaming=True
        )
        self._item_budget = budget
        self._render_max = budget - PER_ITEM_SLACK
        # The packer's inbox: (id, tokens) fed from the store, or ("", 0) to flush.
        self._queue_send, self._queue_recv = trio.open_memory_channel[tuple[str, int]](FEED_BATCH)
        self._subsets_send, self._subsets_recv = trio.open_memory_channel[str](
            config.max_pending_subsets
        )
        # Failed subsets come back this way for their retries.
        self._retry_send = self._subsets_send.clone()
        self._leaves_send, self._leaves_recv = trio.open_memory_channel[tuple[str, int]](
            config.max_pending_subsets
        )
        self._changed = trio.Event()  # the forest's trees changed
        self._stored = trio.Event()  # new trajectories are in the store
        self._flow = Flow()  # where the work is, as counts
        self._forest: MergeForest | None = None
        self._runner: ForestRunner | None = None  # runs the forest's merges
        self._folding = False
        self._latest: Version | None = None
        self._published_trees: frozenset[str] = frozenset()
        # subsets_done, subsets_failed, versions_published, versions_rejected
        self._count: Counter[str] = Counter()
        self._failures: Counter[str] = Counter()  # subset id -> failed attempts this run
        self._trajectories = 0
        self._closed = False
        self._stopping = False
        self._subset_number = 1
        self._activity = trio.Event()  # set (and replaced) whenever work moves on
        self._spent_before: dict[str, dict[str, int]] = {}

    # -- public API -------------------------------------------------------
    async def submit(self, trajectory: Trajectory | dict[str, Any]) -> IngestResult:
        """Accept one trajectory (idempotent by id). Waits while the pipeline is full."""
        return await self.submit_many([trajectory])

    async def submit_many(
        self, records: Sequence[Trajectory | object], *, lines: Sequence[int] | None = None
    ) -> IngestResult:
        """Validate, render and store ``records``; the new ones will be packed.

        Bad records are reported (with ``lines[i]``, default i+1) and skipped;
        duplicates of stored ids are counted and skipped. Waits first while the
        pipeline is :attr:`saturated` (library backpressure; HTTP checks it
        and answers 429 instead). Once stored, a record is never lost: the
        feeder gives the store's backlog to the packer in arrival order.
        """
        while self.saturated and not self._closed:
            await self._activity.wait()
        return await self._submit(records, lines)

    async def submit_text(self, text: str, *, max_record_bytes: int | None = None) -> IngestResult:
        """Ingest a JSON or JSONL body at once (no waiting): records that are not
        JSON, or too big, are rejected; the rest are stored."""
        # Parsing and validating a big body takes a while: in a worker thread,
        # so that other requests (/healthz) are answered meanwhile.
        records, bad = await trio.to_thread.run_sync(
            functools.partial(parse_body, text, max_record_bytes=max_record_bytes)
        )
        return await self._submit([r for _, r in records], [n for n, _ in records], bad)

    async def _submit(
        self,
        records: Sequence[Trajectory | object],
        lines: Sequence[int] | None,
        refused: Sequence[Rejected] = (),
    ) -> IngestResult:
        if self._closed:
            raise RuntimeError("the optimizer is closed")
        numbers = list(lines) if lines is not None else list(range(1, len(records) + 1))
        valid, rejected, duplicates = await trio.to_thread.run_sync(
            validate_records, records, numbers, refused
        )
        known = await self.store.known_ids([t.id for _, t, _ in valid])
        fresh = [(n, t, b) for n, t, b in valid if t.id not in known]
        duplicates += len(valid) - len(fresh)
        rendered = await trio.to_thread.run_sync(
            render_many,
            [t for _, t, _ in fresh],
            self.gateway.counter,
            self._render_max,
            self.config.run.group_key,
        )
        added = await self.store.add_trajectories(
            [(r, b) for r, (_, _, b) in zip(rendered, fresh, strict=True)],
            time.time(),
        )
        accepted = sum(added)
        duplicates += len(added) - accepted  # stored by another request meanwhile
        self._trajectories += accepted
        self._flow.accepted(accepted)
        if accepted:
            self._stored.set()
        result = IngestResult(accepted, duplicates, tuple(sorted(rejected, key=lambda r: r.line)))
        self.events.emit("ingest", accepted=accepted, duplicate=duplicates, rejected=len(rejected))
        return result

    @property
    def saturated(self) -> bool:
        """True when the pipeline is full: ingest should push back."""
        return self._flow.saturated(self.config.max_pending_subsets, self.config.max_queued)

    @property
    def publish_pending(self) -> bool:
        """True while the forest holds work the latest version does not: a
        fold (a new version) is due or under way, so the latest is not final."""
        return self._changed.is_set() or self._folding

    def latest_version(self) -> Version | None:
        return self._latest

    def latest_module(self) -> Module | None:
        """The module of the newest published version, or None before the first."""
        return None if self._latest is None else self._latest.module

    async def version(self, n: int) -> Version | None:
        return await self.store.version(n)

    async def list_versions(self) -> list[Version]:
        return await self.store.versions()

    async def rollback(self, n: int) -> Version:
        """Publish version ``n``'s module again, as a new version; raises KeyError
        for an unknown version and ValueError for a rejected one."""
        target = await self.version(n)
        if target is None:
            raise KeyError(n)
        if target.status != "published":
            raise ValueError(f"version {n} was rejected; only published versions can come back")
        # The forest stays as it is: the rolled-back module stands until new
        # trajectories change the forest ("trees" records what it was now, so
        # a restart does not publish the forest's fold over the rollback).
        trees = [t for t, _ in self._forest.ranked_trees()] if self._forest else []
        lineage = {
            **target.lineage,
            "rollback_of": n,
            "trees": trees,
            "parents": [self._latest.n] if self._latest else [],
        }
        version = await self.store.add_version("published", target.module, lineage, time.time())
        self._latest = version
        self._published_trees = frozenset(trees)
        self._count["versions_published"] += 1
        self.events.emit("publish", version=version.n, rollback_of=n)
        return version

    @trio.as_safe_channel
    async def versions(self) -> AsyncGenerator[Version, None]:
        """Each version published from now on, as it is published:
        ``async with opt.versions() as versions: async for v in versions: ...``."""
        async with self.events.subscribe() as events:
            async for event in events:
                if event["type"] == "publish":
                    version = await self.version(int(event["version"]))
                    if version is not None:
                        yield version

    async def flush(self) -> None:
        """Seal the open subset now instead of waiting for ``max_wait``."""
        await self._queue_send.send(("", 0))

    async def wait_idle(self) -> None:
        """Wait until everything received so far is packed, optimized, merged and
        published (flushing the open subset). For tests, batch feeds and stdin."""
        while not self._idle():
            if self._flow.flush_due():
                await self.flush()  # all fed: seal the open subset now
            await self._activity.wait()

    def _idle(self) -> bool:
        merging = (
            self._forest is None
            or bool(self._forest.in_flight())
            or self._folding
            or self._changed.is_set()
        )
        return self._flow.idle(merging=merging)

    def statistics(self) -> DaemonStatistics:
        gw = self.gateway.statistics()
        roles = sorted(set(gw.prompt_tokens) | set(gw.completion_tokens))
        forest = self._forest
        count = self._count
        return DaemonStatistics(
            trajectories=self._trajectories,
            queued=self._flow.queued,
            subsets_pending=self._flow.pending,
            subsets_done=count["subsets_done"],
            subsets_failed=count["subsets_failed"],
            optimizing=self._flow.optimizing,
            merges_in_flight=len(forest.in_flight()) if forest else 0,
            trees=len(forest.trees()) if forest else 0,
            versions_published=count["versions_published"],
            versions_rejected=count["versions_rejected"],
            latest_version=self._latest.n if self._latest else None,
            llm_in_flight=gw.in_flight,
            llm_window=gw.window if gw.window is not None else self.gateway.config.max_concurrency,
            llm_throttled=gw.throttled,
            tokens_by_role={
                r: {
                    "prompt": gw.prompt_tokens.get(r, 0),
                    "completion": gw.completion_tokens.get(r, 0),
                }
                for r in roles
            },
            cached_calls=sum(gw.cached.values()),
            events_dropped=self.events.dropped,
            saturated=self.saturated,
            publish_pending=self.publish_pending,
        )

    def _poke(self) -> None:
        self._activity.set()
        self._activity = trio.Event()

    # -- start-up ---------------------------------------------------------
    async def _resume(self) -> None:
        """Rebuild queues and forest from the store, then start the actors."""
        counts = await self.store.counts()
        self._trajectories = counts.trajectories
        self._count.update(
            subsets_done=counts.subsets_done,
            subsets_failed=counts.subsets_failed,
            versions_published=counts.versions_published,
            versions_rejected=counts.versions_rejected,
        )
        self._spent_before = await self.store.tokens_spent()
        self._latest = await self.store.latest_version()
        if self._latest is not None:
            self._published_trees = frozenset(self._latest.lineage.get("trees", ()))
        trees = await self.store.forest_trees()
        first_merge = await self.store.max_node_number("m") + 1
        self._forest, jobs = MergeForest.restore(
            trees, fan_in=self.config.run.fan_in, first_id=first_merge
        )
        pending = await self.store.pending_subsets()
        self._subset_number = await self.store.next_subset_number()
        self._log.info(
            "daemon_resumed",
            trajectories=counts.trajectories,
            unassigned=counts.unassigned,
            pending_subsets=len(pending),
            trees=len(trees),
            merges_restarted=len(jobs),
            latest_version=self._latest.n if self._latest else None,
        )
        n = self._nursery
        for _ in range(self.config.run.optimizers or self.gateway.config.max_concurrency):
            n.start_soon(self._optimizer, self._subsets_recv.clone(), self._leaves_send.clone())
        self._subsets_recv.close()
        self._leaves_send.close()
        n.start_soon(self._merger, self._leaves_recv)
        self._runner = ForestRunner(self._forest, n, self._merge, self._merged)
        self._runner.launch(jobs)
        n.start_soon(self._publisher)
        # Subsets sealed before a restart go first, then the unpacked backlog.
        subsets_send = self._subsets_send.clone()
        n.start_soon(self._feed_pending, pending, subsets_send)
        n.start_soon(self._packer, self._queue_recv, self._subsets_send)
        self._flow.resumed(counts.unassigned, len(pending))
        n.start_soon(self._feeder, self._queue_send.clone())
        if trees and {t for t, _ in trees} != self._published_trees:
            self._changed.set()

    async def _feed_pending(self, pending: Sequence[str], out: trio.MemorySendChannel[str]) -> None:
        with out:
            for subset_id in pending:
                await out.send(subset_id)

    # -- actors -----------------------------------------------------------
    async def _feeder(self, out: trio.MemorySendChannel[tuple[str, int]]) -> None:
        """Give the store's unpacked trajectories to the packer, in arrival order.

        Everything ingested goes through here, so memory holds at most one feed
        batch however far ingest runs ahead: the backlog waits in the store.
        """
        structlog.contextvars.bind_contextvars(actor="feeder")
        after = 0  # the store sequence number of the last trajectory fed
        with out:
            while True:
                self._stored = trio.Event()
                rows = await self.store.unassigned(after, FEED_BATCH)
                if not rows:
                    await self._stored.wait()
                    continue
                for seq, trajectory_id, tokens in rows:
                    await out.send((trajectory_id, tokens + PER_ITEM_SLACK))
                    after = seq
                    self._flow.fed()
                self._poke()

    async def _packer(
        self,
        inp: trio.MemoryReceiveChannel[tuple[str, int]],
        out: trio.MemorySendChannel[str],
    ) -> None:
        """Seal subsets by budget, by ``max_wait``, or on a flush (an empty id)."""
        structlog.contextvars.bind_contextvars(actor="packer")
        packer = StreamPacker(self._item_budget, self.config.max_wait)
        with inp, out:
            while True:
                deadline = packer.deadline()
                item: tuple[str, int] | None = None
                with trio.move_on_at(math.inf if deadline is None else deadline):
                    try:
                        item = await inp.receive()
                    except trio.EndOfChannel:
                        return
                now = trio.current_time()
                if item is None:
                    sealed = [s for s in [packer.due(now)] if s]
                elif not item[0]:
                    sealed = [s for s in [packer.flush()] if s]
                else:
                    sealed = packer.add(item[0], item[1], now)
                for ids in sealed:
                    await self._seal(ids, out)
                self._poke()

    async def _seal(self, ids: Sequence[str], out: trio.MemorySendChannel[str]) -> None:
        subset_id = f"s{self._subset_number:06d}"
        self._subset_number += 1
        await self.store.create_subset(subset_id, ids, time.time())
        self._flow.sealed(len(ids))
        self.events.emit("subset", subset=subset_id, trajectories=len(ids))
        await out.send(subset_id)

    async def _optimizer(
        self, inp: trio.MemoryReceiveChannel[str], out: trio.MemorySendChannel[tuple[str, int]]
    ) -> None:
        with inp, out:
            async for subset_id in inp:
                if self._stopping:
                    continue  # left pending in the store for the next start
                self._flow.started()
                node = None
                try:
                    node = await self._optimize(subset_id)
                finally:
                    self._flow.finished(leaf=node is not None)
                    self._poke()
                if node is not None:
                    await out.send((node.id, 0))

    async def _optimize(self, subset_id: str) -> MergeNode | None:
        structlog.contextvars.bind_contextvars(actor=f"optimizer/{subset_id}")
        items = await self.store.subset_items(subset_id)
        subset = Subset(id=subset_id, items=items)
        started = self._state.now()
        initial = self.config.initial
        if self.config.run.playbook:  # a no-op for items stored without their turns
            initial = with_plays(initial, (i.turns for i in items))
        while True:
            try:
                module = await optimize_subset(
                    self.gateway,
                    initial,
                    items,
                    subset_id=subset_id,
                    module_tokens=self._module_tokens,
                )
                break
            except (UnitFailedError, BudgetExhaustedError) as e:
                # Marked failed in the store (a restart tries it again); an
                # invalid reply is also tried again in this run, after a pause.
                await self.store.fail_subset(subset_id, str(e))
                self._failures[subset_id] += 1
                tries = self._failures[subset_id]
                retry_in: float | None = None
                if isinstance(e, UnitFailedError) and tries <= self.config.subset_retries:
                    retry_in = min(self.config.retry_pause * 2 ** (tries - 1), MAX_RETRY_PAUSE)
                    self._flow.retry_scheduled()  # waiting for its retry is work still to do
                    self._nursery.start_soon(self._retry_later, subset_id, retry_in)
                else:
                    self._count["subsets_failed"] += 1
                self.events.emit(
                    "optimize_failed", subset=subset_id, error=str(e)[:500], retry_in=retry_in
                )
                return None
            except LLMUnavailableError as e:
                self._log.warning(
                    "llm_unavailable",
                    unit=subset_id,
                    error=str(e),
                    retry_in=self.config.retry_pause,
                )
                await trio.sleep(self.config.retry_pause)
        node = MergeNode.leaf(
            subset_id,
            module,
            started_at=started,
            finished_at=self._state.now(),
            stats={**subset.stats(), "epochs": 1},
        )
        node = bounded(node, self.config.provenance_cap)
        await self.store.add_node(node, rank=0)
        self._count["subsets_done"] += 1
        self.events.emit("optimize", subset=subset_id, rules=len(module.rules))
        return node

    async def _retry_later(self, subset_id: str, delay: float) -> None:
        """Offer a failed subset to the optimizers again after ``delay`` seconds."""
        self._log.info("subset_retry_scheduled", subset=subset_id, retry_in=delay)
        await trio.sleep(delay)
        if self._stopping:
            self._flow.retry_dropped()
            return  # still failed in the store: the next start tries it
        await self._retry_send.send(subset_id)

    async def _merger(self, inp: trio.MemoryReceiveChannel[tuple[str, int]]) -> None:
        structlog.contextvars.bind_contextvars(actor="merger")
        assert self._runner is not None
        with inp:
            async for node_id, _rank in inp:
                self._runner.add_leaf(node_id)
                self._flow.leaf_arrived()
                self._changed.set()
                self._poke()

    async def _merge(self, job: MergeJob) -> str:
        return (await self._merge_node(job, role="forest")).id

    async def _merged(self, job: MergeJob, node_id: str) -> None:
        assert self._runner is not None
        self._runner.complete(job, node_id)
        self._changed.set()
        self._poke()

    async def _merge_node(self, job: MergeJob, *, role: str) -> MergeNode:
        """Run one merge (retrying through endpoint outages) and store its node."""
        # Bound for this call only: the publisher's own folds run in its task.
        with structlog.contextvars.bound_contextvars(actor=f"merger/{job.id}"):
            return await self._run_merge(job, role)

    async def _run_merge(self, job: MergeJob, role: str) -> MergeNode:
        children = [await self.store.node(c) for c in job.children]
        missing = [c for c, n in zip(job.children, children, strict=True) if n is None]
        if missing:
            raise RuntimeError(f"merge {job.id}: children {missing} are not in the store")
        while True:
            try:
                node = await merge_modules(
                    self.gateway,
                    job,
                    [c for c in children if c is not None],
                    module_tokens=self._module_tokens,
                    state=self._state,
                )
                break
            except LLMUnavailableError as e:
                self._log.warning(
                    "llm_unavailable", unit=job.id, error=str(e), retry_in=self.config.retry_pause
                )
                await trio.sleep(self.config.retry_pause)
        node = bounded(node, self.config.provenance_cap)
        await self.store.add_node(node, rank=job.rank, role=role)
        self.events.emit(
            "merge", node=node.id, role=role, method=node.method, rules=len(node.module.rules)
        )
        return node

    async def _publisher(self) -> None:
        """Fold the forest into a candidate when it is quiet and has changed; publish it."""
        structlog.contextvars.bind_contextvars(actor="publisher")
        assert self._forest is not None
        last = -math.inf
        while True:
            await self._changed.wait()
            await trio.sleep_until(last + self.config.publish_interval)
            self._changed = trio.Event()
            self._folding = True  # a publish is due from here until it is out
            try:
                self._poke()
                # Prefer a quiet forest; but under a steady stream some merge is
                # nearly always running, so after a while fold what is finished.
                with trio.move_on_after(max(self.config.publish_interval, 1.0)):
                    while self._forest.in_flight():
                        await self._activity.wait()
                trees = self._frontier()
                ids = tuple(t for t, _ in trees)
                if not trees or set(ids) == self._published_trees:
                    continue
                await self._fold_and_publish(trees)
                last = trio.current_time()
            finally:
                self._folding = False
                self._poke()

    def _frontier(self) -> list[tuple[str, int]]:
        """The finished trees, lowest rank first: the forest's trees and the
        children of the merges under way (finished nodes, already stored)."""
        assert self._forest is not None
        trees = self._forest.ranked_trees()
        for job in self._forest.in_flight():
            trees += [(child, job.rank - 1) for child in job.children]
        return sorted(trees, key=lambda t: t[1])

    async def _fold_and_publish(self, trees: Sequence[tuple[str, int]]) -> None:
        ids = tuple(t for t, _ in trees)
        # A chain, biggest trees first, with ids derived from the children: the
        # merges a previous fold already made are in the store, and only those
        # after the first tree that changed are run.
        root: MergeNode | None = None
        reused = 0
        for job in fold_plan(trees, self.config.run.fan_in):
            root = await self.store.node(job.id)
            if root is None:
                root = await self._merge_node(job, role="fold")
            else:
                reused += 1
        if root is None:  # a single tree
            root = await self.store.node(ids[0])
        assert root is not None
        root_id = root.id
        self._log.info("folded", trees=len(ids), merges_reused=reused, node=root_id)
        self._published_trees = frozenset(ids)
        stats = await self.store.node_stats(ids)
        lineage: dict[str, Any] = {
            "node": root_id,
            "trees": list(ids),
            "parents": [self._latest.n] if self._latest else [],
            "subsets": sum(int(s.get("subsets", 0)) for s in stats),
            "trajectories": sum(int(s.get("trajectories", 0)) for s in stats),
            "tokens": self._tokens_spent(),
            "scores": None,
        }
        latest = self._latest
        if (
            latest is not None
            and same_content(latest.module, root.module)
            and latest.lineage.get("trajectories") == lineage["trajectories"]
        ):
            # Nothing new to say (say, a fold that got the same reply as the
            # forest merge of the same children): no new version.
            self.events.emit("unchanged", node=root_id, version=latest.n)
            return
        status = "published"
        if self.config.validation is not None:
            current = self._latest.module if self._latest else self.config.initial
            try:
                before = await self._validate(current, self._latest)
                after = await self._validate(root.module, None)
            except* BudgetExhaustedError as group:
                # Not validated, so not published; kept (rejected, with the
                # reason) like every candidate, and the daemon goes on serving.
                error = str(leaf_exceptions(group)[0])
                lineage["validation_error"] = f"validation stopped: {error}"
                self._log.warning("validation_stopped", node=root_id, error=error)
            if "validation_error" in lineage:
                status = "rejected"
            else:
                lineage["scores"] = {
                    "candidate": after,
                    "current": {**before, "version": self._latest.n if self._latest else None},
                }
                if _value(after) < _value(before):
                    status = "rejected"
        version = await self.store.add_version(status, root.module, lineage, time.time())
        if status == "rejected":
            self._count["versions_rejected"] += 1
            self.events.emit(
                "reject",
                version=version.n,
                node=root_id,
                scores=lineage["scores"],
                error=lineage.get("validation_error"),
            )
            return
        self._latest = version
        self._count["versions_published"] += 1
        self.events.emit(
            "publish",
            version=version.n,
            node=root_id,
            rules=len(root.module.rules),
            trajectories=lineage["trajectories"],
        )

    def _tokens_spent(self) -> dict[str, dict[str, int]]:
        """Tokens paid for by role, ever: the store's count at start plus this
        process's (cache hits excluded)."""
        gw = self.gateway.statistics()
        out = {role: dict(counts) for role, counts in self._spent_before.items()}
        for role in set(gw.calls) | set(gw.prompt_tokens):
            counts = out.setdefault(role, {"prompt": 0, "completion": 0, "calls": 0})
            counts["prompt"] += gw.prompt_tokens.get(role, 0)
            counts["completion"] += gw.completion_tokens.get(role, 0)
            counts["calls"] += gw.calls.get(role, 0)
        return out

    async def _validate(self, module: Module, version: Version | None) -> dict[str, Any]:
        """The module's validation result: remembered, recorded in ``version``'s
        lineage (after a restart), or played now."""
        validation = self.config.validation
        assert validation is not None
        key = module.digest()
        if key not in self._values:
            recorded = version.lineage.get("scores") if version else None
            if isinstance(recorded, dict) and "candidate" in recorded:
                self._values[key] = dict(recorded["candidate"])
            else:
                summary, _ = await evaluate(
                    validation.tasks,
                    module,
                    self.agent_gateway,
                    label=key,
                    workers=validation.workers,
                    config=validation.agent,
                    executor=validation.executor,
                )
                self._values[key] = {
                    "score": round(summary.score_mean, 4),
                    "success_rate": round(summary.success_rate, 4),
                    "tasks": summary.episodes,
                }
                self.events.emit("validate", module=key, **self._values[key])
        return self._values[key]

    async def _stop(self, grace: float) -> None:
        """Stop intake; let the optimize and merge calls under way finish within
        ``grace`` seconds. What is not finished stays in the store for next time."""
        self._closed = True
        self._stopping = True
        self._queue_send.close()
        with trio.move_on_after(grace):
            while self._flow.optimizing or (self._forest is not None and self._forest.in_flight()):
                await self._activity.wait()
        self._log.info(
            "daemon_stopped",
            optimizing=self._flow.optimizing,
            merges_in_flight=len(self._forest.in_flight()) if self._forest else 0,
        )


def same_content(a: Module, b: Module) -> bool:
    """Whether two modules would steer an agent the same way: the same
    instructions, rule texts and functions (rule ids and provenance aside, as
    when a fold and a forest merge of the same children got the same reply)."""
    return (
        a.instructions == b.instructions
        and [r.text for r in a.rules] == [r.text for r in b.rules]
        and a.functions == b.functions
    )


def bounded(node: MergeNode, cap: int) -> MergeNode:
    """``node`` with at most ``cap`` of the most recent subsets and trajectories
    in each rule's provenance, and of subsets in the node itself."""
    rules = tuple(
        attrs.evolve(r, subsets=r.subsets[-cap:], trajectories=r.trajectories[-cap:])
        if len(r.subsets) > cap or len(r.trajectories) > cap
        else r
        for r in node.module.rules
    )
    return attrs.evolve(
        node, module=attrs.evolve(node.module, rules=rules), subsets=node.subsets[-cap:]
    )


def _value(result: dict[str, Any]) -> tuple[float, float]:
    """What the gate compares: mean score first, then success rate."""
    return (float(result["score"]), float(result["success_rate"]))


@asynccontextmanager
async def open_optimizer(
    config: DaemonConfig, *, grace: float = defaults.GRACE
) -> AsyncIterator[StreamingOptimizer]:
    """Run an incremental optimizer for the body of an ``async with``.

    ``await opt.submit(trajectory)`` feeds it; ``opt.latest_module()`` is the
    newest published module; ``async for v in opt.versions()`` follows
    publications. On exit, intake stops and work under way gets ``grace``
    seconds to finish; everything else resumes from the store next time.
    """
    store = Store(config.store, durable=config.durable, allow_empty=config.init)
    try:
        astore = AsyncStore(store)
        # The agent that plays validation tasks: short replies, no response
        # cache (each validation is a fresh sample).
        agent_config = attrs.evolve(config.gateway, max_completion_tokens=64)
        async with (
            LLMGateway(config.gateway, cache=StoreCache(astore)) as gateway,
            LLMGateway(agent_config) as agent_gateway,
            trio.open_nursery() as nursery,
        ):
            optimizer = StreamingOptimizer(config, astore, gateway, nursery, agent_gateway)
            await optimizer._resume()
            try:
                yield optimizer
            finally:
                with trio.CancelScope(shield=True):
                    await optimizer._stop(grace)
                nursery.cancel_scope.cancel()
    finally:
        store.close()
