"""The Merger: grows the merge forest as leaves arrive and runs merges concurrently."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import structlog
import trio

from .._core.edits import Drop, MergeChild, MergeResult, apply_merge, merge_input, union_merge
from .._core.errors import BudgetExhaustedError, ReplyRejectedError, UnitFailedError
from .._core.forest import MergeForest, MergeJob, Sequencer
from .._core.model import FunctionSpec, MergeNode, Module
from .._core.playbook import is_playbook
from .._core.prompts import merge_messages, render_module
from .._llm.gateway import LLMGateway
from .._storage.diskcache import Journal
from ..agent.fncheck import replay_problems, static_problems
from .state import RunState


def _combined_stats(children: Sequence[MergeNode]) -> dict[str, Any]:
    keys = ("trajectories", "successes", "failures", "subsets")
    out: dict[str, Any] = {k: sum(int(c.stats.get(k, 0)) for c in children) for k in keys}
    out["groups"] = sorted({g for c in children for g in c.stats.get("groups", [])})
    return out


def merge_children(children: Sequence[MergeNode]) -> list[MergeChild]:
    """The children in id order: the order they finished in varies from run to
    run, and the merge prompt (a cache key) must not."""
    return [
        MergeChild(c.id, c.module, int(c.stats.get("successes", 0)))
        for c in sorted(children, key=lambda c: c.id)
    ]


async def _judge_functions_held_out(
    result: MergeResult, children: Sequence[MergeNode], state: RunState
) -> MergeResult:
    """Replay each merged function on the recorded turns of the subsets it was
    not written from (the children that lack it), as far as the run kept them;
    one that fails there is cut, on record. Not covering new cases is no fault:
    only failures and unusable return values count here."""
    keep: list[FunctionSpec] = []
    cut: list[Drop] = []
    for fn in result.module.functions:
        items = [
            item
            for c in children
            if c.module.function(fn.name) is None
            for s in c.subsets
            for item in state.subset_items.get(s, ())
        ]
        problems = await replay_problems(fn, items, require_match=False) if items else []
        if problems:
            reason = f"fails on turns of subsets it was not written from: {problems[0]}"
            cut.append(Drop(fn.name, (), reason))
        else:
            keep.append(fn)
    if not cut:
        return result
    return attrs.evolve(
        result,
        module=attrs.evolve(result.module, functions=tuple(keep)),
        dropped_functions=(*result.dropped_functions, *cut),
    )


async def merge_modules(
    gateway: LLMGateway,
    job: MergeJob,
    children: Sequence[MergeNode],
    *,
    module_tokens: int,
    state: RunState,
) -> MergeNode:
    """Merge ``children``: the LLM decides over their rule ids, code applies the
    decisions and the module cap. If the call fails, every candidate is kept
    and the cap cut by evidence (``union_merge``); nothing is lost unrecorded."""
    started = state.now()
    log = structlog.get_logger()
    inp = merge_input(merge_children(children), node_id=job.id)
    successes = {c.id: int(c.stats.get("successes", 0)) for c in children}

    def size(module: Module) -> int:
        return gateway.counter.count(render_module(module))

    def apply(reply: dict[str, Any]) -> MergeResult:
        return apply_merge(
            inp, reply, node_id=job.id, size=size, cap=module_tokens, successes=successes
        )

    def check(reply: dict[str, Any]) -> MergeResult:
        result = apply(reply)
        conflicted = {c.name for c in inp.conflicts}
        problems = [
            p for f in result.module.functions if f.name in conflicted for p in static_problems(f)
        ]
        if result.errors or problems:
            raise ReplyRejectedError("; ".join([*result.errors, *problems]))
        return result

    method: Any = "llm"
    editable = [f for f in inp.functions if not is_playbook(f)]
    decide = len(inp.rules) > 1 or editable or inp.conflicts or len(inp.instructions) > 1
    if not decide:
        result = union_merge(inp, node_id=job.id, size=size, cap=module_tokens, successes=successes)
        method = "union"
    else:
        messages = merge_messages(
            inp,
            [(c.id, c.stats) for c in sorted(children, key=lambda c: c.id)],
            module_tokens=module_tokens,
            module_size=size(union_merge(inp, node_id=job.id, size=size, cap=10**9).module),
        )
        try:
            result = await gateway.structured("merge", messages, "fgo_merge", check)
        except (UnitFailedError, BudgetExhaustedError) as e:
            kind = "budget" if isinstance(e, BudgetExhaustedError) else "merge"
            if kind == "budget":
                state.budget_exhausted = True
            state.fail(job.id, kind, f"{e}; fell back to a union merge")
            result = union_merge(
                inp, node_id=job.id, size=size, cap=module_tokens, successes=successes
            )
            method = "union"
    result = await _judge_functions_held_out(result, children, state)
    if result.dropped or result.dropped_functions:
        log.info(
            "merge_dropped",
            node=job.id,
            rules=[d.to_json() for d in result.dropped],
            functions=[d.to_json() for d in result.dropped_functions],
        )
    inferred = [r.id for r in result.module.rules if r.lineage_inferred]
    return MergeNode(
        id=job.id,
        kind="merge",
        module=result.module,
        children=job.children,
        subsets=tuple(s for c in children for s in c.subsets),
        started_at=started,
        finished_at=state.now(),
        method=method,
        stats={
            **_combined_stats(children),
            "dropped_rules": [d.to_json() for d in result.dropped],
            "dropped_functions": [d.to_json() for d in result.dropped_functions],
            "lineage_inferred": inferred,
            "notes": list(result.notes),
        },
    )


@attrs.define
class ForestRunner:
    """Runs the merges a :class:`MergeForest` schedules, each as a task in
    ``nursery`` from the moment the forest schedules it: the one forest
    driver of batch runs, online runs and the daemon.

    ``merge(job)`` runs one merge and returns the id of the node it made.
    Then ``done(job, node_id)`` is awaited; by default it tells the forest
    (:meth:`complete`), which may schedule the next merges. A caller that
    must record or order the events first passes its own ``done`` and calls
    :meth:`complete` from it.
    """

    forest: MergeForest
    nursery: trio.Nursery
    merge: Callable[[MergeJob], Awaitable[str]]
    done: Callable[[MergeJob, str], Awaitable[None]] | None = None
    running: int = attrs.field(default=0, init=False)  # merges started, not yet finished

    def add_leaf(self, node_id: str) -> None:
        self.launch(self.forest.add_leaf(node_id))

    def complete(self, job: MergeJob, node_id: str) -> None:
        self.launch(self.forest.complete(job, node_id))

    def close(self) -> None:
        self.launch(self.forest.close())

    def launch(self, jobs: Sequence[MergeJob]) -> None:
        for job in jobs:
            self.running += 1
            self.nursery.start_soon(self._run, job, name=f"merge {job.id}")

    async def _run(self, job: MergeJob) -> None:
        node_id = await self.merge(job)
        self.running -= 1
        if self.done is None:
            self.complete(job, node_id)
        else:
            await self.done(job, node_id)


async def merger(
    inp: trio.MemoryReceiveChannel[tuple[str, MergeNode | None]],
    *,
    gateway: LLMGateway,
    forest: MergeForest,
    module_tokens: int,
    state: RunState,
    resume_dir: Path | None = None,
) -> None:
    """Receive each subset's leaf (None: nothing optimized), start each merge
    the moment its children exist, fold at the end.

    With ``resume_dir``, the forest's events (a leaf in, a merge done, input
    closed) are recorded there, one journal per partition of the data, as
    they are applied; a rerun on the same partition applies them in the
    recorded order first (:class:`Sequencer`), so it schedules the same
    merges as the run that recorded them, and a response cache answers them
    all, however differently the rerun's calls are timed.
    """
    structlog.contextvars.bind_contextvars(actor="merger")
    log = structlog.get_logger()
    journal: Journal | None = None
    recorded: list[str] = []
    sequencer = Sequencer()
    applied = 0
    jobs: dict[str, MergeJob] = {}
    closed = False
    lock = trio.Lock()

    def open_journal() -> None:
        # At the first event: by then the partitioner has made the subsets.
        nonlocal journal, recorded, sequencer
        assert resume_dir is not None
        assert state.partition_digest is not None
        key = f"{state.partition_digest}\n{forest.fan_in}\n{forest.eager}"
        name = hashlib.sha256(key.encode()).hexdigest()[:16]
        journal = Journal(resume_dir / f"merges-{name}.jsonl")
        recorded = [str(row["event"]) for row in journal.read()]
        sequencer = Sequencer(recorded)
        if recorded:
            log.info("merge_order_replayed", events=len(recorded), journal=str(journal.path))

    async with trio.open_nursery() as nursery:

        async def run_merge(job: MergeJob) -> str:
            log.info("merge_started", node=job.id, children=list(job.children))
            jobs[job.id] = job
            structlog.contextvars.bind_contextvars(actor=f"merger/{job.id}")
            children = [state.nodes[c] for c in job.children]
            node = await merge_modules(
                gateway, job, children, module_tokens=module_tokens, state=state
            )
            state.add_node(node)
            state.merges_done += 1
            log.info(
                "merge_finished", node=node.id, method=node.method, rules=len(node.module.rules)
            )
            return node.id

        async def merged(job: MergeJob, node_id: str) -> None:
            await happened(f"merge:{job.id}")

        runner = ForestRunner(forest, nursery, run_merge, merged)

        async def happened(event: str) -> None:
            nonlocal applied
            async with lock:  # events are recorded and applied one at a time, in order
                if resume_dir is not None and journal is None:
                    await trio.to_thread.run_sync(open_journal)
                ready = sequencer.arrive(event)
                while ready:
                    for event in ready:
                        applied += 1
                        if journal is not None and applied > len(recorded):
                            # Written before it is applied: a kill between the two
                            # leaves no scheduled merge out of the record.
                            await journal.append_async({"event": event})
                        apply(event)
                    ready = []
                    if closed and runner.running == 0 and sequencer.replaying:
                        # Nothing left could bring the next recorded event (the
                        # data or the replies changed): go on in arrival order.
                        log.warning("merge_order_abandoned", waiting=len(sequencer.held))
                        ready = sequencer.abandon()

        def apply(event: str) -> None:
            kind, _, name = event.partition(":")
            if kind == "leaf":
                runner.add_leaf(name)
            elif kind == "merge":
                runner.complete(jobs[name], name)
            elif kind == "close":
                if state.subsets_total is not None and state.subsets_done >= state.subsets_total:
                    state.phase = "merging"
                runner.close()

        with inp:
            async for subset_id, leaf in inp:
                if leaf is None:
                    await happened(f"skip:{subset_id}")
                else:
                    state.add_node(leaf)
                    await happened(f"leaf:{leaf.id}")
        closed = True
        await happened("close")
