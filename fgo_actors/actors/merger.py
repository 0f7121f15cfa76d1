"""The Merger: grows the merge forest as leaves arrive and runs merges concurrently."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import structlog
import trio

from .._edits import Drop, MergeChild, MergeResult, apply_merge, merge_input, union_merge
from .._errors import BudgetExhaustedError, ReplyRejectedError, UnitFailedError
from .._fncheck import replay_problems, static_problems
from .._forest import MergeForest, MergeJob
from .._gateway import LLMGateway
from .._model import FunctionSpec, MergeNode, Module
from .._playbook import is_playbook
from .._prompts import merge_messages, render_module
from .._state import RunState


def _combined_stats(children: Sequence[MergeNode]) -> dict[str, Any]:
    keys = ("trajectories", "successes", "failures", "subsets")
    out: dict[str, Any] = {k: sum(int(c.stats.get(k, 0)) for c in children) for k in keys}
    out["groups"] = sorted({g for c in children for g in c.stats.get("groups", [])})
    return out


def _children(children: Sequence[MergeNode]) -> list[MergeChild]:
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
    inp = merge_input(_children(children), node_id=job.id)
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


async def merger(
    inp: trio.MemoryReceiveChannel[MergeNode],
    *,
    gateway: LLMGateway,
    forest: MergeForest,
    module_tokens: int,
    state: RunState,
) -> None:
    """Receive leaves, start each merge the moment its children exist, fold at the end."""
    structlog.contextvars.bind_contextvars(actor="merger")
    log = structlog.get_logger()

    async with trio.open_nursery() as nursery:

        def launch(jobs: list[MergeJob]) -> None:
            for job in jobs:
                log.info("merge_started", node=job.id, children=list(job.children))
                nursery.start_soon(run_merge, job, name=f"merge {job.id}")

        async def run_merge(job: MergeJob) -> None:
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
            launch(forest.complete(job, node.id))

        with inp:
            async for leaf in inp:
                state.add_node(leaf)
                launch(forest.add_leaf(leaf.id))
        if state.subsets_total is not None and state.subsets_done >= state.subsets_total:
            state.phase = "merging"
        launch(forest.close())
