"""The gateway's small parts, pinned exactly: each test here fails for a
one-line change to them (the mutation probe, ``scripts/mutation.sh``)."""

from __future__ import annotations

import email.utils
import hashlib
import itertools
import json
import logging
import random
import re
import time
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import structlog
import trio
import trio.testing

from fgo_actors import (
    GatewayConfig,
    LLMGateway,
    LLMUnavailableError,
    ReplyRejectedError,
    UnitFailedError,
)
from fgo_actors._core.schemas import load_schema
from fgo_actors._llm.gateway import (
    SCHEMA_FILES,
    GatewayStatistics,
    _CallTimeoutError,
    _content_of,
    _int_or,
    _parse_retry_after,
    _RetryableStatusError,
    _ThrottledError,
    _wire_schema,
    parse_json_reply,
    request_key,
)
from fgo_actors._storage.store import AsyncStore, Store, StoreCache
from fgo_actors.testing import Fault

from .helpers import StartLLM

MESSAGES = [{"role": "user", "content": "hello there"}]


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, None),
        (" 2.5 ", 2.5),
        ("0", 0.0),
        ("0.5", 0.5),
        ("-3", 0.0),  # a negative wait is no wait
        ("nan", 0.0),
        ("soon", None),  # neither seconds nor a date: no advice
    ],
)
def test_retry_after_in_seconds(header: str | None, seconds: float | None) -> None:
    assert _parse_retry_after(header) == seconds


def test_retry_after_as_a_date() -> None:
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    earlier = email.utils.formatdate(time.time() - 30, usegmt=True)
    wait = _parse_retry_after(later)
    assert wait is not None
    assert 27 <= wait <= 31
    assert _parse_retry_after(earlier) == 0.0


@pytest.mark.parametrize(
    ("value", "read"),
    [(5, 5), (0, 0), (True, None), (False, None), ("5", None), (5.0, None), (None, None)],
)
def test_usage_counts_are_read_only_as_plain_integers(value: object, read: int | None) -> None:
    assert _int_or(value, None) == read
    assert _int_or(value, -1) == (read if read is not None else -1)


@pytest.mark.parametrize(
    ("data", "read"),
    [
        ({"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}]}, ("hi", "stop")),
        ({"choices": [{"message": {"content": "hi"}}]}, ("hi", None)),
        ({"choices": [{"message": {"content": "hi"}, "finish_reason": 3}]}, ("hi", None)),
        ({"choices": [{"message": {"content": None}, "finish_reason": "stop"}]}, (None, "stop")),
        (
            {"choices": [{"message": {"content": ["hi"]}, "finish_reason": "length"}]},
            (None, "length"),
        ),
        ({"choices": []}, (None, None)),
        ({"choices": [["hi"]]}, (None, None)),
        ({"choices": [{"message": "hi"}]}, (None, None)),
        ({}, (None, None)),
    ],
)
def test_a_replys_content_and_finish_reason(data: dict[str, Any], read: tuple[Any, Any]) -> None:
    assert _content_of(data) == read


@pytest.mark.parametrize(
    "content",
    [
        '{"a": 1}',
        '  {"a": 1}\n',
        '```json\n{"a": 1}\n```',
        '```JSON\n{"a": 1}```',
        '```\n{"a": 1}\n```',
        'Here it is:\n```json\n{"a": 1}\n```\nDone.',
    ],
)
def test_a_json_reply_is_read_with_or_without_its_fence(content: str) -> None:
    assert parse_json_reply(content) == {"a": 1}


def test_a_reply_that_is_not_json_names_where_it_broke() -> None:
    with pytest.raises(ReplyRejectedError) as caught:
        parse_json_reply('{"a": 1,\n  "b": }')
    assert str(caught.value) == ("the reply is not valid JSON (Expecting value at line 2 column 8)")


def test_the_request_key_is_the_sha256_of_the_canonical_json() -> None:
    """The cache key's form is what lets a rerun (or the next version) replay
    what was paid for: it must not change."""
    body = {"b": [1, 2], "a": "é"}
    canonical = '{"a":"é","b":[1,2]}'
    assert request_key(body) == hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    assert request_key({"a": "é", "b": [1, 2]}) == request_key(body)
    assert request_key({"a": "e", "b": [1, 2]}) != request_key(body)


def test_statistics_since_an_earlier_snapshot() -> None:
    earlier = GatewayStatistics(
        calls={"optimize": 2, "merge": 1},
        prompt_tokens={"optimize": 100, "merge": 10},
        completion_tokens={"optimize": 20, "merge": 5},
        retries=1,
        reasks=1,
        in_flight=0,
        max_in_flight=2,
        token_budget=None,
        budget_exhausted=False,
        cached={"optimize": 1},
        window=3,
        window_cuts=1,
        throttled=2,
        salvaged=1,
    )
    now = attrs.evolve(
        earlier,
        calls={"optimize": 5, "merge": 1, "agent": 1},
        prompt_tokens={"optimize": 400, "merge": 10},
        completion_tokens={"optimize": 50, "merge": 5},
        retries=4,
        reasks=3,
        in_flight=1,
        max_in_flight=3,
        cached={"optimize": 3, "merge": 2},
        window=2,
        window_cuts=3,
        throttled=7,
        salvaged=2,
    )
    assert now.total_tokens == 465
    since = now.since(earlier)
    assert since.calls == {"optimize": 3, "agent": 1}  # a role with nothing new is left out
    assert since.prompt_tokens == {"optimize": 300}
    assert since.completion_tokens == {"optimize": 30}
    assert since.cached == {"optimize": 2, "merge": 2}
    assert (since.retries, since.reasks, since.window_cuts, since.throttled, since.salvaged) == (
        3,
        2,
        2,
        5,
        1,
    )
    # What is a level, not a count, is as it is now.
    assert (since.in_flight, since.max_in_flight, since.window) == (1, 3, 2)
    assert since.total_tokens == 330


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_concurrency", 0, "max_concurrency must be at least 1"),
        ("token_budget", 0, "token_budget must be positive"),
        (
            "connect_timeout",
            float("inf"),
            "connect_timeout must be a positive number of seconds, got inf",
        ),
        ("connect_timeout", 0.0, "connect_timeout must be a positive number of seconds, got 0.0"),
        ("call_timeout", 0.0, "call_timeout must be a positive number of seconds, got 0.0"),
        ("retry_attempts", 0, "retry_attempts must be at least 1"),
        ("max_reasks", -1, "max_reasks must not be negative"),
        ("max_completion_tokens", 0, "max_completion_tokens must be at least 1"),
    ],
)
def test_each_bad_setting_is_named(field: str, value: object, message: str) -> None:
    kwargs: dict[str, Any] = {"base_url": "https://example.test/v1", "model": "m", field: value}
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        GatewayConfig(**kwargs)


def test_the_edges_of_each_setting_are_allowed() -> None:
    config = GatewayConfig(
        base_url="https://example.test/v1",
        model="m",
        max_concurrency=1,
        token_budget=1,
        retry_attempts=1,
        max_reasks=0,
        max_completion_tokens=1,
        call_timeout=0.5,
        connect_timeout=0.5,
    )
    assert config.max_concurrency == 1


async def test_which_failures_are_retried_and_how_long_a_retry_after_waits() -> None:
    config = GatewayConfig(base_url="http://127.0.0.1:9/v1", model="m", retry_after_max=10.0)
    request = httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions")

    def status(code: int, retry_after: str | None = None) -> _RetryableStatusError:
        headers = {"retry-after": retry_after} if retry_after is not None else {}
        return _RetryableStatusError(httpx.Response(code, headers=headers, request=request))

    async with LLMGateway(config) as gw:
        assert gw._retry_hook(status(503)) is True
        assert gw._retry_hook(status(429, "3")) == 3.0
        assert gw._retry_hook(status(429, "10")) == 10.0
        assert gw._retry_hook(status(429, "3600")) == 10.0  # capped at retry_after_max
        assert gw._retry_hook(httpx.ConnectError("refused")) is True
        assert gw._retry_hook(httpx.ReadTimeout("slow")) is True
        assert gw._retry_hook(_CallTimeoutError("no reply")) is True
        assert gw._retry_hook(httpx.UnsupportedProtocol("ftp://")) is False
        assert gw._retry_hook(httpx.LocalProtocolError("bad header")) is False
        assert gw._retry_hook(ValueError("a bug")) is False


@pytest.mark.parametrize(
    ("code", "hint"),
    [
        (401, " (check the API key: --api-key-env or FGO_API_KEY)"),
        (403, " (check the API key: --api-key-env or FGO_API_KEY)"),
        (404, " (check --base-url; it should end before /chat/completions, e.g. .../v1)"),
        (418, ""),
    ],
)
async def test_a_refusal_names_the_likely_setting_and_is_not_retried(
    start_llm: StartLLM, code: int, hint: str
) -> None:
    server, url = await start_llm(faults=[Fault(status=code)])
    async with LLMGateway(GatewayConfig(base_url=url, model="m")) as gw:
        with pytest.raises(LLMUnavailableError) as caught:
            await gw.chat("optimize", MESSAGES)
    message = str(caught.value)
    assert message.startswith(
        f"LLM endpoint {url}/chat/completions refused the request: HTTP {code}{hint}: "
    )
    assert f"injected {code}" in message
    assert len(server.requests) == 1
    assert gw.statistics().retries == 0


async def _answering(nursery: trio.Nursery, payload: bytes) -> tuple[str, list[bytes]]:
    """A loopback HTTP server that answers every request 200 with ``payload``;
    its base URL, and the request line of each request it was sent."""
    seen: list[bytes] = []

    async def handle(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        found = re.search(rb"content-length: *(\d+)", head, re.IGNORECASE)
        while found is not None and len(body) < int(found.group(1)):
            body += await stream.receive_some(65536)
        seen.append(head.split(b"\r\n", 1)[0])
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(payload), payload)
        )
        await stream.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, handle, listeners)
    return f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/v1", seen


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"[1, 2]", "_BadBodyError: HTTP body is not a JSON object"),
        (b"<html>busy</html>", "_BadBodyError: HTTP body is not JSON: '<html>busy</html>'"),
    ],
)
async def test_a_body_that_is_not_a_json_object_is_retried_then_given_up(
    nursery: trio.Nursery, payload: bytes, error: str
) -> None:
    """A 200 whose body is not a JSON object (a proxy's error page, a list) is
    a bad body: retried, then given up with the endpoint named."""
    url, seen = await _answering(nursery, payload)
    config = GatewayConfig(
        base_url=url, model="m", retry_attempts=2, retry_wait_initial=0.01, retry_wait_max=0.02
    )
    async with LLMGateway(config) as gw:
        with pytest.raises(LLMUnavailableError) as caught:
            await gw.chat("optimize", MESSAGES)
    assert str(caught.value) == (
        f"LLM endpoint {url}/chat/completions failed after 2 attempts: {error}"
    )
    assert gw.statistics().retries == 1
    assert len(seen) == 2


@pytest.mark.parametrize("owned_by", ["llama.cpp", "LlamaCpp", "ME"])
async def test_every_llama_cpp_owner_name_is_recognised_in_any_case(
    start_llm: StartLLM, owned_by: str
) -> None:
    _server, url = await start_llm(owned_by=owned_by)
    async with LLMGateway(GatewayConfig(base_url=url, model="m")) as gw:
        assert await gw.structured_mode() == "json_object"


async def test_tokens_booked_elsewhere_must_not_be_negative() -> None:
    async with LLMGateway(GatewayConfig(base_url="http://127.0.0.1:9/v1", model="m")) as gw:
        with pytest.raises(ValueError, match="tokens must not be negative"):
            gw.book_elsewhere(-1)
        gw.book_elsewhere(0)
        assert gw.used_tokens == 0


def test_a_throttled_call_says_how_long_it_waits() -> None:
    assert str(_ThrottledError(1.2345)) == "throttled; retry in 1.23 s"


@pytest.mark.parametrize("name", ["fgo_optimize", "fgo_merge"])
def test_the_wire_schema_is_the_protocol_schema_without_its_ids(name: str) -> None:
    protocol = load_schema(SCHEMA_FILES[name])
    wire = _wire_schema(name)
    assert "$schema" not in wire
    assert "$id" not in wire
    assert wire["required"] == [
        "analysis",
        *(r for r in protocol.get("required", []) if r != "analysis"),
    ]
    assert set(wire["required"]) - {"analysis"}  # the protocol's own required fields are kept
    assert wire["properties"] == protocol["properties"]


async def test_the_http_client_is_bounded_like_the_gateway() -> None:
    config = GatewayConfig(
        base_url="http://127.0.0.1:9/v1", model="m", call_timeout=42.0, connect_timeout=3.0
    )
    async with LLMGateway(config) as gw:
        timeout = gw._client.timeout
        assert (timeout.read, timeout.write, timeout.pool, timeout.connect) == (
            42.0,
            42.0,
            42.0,
            3.0,
        )


async def test_the_window_shows_in_the_statistics_only_when_adaptive() -> None:
    url = "http://127.0.0.1:9/v1"
    async with LLMGateway(GatewayConfig(base_url=url, model="m", max_concurrency=5)) as gw:
        assert gw.statistics().window == 5
    async with LLMGateway(
        GatewayConfig(base_url=url, model="m", max_concurrency=5, adaptive=False)
    ) as fixed:
        assert fixed.statistics().window is None


async def test_a_reply_the_check_refuses_for_good_is_asked_once(start_llm: StartLLM) -> None:
    server, url = await start_llm()

    def refuse(reply: dict[str, Any]) -> None:
        raise ReplyRejectedError("cannot be helped", reask=False)

    async with LLMGateway(GatewayConfig(base_url=url, model="m")) as gw:
        with pytest.raises(UnitFailedError) as caught:
            await gw.structured("optimize", MESSAGES, "fgo_optimize", refuse)
    assert str(caught.value) == "optimize reply still invalid after 1 attempts: cannot be helped"
    assert len(server.requests) == 1


async def test_chat_with_a_schema_asks_for_it(start_llm: StartLLM) -> None:
    server, url = await start_llm()
    config = GatewayConfig(base_url=url, model="m", structured_output="json_object")
    async with LLMGateway(config) as gw:
        await gw.chat("optimize", MESSAGES, "fgo_optimize")
        await gw.chat("optimize", MESSAGES)
    formats = [r.body.get("response_format") for r in server.requests]
    assert formats[0] == {"type": "json_object", "schema": _wire_schema("fgo_optimize")}
    assert formats[1] is None


async def test_each_finished_call_gives_its_reservation_back(start_llm: StartLLM) -> None:
    """Calls one after another, each reserving its worst case (about 1,010
    tokens) against a budget of 1,500: each fits only once the one before it
    has given its reservation back."""
    server, url = await start_llm()
    config = GatewayConfig(base_url=url, model="m", token_budget=1500, max_completion_tokens=1000)
    async with LLMGateway(config) as gw:
        with trio.fail_after(10):
            for _ in range(3):
                await gw.chat("optimize", MESSAGES)
        assert gw._reserved == 0
    assert len(server.requests) == 3


@pytest.mark.parametrize("status", [429, 503])
async def test_a_structured_call_throttled_by_its_own_window_is_sent_again(
    start_llm: StartLLM,
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    status: int,
) -> None:
    """A 429 or 503 that cuts the window is ours, not the endpoint's: the call
    waits (retry_wait_initial × (0.5 + random), here with random() at 0.25)
    outside its place and is sent again, spending no retry; twice here."""
    monkeypatch.setattr(random, "random", lambda: 0.25)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    server, url = await start_llm(faults=[Fault(status=status), Fault(status=status)])
    config = GatewayConfig(base_url=url, model="m", max_concurrency=4, retry_wait_initial=8.0)
    async with LLMGateway(config) as gw:
        with structlog.testing.capture_logs() as logs:
            reply = await gw.structured("optimize", MESSAGES, "fgo_optimize", lambda r: r)
        stats = gw.statistics()
    assert reply["actions"]
    assert (stats.throttled, stats.retries, stats.window_cuts, stats.window) == (2, 0, 2, 2)
    first, second, third = server.requests
    assert second.started - first.started == pytest.approx(6.0, abs=0.01)
    assert third.started - second.started == pytest.approx(6.0, abs=0.01)
    assert gw._limiter.borrowed_tokens == 0
    throttled = [e for e in logs if e["event"] == "llm_call_throttled"]
    assert throttled == [
        {
            "event": "llm_call_throttled",
            "log_level": "info",
            "role": "optimize",
            "retry_in": 6.0,
            "window": 3,
        },
        {
            "event": "llm_call_throttled",
            "log_level": "info",
            "role": "optimize",
            "retry_in": 6.0,
            "window": 2,
        },
    ]


async def test_what_the_gateway_logs(start_llm: StartLLM, tmp_path: Path) -> None:
    """The log events others read (the bench, the live display, a user's
    grep): their names and fields."""
    bad, good = "{not json", json.dumps({"actions": [{"op": "add_rule", "text": "Be careful."}]})
    cut = '{"analysis": "x", "actions": [{"op": "add_rule", "text": "Look first."}, {"op": "add'
    server, url = await start_llm(
        faults=[Fault(content=bad), Fault(content=good), Fault(content=cut, finish_reason="length")]
    )
    # The suite logs warnings only (conftest); these events are info.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    store = AsyncStore(Store(tmp_path / "cache.db"))
    merge_messages = [{"role": "user", "content": "another prompt"}]
    try:
        config = GatewayConfig(base_url=url, model="m", structured_output="auto")
        async with LLMGateway(config, cache=StoreCache(store)) as gw:
            with structlog.testing.capture_logs() as logs:
                for role, messages in (
                    ("optimize", MESSAGES),
                    ("merge", merge_messages),
                    ("merge", merge_messages),  # answered by the cache
                ):
                    await gw.structured(role, messages, "fgo_optimize", lambda r: r)
    finally:
        store.sync.close()
    events = [e["event"] for e in logs]
    assert events == [
        "structured_output",
        "llm_call",
        "llm_reply_rejected",
        "llm_call",
        "llm_call",
        "llm_reply_salvaged",
        "llm_call_cached",
        "llm_reply_salvaged",
    ]
    mode, first, rejected, _second, third, salvaged, cached, _again = logs
    assert (mode["mode"], mode["url"]) == ("json_schema", f"{url}/chat/completions")
    assert first["role"] == "optimize"
    assert first["finish_reason"] == "stop"
    assert [type(first[k]) for k in ("prompt_tokens", "completion_tokens")] == [int, int]
    assert min(first["prompt_tokens"], first["completion_tokens"]) > 0
    assert 0 <= first["seconds"] < 30
    assert (rejected["role"], rejected["attempt"]) == ("optimize", 1)
    assert rejected["error"].startswith("the reply is not valid JSON")
    assert (third["role"], third["finish_reason"]) == ("merge", "length")
    assert (salvaged["role"], salvaged["kept"], salvaged["chars"]) == ("merge", 1, len(cut))
    assert cached["role"] == "merge"
    assert len(server.requests) == 3


async def test_the_request_body(start_llm: StartLLM) -> None:
    server, url = await start_llm()
    config = GatewayConfig(base_url=url, model="m7", temperature=0.3, max_completion_tokens=99)
    async with LLMGateway(config) as gw:
        await gw.chat("optimize", MESSAGES)
        await gw.chat("optimize", MESSAGES, max_tokens=7)
    assert [r.body for r in server.requests] == [
        {"model": "m7", "messages": MESSAGES, "temperature": 0.3, "max_tokens": 99},
        {"model": "m7", "messages": MESSAGES, "temperature": 0.3, "max_tokens": 7},
    ]


async def test_a_base_url_with_a_trailing_slash(nursery: trio.Nursery) -> None:
    url, seen = await _answering(nursery, b'{"data": [{"owned_by": "me"}]}')
    async with LLMGateway(GatewayConfig(base_url=url + "/", model="m")) as gw:
        assert gw.url == f"{url}/chat/completions"
        assert await gw.structured_mode() == "json_object"
    assert seen == [b"GET /v1/models HTTP/1.1"]


async def test_a_model_listing_without_data_means_json_schema(nursery: trio.Nursery) -> None:
    url, _seen = await _answering(nursery, b'{"object": "list"}')
    async with LLMGateway(GatewayConfig(base_url=url, model="m")) as gw:
        assert await gw.structured_mode() == "json_schema"


async def test_a_reply_with_no_content_is_refused(nursery: trio.Nursery) -> None:
    empty = {
        "choices": [{"message": {"role": "assistant", "content": None}, "finish_reason": "stop"}]
    }
    url, _seen = await _answering(nursery, json.dumps(empty).encode())
    async with LLMGateway(GatewayConfig(base_url=url, model="m")) as gw:
        with pytest.raises(ReplyRejectedError, match=r"^the reply's message content is empty$"):
            await gw.chat("optimize", MESSAGES)


async def test_fresh_statistics(start_llm: StartLLM) -> None:
    _server, url = await start_llm()
    config = GatewayConfig(base_url=url, model="m", token_budget=12345, adaptive=False)
    async with LLMGateway(config) as gw:
        fresh = gw.statistics()
    assert (fresh.max_in_flight, fresh.in_flight, fresh.token_budget) == (0, 0, 12345)
    assert fresh.budget_exhausted is False
    assert (fresh.window, fresh.window_cuts, fresh.throttled) == (None, 0, 0)


@pytest.mark.parametrize("cached", [False, True])
async def test_usage_reasks_and_cut_replies_through_chat(
    start_llm: StartLLM, tmp_path: Path, cached: bool
) -> None:
    """With the response cache and without: usage adds up per role, a re-ask
    is counted, and a reply cut off at the cap is refused naming the cap
    (this call's, else the configured one) unless the caller accepts it."""

    def cut_third(body: dict[str, Any]) -> Fault | None:
        third = "a third prompt" in json.dumps(body["messages"])
        return Fault(content="cut off", finish_reason="length") if third else None

    server, url = await start_llm(
        policy=lambda body: "ok", fault_for=cut_third, include_usage=False
    )
    store = AsyncStore(Store(tmp_path / "cache.db"))
    config = GatewayConfig(base_url=url, model="m", max_completion_tokens=50, token_budget=10**6)
    try:
        async with LLMGateway(config, cache=StoreCache(store) if cached else None) as gw:
            plain = await gw.chat("optimize", MESSAGES, reask=False)
            assert gw.statistics().reasks == 0
            again = await gw.chat(
                "optimize", [*MESSAGES, {"role": "user", "content": "more"}], reask=True
            )
            assert (plain, again) == ("ok", "ok")
            stats = gw.statistics()
            assert stats.reasks == 1
            counted = gw.counter.count_messages(MESSAGES) + gw.counter.count_messages(
                [*MESSAGES, {"role": "user", "content": "more"}]
            )
            assert stats.prompt_tokens == {"optimize": counted}
            assert stats.completion_tokens == {"optimize": 2 * gw.counter.count("ok")}
            other = [{"role": "user", "content": "a third prompt"}]
            with pytest.raises(
                ReplyRejectedError, match=r"^the reply was cut off at 7 tokens; be more concise$"
            ):
                await gw.chat("optimize", other, max_tokens=7)
            with pytest.raises(
                ReplyRejectedError, match=r"^the reply was cut off at 50 tokens; be more concise$"
            ):
                await gw.chat("optimize", other)
            assert await gw.chat("optimize", other, max_tokens=9, accept_cut=True) == "cut off"
    finally:
        store.sync.close()
    assert len(server.requests) == 5


async def test_one_attempt_is_named_in_the_singular_and_a_timeout_says_how_long(
    start_llm: StartLLM, autojump_clock: trio.testing.MockClock
) -> None:
    _server, url = await start_llm(latency=5.0)
    config = GatewayConfig(base_url=url, model="m", retry_attempts=1, call_timeout=1.5)
    async with LLMGateway(config) as gw:
        with pytest.raises(LLMUnavailableError) as caught:
            await gw.chat("optimize", MESSAGES)
    assert str(caught.value) == (
        f"LLM endpoint {url}/chat/completions failed after 1 attempt: "
        "_CallTimeoutError: no reply within 1.5 s"
    )


async def test_retries_wait_as_configured(
    start_llm: StartLLM, autojump_clock: trio.testing.MockClock
) -> None:
    """Backoff starts at retry_wait_initial and never passes retry_wait_max
    (plus stamina's jitter of up to a second)."""
    server, url = await start_llm(faults=[Fault(status=500)] * 3)
    config = GatewayConfig(
        base_url=url, model="m", retry_wait_initial=20.0, retry_wait_max=30.0, adaptive=False
    )
    async with LLMGateway(config) as gw:
        assert await gw.chat("optimize", MESSAGES)
        assert gw.statistics().retries == 3
    starts = [r.started for r in server.requests]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert len(gaps) == 3
    assert 20.0 <= gaps[0] <= 21.0
    assert all(20.0 <= g <= 31.0 for g in gaps)
    assert max(gaps) >= 29.0  # 20, then 40 capped at 30


@pytest.mark.parametrize("status", [413, 422])
async def test_a_request_too_large_or_unprocessable_fails_the_unit(
    start_llm: StartLLM, status: int
) -> None:
    server, url = await start_llm(faults=[Fault(status=status)])
    async with LLMGateway(GatewayConfig(base_url=url, model="m")) as gw:
        with pytest.raises(
            UnitFailedError, match=f"^the LLM endpoint refused this request: HTTP {status}: "
        ):
            await gw.chat("optimize", MESSAGES)
        assert gw.statistics().retries == 0
    assert len(server.requests) == 1


async def test_without_a_budget_nothing_stays_reserved(start_llm: StartLLM) -> None:
    _server, url = await start_llm()
    async with LLMGateway(GatewayConfig(base_url=url, model="m")) as gw:
        for _ in range(2):
            await gw.chat("optimize", MESSAGES)
        assert gw._reserved == 0


async def test_replays_and_salvages_are_counted_each_time(
    start_llm: StartLLM, tmp_path: Path
) -> None:
    cut = '{"analysis": "x", "actions": [{"op": "add_rule", "text": "Look first."}, {"op": "add'
    server, url = await start_llm(
        policy=lambda body: cut, fault_for=lambda body: Fault(content=cut, finish_reason="length")
    )
    store = AsyncStore(Store(tmp_path / "cache.db"))
    try:
        async with LLMGateway(
            GatewayConfig(base_url=url, model="m"), cache=StoreCache(store)
        ) as gw:
            for _ in range(3):
                await gw.structured("optimize", MESSAGES, "fgo_optimize", lambda r: r)
            stats = gw.statistics()
    finally:
        store.sync.close()
    assert (stats.calls, stats.cached, stats.salvaged) == ({"optimize": 1}, {"optimize": 2}, 3)
    assert len(server.requests) == 1


async def test_a_calls_seconds_are_logged_to_the_millisecond(
    start_llm: StartLLM, autojump_clock: trio.testing.MockClock
) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    _server, url = await start_llm(latency=1.23456)
    async with LLMGateway(GatewayConfig(base_url=url, model="m")) as gw:
        with structlog.testing.capture_logs() as logs:
            await gw.chat("optimize", MESSAGES)
    (call,) = [e for e in logs if e["event"] == "llm_call"]
    assert call["seconds"] == 1.235
    assert isinstance(call["seconds"], float)
