"""The ``fgo`` command line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click
import structlog
import trio
from rich.console import Console

from ._errors import InputError
from ._gateway import GatewayConfig, LLMGateway
from ._io import atomic_write_json, load_module, load_trajectories
from ._logging import configure_logging
from ._model import Module
from ._pipeline import RunFailedError, RunResult, run
from ._progress import log_progress, show_progress
from ._state import RunConfig, RunState

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_LLM = 3
EXIT_BUDGET = 4


@click.group()
@click.version_option(package_name="fgo-actors")
def main() -> None:
    """FGO Actors: optimize LLM agent modules from execution trajectories."""


def _positive(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    if value is not None and value < 1:
        raise click.BadParameter("must be at least 1")
    return value


@main.command()
@click.argument("trajectories", type=click.Path(dir_okay=False, path_type=Path))
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
    help="Model name sent to the server [env FGO_MODEL].",
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
    default=8192,
    show_default=True,
    callback=_positive,
    help="The optimizer LLM's context size.",
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
    default=4,
    show_default=True,
    callback=_positive,
    help="LLM calls in flight at once.",
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
    "--token-budget",
    type=int,
    callback=_positive,
    help="Hard cap on prompt+completion tokens; the partial result is written.",
)
@click.option(
    "--max-completion-tokens", type=int, default=2048, show_default=True, callback=_positive
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
    type=click.Choice(["json_schema", "json_object", "none"]),
    default="json_schema",
    show_default=True,
    help="How replies are constrained: OpenAI json_schema, llama.cpp json_object+schema, "
    "or not at all (replies are still validated).",
)
@click.option(
    "--strict/--no-strict",
    default=True,
    show_default=True,
    help="Send strict: true with json_schema.",
)
@click.option("--log-json", is_flag=True, help="JSON logs on stderr even on a terminal.")
def optimize(
    trajectories: Path,
    out: Path,
    report_path: Path | None,
    strategy: str,
    initial_module: Path | None,
    base_url: str | None,
    model: str,
    api_key_env: str,
    context_tokens: int,
    subset_tokens: int | None,
    module_tokens: int | None,
    max_concurrency: int,
    fan_in: int,
    epochs: int,
    seed: int,
    group_key: str,
    token_budget: int | None,
    max_completion_tokens: int,
    call_timeout: float,
    retries: int,
    structured_output: str,
    strict: bool,
    log_json: bool,
) -> None:
    """Optimize a module from TRAJECTORIES (JSONL) and write it to --out.

    Exit codes: 0 success; 2 bad input; 3 LLM endpoint unreachable or failing;
    4 token budget exhausted (the partial result is written).
    """
    interactive = sys.stderr.isatty() and not log_json
    configure_logging(json=not interactive, level="warning" if interactive else "info")
    err = Console(stderr=True, soft_wrap=True)
    report_path = report_path or out.with_name(out.stem + ".report.json")

    try:
        data = load_trajectories(trajectories)
        initial = load_module(initial_module) if initial_module else Module()
        if not base_url:
            raise click.UsageError(
                "no LLM endpoint: pass --base-url or set FGO_BASE_URL "
                "(e.g. http://127.0.0.1:8080/v1)"
            )
        if subset_tokens is not None and subset_tokens > context_tokens:
            raise click.BadParameter(
                f"--subset-tokens ({subset_tokens}) exceeds --context-tokens ({context_tokens})"
            )
        config = RunConfig(
            strategy=strategy,  # type: ignore[arg-type]
            context_tokens=context_tokens,
            subset_tokens=subset_tokens,
            module_tokens=module_tokens,
            fan_in=fan_in,
            epochs=epochs,
            seed=seed,
            group_key=group_key,
        )
        gw_config = GatewayConfig(
            base_url=base_url,
            model=model,
            api_key=os.environ.get(api_key_env) or None,
            max_concurrency=max_concurrency,
            token_budget=token_budget,
            max_completion_tokens=max_completion_tokens,
            call_timeout=call_timeout,
            retry_attempts=retries + 1,
            structured_output=structured_output,  # type: ignore[arg-type]
            strict=strict,
        )
    except InputError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(EXIT_BAD_INPUT)
    except ValueError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(EXIT_BAD_INPUT)

    async def go() -> RunResult | RunFailedError | ValueError:
        # Expected failures are returned, not raised: raised inside the nursery
        # they would reach trio.run wrapped in an ExceptionGroup.
        state = RunState()
        async with LLMGateway(gw_config) as gateway, trio.open_nursery() as nursery:
            if interactive:
                nursery.start_soon(show_progress, state, gateway, err)
            else:
                nursery.start_soon(log_progress, state, gateway)
            try:
                return await run(data, gateway, config, initial=initial, state=state)
            except (RunFailedError, ValueError) as e:
                return e
            finally:
                nursery.cancel_scope.cancel()

    outcome = trio.run(go)
    try:
        if isinstance(outcome, BaseException):
            raise outcome
        result = outcome
    except RunFailedError as e:
        atomic_write_json(report_path, e.result.report.to_json())
        err.print(f"[bold red]LLM failure:[/] {e}", highlight=False)
        err.print(f"report: {report_path} (no module written)", highlight=False)
        sys.exit(EXIT_LLM)
    except ValueError as e:  # budgets that leave no room, and the like
        err.print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(EXIT_BAD_INPUT)

    assert result.module is not None
    atomic_write_json(out, result.module.to_json())
    atomic_write_json(report_path, result.report.to_json())
    _print_summary(result, out, report_path)
    if result.report.status == "budget_exhausted":
        err.print("[yellow]token budget exhausted: the partial result was written[/]")
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


if __name__ == "__main__":  # pragma: no cover
    main()
