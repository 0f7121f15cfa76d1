"""The Optimizer: asks the LLM for edits to the module, one subset at a time."""

from __future__ import annotations

from typing import Any

import structlog
import trio

from .._edits import apply_actions
from .._errors import BudgetExhaustedError, ReplyRejectedError, UnitFailedError
from .._gateway import LLMGateway
from .._model import MergeNode, Module, RenderedTrajectory, Subset
from .._prompts import optimize_messages, render_module
from .._state import RunState


async def optimize_subset(
    gateway: LLMGateway,
    module: Module,
    items: tuple[RenderedTrajectory, ...],
    *,
    subset_id: str,
    module_tokens: int,
) -> Module:
    """One optimize call: the edited module, or UnitFailedError after bounded re-asks."""
    messages = optimize_messages(module, items, module_tokens=module_tokens)
    trajectory_ids = [i.id for i in items]

    def check(reply: dict[str, Any]) -> Module:
        result = apply_actions(
            module, reply["actions"], subset_id=subset_id, trajectory_ids=trajectory_ids
        )
        if result.errors:
            raise ReplyRejectedError("; ".join(result.errors))
        size = gateway.counter.count(render_module(result.module))
        if size > module_tokens:
            raise ReplyRejectedError(
                f"the edited module would be {size} tokens, above the limit of {module_tokens}; "
                "merge or remove rules to make room"
            )
        return result.module

    return await gateway.structured("optimize", messages, "fgo_optimize", check)


async def optimizer(
    name: str,
    inp: trio.MemoryReceiveChannel[Subset],
    out: trio.MemorySendChannel[MergeNode],
    *,
    gateway: LLMGateway,
    initial: Module,
    epochs: int,
    module_tokens: int,
    state: RunState,
) -> None:
    """Optimize each subset received for ``epochs`` passes; send the result as a leaf."""
    structlog.contextvars.bind_contextvars(actor=name)
    log = structlog.get_logger()
    with inp, out:
        async for subset in inp:
            started = state.now()
            module = initial
            done_epochs = 0
            for epoch in range(epochs):
                try:
                    module = await optimize_subset(
                        gateway,
                        module,
                        subset.items,
                        subset_id=subset.id,
                        module_tokens=module_tokens,
                    )
                except UnitFailedError as e:
                    state.fail(f"{subset.id}/epoch{epoch + 1}", "optimize", e)
                    break
                except BudgetExhaustedError as e:
                    state.budget_exhausted = True
                    state.fail(f"{subset.id}/epoch{epoch + 1}", "budget", e)
                    break
                done_epochs += 1
                state.successful_units += 1
            state.subsets_done += 1
            if done_epochs == 0:
                state.subsets_skipped += 1
                log.warning("subset_not_optimized", subset=subset.id)
                continue
            node = MergeNode(
                id=subset.id,
                kind="leaf",
                module=module,
                children=(),
                subsets=(subset.id,),
                started_at=started,
                finished_at=state.now(),
                method="llm",
                stats={**subset.stats(), "subsets": 1, "epochs": done_epochs},
            )
            log.info("subset_optimized", subset=subset.id, rules=len(module.rules))
            await out.send(node)
