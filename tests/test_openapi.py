"""The live HTTP API of ``fgo serve`` against ``protocols/openapi.yaml``.

A real daemon and ``serve_http`` on a loopback port, driven with httpx over
the socket: every answer's status must be documented for its path and method,
its content type must be the documented one, its documented headers present
and valid, and its JSON body (and each SSE event's data) valid against the
documented schema. The other way round, every documented path, method and
status must be exercised here, so the file cannot drift from the code.
"""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio.testing
import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from starlette.routing import Route

from fgo_actors import (
    DaemonConfig,
    Module,
    RunConfig,
    StreamingOptimizer,
    open_optimizer,
)
from fgo_actors._daemon.http import make_app, serve_http
from fgo_actors._storage.store import Store

from .helpers import ROOT, StartLLM, daemon_config, make_trajectories

PROTOCOLS = ROOT / "protocols"
# The spec's base URI: its relative $refs ("module.schema.json") resolve to
# the schemas' own $ids ("fgo-actors/module.schema.json").
SPEC_URI = "fgo-actors/openapi.yaml"
METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")
TOKEN = "s3cret-token"
MAX_BODY = 16_384


def _pointer(*parts: str) -> str:
    return "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in parts)


@functools.cache
def _spec() -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load((PROTOCOLS / "openapi.yaml").read_text("utf-8"))
    return spec


@functools.cache
def _registry() -> Registry[Any]:
    """The spec and every ``protocols/*.schema.json`` under its $id; nothing
    is fetched (an unknown $ref is an error, not a download)."""
    resources = [(SPEC_URI, DRAFT202012.create_resource(_spec()))]
    for path in sorted(PROTOCOLS.glob("*.schema.json")):
        schema = json.loads(path.read_text("utf-8"))
        resources.append((schema["$id"], Resource.from_contents(schema)))
    return Registry().with_resources(resources)


def _validator(pointer: str) -> Draft202012Validator:
    """A validator for the schema at ``pointer`` in the spec."""
    return Draft202012Validator({"$ref": f"{SPEC_URI}#{pointer}"}, registry=_registry())


def _deref(node: dict[str, Any], pointer: str) -> tuple[dict[str, Any], str]:
    """Follow a local ``$ref`` (a reusable response or parameter)."""
    while "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/"), ref
        pointer = ref[1:]
        found: Any = _spec()
        for part in ref[2:].split("/"):
            found = found[part.replace("~1", "/").replace("~0", "~")]
        node = found
    return node, pointer


def _documented() -> set[tuple[str, str, str]]:
    return {
        (path, method, status)
        for path, item in _spec()["paths"].items()
        for method, operation in item.items()
        if method in METHODS
        for status in operation["responses"]
    }


class Conformance:
    """Checks answers against the spec and records what was exercised."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, str, str]] = set()

    def check(self, response: httpx.Response, template: str, *, read: bool = True) -> Any:
        """Check ``response`` to a request on path ``template``; return its JSON
        body (or text). With ``read=False`` (a stream), only status and headers."""
        method = response.request.method.lower()
        status = str(response.status_code)
        operation = _spec()["paths"][template][method]
        assert status in operation["responses"], (
            f"{method.upper()} {template} answered {status}, which is not documented: "
            f"{response.text if read else ''}"
        )
        self.seen.add((template, method, status))
        doc, pointer = _deref(
            operation["responses"][status], _pointer("paths", template, method, "responses", status)
        )
        for name, header in doc.get("headers", {}).items():
            value = response.headers.get(name)
            assert value is not None or not header.get("required"), f"{status}: no {name} header"
            if value is not None:
                typed = int(value) if header["schema"].get("type") == "integer" else value
                Draft202012Validator(header["schema"]).validate(typed)
        if "content" not in doc:  # a 304: no body
            assert not response.content
            return None
        media = response.headers["content-type"].split(";")[0].strip()
        assert media in doc["content"], f"{method.upper()} {template} {status}: {media}"
        if not read:
            return None
        if media != "application/json":
            return response.text
        body = response.json()
        _validator(pointer + _pointer("content", media, "schema")).validate(body)
        return body

    def check_event(self, event: dict[str, str]) -> dict[str, Any]:
        """Check one SSE message (its ``id``, ``event`` and ``data`` fields)."""
        data: dict[str, Any] = json.loads(event["data"])
        _validator(
            _pointer(
                "paths", "/v1/events", "get", "responses", "200", "content", "text/event-stream"
            )
            + "/x-event-data"
        ).validate(data)
        assert (event["id"], event["event"]) == (str(data["id"]), data["type"])
        return data


@asynccontextmanager
async def _events(
    client: httpx.AsyncClient,
) -> AsyncIterator[tuple[httpx.Response, AsyncIterator[str]]]:
    """``GET /v1/events`` as a stream; yields the response and its lines."""
    async with client.stream("GET", "/v1/events") as response:
        lines = response.aiter_lines()
        try:
            yield response, lines
        finally:
            # The lines come through a chain of httpx async generators that
            # aclosing() cannot reach, and trio warns about each one left
            # suspended. Close the socket and run the chain to its ReadError.
            await response.aclose()
            with trio.fail_after(1), suppress(httpx.ReadError, httpx.StreamClosed):
                async for _ in lines:
                    pass


async def _next_event(lines: AsyncIterator[str]) -> dict[str, str]:
    """The next SSE message's fields; comments (heartbeats) are skipped."""
    fields: dict[str, str] = {}
    async for line in lines:
        if not line:
            if fields:
                return fields
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        fields[name] = value.removeprefix(" ")
    raise AssertionError(f"the event stream ended; last fields {fields}")


def _metrics(text: str) -> dict[str, dict[str, Any]]:
    """Parse the Prometheus text format: {family: {type, labels, samples}}."""
    families: dict[str, dict[str, Any]] = {}
    sample = re.compile(r"^([a-z_]+)(?:\{(.*)\})? (\S+)$")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            families[line.split()[2]] = {"type": None, "labels": set(), "samples": {}}
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            families[name]["type"] = kind
        else:
            m = sample.match(line)
            assert m, f"not a sample line: {line!r}"
            name, labels, value = m.groups()
            pairs = re.findall(r'([a-z_]+)="([^"]*)"', labels or "")
            families[name]["labels"] |= {k for k, _ in pairs}
            families[name]["samples"][tuple(pairs)] = value
    return families


@asynccontextmanager
async def _serving(
    config: DaemonConfig, *, grace: float = 10.0, **http: Any
) -> AsyncIterator[tuple[StreamingOptimizer, str]]:
    """A daemon and its HTTP API on 127.0.0.1 (a free port); yields it and the base URL."""
    stop = trio.Event()
    async with open_optimizer(config, grace=grace) as opt, trio.open_nursery() as nursery:
        base: str = await nursery.start(
            functools.partial(serve_http, opt, host="127.0.0.1", port=0, shutdown=stop, **http)
        )
        try:
            yield opt, base
        finally:
            stop.set()


@asynccontextmanager
async def _client(base: str, token: str | None = TOKEN) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=5) as client:
        yield client


async def _trickled_post(base: str, path: str, body: bytes, pause: float) -> httpx.Response:
    """POST ``body`` one byte every ``pause`` seconds, over a raw socket (the
    server may answer before the body is all sent); the reply as httpx's."""
    url = httpx.URL(base)
    stream = await trio.open_tcp_stream(url.host, url.port or 80)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n"
        f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    reply = b""
    async with stream:
        await stream.send_all(head.encode())

        async def send() -> None:
            for byte in body:
                await trio.sleep(pause)
                try:
                    await stream.send_all(bytes([byte]))
                except trio.BrokenResourceError:
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            while chunk := await stream.receive_some(65536):
                reply += chunk
            nursery.cancel_scope.cancel()
    status_line, _, rest = reply.partition(b"\r\n")
    header_block, _, content = rest.partition(b"\r\n\r\n")
    headers = [
        (name, value)
        for name, _, value in (h.decode().partition(": ") for h in header_block.split(b"\r\n"))
        if name
    ]
    return httpx.Response(
        int(status_line.split()[1]),
        headers=headers,
        content=content,
        request=httpx.Request("POST", f"{base}{path}"),
    )


def _seed_rejected_version(path: Path) -> Module:
    """A store whose version 1 the validation gate kept as rejected."""
    module = Module(instructions="a candidate that played worse")
    lineage = {
        "node": "f1",
        "trees": ["s000001"],
        "parents": [],
        "subsets": 1,
        "trajectories": 4,
        "tokens": {"optimize": {"prompt": 10, "completion": 5, "calls": 1}},
        "scores": {
            "candidate": {"score": 0.25, "success_rate": 0.0, "tasks": 4},
            "current": {"score": 0.5, "success_rate": 0.5, "tasks": 4, "version": None},
        },
    }
    store = Store(path)
    try:
        store.add_version("rejected", module, lineage, time.time())
    finally:
        store.close()
    return module


# ---------------------------------------------------------------- the spec


def test_the_spec_is_well_formed_and_resolves_offline() -> None:
    spec = _spec()
    assert spec["openapi"].startswith("3.1")
    for schema in spec["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)
    # Every $ref anywhere in the file resolves, without the network.
    resolver = _registry().resolver(base_uri=SPEC_URI)

    def refs(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                yield node["$ref"]
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    found = set(refs(spec))
    assert {"module.schema.json", "trajectory.schema.json"} <= found
    for ref in found:
        resolver.lookup(ref)
    # The module schema is applied, not skipped: a version whose module has an
    # unknown key fails.
    version = {"version": 1, "status": "published", "created_at": 1.0, "lineage": {}}
    _validator("/components/schemas/Version").validate({**version, "module": Module().to_json()})
    with pytest.raises(ValidationError):
        _validator("/components/schemas/Version").validate(
            {**version, "module": {**Module().to_json(), "bogus": 1}}
        )


def test_every_event_the_daemon_emits_is_documented() -> None:
    source = "\n".join(
        path.read_text("utf-8") for path in sorted((ROOT / "fgo_actors" / "_daemon").glob("*.py"))
    )
    emitted = set(re.findall(r"\.emit\(\s*\"(\w+)\"", source))
    documented = set(_spec()["components"]["schemas"]["Event"]["discriminator"]["mapping"])
    assert emitted == documented


# ---------------------------------------------------------------- the live API


async def test_live_api_conforms_to_the_spec(start_llm: StartLLM, tmp_path: Path) -> None:
    _server, url = await start_llm()
    conformance = Conformance()
    rejected_module = _seed_rejected_version(tmp_path / "fgo.db")
    data = [t.to_json() for t in make_trajectories(12)]
    async with (
        _serving(
            daemon_config(tmp_path / "fgo.db", url),
            token=TOKEN,
            max_body_bytes=MAX_BODY,
            body_seconds=1.0,
        ) as (opt, base),
        _client(base) as client,
        _client(base, token=None) as anonymous,
        _client(base, token="wrong") as wrong,
    ):
        # The routes the app serves are the documented ones.
        served = {
            (route.path.replace(":int}", "}"), method.lower())
            for route in make_app(opt).routes
            if isinstance(route, Route)
            for method in route.methods or ()
            if method != "HEAD"
        }
        assert served == {(path, method) for path, method, _ in _documented()}

        health = conformance.check(await anonymous.get("/healthz"), "/healthz")
        assert health == {
            "status": "ok",
            "latest_version": None,
            "saturated": False,
            "publish_pending": False,
        }

        # 401 on every guarded endpoint, without a token and with a wrong one.
        guarded = [
            ("POST", "/v1/trajectories", "/v1/trajectories"),
            ("GET", "/v1/module", "/v1/module"),
            ("GET", "/v1/module/versions", "/v1/module/versions"),
            ("GET", "/v1/module/versions/1", "/v1/module/versions/{n}"),
            ("POST", "/v1/module/rollback/1", "/v1/module/rollback/{n}"),
            ("GET", "/v1/events", "/v1/events"),
            ("GET", "/metrics", "/metrics"),
        ]
        for method, path, template in guarded:
            for who in (anonymous, wrong):
                body = b"{}" if method == "POST" else None
                answer = await who.request(method, path, content=body)
                assert answer.status_code == 401, (method, path)
                conformance.check(answer, template)

        # Before any publication: only the (seeded) rejected version exists.
        answer = await client.get("/v1/module")
        assert answer.status_code == 404
        conformance.check(answer, "/v1/module")
        listing = conformance.check(await client.get("/v1/module/versions"), "/v1/module/versions")
        assert listing["latest"] is None
        assert [(v["version"], v["status"]) for v in listing["versions"]] == [(1, "rejected")]
        one = conformance.check(
            await client.get("/v1/module/versions/1"), "/v1/module/versions/{n}"
        )
        assert one["module"] == rejected_module.to_json()
        for n in (0, 99, "9" * 5000, 2**63):
            answer = await client.get(f"/v1/module/versions/{n}")
            assert answer.status_code == 404
            conformance.check(answer, "/v1/module/versions/{n}")
        answer = await client.post("/v1/module/rollback/1")
        assert answer.status_code == 409
        assert "rejected" in conformance.check(answer, "/v1/module/rollback/{n}")["error"]
        for n in (99, "9" * 5000):
            answer = await client.post(f"/v1/module/rollback/{n}")
            assert answer.status_code == 404
            conformance.check(answer, "/v1/module/rollback/{n}")

        # Bodies refused whole: not UTF-8 (400), over the size limit (413).
        answer = await client.post("/v1/trajectories", content=b'{"id": "\xff"}')
        assert answer.status_code == 400
        conformance.check(answer, "/v1/trajectories")
        answer = await client.post("/v1/trajectories", content=b" " * (MAX_BODY + 1))
        assert answer.status_code == 413
        conformance.check(answer, "/v1/trajectories")

        # A body trickled in a byte at a time is cut off (408).
        answer = await _trickled_post(base, "/v1/trajectories", b'{"id": "slow"}', 0.2)
        assert answer.status_code == 408
        conformance.check(answer, "/v1/trajectories")
        # What a web page could send: refused before anything is stored.
        evil = {"Origin": "http://attacker.example"}
        answer = await client.post("/v1/trajectories", content=b"{}", headers=evil)
        assert answer.status_code == 403
        conformance.check(answer, "/v1/trajectories")
        answer = await client.post("/v1/module/rollback/1", headers=evil)
        assert answer.status_code == 403
        conformance.check(answer, "/v1/module/rollback/{n}")
        answer = await client.post(
            "/v1/trajectories", content=b"{}", headers={"Content-Type": "text/plain"}
        )
        assert answer.status_code == 415
        conformance.check(answer, "/v1/trajectories")
        answer = await client.post(
            "/v1/trajectories", content=b"{}", headers={"Host": "rebound.example"}
        )
        assert answer.status_code == 421
        conformance.check(answer, "/v1/trajectories")

        async with _events(client) as (stream, lines):
            conformance.check(stream, "/v1/events", read=False)
            assert await anext(lines) == ": fgo events"
            # The stream subscribes after its first comment: let it.
            await trio.testing.wait_all_tasks_blocked()

            # JSON Lines, with one line that is not JSON and one that is no trajectory.
            jsonl = "\n".join(
                [*(json.dumps(t) for t in data[:3]), "{oops", '{"id": "x"}']
                + [json.dumps(t) for t in data[3:6]]
            )
            answer = await client.post(
                "/v1/trajectories",
                content=jsonl,
                headers={"Content-Type": "application/x-ndjson"},
            )
            result = conformance.check(answer, "/v1/trajectories")
            assert answer.status_code == 202
            assert (result["accepted"], result["duplicate"], result["rejected"]) == (6, 0, 2)
            assert [e["line"] for e in result["errors"]] == [4, 5]
            await opt.wait_idle()
            # A JSON array (two already stored) and a single JSON object.
            array = data[4:11]
            _validator(
                _pointer("paths", "/v1/trajectories", "post", "requestBody", "content")
                + "/application~1json/schema"
            ).validate(array)
            answer = await client.post("/v1/trajectories", json=array)
            result = conformance.check(answer, "/v1/trajectories")
            assert (result["accepted"], result["duplicate"], result["errors"]) == (5, 2, [])
            answer = await client.post("/v1/trajectories", json=data[11])
            assert conformance.check(answer, "/v1/trajectories")["accepted"] == 1
            await opt.wait_idle()

            latest = conformance.check(await client.get("/v1/module"), "/v1/module")
            assert (latest["version"], latest["status"]) == (3, "published")
            # The module as agents load it, and a poll that costs nothing.
            module = Module.from_json(latest["module"])
            forms = {}
            for form in ("system-prompt", "openai-tools", "markdown"):
                answer = await client.get("/v1/module", params={"as": form})
                forms[form] = conformance.check(answer, "/v1/module")
                assert form in answer.headers["etag"]
            assert forms["system-prompt"] == module.system_prompt() + "\n"
            assert forms["openai-tools"] == module.openai_tools()
            assert forms["markdown"].startswith("# Module version 3\n")
            tag = (await client.get("/v1/module")).headers["etag"]
            unchanged = await client.get("/v1/module", headers={"If-None-Match": tag})
            assert unchanged.status_code == 304
            conformance.check(unchanged, "/v1/module")
            bad = await client.get("/v1/module", params={"as": "yaml"})
            assert "system-prompt" in conformance.check(bad, "/v1/module")["error"]
            assert latest["lineage"]["trajectories"] == 12
            assert latest["lineage"]["parents"] == [2]
            second = conformance.check(
                await client.get("/v1/module/versions/2"), "/v1/module/versions/{n}"
            )
            back = conformance.check(
                await client.post("/v1/module/rollback/2"), "/v1/module/rollback/{n}"
            )
            assert (back["version"], back["lineage"]["rollback_of"]) == (4, 2)
            assert back["module"] == second["module"] != latest["module"]

            # The events, from the first: every one valid, ids consecutive.
            events: list[dict[str, Any]] = []
            with trio.fail_after(3):
                while not events or events[-1].get("rollback_of") != 2:
                    events.append(conformance.check_event(await _next_event(lines)))
        assert [e["id"] for e in events] == list(range(1, len(events) + 1))
        assert {"ingest", "subset", "optimize", "merge", "publish"} <= {e["type"] for e in events}
        assert [e["version"] for e in events if e["type"] == "publish"] == [2, 3, 4]
        assert [(e["accepted"], e["duplicate"]) for e in events if e["type"] == "ingest"] == [
            (6, 0),
            (5, 2),
            (1, 0),
        ]

        listing = conformance.check(await client.get("/v1/module/versions"), "/v1/module/versions")
        assert listing["latest"] == 4
        assert [v["status"] for v in listing["versions"]] == ["rejected"] + ["published"] * 3
        text = conformance.check(await client.get("/metrics"), "/metrics")
        metrics = _metrics(text)
        documented = _spec()["paths"]["/metrics"]["get"]["responses"]["200"]["x-metrics"]
        assert {
            name: {"type": f["type"], "labels": sorted(f["labels"])} for name, f in metrics.items()
        } == {name: {**m, "labels": sorted(m["labels"])} for name, m in documented.items()}
        assert metrics["fgo_trajectories_total"]["samples"][()] == "12"
        assert metrics["fgo_latest_version"]["samples"][()] == "4"
        versions = metrics["fgo_versions_total"]["samples"]
        assert (versions[(("status", "published"),)], versions[(("status", "rejected"),)]) == (
            "3",
            "1",
        )
        health = conformance.check(await anonymous.get("/healthz"), "/healthz")
        assert health == {
            "status": "ok",
            "latest_version": 4,
            "saturated": False,
            "publish_pending": False,
        }

    # A saturated daemon: its LLM never answers, so the one subset it may hold
    # (max_pending_subsets=1) stays unoptimized, and ingest pushes back.
    _stalled, stalled_url = await start_llm(latency=1000)
    config = daemon_config(
        tmp_path / "sat" / "fgo.db",
        stalled_url,
        run=RunConfig(context_tokens=4096, subset_tokens=2000, optimizers=1),
        max_pending_subsets=1,
        max_wait=0.01,
    )
    config.store.parent.mkdir()
    async with (
        _serving(config, grace=0, token=TOKEN, max_body_bytes=MAX_BODY) as (opt, base),
        _client(base) as client,
    ):
        answer = await client.post("/v1/trajectories", json=data[0])
        assert conformance.check(answer, "/v1/trajectories")["accepted"] == 1
        with trio.fail_after(10):
            while not opt.saturated:  # noqa: ASYNC110
                await trio.sleep(0.01)
        health = conformance.check(await client.get("/healthz"), "/healthz")
        assert health["saturated"] is True
        answer = await client.post("/v1/trajectories", json=data[1])
        assert answer.status_code == 429
        conformance.check(answer, "/v1/trajectories")
        assert int(answer.headers["Retry-After"]) > 0
        assert opt.statistics().trajectories == 1  # the refused body was not read

    # A full disk under the store: SQLite's own limit on the file's size makes
    # every write fail as a full disk does. Intake says so; reads go on.
    config = daemon_config(tmp_path / "full" / "fgo.db", url)
    config.store.parent.mkdir()
    async with (
        _serving(config, token=TOKEN, max_body_bytes=MAX_BODY) as (opt, base),
        _client(base) as client,
    ):
        db = opt.store.sync._db
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count = {pages}")
        answer = await client.post("/v1/trajectories", json=data[:6])
        assert answer.status_code == 507
        assert (
            "no space left for the store" in conformance.check(answer, "/v1/trajectories")["error"]
        )
        assert int(answer.headers["Retry-After"]) > 0
        assert conformance.check(await client.get("/healthz"), "/healthz")["status"] == "ok"
        assert opt.statistics().trajectories == 0
        db.execute("PRAGMA max_page_count = 1073741823")
        answer = await client.post("/v1/trajectories", json=data[:6])
        assert conformance.check(answer, "/v1/trajectories")["accepted"] == 6

    # OTLP ingest has its own test, below.
    unexercised = {d for d in _documented() if d[0] not in OTLP_PATHS} - conformance.seen
    assert unexercised == set(), "documented but never exercised"


OTLP_PATHS = ("/v1/traces", "/v1/feedback")


async def test_otlp_ingest_conforms_to_the_spec(start_llm: StartLLM, tmp_path: Path) -> None:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    from fgo_actors._daemon.traces import TraceIngest, TraceSettings

    from .test_traces import SUCCESS, Recorder, genai_run, otlp_line, trace_hex

    _server, url = await start_llm()
    conformance = Conformance()
    rec = Recorder()
    genai_run(rec, success=True)
    first = rec.spans()
    genai_run(rec, success=None)
    second = rec.spans()[len(first) :]

    @asynccontextmanager
    async def serving(
        config: DaemonConfig, *, ingest: bool = True
    ) -> AsyncIterator[tuple[StreamingOptimizer, httpx.AsyncClient, httpx.AsyncClient]]:
        async with open_optimizer(config, grace=0) as opt, trio.open_nursery() as nursery:
            traces = TraceIngest(opt, TraceSettings(success_attr=SUCCESS)) if ingest else None
            if traces is not None:
                await nursery.start(lambda task_status: traces.run(task_status=task_status))
            stop = trio.Event()
            base: str = await nursery.start(
                functools.partial(
                    serve_http,
                    opt,
                    host="127.0.0.1",
                    port=0,
                    token=TOKEN,
                    max_body_bytes=MAX_BODY * 4,
                    body_seconds=1.0,
                    shutdown=stop,
                    traces=traces,
                )
            )
            async with _client(base) as client, _client(base, token=None) as anonymous:
                yield opt, client, anonymous
            stop.set()
            nursery.cancel_scope.cancel()

    def check(answer: httpx.Response, path: str, status: int) -> Any:
        assert answer.status_code == status, (path, answer.status_code, answer.text)
        return conformance.check(answer, path)

    async with serving(daemon_config(tmp_path / "fgo.db", url)) as (opt, client, anonymous):
        for path in OTLP_PATHS:
            check(await anonymous.post(path, content=b"{}"), path, 401)
            evil = {"Origin": "http://attacker.example"}
            check(await client.post(path, content=b"{}", headers=evil), path, 403)
            host = {"Host": "rebound.example"}
            check(await client.post(path, content=b"{}", headers=host), path, 421)
            too_big = b" " * (MAX_BODY * 4 + 1)
            check(await client.post(path, content=too_big), path, 413)
            form = {"Content-Type": "text/plain"}
            check(await client.post(path, content=b"{}", headers=form), path, 415)
            answer = await _trickled_post(base_of(client), path, b'{"a": 1}', 0.2)
            assert answer.status_code == 408
            conformance.check(answer, path)
        check(await client.post("/v1/traces", content=b"{oops"), "/v1/traces", 400)
        check(await client.post("/v1/feedback", content=b"\xff"), "/v1/feedback", 400)

        # Protobuf, as the SDK's exporter sends it: the complete trace goes in.
        proto = {"Content-Type": "application/x-protobuf"}
        body = encode_spans(first).SerializeToString()
        answer = await client.post("/v1/traces", content=body, headers=proto)
        assert (answer.status_code, answer.content) == (200, b"")
        conformance.check(answer, "/v1/traces")
        # JSON: the second trace waits for its feedback; one span sent twice.
        answer = await client.post("/v1/traces", content=otlp_line([*second, second[0]]))
        assert check(answer, "/v1/traces", 200) == {}
        feedback = [
            {"trace_id": trace_hex(second[0]), "success": False, "score": 0.25},
            {"trace_id": "nope"},
        ]
        _validator(
            _pointer("paths", "/v1/feedback", "post", "requestBody", "content")
            + "/application~1json/schema"
        ).validate(feedback[:1])
        receipt = check(await client.post("/v1/feedback", json=feedback), "/v1/feedback", 202)
        assert receipt["accepted"] == 1
        assert [r["reason"] for r in receipt["rejected"]] == ["bad_feedback"]
        with trio.fail_after(10):
            both = {trace_hex(first[0]), trace_hex(second[0])}
            while await opt.store.known_ids(both) != both:  # noqa: ASYNC110
                await trio.sleep(0.05)
        # Spans of a converted trace: a partial success, which says why.
        answer = await client.post("/v1/traces", content=otlp_line(first))
        partial = check(answer, "/v1/traces", 200)["partialSuccess"]
        assert partial["rejectedSpans"] == str(len(first))
        assert partial["errorMessage"].startswith(f"late_span: {len(first)}")
        metrics = _metrics(conformance.check(await client.get("/metrics"), "/metrics"))
        assert metrics["fgo_traces_converted_total"]["samples"][()] == "2"

        db = opt.store.sync._db
        db.execute("VACUUM")  # no free pages left for the spans to go in
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count = {pages}")
        rec2 = Recorder()
        genai_run(rec2, success=None)
        check(await client.post("/v1/traces", content=otlp_line(rec2.spans())), "/v1/traces", 507)
        one = {"trace_id": trace_hex(rec2.spans()[0]), "success": True, "feedback": "x" * 40_000}
        check(await client.post("/v1/feedback", json=one), "/v1/feedback", 507)
        db.execute("PRAGMA max_page_count = 1073741823")

    async with serving(daemon_config(tmp_path / "off.db", url), ingest=False) as (_o, client, _a):
        for path in OTLP_PATHS:
            check(await client.post(path, content=b"{}"), path, 501)

    # A saturated daemon pushes back on spans as on trajectories.
    _stalled, stalled_url = await start_llm(latency=1000)
    config = daemon_config(
        tmp_path / "sat.db",
        stalled_url,
        run=RunConfig(context_tokens=4096, subset_tokens=2000, optimizers=1),
        max_pending_subsets=1,
        max_wait=0.01,
    )
    data = [t.to_json() for t in make_trajectories(12)]
    async with serving(config) as (opt, client, _a):
        await client.post("/v1/trajectories", json=data[0])
        with trio.fail_after(10):
            while not opt.saturated:  # noqa: ASYNC110
                await trio.sleep(0.01)
        answer = await client.post("/v1/traces", content=otlp_line(first))
        check(answer, "/v1/traces", 429)
        assert int(answer.headers["Retry-After"]) > 0

    otlp = {d for d in _documented() if d[0] in OTLP_PATHS}
    assert otlp - conformance.seen == set(), "documented but never exercised"


def base_of(client: httpx.AsyncClient) -> str:
    return str(client.base_url).rstrip("/")


# ---------------------------------------------------------------- edge cases


async def test_a_version_number_past_sqlite_integers_is_404(
    start_llm: StartLLM, tmp_path: Path
) -> None:
    _server, url = await start_llm()
    conformance = Conformance()
    async with (
        _serving(daemon_config(tmp_path / "fgo.db", url)) as (_opt, base),
        _client(base) as client,
    ):
        for method, path in [
            ("GET", "/v1/module/versions/{n}"),
            ("POST", "/v1/module/rollback/{n}"),
        ]:
            answer = await client.request(method, path.format(n=2**63))
            assert answer.status_code == 404, answer.text
            conformance.check(answer, path)


async def test_the_ingest_event_counts_every_refused_record(
    start_llm: StartLLM, tmp_path: Path
) -> None:
    _server, url = await start_llm()
    conformance = Conformance()
    body = json.dumps(make_trajectories(1)[0].to_json()) + "\nnot json\n"
    async with (
        _serving(daemon_config(tmp_path / "fgo.db", url)) as (_opt, base),
        _client(base) as client,
        _events(client) as (_stream, lines),
    ):
        assert await anext(lines) == ": fgo events"
        await trio.testing.wait_all_tasks_blocked()
        answer = await client.post("/v1/trajectories", content=body)
        reply = conformance.check(answer, "/v1/trajectories")
        with trio.fail_after(3):
            event = conformance.check_event(await _next_event(lines))
    assert (reply["accepted"], reply["rejected"]) == (1, 1)
    assert event["type"] == "ingest"
    assert event["rejected"] == reply["rejected"], (
        f"ingest event rejected={event['rejected']}, reply rejected={reply['rejected']}"
    )


async def test_metrics_write_big_counts_exactly(
    start_llm: StartLLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _server, url = await start_llm()
    conformance = Conformance()
    async with (
        _serving(daemon_config(tmp_path / "fgo.db", url)) as (opt, base),
        _client(base) as client,
    ):
        real = opt.statistics
        monkeypatch.setattr(
            opt,
            "statistics",
            lambda: attrs.evolve(
                real(), trajectories=1_234_567, tokens_by_role={"optimize": {"prompt": 98_765_432}}
            ),
        )
        metrics = _metrics(conformance.check(await client.get("/metrics"), "/metrics"))
    assert metrics["fgo_trajectories_total"]["samples"][()] == "1234567"
    tokens = metrics["fgo_llm_tokens_total"]["samples"]
    assert tokens[(("role", "optimize"), ("kind", "prompt"))] == "98765432"


async def test_a_body_bigger_than_the_room_left_is_answered_at_once(
    start_llm: StartLLM, tmp_path: Path
) -> None:
    _server, url = await start_llm(latency=1000)  # the LLM never answers in time
    conformance = Conformance()
    config = daemon_config(
        tmp_path / "fgo.db",
        url,
        run=RunConfig(context_tokens=4096, subset_tokens=2000, optimizers=1),
        max_queued=3,
        max_pending_subsets=1,
        max_wait=0.01,
    )
    body = [t.to_json() for t in make_trajectories(100)]
    answer: httpx.Response | None = None
    with trio.CancelScope() as hard_stop:
        async with _serving(config, grace=0) as (opt, base), _client(base) as client:
            assert not opt.saturated
            with trio.move_on_after(0.5):
                answer = await client.post("/v1/trajectories", json=body)
            hard_stop.cancel()  # hypercorn would give a held request 2 s to finish
    assert answer is not None, "POST /v1/trajectories: no answer in 0.5 s"
    assert answer.status_code in (202, 429)
    conformance.check(answer, "/v1/trajectories")
