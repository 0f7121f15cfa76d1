"""``fgo serve``: the daemon."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .._core.errors import ClusterUnavailableError, InputError, leaf_exceptions
from .._daemon import defaults
from .._llm import local
from .._storage.store import StoreError
from .common import (
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    EXIT_LLM,
    REMOTE_CONCURRENCY,
    _check_endpoint,
    _check_outputs,
    _endpoint,
    _fail,
    _positive,
    _trio_run,
    context_for,
    default_completion_tokens,
    endpoint_options,
    executor_flags,
    gateway_config,
    in_flags,
    optimizer_options,
    start_command,
)


@click.command("serve")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Settings file (TOML, the flags' names with underscores); flags override it.",
)
@click.option(
    "--store",
    type=click.Path(dir_okay=False, path_type=Path),
    help=f"SQLite store [default: {defaults.STORE}].",
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
@click.option("--host", help=f"Address to bind [default: {defaults.HOST}; others need a token].")
@click.option(
    "--port", type=int, help=f"Port to bind [default: {defaults.PORT}; 0 picks a free one]."
)
@click.option(
    "--token-env",
    help=f"Environment variable holding the bearer token [default: {defaults.TOKEN_ENV}].",
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
    help="Seconds a partial subset waits before it is optimized anyway "
    f"[default: {defaults.MAX_WAIT:g}].",
)
@click.option(
    "--publish-interval",
    type=float,
    help=f"Least seconds between two published versions [default: {defaults.PUBLISH_INTERVAL:g}].",
)
@click.option(
    "--max-pending-subsets",
    type=int,
    callback=_positive,
    help="Subsets waiting for an optimizer before ingest answers 429 "
    f"[default: {defaults.MAX_PENDING_SUBSETS}].",
)
@click.option(
    "--max-body-bytes",
    type=int,
    callback=_positive,
    help=f"Largest HTTP body [default: {defaults.MAX_BODY_BYTES}].",
)
@click.option(
    "--max-record-bytes",
    type=int,
    callback=_positive,
    help=f"Largest trajectory [default: {defaults.MAX_RECORD_BYTES}].",
)
@click.option(
    "--grace",
    type=float,
    help=f"Seconds work under way gets at shutdown [default: {defaults.GRACE:g}].",
)
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
    help=f"Agent turns per validation episode [default: {defaults.VALIDATE_MAX_STEPS}].",
)
@executor_flags(
    in_flight="--validate's episodes; with ray, the settings file's validate_workers "
    "tasks in flight, by default one per CPU of the cluster",
    settings_file=True,
)
@click.option("--context-tokens", type=int, callback=_positive, help="Optimizer LLM context.")
@click.option("--subset-tokens", type=int, callback=_positive, help="Subset token budget.")
@click.option("--module-tokens", type=int, callback=_positive, help="Module size cap.")
@click.option("--fan-in", type=int, help="Trees merged at once [default: 2].")
@click.option("--token-budget", type=int, callback=_positive, help="Hard cap on tokens.")
@click.option(
    "--success-attr",
    help="POST /v1/traces: the span or resource attribute holding a run's success "
    "(true/false). Without it, outcomes come from POST /v1/feedback.",
)
@click.option("--score-attr", help="POST /v1/traces: the attribute holding a run's score.")
@click.option(
    "--success-threshold",
    type=float,
    help="POST /v1/traces: a score alone decides success (score >= this).",
)
@click.option(
    "--trace-format",
    type=click.Choice(["auto", "otlp-json", "openinference"]),
    help="POST /v1/traces: the attribute conventions spans follow [default: auto].",
)
@click.option(
    "--trace-wait",
    type=float,
    callback=_positive,
    help="Seconds a trace may wait for its outcome before it is skipped [default: 600].",
)
@click.option(
    "--trace-settle",
    type=float,
    help="Quiet seconds after which a trace without a root span is complete [default: 5].",
)
@click.option(
    "--max-waiting-traces",
    type=int,
    callback=_positive,
    help="Traces that may wait at once; past it the oldest is skipped [default: 10000].",
)
@endpoint_options(concurrency=str(REMOTE_CONCURRENCY), settings_file=True)
def serve_command(config_path: Path | None, log_json: bool, **flags: Any) -> None:
    """Run the optimization daemon: take trajectories over HTTP (POST
    /v1/trajectories, or OpenTelemetry traces on POST /v1/traces with their
    outcomes on POST /v1/feedback), from a watched folder or from stdin; optimize them
    incrementally; publish versioned modules (GET /v1/module). Everything
    lives in one SQLite file, and a restart carries on where it stopped.

    Stops on SIGTERM or Ctrl-C: intake stops, work under way gets --grace
    seconds, and the exit code is 0.
    """
    from .._daemon import serve as _serve
    from .._daemon.http import LOOPBACK

    _, err, _ = start_command(log_json, tty_level="info")
    flags["executor"] = flags.pop("executor_kind")  # the setting's name
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
        with _endpoint(settings.base_url, settings.model, err, settings.context_tokens) as (
            url,
            served,
            local_ctx,
        ):
            ctx = context_for(settings.context_tokens, local_ctx)
            gateway = gateway_config(
                url,
                served,
                local_ctx,
                api_key_env=settings.api_key_env,
                max_concurrency=settings.max_concurrency,
                max_completion_tokens=settings.max_completion_tokens
                or default_completion_tokens(ctx, local=local_ctx is not None),
                **optimizer_options(
                    token_budget=settings.token_budget,
                    call_timeout=settings.call_timeout,
                    retries=settings.retries,
                    structured_output=settings.structured_output,
                    strict=settings.strict,
                    adaptive=settings.adaptive,
                ),
            )
            config = _serve.daemon_config(settings, gateway, ctx)
            try:
                _trio_run(_serve.run_daemon, settings, config)
            except BaseExceptionGroup as group:
                # Settings that cannot work, found as the nursery starts.
                leaves = leaf_exceptions(group)
                expected = [
                    e
                    for e in leaves
                    if isinstance(e, ValueError | StoreError | ClusterUnavailableError)
                ]
                if len(expected) != len(leaves):
                    raise
                raise expected[0] from group
    except (ValueError, InputError) as e:
        # Its flags; max_completion_tokens is set in the settings file only.
        _fail(
            err,
            EXIT_BAD_INPUT,
            "error",
            in_flags(e, ("subset_tokens", "context_tokens", "module_tokens", "fan_in")),
        )
    except StoreError as e:
        _fail(err, EXIT_BAD_INPUT, "store", e)
    except ClusterUnavailableError as e:
        _fail(err, EXIT_LLM, "Ray cluster", e)
    except local.LocalLLMError as e:
        _fail(err, EXIT_LLM, "local model", e)
    except KeyboardInterrupt:
        _fail(err, EXIT_INTERRUPTED, "interrupted", "work under way resumes at the next start")
