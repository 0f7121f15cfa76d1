"""The Optimizer: asks the LLM for edits to the module, one subset at a time."""

from __future__ import annotations

from typing import Any

import structlog
import trio

from .._core.edits import apply_actions, revert_functions
from .._core.errors import BudgetExhaustedError, ReplyRejectedError, UnitFailedError
from .._core.model import FunctionSpec, MergeNode, Module, RenderedTrajectory, Subset
from .._core.playbook import with_plays
from .._core.prompts import accept_edits, fix_function_messages, optimize_messages
from .._llm.gateway import LLMGateway
from ..agent.fncheck import changed_functions, function_problems, static_problems
from ..agent.sandbox import SandboxLimits
from .state import RunState


async def _failing_functions(
    before: Module,
    after: Module,
    items: tuple[RenderedTrajectory, ...],
    limits: SandboxLimits | None,
) -> dict[str, list[str]]:
    """The problems of each function ``after`` adds or revises, by name: static
    ones, and only if there are none, those of a replay on ``items``."""
    failing: dict[str, list[str]] = {}
    for fn in changed_functions(before, after):
        problems = static_problems(fn)
        if not problems:
            problems = await function_problems([fn], items, limits)
        if problems:
            failing[fn.name] = problems
    return failing


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

    Every function the reply adds or revises is checked before it is kept
    (``agent.fncheck``): statically, then replayed in the sandbox (with
    ``function_limits``, by default the agent's) on the subset's recorded
    turns, if any. The reply's other edits are kept either way. A function
    that fails is not re-asked with the whole subset's prompt: it goes to
    ``fix_functions``, a short call that shows the function and its problems
    (the trajectory, turn and error) and nothing of the trajectories but the
    actions that earned score. A reply whose only edits were functions that
    could not be fixed fails the unit (UnitFailedError).
    """
    messages = optimize_messages(
        module, items, module_tokens=module_tokens, counter=gateway.counter
    )
    trajectory_ids = [i.id for i in items]

    async def check(reply: dict[str, Any]) -> tuple[Module, Module, dict[str, list[str]]]:
        result = apply_actions(
            module,
            reply["actions"],
            subset_id=subset_id,
            trajectory_ids=trajectory_ids,
            shown=messages[0]["content"],
        )
        errors = [*result.errors] if result.worth_reask else []
        if errors:
            raise ReplyRejectedError("; ".join(errors))
        failing = await _failing_functions(module, result.module, items, function_limits)
        kept = revert_functions(module, result.module, failing)
        edited = accept_edits(
            gateway.counter, kept, [], module_tokens, "merge or remove rules to make room"
        )
        if result.errors or result.notes:
            structlog.get_logger().info(
                "optimize_reply_read",
                subset=subset_id,
                applied=result.applied,
                skipped=list(result.errors),
                read_as=list(result.notes),
            )
        return edited, result.module, failing

    read: tuple[Module, Module, dict[str, list[str]]] = await gateway.structured(
        "optimize", messages, "fgo_optimize", check
    )
    edited, proposed, failing = read
    if not failing:
        return edited
    rejected = [fn for fn in proposed.functions if fn.name in failing]
    fixed = await fix_functions(
        gateway,
        edited,
        rejected,
        failing,
        items,
        subset_id=subset_id,
        module_tokens=module_tokens,
        function_limits=function_limits,
    )
    if fixed.to_json() == module.to_json():
        problems = "; ".join(p for ps in failing.values() for p in ps)
        raise UnitFailedError(f"optimize reply held only functions that failed: {problems}")
    return fixed


FUNCTION_OPS = frozenset({"add_function", "revise_function"})


async def fix_functions(
    gateway: LLMGateway,
    module: Module,
    rejected: list[FunctionSpec],
    failing: dict[str, list[str]],
    items: tuple[RenderedTrajectory, ...],
    *,
    subset_id: str,
    module_tokens: int,
    function_limits: SandboxLimits | None = None,
) -> Module:
    """``module`` with the ``rejected`` functions fixed, where the LLM can.

    One short call (``fix_function_messages``); a function its reply still
    gets wrong is re-asked once in that short conversation, then left out.
    Only the reply's add/revise actions of the rejected names are read. The
    outcome is logged (``function_fix``: fixed, and the first problems of
    those left out as ``functions_dropped``); a call that cannot be made (a
    failed unit, an exhausted budget) leaves them all out. ``module``, with
    the optimize reply's other edits, is kept whatever happens here.
    """
    names = {fn.name for fn in rejected}
    messages = fix_function_messages(rejected, failing, items, gateway.counter)
    trajectory_ids = [i.id for i in items]
    replies = 0

    async def check(reply: dict[str, Any]) -> tuple[Module, list[str]]:
        nonlocal replies
        replies += 1
        actions = [
            a
            for a in reply["actions"]
            if a.get("op") in FUNCTION_OPS
            and isinstance(a.get("function"), dict)
            and a["function"].get("name") in names
        ]
        result = apply_actions(module, actions, subset_id=subset_id, trajectory_ids=trajectory_ids)
        still = await _failing_functions(module, result.module, items, function_limits)
        if still and replies == 1:
            raise ReplyRejectedError(
                "; ".join(p for ps in still.values() for p in ps)
                + '. Fix the function, or reply with an empty "actions" list to leave it out.'
            )
        candidate = revert_functions(module, result.module, still)
        kept = accept_edits(
            gateway.counter, candidate, [], module_tokens, "write a shorter function"
        )
        left_out = names - {fn.name for fn in changed_functions(module, kept)}
        return kept, sorted(left_out)

    fixed: Module
    left_out: list[str]
    error: str | None = None
    try:
        fixed, left_out = await gateway.structured("optimize", messages, "fgo_optimize", check)
    except (UnitFailedError, BudgetExhaustedError) as e:
        fixed, left_out, error = module, sorted(names), str(e)[:300]
    structlog.get_logger().info(
        "function_fix",
        subset=subset_id,
        fixed=sorted(names - set(left_out)),
        functions_dropped=[p for name in left_out for p in failing[name]],
        error=error,
    )
    return fixed


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
