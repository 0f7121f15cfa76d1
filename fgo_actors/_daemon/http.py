"""The daemon's HTTP API (``protocols/openapi.yaml``): a small Starlette app
served by hypercorn's trio worker, in the same trio run as the optimizer."""

from __future__ import annotations

import functools
import hmac
import json
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import structlog
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from .._core.render import module_markdown
from .._storage.store import StoreFullError
from . import defaults
from .optimizer import StreamingOptimizer
from .traces import (
    TRACE_SKIP_REASONS,
    OTLPBodyError,
    TraceIngest,
    otel_missing,
    parse_feedback_body,
    parse_traces_body,
)

# Version numbers are SQLite integers: larger ones cannot exist.
MAX_VERSION = 2**63
LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})
SSE_HEARTBEAT = 15.0


# What GET /v1/module?as= serves: the version as JSON, or its module as an
# agent loads it (see fgo render).
MODULE_FORMS = ("json", "system-prompt", "openai-tools", "markdown")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


# Seconds a client is asked to wait after a 507 (no space left for the store):
# freeing disk space takes a person, not a moment.
FULL_DISK_RETRY_AFTER = 30
# A body must have arrived this many seconds after its request began: one
# trickled a byte at a time would otherwise hold a connection for ever.
BODY_SECONDS = defaults.BODY_SECONDS


class BodyTooLargeError(Exception):
    pass


class BodyTooSlowError(Exception):
    pass


async def _read_body(request: Request, limit: int, seconds: float = BODY_SECONDS) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLargeError
    chunks: list[bytes] = []
    size = 0
    with trio.move_on_after(seconds) as deadline:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLargeError
            chunks.append(chunk)
    if deadline.cancelled_caught:
        raise BodyTooSlowError
    return b"".join(chunks)


# Bodies a browser can send cross-origin without asking first (a "simple"
# request) in a type that is not JSON: refused, so that no web page can post
# trajectories. Clients send JSON, JSONL or, like curl, no particular type.
BROWSER_FORM_TYPES = frozenset({"text/plain", "multipart/form-data"})


class BodyEncodingError(Exception):
    pass


def _decoded(raw: bytes, encoding: str, limit: int) -> bytes:
    """The body as sent before its ``Content-Encoding`` (gzip, as collectors
    send OTLP by default), decompressed to at most ``limit`` bytes."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return raw
    if encoding not in ("gzip", "deflate"):
        raise BodyEncodingError(f"Content-Encoding {encoding!r} is not supported (gzip is)")
    inflater = zlib.decompressobj(wbits=47 if encoding == "gzip" else 15)
    try:
        out = inflater.decompress(raw, limit + 1)
    except zlib.error as e:
        raise BodyEncodingError(f"the body is not valid {encoding}: {e}") from e
    if len(out) > limit:
        raise BodyTooLargeError
    return out


def host_name(header: str) -> str:
    """The host in a ``Host`` header, without the port (``[::1]:8765`` -> ``::1``)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


def _version_number(text: str) -> int | None:
    """A version number from the path, or None for one that cannot exist (not
    digits, or past SQLite's integers: 5,000 digits must not reach int())."""
    if not text.isdigit() or not text.isascii() or len(text) > len(str(MAX_VERSION)):
        return None
    n = int(text)
    return n if n < MAX_VERSION else None


def _shown(text: str) -> str:
    return text if len(text) <= 40 else text[:40] + "..."


def make_app(
    optimizer: StreamingOptimizer,
    *,
    token: str | None = None,
    max_body_bytes: int = defaults.MAX_BODY_BYTES,
    max_record_bytes: int = defaults.MAX_RECORD_BYTES,
    retry_after: int = 2,
    allowed_hosts: frozenset[str] | None = None,
    body_seconds: float = BODY_SECONDS,
    traces: TraceIngest | None = None,
) -> Starlette:
    """The API over ``optimizer``. With ``token``, every endpoint but
    ``/healthz`` needs ``Authorization: Bearer <token>``.

    With ``allowed_hosts``, a request whose ``Host`` names another host is
    refused (421): a web page that points a name it controls at 127.0.0.1
    (DNS rebinding) cannot talk to the daemon. A write (POST) whose
    ``Origin`` is not the daemon's own is refused (403), so a page the user
    opens cannot post trajectories or roll back the module, and a body in a
    browser form's type is refused (415).

    ``traces`` serves ``POST /v1/traces`` and ``POST /v1/feedback``; without
    it they answer 501.
    """
    expected = token.encode() if token else None

    def authorized(request: Request) -> bool:
        if expected is None:
            return True
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        # Constant time: the comparison does not stop at the first wrong byte.
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), expected)

    Handler = Callable[[Request], Awaitable[Response]]

    def foreign(request: Request) -> Response | None:
        """The answer to a request from where it must not come, or None."""
        host = request.headers.get("host", "")
        if allowed_hosts is not None and host_name(host) not in allowed_hosts:
            return _error(
                421,
                f"Host {host!r} is not one this daemon answers to "
                f"({', '.join(sorted(allowed_hosts))}; see allowed_hosts)",
            )
        origin = request.headers.get("origin")
        if request.method == "POST" and origin is not None:
            own = f"{request.url.scheme}://{host}".lower()
            if origin.strip().lower() != own:
                return _error(403, f"cross-origin writes are refused (Origin {origin!r})")
        return None

    def guarded(handler: Handler, *, open_to_all: bool = False) -> Handler:
        async def wrapper(request: Request) -> Response:
            refused = foreign(request)
            if refused is not None:
                return refused
            if not open_to_all and not authorized(request):
                return _error(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
            return await handler(request)

        return wrapper

    def saturated() -> Response:
        return _error(
            429,
            "the optimizer is saturated; nothing was stored; retry later",
            {"Retry-After": str(retry_after)},
        )

    def store_full(e: StoreFullError) -> Response:
        structlog.get_logger().error("store_full", error=str(e))
        return _error(
            507,
            f"{e}; nothing of this body was stored; free space, then send it again",
            {"Retry-After": str(FULL_DISK_RETRY_AFTER)},
        )

    async def post_trajectories(request: Request) -> Response:
        # The body is read even when the answer is 429: a server that answers
        # before reading must drop the connection, and the client would see a
        # reset instead of the 429.
        try:
            raw = await _read_body(request, max_body_bytes, body_seconds)
        except BodyTooLargeError:
            return _error(413, f"request body is over {max_body_bytes} bytes")
        except BodyTooSlowError:
            return _error(408, f"the request body did not arrive within {body_seconds:g} s")
        kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if kind in BROWSER_FORM_TYPES:
            return _error(
                415,
                f"Content-Type {kind} is refused: send JSON or JSONL "
                "(application/json or application/x-ndjson)",
            )
        if optimizer.saturated:
            return saturated()
        try:
            text = await trio.to_thread.run_sync(raw.decode, "utf-8")
        except UnicodeDecodeError as e:
            return _error(400, f"request body is not UTF-8: {e}")
        try:
            result = await optimizer.submit_text(text, max_record_bytes=max_record_bytes)
        except StoreFullError as e:
            return store_full(e)
        return JSONResponse(result.to_json(), status_code=202)

    async def read_write(request: Request) -> bytes | Response:
        """The body of a POST, or the error response to send instead."""
        try:
            raw = await _read_body(request, max_body_bytes, body_seconds)
            return _decoded(raw, request.headers.get("content-encoding", ""), max_body_bytes)
        except BodyTooLargeError:
            return _error(413, f"request body is over {max_body_bytes} bytes")
        except BodyTooSlowError:
            return _error(408, f"the request body did not arrive within {body_seconds:g} s")
        except BodyEncodingError as e:
            return _error(415, str(e))

    def no_traces() -> Response:
        why = otel_missing() or "this daemon was started without OTLP ingest"
        return _error(501, why)

    async def post_traces(request: Request) -> Response:
        body = await read_write(request)
        if isinstance(body, Response):
            return body
        if traces is None:
            return no_traces()
        kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if kind not in ("application/json", "application/x-protobuf", ""):
            return _error(
                415,
                f"Content-Type {kind} is refused: send OTLP/HTTP as application/json "
                "or application/x-protobuf",
            )
        if optimizer.saturated:
            return saturated()
        try:
            spans, problems = await trio.to_thread.run_sync(parse_traces_body, body, kind)
        except OTLPBodyError as e:
            return _error(400, str(e))
        try:
            receipt = await traces.receive_spans(spans, problems)
        except StoreFullError as e:
            return store_full(e)
        answer = receipt.otlp_json()
        if kind == "application/x-protobuf":
            from google.protobuf import json_format
            from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
                ExportTraceServiceResponse,
            )

            message = json_format.ParseDict(answer, ExportTraceServiceResponse())
            return Response(message.SerializeToString(), media_type="application/x-protobuf")
        return JSONResponse(answer)

    async def post_feedback(request: Request) -> Response:
        body = await read_write(request)
        if isinstance(body, Response):
            return body
        if traces is None:
            return no_traces()
        kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if kind in BROWSER_FORM_TYPES:
            return _error(415, f"Content-Type {kind} is refused: send JSON or JSONL")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as e:
            return _error(400, f"request body is not UTF-8: {e}")
        records, problems = await trio.to_thread.run_sync(parse_feedback_body, text)
        try:
            receipt = await traces.receive_feedback(records, problems)
        except StoreFullError as e:
            return store_full(e)
        return JSONResponse(receipt.to_json(), status_code=202)

    async def get_module(request: Request) -> Response:
        form = request.query_params.get("as", "json")
        if form not in MODULE_FORMS:
            return _error(400, f"as must be one of {', '.join(MODULE_FORMS)}, not {_shown(form)!r}")
        version = optimizer.latest_version()
        if version is None:
            return _error(404, "no version has been published yet")
        # One tag per version, content and form: an agent polling with
        # If-None-Match gets a 304 until a new version is published.
        etag = f'"v{version.n}-{version.module.digest()}-{form}"'
        headers = {"ETag": etag, "Cache-Control": "no-cache"}
        asked = {tag.strip() for tag in request.headers.get("if-none-match", "").split(",")}
        if etag in asked or "*" in asked:
            return Response(status_code=304, headers=headers)
        if form == "system-prompt":
            return PlainTextResponse(version.module.system_prompt() + "\n", headers=headers)
        if form == "openai-tools":
            return JSONResponse(version.module.openai_tools(), headers=headers)
        if form == "markdown":
            text = module_markdown(version.module, title=f"Module version {version.n}")
            return Response(text, media_type="text/markdown; charset=utf-8", headers=headers)
        return JSONResponse(version.to_json(), headers=headers)

    async def list_versions(request: Request) -> Response:
        versions = await optimizer.list_versions()
        latest = optimizer.latest_version()
        return JSONResponse(
            {
                "latest": latest.n if latest else None,
                "versions": [v.to_json(with_module=False) for v in versions],
            }
        )

    async def get_version(request: Request) -> Response:
        n = _version_number(request.path_params["n"])
        version = await optimizer.version(n) if n is not None else None
        if version is None:
            return _error(404, f"there is no version {_shown(request.path_params['n'])}")
        return JSONResponse(version.to_json())

    async def rollback(request: Request) -> Response:
        n = _version_number(request.path_params["n"])
        try:
            if n is None:
                raise KeyError(request.path_params["n"])
            version = await optimizer.rollback(n)
        except KeyError:
            return _error(404, f"there is no version {_shown(request.path_params['n'])}")
        except ValueError as e:
            return _error(409, str(e))
        return JSONResponse(version.to_json())

    async def events(request: Request) -> Response:
        async def stream() -> AsyncIterator[str]:
            async with optimizer.events.subscribe() as inbox:
                # Subscribed before the first byte: a client that has read this
                # comment misses no later event.
                yield ": fgo events\n\n"
                while True:
                    event: dict[str, Any] | None = None
                    with trio.move_on_after(SSE_HEARTBEAT):
                        event = await inbox.receive()
                    if event is None:
                        yield ": heartbeat\n\n"
                        continue
                    yield (
                        f"id: {event['id']}\nevent: {event['type']}\n"
                        f"data: {json.dumps(event, separators=(',', ':'))}\n\n"
                    )

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def healthz(request: Request) -> Response:
        latest = optimizer.latest_version()
        return JSONResponse(
            {
                "status": "ok",
                "latest_version": latest.n if latest else None,
                "saturated": optimizer.saturated,
                "publish_pending": optimizer.publish_pending,
            }
        )

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(
            prometheus_text(optimizer, traces), media_type="text/plain; version=0.0.4"
        )

    routes = [
        Route("/v1/trajectories", guarded(post_trajectories), methods=["POST"]),
        Route("/v1/traces", guarded(post_traces), methods=["POST"]),
        Route("/v1/feedback", guarded(post_feedback), methods=["POST"]),
        Route("/v1/module", guarded(get_module), methods=["GET"]),
        Route("/v1/module/versions", guarded(list_versions), methods=["GET"]),
        Route("/v1/module/versions/{n}", guarded(get_version), methods=["GET"]),
        Route("/v1/module/rollback/{n}", guarded(rollback), methods=["POST"]),
        Route("/v1/events", guarded(events), methods=["GET"]),
        Route("/healthz", guarded(healthz, open_to_all=True), methods=["GET"]),
        Route("/metrics", guarded(metrics), methods=["GET"]),
    ]
    return Starlette(routes=routes)


def prometheus_text(optimizer: StreamingOptimizer, traces: TraceIngest | None = None) -> str:
    """``/metrics`` in the Prometheus text exposition format."""
    s = optimizer.statistics()
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP fgo_{name} {help_text}")
        lines.append(f"# TYPE fgo_{name} {kind}")
        lines.extend(f"fgo_{name}{labels} {_number(value)}" for labels, value in samples)

    metric("trajectories_total", "counter", "Trajectories stored.", [("", s.trajectories)])
    metric(
        "queue_depth",
        "gauge",
        "Work waiting, by queue.",
        [
            ('{queue="unpacked"}', s.queued),
            ('{queue="subsets"}', s.subsets_pending),
        ],
    )
    metric("optimizing", "gauge", "Subsets being optimized now.", [("", s.optimizing)])
    metric("merges_in_flight", "gauge", "Forest merges running now.", [("", s.merges_in_flight)])
    metric("forest_trees", "gauge", "Trees in the merge forest.", [("", s.trees)])
    metric(
        "subsets_total",
        "counter",
        "Subsets finished, by outcome.",
        [('{outcome="done"}', s.subsets_done), ('{outcome="failed"}', s.subsets_failed)],
    )
    metric("llm_in_flight", "gauge", "LLM calls in flight.", [("", s.llm_in_flight)])
    metric(
        "llm_window",
        "gauge",
        "LLM calls allowed in flight now (the adaptive window).",
        [("", s.llm_window)],
    )
    metric(
        "llm_throttled_total",
        "counter",
        "Calls sent again after a 429 or 503 caused by our own concurrency.",
        [("", s.llm_throttled)],
    )
    metric(
        "llm_tokens_total",
        "counter",
        "Tokens paid for since start, by role and kind.",
        [
            (f'{{role="{role}",kind="{kind}"}}', n)
            for role, counts in sorted(s.tokens_by_role.items())
            for kind, n in sorted(counts.items())
        ],
    )
    metric(
        "llm_cached_calls_total",
        "counter",
        "Calls replayed from the cache.",
        [("", s.cached_calls)],
    )
    metric(
        "versions_total",
        "counter",
        "Module versions, by status.",
        [
            ('{status="published"}', s.versions_published),
            ('{status="rejected"}', s.versions_rejected),
        ],
    )
    metric(
        "latest_version",
        "gauge",
        "The latest published version (0: none).",
        [("", s.latest_version or 0)],
    )
    metric(
        "events_dropped_total",
        "counter",
        "Events slow subscribers missed.",
        [("", s.events_dropped)],
    )
    metric("saturated", "gauge", "1 while ingest answers 429.", [("", int(s.saturated))])
    metric(
        "publish_pending",
        "gauge",
        "1 while a new version is due or being folded (the latest is not final).",
        [("", int(s.publish_pending))],
    )
    # Written with zeros when OTLP ingest is off, so the families never change.
    t = traces.statistics() if traces is not None else {}
    metric(
        "trace_spans_total",
        "counter",
        "Spans received on /v1/traces, and those refused.",
        [
            ('{outcome="received"}', t.get("spans_received", 0)),
            ('{outcome="rejected"}', t.get("spans_rejected", 0)),
        ],
    )
    metric(
        "traces_waiting",
        "gauge",
        "Traces waiting for their outcome or the rest of their spans.",
        [("", t.get("traces_waiting", 0))],
    )
    metric(
        "traces_converted_total",
        "counter",
        "Traces stored as trajectories.",
        [("", t.get("traces_converted", 0))],
    )
    metric(
        "traces_skipped_total",
        "counter",
        "Traces that gave no trajectory, by reason.",
        [(f'{{reason="{r}"}}', t.get(f"skipped:{r}", 0)) for r in TRACE_SKIP_REASONS],
    )
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    """A sample value: integers exactly (token counters pass a million fast)."""
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


async def serve_http(
    optimizer: StreamingOptimizer,
    *,
    host: str = defaults.HOST,
    port: int = defaults.PORT,
    token: str | None = None,
    max_body_bytes: int = defaults.MAX_BODY_BYTES,
    max_record_bytes: int = defaults.MAX_RECORD_BYTES,
    allowed_hosts: Sequence[str] = (),
    body_seconds: float = BODY_SECONDS,
    shutdown: trio.Event | None = None,
    traces: TraceIngest | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the API until ``shutdown`` is set; reports the base URL when ready.

    Refuses a non-loopback bind without a token: the API can publish and roll
    back modules, so it must not be open to the network. On loopback, only
    the loopback names (and ``allowed_hosts``) are answered; on another
    address, the token guards it, and any ``Host`` is answered unless
    ``allowed_hosts`` names some.
    """
    if host not in LOOPBACK and not token:
        raise ValueError(
            f"binding {host} (not loopback) needs a bearer token "
            "(in $FGO_TOKEN, or the variable --token-env names)"
        )
    config = HypercornConfig()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 2.0
    names = {host_name(h) for h in allowed_hosts}
    if host in LOOPBACK:
        names |= LOOPBACK
    elif names:
        names.add(host_name(host))
    app = make_app(
        optimizer,
        token=token,
        max_body_bytes=max_body_bytes,
        max_record_bytes=max_record_bytes,
        allowed_hosts=frozenset(names) if names else None,
        body_seconds=body_seconds,
        traces=traces,
    )
    stop = shutdown if shutdown is not None else trio.Event()
    async with trio.open_nursery() as nursery:
        urls: list[str] = await nursery.start(
            functools.partial(hypercorn_serve, app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]
        )
        task_status.started(urls[0].rstrip("/"))
