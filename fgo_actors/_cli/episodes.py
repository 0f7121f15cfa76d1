"""``fgo collect`` and ``fgo eval``: the reference agent (or the oracle) plays tasks."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import click
import trio
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .._core.errors import ClusterUnavailableError, InputError, leaf_exceptions
from .._core.io import (
    atomic_write_json,
    atomic_write_jsonl,
    load_module,
)
from .._core.model import Module, Trajectory
from .._llm.gateway import GatewayConfig, LLMGateway
from .common import (
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    EXIT_LLM,
    _agent_endpoint_options,
    _check_endpoint,
    _check_outputs,
    _positive,
    _probability,
    _run_agent_command,
    _trio_run,
    _workers_option,
    default_workers,
    executor_options,
    make_executor,
    start_command,
)


@click.command()
@click.option(
    "--tasks", "task_spec", required=True, help="Task set ENV:FOLD:SEEDS, e.g. twc:train:0-19."
)
@click.option(
    "--params",
    default="",
    help="Environment generation parameters "
    "(default for twc: numLocations=1,numItemsToPutAway=2,includeDoors=0).",
)
@click.option(
    "--module",
    "module_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Module the agent acts with (default: empty; --policy llm only).",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the trajectories (JSONL).",
)
@click.option("--max-steps", type=int, default=25, show_default=True, callback=_positive)
@click.option(
    "--policy",
    type=click.Choice(["llm", "oracle"]),
    default="llm",
    show_default=True,
    help="Who acts: the reference agent with an LLM, or the oracle (the environment's "
    "gold path with random detours; no LLM).",
)
@click.option(
    "--epsilon",
    type=float,
    default=0.3,
    show_default=True,
    callback=_probability,
    help="Oracle: each episode takes a random action instead of the gold one with a "
    "probability drawn uniformly from [0, EPSILON].",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Oracle: seed of its random choices."
)
@_workers_option
@executor_options
@_agent_endpoint_options
def collect(
    task_spec: str,
    params: str,
    module_path: Path | None,
    out: Path,
    max_steps: int,
    policy: str,
    epsilon: float,
    seed: int,
    workers: int | None,
    executor_kind: str,
    ray_address: str | None,
    base_url: str | None,
    model: str,
    api_key_env: str,
    max_concurrency: int | None,
    log_json: bool,
) -> None:
    """Run the reference agent (or the oracle policy) on a task set and write
    its trajectories as JSONL.

    Lines are written as episodes finish (to OUT.partial, renamed to OUT at the
    end), so a long collection shows progress and loses little if stopped.
    """
    from ..agent.envs import parse_tasks
    from ..agent.executor import Policy
    from ..agent.rollout import AgentConfig

    interactive, err, fail = start_command(log_json)

    if policy == "oracle" and module_path is not None:
        raise click.UsageError("--module is for --policy llm: the oracle acts without a module")
    try:
        tasks = parse_tasks(task_spec, params)
        module = load_module(module_path) if module_path else Module()
    except (ValueError, InputError) as e:
        fail(EXIT_BAD_INPUT, "error", e)
    _check_outputs(err, out)
    if policy == "llm":
        _check_endpoint(base_url)
    partial = out.with_name(out.name + ".partial")
    on_stop = f"episodes so far are in {partial}"
    counts = {"episodes": 0, "successes": 0}

    async def record(
        produce: Callable[[trio.MemorySendChannel[Trajectory]], Awaitable[None]],
    ) -> None:
        """Run ``produce(send)`` and write what it sends as it comes, with a progress bar."""
        send, receive = trio.open_memory_channel[Trajectory](0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce, send)
            with Progress(
                TextColumn("episodes"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=err,
                disable=not interactive,
            ) as bar:
                task = bar.add_task("episodes", total=len(tasks), rate="")
                with partial.open("w", encoding="utf-8") as f:
                    async with receive:
                        async for traj in receive:
                            f.write(json.dumps(traj.to_json(), ensure_ascii=False) + "\n")
                            f.flush()
                            counts["episodes"] += 1
                            counts["successes"] += traj.outcome.success
                            rate = f"{counts['successes']}/{counts['episodes']} solved"
                            bar.update(task, advance=1, rate=rate)

    agent = AgentConfig(max_steps=max_steps)

    async def play(gw_config: GatewayConfig, local_ctx: int | None) -> None:
        executor = make_executor(executor_kind, ray_address, workers, default_workers(local_ctx))
        llm = Policy(kind="llm", module=module, agent=agent, gateway=gw_config)
        async with LLMGateway(gw_config) as gateway:
            await record(functools.partial(executor.play, tasks, llm, gateway=gateway))

    async def play_oracle() -> ValueError | ClusterUnavailableError | None:
        # Returned, not raised: trio.run would hand it over in an ExceptionGroup.
        problems: list[ValueError | ClusterUnavailableError] = []
        executor = make_executor(executor_kind, ray_address, workers, 1)
        oracle = Policy(kind="oracle", agent=agent, epsilon=epsilon, seed=seed)
        try:
            await record(functools.partial(executor.play, tasks, oracle))
        except* ValueError as group:  # an environment the oracle cannot play
            problems.extend(leaf_exceptions(group))
        except* ClusterUnavailableError as group:
            problems.extend(leaf_exceptions(group))
        return problems[0] if problems else None

    if policy == "oracle":
        try:
            problem = _trio_run(play_oracle)
        except KeyboardInterrupt:
            fail(EXIT_INTERRUPTED, "interrupted", on_stop)
        if isinstance(problem, ClusterUnavailableError):
            fail(EXIT_LLM, "Ray cluster", f"{problem}; {on_stop}")
        if problem is not None:
            fail(EXIT_BAD_INPUT, "error", f"{problem}; {on_stop}")
    else:
        _run_agent_command(
            err,
            play,
            base_url=base_url,
            model=model,
            api_key_env=api_key_env,
            max_concurrency=max_concurrency,
            workers=workers,
            on_stop=on_stop,
        )
    os.replace(partial, out)
    n, k = counts["episodes"], counts["successes"]
    click.echo(f"trajectories: {out} ({n} episodes, {k} solved, {k / max(n, 1):.0%})")


@click.command("eval")
@click.option(
    "--tasks", "task_spec", required=True, help="Task set ENV:FOLD:SEEDS, e.g. twc:test:0-39."
)
@click.option("--params", default="", help="Environment generation parameters.")
@click.option(
    "--module",
    "module_paths",
    required=True,
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="A module to evaluate (repeat to evaluate several on the same seeds).",
)
@click.option(
    "--baseline",
    "baseline_path",
    help="A module to compare every --module with on the same seeds (a path, or 'empty').",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the evaluation as JSON here.",
)
@click.option(
    "--trajectories-out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write every episode (JSONL).",
)
@click.option("--max-steps", type=int, default=25, show_default=True, callback=_positive)
@_workers_option
@executor_options
@_agent_endpoint_options
def eval_command(
    task_spec: str,
    params: str,
    module_paths: tuple[Path, ...],
    baseline_path: str | None,
    out: Path | None,
    trajectories_out: Path | None,
    max_steps: int,
    workers: int | None,
    executor_kind: str,
    ray_address: str | None,
    base_url: str | None,
    model: str,
    api_key_env: str,
    max_concurrency: int | None,
    log_json: bool,
) -> None:
    """Evaluate a module with the reference agent: success rate and score with 95%
    confidence intervals, tokens, and (with --baseline, or with exactly two
    modules) McNemar's exact test on the same seeds."""
    from .._core.stats import paired
    from ..agent.envs import parse_tasks
    from ..agent.eval import EvalSummary, evaluate
    from ..agent.rollout import AgentConfig

    _, err, fail = start_command(log_json)

    try:
        tasks = parse_tasks(task_spec, params)
        modules = [(path.stem, load_module(path)) for path in module_paths]
        if baseline_path == "empty":
            modules.append(("empty", Module()))
        elif baseline_path:
            modules.append((Path(baseline_path).stem, load_module(baseline_path)))
        labels = [label for label, _ in modules]
        if len(set(labels)) != len(labels):
            raise ValueError(f"modules need distinct file names, got {', '.join(labels)}")
    except (ValueError, InputError) as e:
        fail(EXIT_BAD_INPUT, "error", e)
    _check_outputs(err, out, trajectories_out)
    _check_endpoint(base_url)
    config = AgentConfig(max_steps=max_steps)

    async def play(
        gw_config: GatewayConfig, local_ctx: int | None
    ) -> list[tuple[EvalSummary, list[Trajectory]]]:
        results = []
        executor = make_executor(executor_kind, ray_address, workers, default_workers(local_ctx))
        async with LLMGateway(gw_config) as gateway:
            for label, module in modules:
                err.print(f"evaluating {label} on {len(tasks)} tasks ...", highlight=False)
                results.append(
                    await evaluate(
                        tasks,
                        module,
                        gateway,
                        label=label,
                        config=config,
                        executor=executor,
                    )
                )
        return results

    outcome = _run_agent_command(
        err,
        play,
        base_url=base_url,
        model=model,
        api_key_env=api_key_env,
        max_concurrency=max_concurrency,
        workers=workers,
        on_stop="nothing was written",
    )

    summaries = [summary for summary, _ in outcome]
    report: dict[str, Any] = {
        "tasks": task_spec,
        "params": params,
        "max_steps": max_steps,
        "results": [s.to_json() for s in summaries],
    }
    for s in summaries:
        lo, hi = s.success_ci
        click.echo(
            f"{s.label:<20} solved {s.successes}/{s.episodes} = {s.success_rate:.0%} "
            f"[95% CI {lo:.0%}-{hi:.0%}] · score {s.score_mean:.3f} · "
            f"{s.prompt_tokens + s.completion_tokens} tokens · {s.wall_seconds:.0f} s · "
            f"{s.turns} turns ({s.macro_turns} macros, {s.invalid_replies} invalid)"
        )
    if baseline_path:
        pairs = [(s, summaries[-1]) for s in summaries[:-1]]
    elif len(summaries) == 2:
        pairs = [(summaries[0], summaries[1])]
    else:
        pairs = []
    report["paired"] = []
    for a, b in pairs:
        cmp = paired(a.outcomes, b.outcomes)
        report["paired"].append(
            {"a": a.label, "b": b.label, **cmp.to_json(), "test": "McNemar exact, two-sided"}
        )
        click.echo(
            f"paired on {cmp.pairs} seeds: only {a.label} solved {cmp.only_a}, "
            f"only {b.label} solved {cmp.only_b}; McNemar p = {cmp.p_value:.4f}"
        )
    if out:
        atomic_write_json(out, report)
    if trajectories_out:
        # Ids get the module's label: the same seed is played once per module.
        lines = [
            {**t.to_json(), "id": f"{summary.label}/{t.id}"}
            for summary, trajs in outcome
            for t in trajs
        ]
        atomic_write_jsonl(trajectories_out, lines)
