"""``fgo serve``: settings (a TOML file, overridden by flags) and the daemon's
main task: the optimizer, the HTTP API, a watched folder, stdin and signals."""

from __future__ import annotations

import os
import signal
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import structlog
import trio

from .._core.model import Module
from .._llm.gateway import GatewayConfig
from ..actors.state import RunConfig
from ..agent.envs import parse_tasks
from ..agent.executor import EXECUTOR_KINDS, RayExecutor, make_executor
from ..agent.rollout import AgentConfig
from . import defaults
from .ingest import parse_body
from .optimizer import DaemonConfig, StreamingOptimizer, ValidationConfig, open_optimizer
from .traces import TraceIngest, TraceSettings, otel_missing


@attrs.frozen
class ServeSettings:
    """Everything ``fgo serve`` takes; the TOML file uses the same names."""

    store: Path = Path(defaults.STORE)
    host: str = defaults.HOST
    port: int = defaults.PORT
    token_env: str = defaults.TOKEN_ENV
    watch: Path | None = None
    watch_interval: float = 1.0
    stdin: bool = False
    once: bool = False
    initial_module: Path | None = None
    max_wait: float = defaults.MAX_WAIT
    publish_interval: float = defaults.PUBLISH_INTERVAL
    max_pending_subsets: int = defaults.MAX_PENDING_SUBSETS
    max_queued: int = defaults.MAX_QUEUED
    max_body_bytes: int = defaults.MAX_BODY_BYTES
    max_record_bytes: int = defaults.MAX_RECORD_BYTES
    # Host names the HTTP API answers to besides the bound one (on loopback:
    # 127.0.0.1, localhost and ::1); others get 421, against DNS rebinding.
    allowed_hosts: tuple[str, ...] = ()
    grace: float = defaults.GRACE
    retry_pause: float = defaults.RETRY_PAUSE
    durable: bool = False
    init: bool = False  # accept an existing empty --store file as a new store
    # Validation gate: publish a candidate only if the reference agent does not
    # do worse with it on these tasks (ENV:FOLD:SEEDS) than with the current version.
    validate: str | None = None
    params: str = ""
    max_steps: int = defaults.VALIDATE_MAX_STEPS
    # Validation episodes at once: threads (default 1), or Ray tasks in flight
    # (default: one per CPU of the cluster).
    validate_workers: int | None = None
    # Where validation episodes are played: "local" threads, or "ray" tasks on
    # the cluster at ray_address (None: RAY_ADDRESS, else a local Ray).
    executor: str = attrs.field(default="local", validator=attrs.validators.in_(EXECUTOR_KINDS))
    ray_address: str | None = None
    # The optimizer LLM.
    base_url: str | None = None
    model: str = "default"
    api_key_env: str = "FGO_API_KEY"
    max_concurrency: int | None = None
    context_tokens: int | None = None
    subset_tokens: int | None = None
    module_tokens: int | None = None
    fan_in: int = 2
    max_completion_tokens: int | None = None
    call_timeout: float | None = None  # 600 s, or 3600 for the local model
    retries: int = 5
    structured_output: str = "auto"
    strict: bool = True
    adaptive: bool = True  # AIMD concurrency (see fgo optimize --adaptive)
    token_budget: int | None = None
    # OTLP ingest (POST /v1/traces, POST /v1/feedback): where a trace's
    # outcome comes from, and how long a trace may wait for it.
    success_attr: str | None = None
    score_attr: str | None = None
    success_threshold: float | None = None
    trace_format: str = "auto"
    trace_wait: float = 600.0
    trace_settle: float = 5.0
    max_waiting_traces: int = 10_000

    def trace_settings(self) -> TraceSettings:
        return TraceSettings(
            success_attr=self.success_attr,
            score_attr=self.score_attr,
            success_threshold=self.success_threshold,
            trace_format=self.trace_format,
            trace_wait=self.trace_wait,
            trace_settle=self.trace_settle,
            max_waiting_traces=self.max_waiting_traces,
        )

    @classmethod
    def load(cls, path: Path | None, overrides: Mapping[str, Any]) -> ServeSettings:
        """Defaults, then the TOML file at ``path``, then ``overrides`` (flags
        given on the command line; None means not given)."""
        values: dict[str, Any] = {}
        fields = {f.name: f for f in attrs.fields(cls)}
        if path is not None:
            try:
                data = tomllib.loads(path.read_text(encoding="utf-8"))
            except OSError as e:
                raise ValueError(f"{path}: cannot read the settings file: {e.strerror}") from e
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"{path}: not valid TOML: {e}") from e
            for key, value in data.items():
                name = key.replace("-", "_")
                if name not in fields:
                    known = ", ".join(sorted(fields))
                    raise ValueError(f"{path}: unknown setting {key!r}; known: {known}")
                values[name] = _coerce(path, key, fields[name].type, value)
        values.update({k: v for k, v in overrides.items() if v is not None})
        for name in ("store", "watch", "initial_module"):
            if isinstance(values.get(name), str):
                values[name] = Path(values[name])
        return cls(**values)

    def token(self) -> str | None:
        return os.environ.get(self.token_env) or None


def _coerce(path: Path, key: str, annotation: object, value: object) -> object:
    text = str(annotation)
    ok: bool
    if text.startswith("tuple[str"):
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ValueError(f"{path}: setting {key!r} must be a list of strings")
    if "bool" in text:
        ok = isinstance(value, bool)
    elif "float" in text:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif "int" in text:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ValueError(f"{path}: setting {key!r} must be {text.replace(' | None', '')}")
    return value


def daemon_config(settings: ServeSettings, gateway: GatewayConfig, context: int) -> DaemonConfig:
    from .._core.io import load_module

    initial = load_module(settings.initial_module) if settings.initial_module else Module()
    validation = None
    if settings.validate:
        validation = ValidationConfig(
            tasks=tuple(parse_tasks(settings.validate, params=settings.params)),
            agent=AgentConfig(max_steps=settings.max_steps),
            workers=settings.validate_workers or 1,
            executor=make_executor(
                settings.executor,
                address=settings.ray_address,
                workers=settings.validate_workers,
                local_workers=1,
            ),
        )
    return DaemonConfig(
        store=settings.store,
        gateway=gateway,
        run=RunConfig(
            context_tokens=context,
            subset_tokens=settings.subset_tokens,
            module_tokens=settings.module_tokens,
            fan_in=settings.fan_in,
        ),
        initial=initial,
        max_wait=settings.max_wait,
        publish_interval=settings.publish_interval,
        max_pending_subsets=settings.max_pending_subsets,
        max_queued=settings.max_queued,
        retry_pause=settings.retry_pause,
        durable=settings.durable,
        init=settings.init,
        validation=validation,
    )


async def run_daemon(settings: ServeSettings, config: DaemonConfig) -> None:
    """Serve until SIGTERM/SIGINT (or, with ``once``, until the inputs are drained)."""
    from .http import serve_http

    log = structlog.get_logger()
    shutdown = trio.Event()
    executor = config.validation.executor if config.validation else None
    if isinstance(executor, RayExecutor):
        await executor.connect()  # an unreachable cluster fails the start, not a publish
    async with (
        open_optimizer(config, grace=settings.grace) as optimizer,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(_signals, shutdown)
        traces: TraceIngest | None = None
        missing = otel_missing()
        if missing is None:
            traces = TraceIngest(optimizer, settings.trace_settings())
            await nursery.start(lambda task_status: traces.run(task_status=task_status))
        else:
            log.info("otlp_ingest_off", why=missing)
        url = await nursery.start(
            lambda task_status: serve_http(
                optimizer,
                host=settings.host,
                port=settings.port,
                token=settings.token(),
                max_body_bytes=settings.max_body_bytes,
                max_record_bytes=settings.max_record_bytes,
                allowed_hosts=settings.allowed_hosts,
                shutdown=shutdown,
                traces=traces,
                task_status=task_status,
            )
        )
        log.info("serving", url=url, store=str(settings.store))
        print(f"fgo serve: listening on {url}", flush=True)
        sources: list[Any] = []
        if settings.watch is not None:
            sources.append(
                lambda: watch_folder(
                    optimizer,
                    settings.watch,
                    interval=settings.watch_interval,
                    max_record_bytes=settings.max_record_bytes,
                    once=settings.once,
                )
            )
        if settings.stdin:
            sources.append(
                lambda: read_stdin(optimizer, max_record_bytes=settings.max_record_bytes)
            )
        nursery.start_soon(_feed_then, optimizer, sources, settings.once, shutdown)
        await shutdown.wait()
        log.info("shutting_down", grace=settings.grace)
        nursery.cancel_scope.cancel()


async def _signals(shutdown: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            shutdown.set()
            return


async def _feed_then(
    optimizer: StreamingOptimizer, sources: list[Any], once: bool, shutdown: trio.Event
) -> None:
    async with trio.open_nursery() as nursery:
        for source in sources:
            nursery.start_soon(source)
    if once:
        await optimizer.wait_idle()
        shutdown.set()


async def _ingest_lines(
    optimizer: StreamingOptimizer, where: str, first_line: int, text: str, max_record_bytes: int
) -> None:
    """Ingest JSONL ``text`` whose first line is line ``first_line`` of ``where``;
    log each refused record with its place."""
    records, bad = parse_body(text, max_record_bytes=max_record_bytes)
    result = await optimizer.submit_many(
        [r for _, r in records], lines=[first_line + n - 1 for n, _ in records]
    )
    log = structlog.get_logger()
    for line, reason in [(first_line + r.line - 1, r.reason) for r in bad] + [
        (r.line, r.reason) for r in result.rejected
    ]:
        log.warning("record_rejected", source=f"{where}:{line}", reason=reason)


async def watch_folder(
    optimizer: StreamingOptimizer,
    folder: Path | None,
    *,
    interval: float,
    max_record_bytes: int,
    once: bool = False,
) -> None:
    """Tail every ``*.jsonl`` file in ``folder``: ingest complete lines, and keep
    each file's offset in the store so a restart goes on where it stopped."""
    assert folder is not None
    store = optimizer.store
    log = structlog.get_logger()
    while True:
        for path in sorted(await trio.to_thread.run_sync(lambda: list(folder.glob("*.jsonl")))):
            key = str(path.resolve())
            offset, lines_read = await store.offset(key)
            chunk, size = await trio.to_thread.run_sync(_read_from, path, offset)
            if size < offset:
                log.warning("file_truncated", path=str(path), offset=offset, size=size)
                await store.set_offset(key, 0, 0)
                continue
            end = chunk.rfind(b"\n") + 1
            if end == 0:
                continue  # no complete line yet
            text = chunk[:end].decode("utf-8", errors="replace")
            await _ingest_lines(optimizer, str(path), lines_read + 1, text, max_record_bytes)
            await store.set_offset(key, offset + end, lines_read + text.count("\n"))
        if once:
            return
        await trio.sleep(interval)


def _read_from(path: Path, offset: int) -> tuple[bytes, int]:
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size < offset:
            return b"", size
        f.seek(offset)
        return f.read(), size


async def read_stdin(
    optimizer: StreamingOptimizer, *, max_record_bytes: int, batch: int = 256
) -> None:
    """Ingest JSONL from stdin until end of file, ``batch`` lines at a time."""
    line_number = 1
    while True:
        lines = await trio.to_thread.run_sync(_read_lines, batch, abandon_on_cancel=True)
        if not lines:
            await optimizer.flush()
            return
        await _ingest_lines(optimizer, "<stdin>", line_number, "".join(lines), max_record_bytes)
        line_number += len(lines)


def _read_lines(n: int) -> list[str]:
    out: list[str] = []
    for _ in range(n):
        line = sys.stdin.readline()
        if not line:
            break
        out.append(line if line.endswith("\n") else line + "\n")
    return out
