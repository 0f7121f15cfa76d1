"""The Merger: grows the merge forest as leaves arrive and runs merges concurrently."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import structlog
import trio

from .._edits import apply_merge, union_merge
from .._errors import BudgetExhaustedError, UnitFailedError
from .._forest import MergeForest, MergeJob
from .._gateway import LLMGateway
from .._model import MergeNode, Module
from .._prompts import accept_edits, merge_messages
from .._state import RunState


def _combined_stats(children: Sequence[MergeNode]) -> dict[str, Any]:
    keys = ("trajectories", "successes", "failures", "subsets")
    out: dict[str, Any] = {k: sum(int(c.stats.get(k, 0)) for c in children) for k in keys}
    out["groups"] = sorted({g for c in children for g in c.stats.get("groups", [])})
    return out


async def merge_modules(
    gateway: LLMGateway,
    job: MergeJob,
    children: Sequence[MergeNode],
    *,
    module_tokens: int,
    state: RunState,
) -> MergeNode:
    """Merge ``children`` with the LLM; fall back to a lossless union merge if that fails."""
    started = state.now()
    log = structlog.get_logger()
    messages = merge_messages(
        [(c.id, c.module, c.stats) for c in children], module_tokens=module_tokens
    )
    child_modules = [c.module for c in children]
    dropped: tuple[str, ...] = ()

    def check(reply: dict[str, Any]) -> Module:
        nonlocal dropped
        result = apply_merge(child_modules, reply, node_id=job.id)
        module = accept_edits(
            gateway.counter,
            result.module,
            result.errors,
            module_tokens,
            "deduplicate and generalise rules to make it shorter",
        )
        dropped = result.dropped_rules
        return module

    method: Any = "llm"
    try:
        module = await gateway.structured("merge", messages, "fgo_merge", check)
    except (UnitFailedError, BudgetExhaustedError) as e:
        kind = "budget" if isinstance(e, BudgetExhaustedError) else "merge"
        if kind == "budget":
            state.budget_exhausted = True
        state.fail(job.id, kind, f"{e}; fell back to a union merge")
        module = union_merge(child_modules, node_id=job.id)
        method = "union"
    if dropped:
        log.info("merge_dropped_rules", node=job.id, dropped=list(dropped))
    return MergeNode(
        id=job.id,
        kind="merge",
        module=module,
        children=job.children,
        subsets=tuple(s for c in children for s in c.subsets),
        started_at=started,
        finished_at=state.now(),
        method=method,
        stats={**_combined_stats(children), "dropped_rules": list(dropped)},
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
