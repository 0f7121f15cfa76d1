"""``fgo bench``: every strategy, trained and evaluated on the same tasks."""

from __future__ import annotations

from pathlib import Path

import attrs
import click
import structlog
from rich.progress import (
    BarColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from .._core.errors import InputError
from .._core.io import (
    load_module,
)
from .._core.model import Module
from .._llm.gateway import GatewayConfig, LLMGateway
from ..actors.state import RunConfig
from .common import (
    EXIT_BAD_INPUT,
    _agent_endpoint_options,
    _check_endpoint,
    _check_outputs,
    _positive,
    _run_agent_command,
    context_for,
    default_completion_tokens,
    executor_options,
    make_executor,
    start_command,
)


@click.command("bench")
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
@click.option(
    "--workers",
    type=int,
    callback=_positive,
    help="Episodes played at once [default: 1; with --executor ray: one per CPU of the cluster].",
)
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
@executor_options
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
    workers: int | None,
    executor_kind: str,
    ray_address: str | None,
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
    bench are refused; --fresh starts over. Where the episodes are played
    (--executor, --workers) is not such a setting.
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

    interactive, err, fail = start_command(log_json)
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
        ctx = context_for(context_tokens, local_ctx)
        if subset_tokens is not None and subset_tokens > ctx:
            raise ValueError(f"--subset-tokens ({subset_tokens}) exceeds the context ({ctx})")
        config = attrs.evolve(
            template,
            run=RunConfig(context_tokens=ctx, subset_tokens=subset_tokens, seed=seed),
            agent=AgentConfig(max_steps=max_steps),
            workers=workers or 1,
        )
        executor = make_executor(executor_kind, ray_address, workers, 1)
        completion = default_completion_tokens(ctx, local=local_ctx is not None)
        gw_config = attrs.evolve(gw_config, max_completion_tokens=completion)
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
                    return await bench(
                        config,
                        gateway,
                        progress,
                        out_dir=out_dir,
                        fresh=fresh,
                        executor=executor,
                    )
                except BenchStateError as e:  # reported as it is, without the on_stop note
                    return e

    result = _run_agent_command(
        err,
        play,
        base_url=base_url,
        model=model,
        api_key_env=api_key_env,
        max_concurrency=max_concurrency,
        workers=workers or 1,
        on_stop=f"what is done is kept in {out_dir}: run the same command again to continue",
        flags=("context_tokens", "subset_tokens"),
        context_tokens=context_tokens,
    )
    if isinstance(result, BenchStateError):
        fail(EXIT_BAD_INPUT, "error", result)
    paths = write_outputs(result, out_dir)
    click.echo(markdown_table(result), nl=False)
    click.echo(f"wrote {paths['json']}, {paths['markdown']} and {paths['plot']}")
