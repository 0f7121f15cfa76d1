"""Running a bench: play the training tasks, optimize with each strategy, and
evaluate every module on the same held-out tasks.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import structlog
import trio

from .._core.errors import leaf_exceptions
from .._core.model import Module, RunReport, Trajectory
from .._core.stats import paired
from .._llm.gateway import LLMGateway
from .._storage.diskcache import Spent
from ..actors.run import RunFailedError, prompt_budgets, run
from ..agent.envs import Environment, Task
from ..agent.eval import EvalSummary
from ..agent.eval import summarise as eval_summary
from ..agent.executor import Executor, LocalExecutor, Policy, RayExecutor
from .records import BASE, Arm, BenchConfig, BenchProgress, BenchResult, module_size
from .workspace import _cache_installed, _Workspace


async def _play(
    tasks: Sequence[Task],
    executor: Executor,
    policy: Policy,
    record: Callable[[Trajectory], Awaitable[None]],
    progress: BenchProgress,
    *,
    gateway: LLMGateway,
    timed: bool = True,
) -> None:
    """Play ``tasks`` with ``policy`` on ``executor``, recording every episode
    and telling ``progress`` as each ends.

    The local executor's workers close their environments when they end
    normally. A bench that is stopped (Ctrl-C, a cancel, an error) would leave
    those JVMs and their pipes behind, so the environments made here are
    closed again on the way out, shielded (closing one twice is harmless).
    On Ray the environments live on the workers, and a stop cancels the tasks.
    """
    if not tasks:
        return
    made: list[Environment] = []
    if isinstance(executor, LocalExecutor):
        from ..agent.envs import make_env

        make = executor.make_env or make_env

        def factory(name: str) -> Environment:
            env = make(name)
            made.append(env)
            return env

        executor = attrs.evolve(executor, make_env=factory)

    asked = {t.id for t in tasks}
    send, receive = trio.open_memory_channel[Trajectory](0)
    last = trio.current_time()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(executor.play, tasks, policy, send, gateway=gateway)
            )
            with receive:
                async for traj in receive:
                    if traj.id not in asked:
                        raise RuntimeError(f"the policy played {traj.id!r}, not one of its tasks")
                    await record(traj)
                    now = trio.current_time()
                    progress.episode_done(now - last, timed=timed)
                    last = now
    except BaseException:
        with trio.CancelScope(shield=True):
            for env in made:
                try:
                    await trio.to_thread.run_sync(env.close)
                except Exception as e:  # already gone: nothing left to release
                    structlog.get_logger().debug("bench_env_close_failed", error=str(e)[:200])
        raise


def _training_policy(config: BenchConfig, gateway: LLMGateway) -> Policy:
    """Who plays the training episodes: the oracle (seeded by the run's seed),
    or the reference agent with the base module."""
    if config.policy == "oracle":
        return Policy(
            kind="oracle", agent=config.agent, epsilon=config.epsilon, seed=config.run.seed
        )
    return _agent_policy(config, gateway, config.base)


def _agent_policy(config: BenchConfig, gateway: LLMGateway, module: Module) -> Policy:
    return Policy(kind="llm", module=module, agent=config.agent, gateway=gateway.config)


def summarise(
    label: str, trajectories: Sequence[Trajectory], spent: Spent, seconds: float
) -> EvalSummary:
    """An EvalSummary of episodes played over one or more runs, with what they cost."""
    return eval_summary(
        label,
        trajectories,
        llm_calls=sum(spent.calls.values()),
        prompt_tokens=spent.prompt_tokens,
        completion_tokens=spent.completion_tokens,
        wall_seconds=seconds,
    )


def _restore_progress(progress: BenchProgress, ws: _Workspace, config: BenchConfig) -> None:
    """Count what earlier runs finished; their mean times seed the estimate."""
    train_ids = {t.id for t in config.train}
    cached_train = len(train_ids & set(ws.train))
    arms = [BASE, *(s for s in config.strategies if s in ws.optimized)]
    cached_held_out = sum(len(ws.held_out.get(a, {})) for a in arms)
    timed = cached_held_out + (cached_train if config.policy == "llm" else 0)
    timed_seconds = sum(ws.seconds.get(f"evaluate {a}", 0.0) for a in arms)
    if config.policy == "llm":
        timed_seconds += ws.seconds.get("collect", 0.0)
    cached_opts = [s for s in config.strategies if s in ws.optimized]
    if not (cached_train or cached_held_out or cached_opts):
        return
    progress.restore(
        episodes=cached_train + cached_held_out,
        optimizations=len(cached_opts),
        episode_seconds=timed_seconds,
        timed_episodes=timed,
        optimization_seconds=sum(ws.seconds.get(f"optimize {s}", 0.0) for s in cached_opts),
        timed_optimizations=len(cached_opts),
    )


async def bench(
    config: BenchConfig,
    gateway: LLMGateway,
    progress: BenchProgress | None = None,
    *,
    out_dir: Path | None = None,
    fresh: bool = False,
    executor: Executor | None = None,
) -> BenchResult:
    """Run the whole bench against ``gateway``; see the module docstring.

    The episodes (training and held-out) are played on ``executor``: by
    default ``config.workers`` threads of this process, through ``gateway``.

    With ``out_dir``, every episode, module, run report and LLM reply is kept
    there as soon as it exists, and what is there is used instead of being
    made again (BenchStateError if it was made with other settings; ``fresh``
    removes it first). The executor is not such a setting: a bench begun on
    one carries on on another. The gateway's response cache is the bench's
    for its duration (calls made by Ray workers do not go through it).
    """
    log = structlog.get_logger()
    n_arms = 1 + len(config.strategies)
    progress = progress or BenchProgress(
        episodes=len(config.train) + n_arms * len(config.test),
        optimizations=len(config.strategies),
        training_episodes=len(config.train),
    )
    # Budgets that leave no room fail here, before any episode is paid for.
    for strategy in config.strategies:
        if strategy != "all-at-once":
            prompt_budgets(gateway, attrs.evolve(config.run, strategy=strategy), config.base)
    ws = _Workspace(config, gateway, out_dir)
    ws.open(fresh=fresh)
    try:
        with _cache_installed(gateway, ws.cache):
            return await _bench(
                config,
                gateway,
                executor or LocalExecutor(workers=config.workers),
                progress,
                ws,
                log,
            )
    except BaseExceptionGroup as group:
        # Ctrl-C lands in whichever task was running, inside a nursery: say
        # it plainly, so that the caller sees an interrupt, not a group.
        if any(isinstance(e, KeyboardInterrupt) for e in leaf_exceptions(group)):
            raise KeyboardInterrupt from group
        raise
    finally:
        ws.close()


async def _bench(
    config: BenchConfig,
    gateway: LLMGateway,
    executor: Executor,
    progress: BenchProgress,
    ws: _Workspace,
    log: Any,
) -> BenchResult:
    _restore_progress(progress, ws, config)

    progress.begin("collect")
    missing = [t for t in config.train if t.id not in ws.train]
    if missing:
        with ws.phase("collect", executor):
            await _play(
                missing,
                executor,
                _training_policy(config, gateway),
                ws.record_train,
                progress,
                gateway=gateway,
                timed=config.policy == "llm",
            )
    collected = sorted((ws.train[t.id] for t in config.train), key=lambda t: t.id)
    log.info(
        "bench_collected",
        episodes=len(collected),
        played=len(missing),
        solved=sum(t.outcome.success for t in collected),
        policy=config.policy,
    )

    optimized: dict[str, tuple[Module | None, RunReport | None, str | None]] = {}
    reports: dict[str, dict[str, Any]] = {}  # the cached strategies' reports, as read
    for strategy in config.strategies:
        cached = ws.optimized.get(strategy)
        if cached is not None:
            optimized[strategy] = (cached[0], cached[1], None)
            reports[strategy] = cached[2]
            log.info("bench_optimized", strategy=strategy, cached=True)
            continue
        progress.begin(f"optimize {strategy}")
        run_config = attrs.evolve(config.run, strategy=strategy)
        with ws.phase(f"optimize {strategy}"):
            try:
                result = await run(collected, gateway, run_config, initial=config.base)
                optimized[strategy] = (result.module, result.report, None)
            except RunFailedError as e:
                optimized[strategy] = (None, e.result.report, str(e))
        module, report, error = optimized[strategy]
        if module is None:
            progress.optimization_done(failed=True, episodes_dropped=len(config.test))
            ws.record_failed(strategy, report)
        else:
            assert report is not None
            progress.optimization_done()
            ws.record_optimized(strategy, module, report)
        log.info(
            "bench_optimized",
            strategy=strategy,
            status=report.status if report else None,
            tokens=(report.prompt_tokens + report.completion_tokens) if report else None,
            error=error,
        )

    playing: list[tuple[str, Module]] = [(BASE, config.base)]
    playing += [(s, m) for s, (m, _, _) in optimized.items() if m is not None]
    for name, module in playing:
        have = ws.held_out.setdefault(name, {})
        left = [t for t in config.test if t.id not in have]
        if not left:
            continue
        progress.begin(f"evaluate {name}")
        record = functools.partial(ws.record_held_out, name)
        with ws.phase(f"evaluate {name}", executor):
            await _play(
                left,
                executor,
                _agent_policy(config, gateway, module),
                record,
                progress,
                gateway=gateway,
            )

    spent = await ws.spent()
    summaries = {
        name: summarise(
            name,
            [ws.held_out[name][t.id] for t in config.test],
            spent.get(f"evaluate {name}", Spent()),
            ws.seconds.get(f"evaluate {name}", 0.0),
        )
        for name, _ in playing
    }
    base_summary = summaries[BASE]
    _, _, base_tokens = module_size(config.base, gateway)
    arms = [Arm(BASE, config.base, base_summary, module_tokens=base_tokens)]
    episodes = {BASE: tuple(_held_out_episodes(ws, BASE, config))}
    for strategy in config.strategies:
        module, report, error = optimized[strategy]
        cost = spent.get(f"optimize {strategy}", Spent())
        seconds = ws.seconds.get(f"optimize {strategy}", 0.0)
        if module is None:
            arms.append(
                Arm(
                    strategy,
                    None,
                    None,
                    report,
                    error=error or "no module",
                    spent=cost,
                    optimization_seconds=seconds,
                )
            )
            continue
        summary = summaries[strategy]
        episodes[strategy] = tuple(_held_out_episodes(ws, strategy, config))
        arms.append(
            Arm(
                strategy,
                module,
                summary,
                report,
                paired(summary.outcomes, base_summary.outcomes),
                spent=cost,
                optimization_seconds=seconds,
                module_tokens=module_size(module, gateway)[2],
                report_json=reports.get(strategy),
            )
        )
    progress.begin("done")
    collect_spent = spent.get("collect", Spent())
    ws.save()
    return BenchResult(
        arms=tuple(arms),
        train=tuple(collected),
        episodes=episodes,
        collect_seconds=ws.seconds.get("collect", 0.0),
        collect_tokens=collect_spent.total_tokens,
        wall_seconds=sum(
            ws.seconds.get(phase, 0.0)
            for phase in [
                "collect",
                *(f"optimize {s}" for s in config.strategies),
                *(f"evaluate {name}" for name, _ in playing),
            ]
        ),
        runs=ws.runs,
        config={
            "train": [t.id for t in config.train],
            "test": [t.id for t in config.test],
            "params": sorted({t.params for t in [*config.train, *config.test]}),
            "strategies": list(config.strategies),
            "run": config.run.to_json(),
            "max_steps": config.agent.max_steps,
            **_executor_json(config, executor),
            "policy": config.policy,
            "epsilon": config.epsilon if config.policy == "oracle" else None,
            "model": gateway.config.model,
            "base_rules": len(config.base.rules),
            "base_functions": len(config.base.functions),
            "base_tokens": base_tokens,
        },
    )


def _held_out_episodes(ws: _Workspace, arm: str, config: BenchConfig) -> list[Trajectory]:
    """``arm``'s held-out episodes, in task order."""
    return sorted((ws.held_out[arm][t.id] for t in config.test), key=lambda t: t.id)


def _executor_json(config: BenchConfig, executor: Executor) -> dict[str, Any]:
    """Where the episodes were played, for the report: threads (``workers``),
    or Ray tasks (``workers``: the tasks in flight, None for one per CPU)."""
    if isinstance(executor, RayExecutor):
        return {"workers": executor.max_in_flight, "executor": "ray"}
    if isinstance(executor, LocalExecutor):
        return {"workers": executor.workers}
    return {"workers": config.workers, "executor": type(executor).__name__}
