"""``fgo optimize``: from a trajectories file (batch) or by playing tasks (``--env``)."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any

import attrs
import click
import structlog
import trio
from rich.console import Console

from .._core.errors import InputError
from .._core.io import (
    atomic_write_json,
    load_module,
    load_trajectories,
)
from .._core.model import Module
from .._llm import local
from .._llm.gateway import GatewayConfig, LLMGateway
from .._storage.store import AsyncStore, Store, StoreCache, StoreError
from ..actors.run import RunFailedError, RunResult, run
from ..actors.state import RunConfig, RunState
from .common import (
    CACHE_FILE,
    EXIT_BAD_INPUT,
    EXIT_BUDGET,
    EXIT_INTERRUPTED,
    EXIT_LLM,
    REMOTE_CONCURRENCY,
    SETTINGS,
    _check_endpoint,
    _check_module_and_report,
    _endpoint,
    _fail,
    _positive,
    _run_agent_command,
    _trio_run,
    context_for,
    default_completion_tokens,
    endpoint_options,
    executor_flags,
    gateway_config,
    in_flags,
    make_executor,
    optimizer_options,
    start_command,
)
from .progress import log_progress, show_progress


@click.command()
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
    help="Seconds one LLM call may take [default: 600; the local model: 3600, as it "
    "answers one request at a time and a retry would wait behind the abandoned one].",
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
@executor_flags(in_flight="--env only; with ray, an episode in flight per CPU of the cluster")
@endpoint_options(concurrency=str(REMOTE_CONCURRENCY))
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
    call_timeout: float | None,
    retries: int,
    structured_output: str,
    strict: bool,
    adaptive: bool,
    cache_dir: Path | None,
    no_cache: bool,
    executor_kind: str,
    ray_address: str | None,
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
    interactive, err, fail = start_command(log_json)
    report_path = report_path or out.with_name(out.stem + ".report.json")
    # The optimizer's gateway settings, for both modes.
    llm_options = optimizer_options(
        token_budget=token_budget,
        call_timeout=call_timeout,
        retries=retries,
        structured_output=structured_output,
        strict=strict,
        adaptive=adaptive,
    )
    if (trajectories is None) == (env_spec is None):
        raise click.UsageError("give exactly one of TRAJECTORIES and --env TASKS (online mode)")
    if env_spec is None and executor_kind != "local":
        raise click.UsageError(
            "--executor applies to --env (online mode), which plays episodes; "
            "optimizing from TRAJECTORIES plays none"
        )
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
            gateway_options=llm_options,
            max_completion_tokens=max_completion_tokens,
            executor_kind=executor_kind,
            ray_address=ray_address,
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
        ctx = context_for(context_tokens, local_ctx)
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
        gw_config = gateway_config(
            url,
            served_model,
            local_ctx,
            api_key_env=api_key_env,
            max_concurrency=max_concurrency,
            max_completion_tokens=max_completion_tokens
            or default_completion_tokens(ctx, local=local_ctx is not None),
            **llm_options,
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
        with _endpoint(base_url, model, err, context_tokens) as (url, served_model, local_ctx):
            run_config, gw_config = configs(url, served_model, local_ctx)
            outcome = _trio_run(go, run_config, gw_config)
    except ValueError as e:
        fail(EXIT_BAD_INPUT, "error", in_flags(e))
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
        fail(EXIT_BAD_INPUT, "error", in_flags(outcome))

    result = outcome
    assert result.module is not None
    write_outputs(result.module, result.report)
    _print_summary(result, out, report_path)
    if result.report.status == "budget_exhausted":
        err.print("[yellow]token budget exhausted: the partial result was written[/]")
        sys.exit(EXIT_BUDGET)


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
    executor_kind: str,
    ray_address: str | None,
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
        ctx = context_for(context_tokens, local_ctx)
        completion = max_completion_tokens or default_completion_tokens(
            ctx, local=local_ctx is not None
        )
        # No --call-timeout: keep the default gateway_config chose (local or remote).
        given = {k: v for k, v in gateway_options.items() if v is not None or k != "call_timeout"}
        gw_config = attrs.evolve(gw_config, max_completion_tokens=completion, **given)
        cap = module_tokens or ctx // 8
        config = OnlineConfig(**online, module_tokens=cap, agent=AgentConfig(max_steps=max_steps))
        executor = make_executor(executor_kind, ray_address, None, config.workers)
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
                        tasks, gateway, config, initial=initial, state=state, executor=executor
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
        flags=SETTINGS,
        context_tokens=context_tokens,
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
    if result.status == "budget_exhausted":
        err.print(
            "[yellow]token budget exhausted: the partial result was written (the finished "
            "subsets and merges, joined within the module cap)[/]"
        )
        sys.exit(EXIT_BUDGET)


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
