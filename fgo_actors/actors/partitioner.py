"""The Partitioner: renders and measures each trajectory once, then packs subsets."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import structlog
import trio

from .._core.model import RenderedTrajectory, Subset, Trajectory
from .._core.partition import order_for_packing, pack
from .._core.prompts import PER_ITEM_SLACK, render_trajectory
from .._core.tokens import TokenCounter
from .state import RunState

# Trajectories rendered per worker-thread call: big enough to amortise the
# thread hop, small enough to keep cancellation and progress responsive.
CHUNK = 256


def _render_chunk(
    chunk: Sequence[Trajectory], counter: TokenCounter, max_tokens: int, group_key: str
) -> list[RenderedTrajectory]:
    return [render_trajectory(t, counter, max_tokens, group_key=group_key) for t in chunk]


def make_subsets(
    rendered: Sequence[RenderedTrajectory], item_budget: int, seed: int
) -> list[Subset]:
    """Order rendered trajectories (group, then stratify outcomes) and pack them."""
    ordered = order_for_packing(rendered, seed)
    sizes = [r.tokens + PER_ITEM_SLACK for r in ordered]
    runs = pack(sizes, item_budget)
    width = max(3, len(str(len(runs))))
    return [
        Subset(id=f"s{i:0{width}d}", items=tuple(ordered[j] for j in run))
        for i, run in enumerate(runs, start=1)
    ]


def partition_digest(subsets: Sequence[Subset]) -> str:
    """Names the partition: the subsets' ids and the trajectories in each."""
    text = "\n".join(f"{s.id}:" + ",".join(i.id for i in s.items) for s in subsets)
    return hashlib.sha256(text.encode()).hexdigest()


async def render_all(
    trajectories: Sequence[Trajectory],
    counter: TokenCounter,
    max_tokens: int,
    group_key: str,
) -> list[RenderedTrajectory]:
    """Render and measure every trajectory in worker threads (tiktoken releases the GIL)."""
    out: list[RenderedTrajectory] = []
    for start in range(0, len(trajectories), CHUNK):
        chunk = trajectories[start : start + CHUNK]
        out.extend(
            await trio.to_thread.run_sync(
                _render_chunk, chunk, counter, max_tokens, group_key, abandon_on_cancel=True
            )
        )
    return out


async def partitioner(
    trajectories: Sequence[Trajectory],
    out: trio.MemorySendChannel[Subset],
    *,
    counter: TokenCounter,
    item_budget: int,
    seed: int,
    group_key: str,
    state: RunState,
) -> None:
    structlog.contextvars.bind_contextvars(actor="partitioner")
    log = structlog.get_logger()
    with out:
        state.phase = "partitioning"
        # One item may take the whole budget, less its separator slack.
        rendered = await render_all(trajectories, counter, item_budget - PER_ITEM_SLACK, group_key)
        subsets = make_subsets(rendered, item_budget, seed)
        state.truncated = sum(1 for r in rendered if r.truncated)
        state.subsets_total = len(subsets)
        state.partition_digest = partition_digest(subsets)
        log.info(
            "partitioned",
            trajectories=len(rendered),
            subsets=len(subsets),
            truncated=state.truncated,
            item_budget=item_budget,
        )
        state.phase = "optimizing"
        for subset in subsets:
            try:
                await out.send(subset)
            except trio.BrokenResourceError:
                # Every optimizer has stopped (the endpoint failed them): their
                # error says why, and the subsets not sent stay unoptimized.
                return
