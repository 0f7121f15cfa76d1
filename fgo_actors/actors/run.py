"""One optimization run: wires the actors together and assembles the report.

``run()`` is the engine behind ``fgo optimize`` and the library API. The FGO
strategy starts one Partitioner, a pool of Optimizers and one Merger in a
nursery, joined by bounded memory channels; the baselines reuse the same
rendering, prompts, gateway and schemas.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from pathlib import Path

import attrs
import structlog
import trio

from .._core.edits import merge_input, union_merge
from .._core.errors import LLMUnavailableError, leaf_exceptions
from .._core.forest import MergeForest
from .._core.model import MergeNode, Module, RunReport, Status, Subset, Trajectory
from .._core.partition import item_budget
from .._core.prompts import PER_ITEM_SLACK, merge_messages, optimize_overhead_tokens, render_module
from .._llm.gateway import GatewayStatistics, LLMGateway
from . import make_subsets, merger, optimize_unit, optimizer, partitioner
from .merger import merge_children
from .partitioner import render_all
from .state import RunConfig, RunState


@attrs.frozen
class RunResult:
    """The optimized module (None when nothing could be produced) and the report."""

    module: Module | None
    report: RunReport


class RunFailedError(LLMUnavailableError):
    """The run stopped on an LLM failure; ``result`` holds the report so far."""

    def __init__(self, message: str, result: RunResult) -> None:
        super().__init__(message)
        self.result = result


async def run(
    trajectories: Sequence[Trajectory],
    gateway: LLMGateway,
    config: RunConfig | None = None,
    *,
    initial: Module | None = None,
    state: RunState | None = None,
    resume_dir: Path | None = None,
) -> RunResult:
    """Optimize ``initial`` (default: an empty module) from ``trajectories``.

    With ``resume_dir`` (FGO), the order the merge forest's events happened
    in is recorded there, so that a rerun on the same data schedules the
    same merges: with the gateway's response cache, a rerun after a crash
    pays only for the calls the first run had not been answered.

    Returns the result with status ``ok`` or ``budget_exhausted`` (a partial
    result). Raises RunFailedError (an LLMUnavailableError) when the endpoint
    cannot be used, with the report so far attached.
    """
    if not trajectories:
        raise ValueError("no trajectories to optimize from")
    config = config or RunConfig()
    state = state or RunState()
    state.started_at = trio.current_time()
    initial = initial or Module()
    baseline = gateway.statistics()
    log = structlog.get_logger()
    log.info(
        "run_started",
        strategy=config.strategy,
        trajectories=len(trajectories),
        **{k: v for k, v in config.to_json().items() if k != "strategy"},
    )
    module: Module | None = None
    root: str | None = None
    error: LLMUnavailableError | None = None
    try:
        if config.strategy == "fgo":
            module, root = await _run_fgo(trajectories, gateway, config, initial, state, resume_dir)
        elif config.strategy == "batch":
            module = await _run_batch(trajectories, gateway, config, initial, state)
        else:
            module = await _run_all_at_once(trajectories, gateway, config, initial, state)
    except* LLMUnavailableError as group:
        error = leaf_exceptions(group)[0]
        module = partial_module(state, gateway, _module_cap(gateway, config, initial))
    if module is not None and initial.metadata:
        module = attrs.evolve(module, metadata=dict(initial.metadata))
    state.phase = "done"
    report = _report(
        config, gateway, baseline, state, len(trajectories), root, error, partial=module is not None
    )
    result = RunResult(module=module, report=report)
    log.info(
        "run_finished",
        status=report.status,
        seconds=round(report.wall_seconds, 3),
        prompt_tokens=report.prompt_tokens,
        completion_tokens=report.completion_tokens,
    )
    if error is not None:
        raise RunFailedError(str(error), result) from error
    if state.successful_units == 0 and not state.budget_exhausted:
        # Every optimize unit failed: there is no optimized module to speak of.
        failed = attrs.evolve(report, status="failed", error="every optimize call failed")
        raise RunFailedError(
            "every optimize call failed; see the report's failures",
            RunResult(module=None, report=failed),
        )
    return result


def partial_module(state: RunState, gateway: LLMGateway, cap: int) -> Module | None:
    """What a run stopped by the endpoint has done, as one module within ``cap``:
    FGO's finished trees (the nodes no merge has taken in yet) joined by a
    union merge, which keeps every rule and function and cuts to the cap by
    evidence, or the baselines' module so far. None if nothing was done."""
    if not state.nodes:
        return state.current
    taken = {c for node in state.nodes.values() for c in node.children}
    tops = [n for n in state.nodes.values() if n.id not in taken]
    if len(tops) == 1:
        return tops[0].module

    def size(module: Module) -> int:
        return gateway.counter.count(render_module(module))

    return union_merge(
        merge_input(merge_children(tops), node_id="partial"),
        node_id="partial",
        size=size,
        cap=cap,
        successes={n.id: int(n.stats.get("successes", 0)) for n in tops},
    ).module


def _module_cap(gateway: LLMGateway, config: RunConfig, initial: Module) -> int:
    """The module size cap: the configured one, or the initial module's size if larger."""
    return max(config.module_budget, gateway.counter.count(render_module(initial)))


def prompt_budgets(
    gateway: LLMGateway, config: RunConfig, initial: Module, *, streaming: bool = False
) -> tuple[int, int]:
    """(module token cap, token room for trajectories in one optimize prompt).

    Also checks that an optimize prompt and a merge prompt, each with its reply,
    fit the context: a prompt the server cannot take would fail at run time.
    ``streaming`` (the daemon) always sets aside the module cap: its
    trajectories are measured and its subsets sealed against this room, and
    kept in the store, so the room must not shrink when a restart brings a
    larger initial module.
    """
    counter = gateway.counter
    module_tokens = _module_cap(gateway, config, initial)
    completion = gateway.config.max_completion_tokens
    if config.subset_budget + completion > config.context_tokens:
        raise ValueError(
            f"subset_tokens ({config.subset_budget}) plus max_completion_tokens "
            f"({completion}) exceed context_tokens ({config.context_tokens})"
        )
    if config.strategy == "fgo":
        empty = merge_messages(
            merge_input([], node_id="m"), [], module_tokens=module_tokens, module_size=0
        )
        merge_prompt = counter.count_messages(empty) + config.fan_in * (module_tokens + 64)
        if merge_prompt + completion > config.context_tokens:
            raise ValueError(
                f"a merge of {config.fan_in} modules of up to {module_tokens} tokens "
                f"(about {merge_prompt} prompt tokens) plus max_completion_tokens "
                f"({completion}) exceeds context_tokens ({config.context_tokens}); "
                "lower module_tokens or fan_in"
            )
    shown = module_tokens if streaming else _shown_module_tokens(gateway, config, initial)
    overhead = optimize_overhead_tokens(counter, shown)
    return module_tokens, item_budget(config.subset_budget, overhead)


def _shown_module_tokens(gateway: LLMGateway, config: RunConfig, initial: Module) -> int:
    """Room to keep for the module an optimize prompt shows.

    With one epoch, every FGO leaf and the all-at-once prompt start from the
    initial module, so that is all their prompts show: what an edit adds is in
    the reply, not the prompt. Batch, and any later epoch, show a module that
    may have grown to its cap.
    """
    cap = _module_cap(gateway, config, initial)
    if config.epochs == 1 and config.strategy != "batch":
        return gateway.counter.count(render_module(initial))
    return cap


async def _run_fgo(
    trajectories: Sequence[Trajectory],
    gateway: LLMGateway,
    config: RunConfig,
    initial: Module,
    state: RunState,
    resume_dir: Path | None,
) -> tuple[Module, str | None]:
    module_tokens, budget = prompt_budgets(gateway, config, initial)
    forest = MergeForest(config.fan_in, eager=config.eager_merge)
    state.fan_in = config.fan_in
    workers = config.optimizers or gateway.config.max_concurrency
    subsets_send, subsets_recv = trio.open_memory_channel[Subset](0)
    leaves_send, leaves_recv = trio.open_memory_channel[tuple[str, MergeNode | None]](workers)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            functools.partial(
                partitioner,
                trajectories,
                subsets_send,
                counter=gateway.counter,
                item_budget=budget,
                seed=config.seed,
                group_key=config.group_key,
                state=state,
            ),
            name="partitioner",
        )
        with subsets_recv, leaves_send:
            for i in range(workers):
                worker = functools.partial(
                    optimizer,
                    f"optimizer-{i + 1}",
                    subsets_recv.clone(),
                    leaves_send.clone(),
                    gateway=gateway,
                    initial=initial,
                    epochs=config.epochs,
                    module_tokens=module_tokens,
                    state=state,
                    playbook=config.playbook,
                )
                nursery.start_soon(worker, name=f"optimizer-{i + 1}")
        nursery.start_soon(
            functools.partial(
                merger,
                leaves_recv,
                gateway=gateway,
                forest=forest,
                module_tokens=module_tokens,
                state=state,
                resume_dir=resume_dir,
            ),
            name="merger",
        )
    root = forest.root()
    if root is None:
        return initial, None
    return state.nodes[root].module, root


async def _run_batch(
    trajectories: Sequence[Trajectory],
    gateway: LLMGateway,
    config: RunConfig,
    initial: Module,
    state: RunState,
) -> Module:
    """Baseline: sequential minibatches of subset size update one module; no merging."""
    module_tokens, budget = prompt_budgets(gateway, config, initial)
    state.phase = "partitioning"
    rendered = await render_all(
        trajectories, gateway.counter, budget - PER_ITEM_SLACK, config.group_key
    )
    subsets = make_subsets(rendered, budget, config.seed)
    state.truncated = sum(1 for r in rendered if r.truncated)
    state.subsets_total = len(subsets)
    state.merges_expected = 0
    state.phase = "optimizing"
    module = initial
    for epoch in range(config.epochs):
        for subset in subsets:
            edited = await optimize_unit(
                gateway,
                module,
                subset.items,
                subset_id=subset.id,
                epoch=epoch,
                module_tokens=module_tokens,
                state=state,
                playbook=config.playbook and epoch == 0,
            )
            if edited is not None:
                module = state.current = edited
            if state.budget_exhausted:
                return module
            if epoch == config.epochs - 1:
                state.subsets_done += 1
    return module


async def _run_all_at_once(
    trajectories: Sequence[Trajectory],
    gateway: LLMGateway,
    config: RunConfig,
    initial: Module,
    state: RunState,
) -> Module:
    """Baseline: one prompt per epoch with every trajectory that fits the context."""
    module_tokens = _module_cap(gateway, config, initial)
    overhead = optimize_overhead_tokens(
        gateway.counter, _shown_module_tokens(gateway, config, initial)
    )
    room = item_budget(
        config.context_tokens - gateway.config.max_completion_tokens,
        overhead,
        what=(
            f"context_tokens ({config.context_tokens}) minus max_completion_tokens "
            f"({gateway.config.max_completion_tokens})"
        ),
        fix="raise context_tokens or lower max_completion_tokens/module_tokens",
    )
    state.phase = "partitioning"
    rendered = await render_all(
        trajectories, gateway.counter, room - PER_ITEM_SLACK, config.group_key
    )
    order = list(rendered)
    random.Random(config.seed).shuffle(order)
    chosen = []
    used = 0
    for r in order:
        if used + r.tokens + PER_ITEM_SLACK <= room:
            chosen.append(r)
            used += r.tokens + PER_ITEM_SLACK
    state.truncated = sum(1 for r in chosen if r.truncated)
    state.cut = len(rendered) - len(chosen)
    state.subsets_total = 1
    state.merges_expected = 0
    state.phase = "optimizing"
    if state.cut:
        structlog.get_logger().warning(
            "trajectories_cut", cut=state.cut, kept=len(chosen), room_tokens=room
        )
    module = initial
    for epoch in range(config.epochs):
        edited = await optimize_unit(
            gateway,
            module,
            tuple(chosen),
            subset_id="all",
            epoch=epoch,
            module_tokens=module_tokens,
            state=state,
            playbook=config.playbook and epoch == 0,
        )
        if edited is not None:
            module = state.current = edited
        if state.budget_exhausted:
            break
    state.subsets_done = 1
    return module


def _report(
    config: RunConfig,
    gateway: LLMGateway,
    baseline: GatewayStatistics,
    state: RunState,
    n_trajectories: int,
    root: str | None,
    error: LLMUnavailableError | None,
    *,
    partial: bool = False,
) -> RunReport:
    stats = gateway.statistics().since(baseline)
    roles = sorted(set(stats.prompt_tokens) | set(stats.completion_tokens))
    status: Status
    if error is not None:
        status = "partial" if partial else "failed"
    else:
        status = "budget_exhausted" if state.budget_exhausted else "ok"
    return RunReport(
        status=status,
        error=str(error) if error is not None else None,
        strategy=config.strategy,
        trajectories=n_trajectories,
        subsets=state.subsets_total or 0,
        epochs=config.epochs,
        fan_in=config.fan_in,
        llm_calls={
            "optimize": stats.calls.get("optimize", 0),
            "merge": stats.calls.get("merge", 0),
            "retries": stats.retries,
            "reasks": stats.reasks,
            # Cut off at the reply cap; their whole actions were kept, not re-asked.
            "salvaged": stats.salvaged,
            # Answered from the response cache, paid for by an earlier run.
            "replayed": sum(stats.cached.values()),
            # Sent again after a 429/503 of our own making (the window shrank).
            "throttled": stats.throttled,
        },
        prompt_tokens=sum(stats.prompt_tokens.values()),
        completion_tokens=sum(stats.completion_tokens.values()),
        tokens_by_role={
            r: {
                "prompt": stats.prompt_tokens.get(r, 0),
                "completion": stats.completion_tokens.get(r, 0),
            }
            for r in roles
        },
        token_budget=stats.token_budget,
        truncated_trajectories=state.truncated,
        cut_trajectories=state.cut,
        wall_seconds=state.now(),
        max_in_flight=stats.max_in_flight,
        merge_tree=tuple(sorted(state.nodes.values(), key=lambda n: n.started_at)),
        root=root,
        failures=tuple(state.failures),
        config={
            **config.to_json(),
            "model": gateway.config.model,
            "base_url": gateway.config.base_url,
            "max_concurrency": gateway.config.max_concurrency,
            "adaptive": gateway.config.adaptive,
            "final_window": stats.window,
            "structured_output": gateway.config.structured_output,
            "max_completion_tokens": gateway.config.max_completion_tokens,
            "token_encoding": gateway.counter.encoding_name,
        },
    )
