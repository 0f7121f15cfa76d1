"""The Optimizer: asks the LLM for edits to the module, one subset at a time."""

from __future__ import annotations

from typing import Any

import structlog
import trio

from .._core.edits import apply_actions, revert_functions
from .._core.errors import BudgetExhaustedError, ReplyRejectedError, UnitFailedError
from .._core.model import MergeNode, Module, RenderedTrajectory, Subset
from .._core.playbook import with_plays
from .._core.prompts import accept_edits, optimize_messages
from .._llm.gateway import LLMGateway
from ..agent.fncheck import changed_functions, function_problems, static_problems
from ..agent.sandbox import SandboxLimits
from .state import RunState


async def optimize_subset(
    gateway: LLMGateway,
    module: Module,
    items: tuple[RenderedTrajectory, ...],
    *,
    subset_id: str,
    module_tokens: int,
    function_limits: SandboxLimits | None = None,
) -> Module:
    """One optimize call: the edited module, or UnitFailedError after bounded re-asks.

    A reply is re-asked when none of its actions could be applied
    (``EditResult.worth_reask``); otherwise its usable actions are kept and
    what was skipped or read another way is logged (``optimize_reply_read``).

    Every function the reply adds or revises is checked before the reply is
    kept (``agent.fncheck``): statically, then replayed in the sandbox (with
    ``function_limits``, by default the agent's) on the subset's recorded
    turns, if any. A failing function rejects the reply, and the re-ask names
    the function, the trajectory and turn, and the error. A re-asked reply
    whose function still fails keeps its other edits without that function
    (logged as ``functions_dropped``); one with nothing else fails the unit
    (UnitFailedError) without a further re-ask.
    """
    messages = optimize_messages(
        module, items, module_tokens=module_tokens, counter=gateway.counter
    )
    trajectory_ids = [i.id for i in items]
    replies = 0

    async def check(reply: dict[str, Any]) -> Module:
        nonlocal replies
        replies += 1
        result = apply_actions(
            module, reply["actions"], subset_id=subset_id, trajectory_ids=trajectory_ids
        )
        errors = [*result.errors] if result.worth_reask else []
        if errors:
            raise ReplyRejectedError("; ".join(errors))
        # Each changed function: statically, and only if that passes, replayed.
        failing: dict[str, list[str]] = {}
        for fn in changed_functions(module, result.module):
            problems = static_problems(fn)
            if not problems:
                problems = await function_problems([fn], items, function_limits)
            if problems:
                failing[fn.name] = problems
        candidate = result.module
        dropped: list[str] = []
        if failing:
            problems = [p for ps in failing.values() for p in ps]
            kept = revert_functions(module, result.module, failing)
            # The first reply's failing function goes back to the LLM to be
            # fixed. A re-asked reply that still carries one keeps the rest of
            # its edits (paid for, and checked) without it, rather than fail
            # the unit and lose them. With nothing else in it, the unit fails
            # (its plays kept): in the benches of 5732f6b and 35921eb, no
            # function that failed after a re-ask was fixed by another
            # (0 of 5 units, 7 calls of about 3.7k prompt tokens each).
            nothing_else = kept.to_json() == module.to_json()
            if replies == 1 or nothing_else:
                raise ReplyRejectedError(
                    "; ".join(problems) + ". Fix the function or leave it out of the actions.",
                    reask=replies == 1,
                )
            candidate, dropped = kept, problems
        edited = accept_edits(
            gateway.counter, candidate, [], module_tokens, "merge or remove rules to make room"
        )
        if result.errors or result.notes or dropped:
            structlog.get_logger().info(
                "optimize_reply_read",
                subset=subset_id,
                applied=result.applied,
                skipped=list(result.errors),
                read_as=list(result.notes),
                functions_dropped=dropped,
            )
        return edited

    return await gateway.structured("optimize", messages, "fgo_optimize", check)


async def optimize_unit(
    gateway: LLMGateway,
    module: Module,
    items: tuple[RenderedTrajectory, ...],
    *,
    subset_id: str,
    epoch: int,
    module_tokens: int,
    state: RunState,
    playbook: bool = True,
) -> Module | None:
    """One optimize unit, its outcome recorded in ``state``.

    With ``playbook``, the plays that earned score in ``items`` are first
    added to the module's playbook function (``_core.playbook``; no LLM). Callers
    ask for it once per set of items: a second epoch over the same items
    would count their plays twice.
    Returns the edited module, or, when the unit failed cleanly (bad replies
    after re-asks, a refused request, or an exhausted budget, which also sets
    ``state.budget_exhausted``), the module with only the plays added, or None
    if there were none. Only LLMUnavailableError escapes.
    """
    unit = f"{subset_id}/epoch{epoch + 1}"
    given = module
    if playbook:
        module = with_plays(module, (i.turns for i in items))
    try:
        edited = await optimize_subset(
            gateway, module, items, subset_id=subset_id, module_tokens=module_tokens
        )
    except UnitFailedError as e:
        state.fail(unit, "optimize", e)
        return module if module is not given else None
    except BudgetExhaustedError as e:
        state.budget_exhausted = True
        state.fail(unit, "budget", e)
        return module if module is not given else None
    state.successful_units += 1
    return edited


async def optimizer(
    name: str,
    inp: trio.MemoryReceiveChannel[Subset],
    out: trio.MemorySendChannel[tuple[str, MergeNode | None]],
    *,
    gateway: LLMGateway,
    initial: Module,
    epochs: int,
    module_tokens: int,
    state: RunState,
    playbook: bool = True,
) -> None:
    """Optimize each subset received for ``epochs`` passes; send the result as a
    leaf (None when nothing came of it: the merger leaves its place empty)."""
    structlog.contextvars.bind_contextvars(actor=name)
    log = structlog.get_logger()
    with inp, out:
        async for subset in inp:
            state.subset_items[subset.id] = subset.items
            started = state.now()
            module = initial
            done_epochs = 0
            for epoch in range(epochs):
                edited = await optimize_unit(
                    gateway,
                    module,
                    subset.items,
                    subset_id=subset.id,
                    epoch=epoch,
                    module_tokens=module_tokens,
                    state=state,
                    playbook=playbook and epoch == 0,
                )
                if edited is None:
                    break
                module = edited
                done_epochs += 1
            state.subsets_done += 1
            if done_epochs == 0:
                state.subsets_skipped += 1
                log.warning("subset_not_optimized", subset=subset.id)
                await out.send((subset.id, None))
                continue
            node = MergeNode.leaf(
                subset.id,
                module,
                started_at=started,
                finished_at=state.now(),
                stats={**subset.stats(), "epochs": done_epochs},
            )
            log.info("subset_optimized", subset=subset.id, rules=len(module.rules))
            await out.send((subset.id, node))
