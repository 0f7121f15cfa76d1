"""OTLP traces in the daemon: ``POST /v1/traces`` and ``POST /v1/feedback``.

The spans come from the real OpenTelemetry SDK, and the first test sends
them with the SDK's own OTLP/HTTP exporter (protobuf), as an agent whose
exporter points at ``fgo serve`` would. The daemon runs in-process against
the scripted loopback LLM, with its real store and HTTP server.
"""

from __future__ import annotations

import gzip
import json
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import trio
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace.export import SpanExportResult

from fgo_actors._daemon.http import serve_http
from fgo_actors._daemon.optimizer import StreamingOptimizer, open_optimizer
from fgo_actors._daemon.traces import TraceIngest, TraceSettings
from fgo_actors._storage.store import Store

from .helpers import StartLLM, daemon_config
from .test_traces import GENAI_STEPS, SUCCESS, Recorder, genai_run, otlp_line, trace_hex


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def daemon(
    store: Path,
    llm: str,
    settings: TraceSettings | None = None,
    *,
    clock: Callable[[], float] | None = None,
    run_converter: bool = True,
) -> AsyncIterator[tuple[StreamingOptimizer, TraceIngest, str]]:
    """An in-process daemon with OTLP ingest; yields it, the ingest and its URL."""
    async with (
        open_optimizer(daemon_config(store, llm)) as opt,
        trio.open_nursery() as nursery,
    ):
        settings = settings or TraceSettings(success_attr=SUCCESS)
        ingest = TraceIngest(opt, settings, **({"clock": clock} if clock else {}))
        if run_converter:
            await nursery.start(lambda task_status: ingest.run(task_status=task_status))
        stop = trio.Event()
        url = await nursery.start(
            lambda task_status: serve_http(
                opt, port=_free_port(), traces=ingest, shutdown=stop, task_status=task_status
            )
        )
        try:
            yield opt, ingest, url
        finally:
            stop.set()
            nursery.cancel_scope.cancel()


async def _stored(opt: StreamingOptimizer, trace_ids: set[str]) -> dict[str, dict[str, Any]]:
    """The stored trajectories of ``trace_ids``, once all are there (10 s)."""
    with trio.fail_after(10):
        while await opt.store.known_ids(trace_ids) != trace_ids:  # noqa: ASYNC110
            await trio.sleep(0.05)

    def read() -> dict[str, dict[str, Any]]:
        rows = opt.store.sync._db.execute("SELECT id, body FROM trajectories").fetchall()
        return {r[0]: json.loads(r[1]) for r in rows if r[0] in trace_ids}

    return await trio.to_thread.run_sync(read)


def _runs(*successes: bool | None) -> tuple[Recorder, list[str]]:
    rec = Recorder()
    ids = []
    for success in successes:
        before = len(rec.spans())
        genai_run(rec, success=success)
        ids.append(trace_hex(rec.spans()[before]))
    return rec, ids


async def test_the_sdk_exporter_posts_traces_that_become_trajectories(
    start_llm: StartLLM, tmp_path: Path
) -> None:
    _server, llm = await start_llm()
    rec, (won, lost) = _runs(True, False)
    async with daemon(tmp_path / "fgo.db", llm) as (opt, ingest, url):
        exporter = OTLPSpanExporter(endpoint=f"{url}/v1/traces", timeout=10)
        result = await trio.to_thread.run_sync(exporter.export, rec.spans())
        assert result is SpanExportResult.SUCCESS
        stored = await _stored(opt, {won, lost})
        assert stored[won]["outcome"]["success"] is True
        assert stored[lost]["outcome"]["success"] is False
        assert stored[won]["steps"] == GENAI_STEPS
        assert stored[won]["metadata"]["service_name"] == "weather-agent"
        stats = ingest.statistics()
        assert (stats["traces_converted"], stats["traces_waiting"]) == (2, 0)
        assert await opt.store.waiting() == ([], [])  # nothing left on disk either

        # The same spans again: their traces are stored, so each is refused
        # as late, in the OTLP partial-success answer (which is not retried).
        async with httpx.AsyncClient() as client:
            again = await client.post(
                f"{url}/v1/traces",
                content=otlp_line(rec.spans()),
                headers={"Content-Type": "application/json"},
            )
            assert again.status_code == 200
            partial = again.json()["partialSuccess"]
            assert partial["rejectedSpans"] == str(len(rec.spans()))
            assert "late_span" in partial["errorMessage"]
            metrics = (await client.get(f"{url}/metrics")).text
        assert "fgo_traces_converted_total 2" in metrics
        assert f'fgo_trace_spans_total{{outcome="rejected"}} {len(rec.spans())}' in metrics


async def test_a_trace_waits_for_its_feedback_across_a_restart(
    start_llm: StartLLM, tmp_path: Path
) -> None:
    _server, llm = await start_llm()
    rec, (pending,) = _runs(None)
    store = tmp_path / "fgo.db"
    async with daemon(store, llm) as (_opt, ingest, url), httpx.AsyncClient() as client:
        response = await client.post(f"{url}/v1/traces", content=otlp_line(rec.spans()))
        assert (response.status_code, response.json()) == (200, {})
        await trio.sleep(0.3)
        assert ingest.statistics()["traces_waiting"] == 1
    # Restarted: the waiting trace was kept in the store.
    async with (
        daemon(store, llm) as (opt, ingest, url),
        httpx.AsyncClient() as client,
    ):
        assert ingest.statistics()["traces_waiting"] == 1
        response = await client.post(
            f"{url}/v1/feedback",
            json={"trace_id": pending.upper(), "success": True, "score": 0.5, "feedback": "good"},
        )
        assert response.status_code == 202
        assert response.json()["accepted"] == 1
        stored = await _stored(opt, {pending})
        assert stored[pending]["outcome"] == {"success": True, "score": 0.5, "feedback": "good"}
        # Feedback for a trace already converted is refused, and says why.
        late = await client.post(f"{url}/v1/feedback", json={"trace_id": pending, "success": False})
        assert late.json()["rejected"][0]["reason"] == "late_feedback"


async def test_feedback_may_come_before_the_spans(start_llm: StartLLM, tmp_path: Path) -> None:
    _server, llm = await start_llm()
    rec, (first, second) = _runs(None, None)
    async with daemon(tmp_path / "fgo.db", llm) as (opt, _ingest, url):
        async with httpx.AsyncClient() as client:
            lines = "\n".join(
                [
                    json.dumps({"trace_id": first, "success": False}),
                    "{not json",
                    json.dumps({"trace_id": second, "success": "maybe"}),
                ]
            )
            response = await client.post(f"{url}/v1/feedback", content=lines)
            body = response.json()
            assert body["accepted"] == 1
            assert [r["reason"] for r in body["rejected"]] == ["bad_feedback", "bad_feedback"]
            assert "POST /v1/feedback:2" in body["rejected"][0]["where"]
            await client.post(f"{url}/v1/traces", content=otlp_line(rec.spans()))
        stored = await _stored(opt, {first})
        assert stored[first]["outcome"]["success"] is False
        assert await opt.store.known_ids({second}) == set()  # still waiting


async def test_a_trace_that_never_gets_an_outcome_expires_counted(
    start_llm: StartLLM, tmp_path: Path
) -> None:
    _server, llm = await start_llm()
    rec, (lonely,) = _runs(None)
    clock = Clock()
    settings = TraceSettings(success_attr=SUCCESS, trace_wait=60)
    async with daemon(tmp_path / "fgo.db", llm, settings, clock=clock, run_converter=False) as (
        opt,
        ingest,
        url,
    ):
        async with httpx.AsyncClient() as client:
            await client.post(f"{url}/v1/traces", content=otlp_line(rec.spans()))
        assert await ingest.convert_due() == 0
        assert ingest.statistics()["traces_waiting"] == 1
        clock.now += 61
        assert await ingest.convert_due() == 0
        stats = ingest.statistics()
        assert (stats["traces_waiting"], stats["skipped:no_outcome"]) == (0, 1)
        assert await opt.store.known_ids({lonely}) == set()
        assert await opt.store.waiting() == ([], [])


async def test_a_trace_without_a_root_span_completes_when_it_settles(
    start_llm: StartLLM, tmp_path: Path
) -> None:
    """Spans whose parent never arrives (the collector sampled it out, or the
    agent's root is in another service) make a trace once no more come."""
    _server, llm = await start_llm()
    rec, (trace,) = _runs(True)
    children = [s for s in rec.spans() if s.parent is not None]
    clock = Clock()
    settings = TraceSettings(success_attr=SUCCESS, trace_settle=5)
    async with daemon(tmp_path / "fgo.db", llm, settings, clock=clock, run_converter=False) as (
        opt,
        ingest,
        url,
    ):
        async with httpx.AsyncClient() as client:
            await client.post(f"{url}/v1/traces", content=otlp_line(children))
        assert await ingest.convert_due() == 0
        clock.now += 5
        assert await ingest.convert_due() == 1
        stored = await _stored(opt, {trace})
        assert stored[trace]["outcome"]["success"] is True


async def test_bad_bodies_are_refused_with_a_reason(start_llm: StartLLM, tmp_path: Path) -> None:
    _server, llm = await start_llm()
    rec, (trace,) = _runs(True)
    async with (
        daemon(tmp_path / "fgo.db", llm) as (opt, _ingest, url),
        httpx.AsyncClient() as client,
    ):

        async def post(content: bytes | str, **headers: str) -> httpx.Response:
            return await client.post(f"{url}/v1/traces", content=content, headers=headers)

        bad_json = await post("{not json")
        assert (bad_json.status_code, "not JSON" in bad_json.json()["error"]) == (400, True)
        not_otlp = await post(json.dumps({"hello": 1}))
        assert (not_otlp.status_code, "resourceSpans" in not_otlp.json()["error"]) == (400, True)
        bad_proto = await post(b"\xff\xfe\x00garbage", **{"Content-Type": "application/x-protobuf"})
        assert bad_proto.status_code == 400
        form = await post("x", **{"Content-Type": "text/plain"})
        assert form.status_code == 415
        brotli = await post(b"x", **{"Content-Encoding": "br"})
        assert brotli.status_code == 415
        bomb = await post(gzip.compress(b" " * (64 << 20)), **{"Content-Encoding": "gzip"})
        assert bomb.status_code == 413
        # A gzipped body (collectors compress by default) is read.
        zipped = await post(
            gzip.compress(otlp_line(rec.spans()).encode()), **{"Content-Encoding": "gzip"}
        )
        assert zipped.status_code == 200
        await _stored(opt, {trace})


async def test_without_the_ingest_the_endpoints_say_so(start_llm: StartLLM, tmp_path: Path) -> None:
    _server, llm = await start_llm()
    async with (
        open_optimizer(daemon_config(tmp_path / "fgo.db", llm)) as opt,
        trio.open_nursery() as nursery,
    ):
        stop = trio.Event()
        url = await nursery.start(
            lambda task_status: serve_http(
                opt, port=_free_port(), shutdown=stop, task_status=task_status
            )
        )
        async with httpx.AsyncClient() as client:
            for path in ("/v1/traces", "/v1/feedback"):
                response = await client.post(f"{url}{path}", content="{}")
                assert response.status_code == 501
                assert "without OTLP ingest" in response.json()["error"]
        stop.set()


def test_waiting_spans_round_trip_through_the_store(tmp_path: Path) -> None:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    from fgo_actors.traces import spans_of
    from fgo_actors.traces.otlp import span_from_json, span_to_json

    rec, _ = _runs(True)
    spans, _problems = spans_of(encode_spans(rec.spans()), file="x")
    store = Store(tmp_path / "s.db")
    store.add_waiting([(s.trace_id, s.span_id, span_to_json(s)) for s in spans], [], 5.0)
    store.add_waiting([(s.trace_id, s.span_id, span_to_json(s)) for s in spans], [], 6.0)
    kept, feedback = store.waiting()
    assert [span_from_json(body) for _, body in kept] == spans
    assert {at for at, _ in kept} == {5.0}  # the first copy
    assert feedback == []
    store.drop_waiting([spans[0].trace_id])
    assert store.waiting() == ([], [])
