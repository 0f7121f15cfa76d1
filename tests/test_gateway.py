"""The LLM gateway against a real loopback server: limits, retries, re-asks, usage, budget."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio
import trio.testing

from fgo_actors import (
    BudgetExhaustedError,
    GatewayConfig,
    LLMGateway,
    LLMUnavailableError,
    ReplyRejectedError,
    UnitFailedError,
    default_counter,
)
from fgo_actors._storage.store import AsyncStore, Store, StoreCache
from fgo_actors.testing import Fault

from .helpers import StartLLM

MESSAGES = [{"role": "user", "content": "hello there"}]
GOOD_OPTIMIZE = json.dumps({"actions": [{"op": "add_rule", "text": "be careful"}]})


def _config(url: str, **kw: Any) -> GatewayConfig:
    base: dict[str, Any] = {
        "base_url": url,
        "model": "m",
        "retry_wait_initial": 0.5,
        "retry_wait_max": 2.0,
    }
    base.update(kw)
    return GatewayConfig(**base)


def _reply(content: str) -> Any:
    return lambda body: content


def _identity(reply: dict[str, Any]) -> dict[str, Any]:
    return reply


async def test_concurrency_never_exceeds_limit(
    start_llm: StartLLM, autojump_clock: trio.testing.MockClock
) -> None:
    server, url = await start_llm(latency=1.0, policy=_reply("ok"))
    async with LLMGateway(_config(url, max_concurrency=3)) as gw, trio.open_nursery() as n:
        for _ in range(10):
            n.start_soon(gw.chat, "optimize", MESSAGES)
    assert len(server.requests) == 10
    assert server.max_in_flight == 3
    assert gw.statistics().max_in_flight == 3
    assert gw.statistics().in_flight == 0


@pytest.mark.parametrize("adaptive", [False, True])
async def test_429_honours_retry_after(
    start_llm: StartLLM, autojump_clock: trio.testing.MockClock, adaptive: bool
) -> None:
    server, url = await start_llm(faults=[Fault(status=429, retry_after=30)], policy=_reply("ok"))
    async with LLMGateway(_config(url, adaptive=adaptive)) as gw:
        assert await gw.chat("optimize", MESSAGES) == "ok"
    first, second = server.requests
    assert first.fault is not None
    assert first.fault.status == 429
    assert first.finished is not None
    waited = second.started - first.finished
    # Exactly the server's Retry-After, not the 0.5 s exponential backoff.
    assert 30.0 <= waited < 30.5
    stats = gw.statistics()
    if adaptive:  # our own concurrency: the window halves and no retry is spent
        assert (stats.retries, stats.throttled, stats.window_cuts) == (0, 1, 1)
    else:
        assert (stats.retries, stats.throttled, stats.window) == (1, 0, None)


async def test_5xx_and_dropped_connections_are_retried(
    start_llm: StartLLM, autojump_clock: trio.testing.MockClock
) -> None:
    server, url = await start_llm(
        faults=[Fault(status=500), Fault(drop=True), Fault(status=503)], policy=_reply("fine")
    )
    async with LLMGateway(_config(url, adaptive=False)) as gw:
        assert await gw.chat("merge", MESSAGES) == "fine"
    assert len(server.requests) == 4
    assert gw.statistics().retries == 3
    assert gw.statistics().calls == {"merge": 1}


async def test_retries_give_up_with_llm_unavailable(
    start_llm: StartLLM, autojump_clock: trio.testing.MockClock
) -> None:
    server, url = await start_llm(faults=[Fault(status=500)] * 10)
    async with LLMGateway(_config(url, retry_attempts=3)) as gw:
        with pytest.raises(LLMUnavailableError, match="failed after 3 attempts"):
            await gw.chat("optimize", MESSAGES)
    assert len(server.requests) == 3


async def test_unreachable_endpoint(autojump_clock: trio.testing.MockClock) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    async with LLMGateway(_config(url, retry_attempts=2)) as gw:
        with pytest.raises(LLMUnavailableError, match="ConnectError"):
            await gw.chat("optimize", MESSAGES)


async def test_client_errors_are_not_retried(start_llm: StartLLM) -> None:
    server, url = await start_llm(faults=[Fault(status=401)])
    async with LLMGateway(_config(url)) as gw:
        with pytest.raises(LLMUnavailableError, match=r"HTTP 401.*API key"):
            await gw.chat("optimize", MESSAGES)
    assert len(server.requests) == 1


async def test_call_timeout_then_retry(
    start_llm: StartLLM, autojump_clock: trio.testing.MockClock
) -> None:
    calls = 0

    def latency(body: dict[str, Any]) -> float:
        nonlocal calls
        calls += 1
        return 1000.0 if calls == 1 else 0.0

    _server, url = await start_llm(latency=latency, policy=_reply("late but fine"))
    async with LLMGateway(_config(url, call_timeout=10.0)) as gw:
        start = trio.current_time()
        assert await gw.chat("optimize", MESSAGES) == "late but fine"
        assert trio.current_time() - start < 20
    assert gw.statistics().retries == 1


async def test_bad_json_is_reasked_then_fails_cleanly(start_llm: StartLLM) -> None:
    server, url = await start_llm(policy=_reply("this is not JSON {"))
    async with LLMGateway(_config(url, max_reasks=2)) as gw:
        with pytest.raises(UnitFailedError, match=r"after 3 attempts.*not valid JSON"):
            await gw.structured("optimize", MESSAGES, "fgo_optimize", _identity)
    assert len(server.requests) == 3
    assert gw.statistics().reasks == 2
    # The re-ask shows the LLM what was wrong, and keeps the original prompt.
    reask = server.requests[1].body["messages"]
    assert reask[: len(MESSAGES)] == MESSAGES
    assert "not valid JSON" in reask[-1]["content"]
    assert "not valid JSON" not in json.dumps(server.requests[0].body["messages"])


async def test_bad_then_good_reply_succeeds(start_llm: StartLLM) -> None:
    server, url = await start_llm(faults=[Fault(content='```json\n{"actions": 5}\n```')])
    server.policy = _reply("```json\n" + GOOD_OPTIMIZE + "\n```")
    async with LLMGateway(_config(url)) as gw:
        reply = await gw.structured("optimize", MESSAGES, "fgo_optimize", _identity)
    assert reply == json.loads(GOOD_OPTIMIZE)
    assert "field actions" in server.requests[1].body["messages"][-1]["content"]
    assert gw.statistics().reasks == 1


async def test_check_rejection_is_reasked(start_llm: StartLLM) -> None:
    server, url = await start_llm(policy=_reply(GOOD_OPTIMIZE))
    seen = 0

    def check(reply: dict[str, Any]) -> str:
        nonlocal seen
        seen += 1
        if seen == 1:
            raise ReplyRejectedError("revise_rule names unknown rule id 'r9'")
        return "accepted"

    async with LLMGateway(_config(url)) as gw:
        assert await gw.structured("optimize", MESSAGES, "fgo_optimize", check) == "accepted"
    assert "unknown rule id 'r9'" in server.requests[1].body["messages"][-1]["content"]


async def test_request_carries_json_schema(start_llm: StartLLM) -> None:
    server, url = await start_llm(policy=_reply(GOOD_OPTIMIZE))
    async with LLMGateway(_config(url)) as gw:
        await gw.structured("optimize", MESSAGES, "fgo_optimize", _identity)
    rf = server.requests[0].body["response_format"]
    assert rf["type"] == "json_schema"
    assert rf["json_schema"]["name"] == "fgo_optimize"
    assert rf["json_schema"]["strict"] is True
    assert "actions" in rf["json_schema"]["schema"]["properties"]
    assert "$schema" not in rf["json_schema"]["schema"]


async def test_json_object_mode_for_llama_cpp(start_llm: StartLLM) -> None:
    server, url = await start_llm(policy=_reply(GOOD_OPTIMIZE))
    async with LLMGateway(_config(url, structured_output="json_object")) as gw:
        await gw.structured("optimize", MESSAGES, "fgo_optimize", _identity)
    rf = server.requests[0].body["response_format"]
    assert rf["type"] == "json_object"
    assert rf["schema"]["title"] == "fgo_optimize"


async def test_usage_from_server_and_fallback_estimate(start_llm: StartLLM) -> None:
    server, url = await start_llm(policy=_reply("four words of reply"), include_usage=False)
    counter = default_counter()
    async with LLMGateway(_config(url)) as gw:
        await gw.chat("optimize", MESSAGES)
    stats = gw.statistics()
    assert stats.prompt_tokens == {"optimize": counter.count_messages(MESSAGES)}
    assert stats.completion_tokens == {"optimize": counter.count("four words of reply")}

    server.include_usage = True
    async with LLMGateway(_config(url)) as gw:
        await gw.chat("merge", MESSAGES)
    stats = gw.statistics()
    chars = len("hello there")
    assert stats.prompt_tokens == {"merge": chars // 4 + 1}  # what the server reported


async def test_token_budget_refuses_before_sending(start_llm: StartLLM) -> None:
    server, url = await start_llm(policy=_reply("ok"))
    cfg = _config(url, token_budget=1000, max_completion_tokens=400)
    async with LLMGateway(cfg) as gw:
        await gw.chat("optimize", MESSAGES)  # ~10 + 400 reserved: fits
        used = gw.used_tokens
        assert used < 1000
        big = [{"role": "user", "content": "word " * 800}]
        with pytest.raises(BudgetExhaustedError, match="token budget of 1000"):
            await gw.chat("optimize", big)
        # Once exhausted, even a small call is refused: the run is winding down.
        with pytest.raises(BudgetExhaustedError):
            await gw.chat("optimize", MESSAGES)
        assert gw.statistics().budget_exhausted
    assert len(server.requests) == 1


async def test_tokens_booked_elsewhere_spend_the_budget_but_are_not_our_calls(
    start_llm: StartLLM,
) -> None:
    server, url = await start_llm(policy=_reply("ok"))
    cfg = _config(url, token_budget=1000, max_completion_tokens=100)
    async with LLMGateway(cfg) as gw:
        gw.book_elsewhere(500)  # the agent's calls on a Ray worker, say
        gw.check_budget()  # 500 of 1000: not spent
        assert gw.used_tokens == 500
        await gw.chat("optimize", MESSAGES)  # ~10 + 100 reserved: fits
        gw.book_elsewhere(1000 - gw.used_tokens)
        with pytest.raises(BudgetExhaustedError, match="token budget of 1000 reached"):
            gw.check_budget()
        with pytest.raises(BudgetExhaustedError):  # our own next call is refused too
            await gw.chat("optimize", MESSAGES)
        stats = gw.statistics()
        assert stats.budget_exhausted
        assert stats.calls == {"optimize": 1}  # only the call this gateway made
        with pytest.raises(ValueError, match="negative"):
            gw.book_elsewhere(-1)
    assert len(server.requests) == 1
    async with LLMGateway(_config(url)) as unlimited:
        unlimited.book_elsewhere(10**9)
        unlimited.check_budget()  # no budget: never spent


@pytest.mark.parametrize(
    ("owned_by", "expected"),
    [("me", "json_object"), ("llamacpp", "json_object"), ("vllm", "json_schema")],
)
async def test_auto_mode_asks_the_server_who_it_is(
    start_llm: StartLLM, owned_by: str, expected: str
) -> None:
    server, url = await start_llm(policy=_reply(GOOD_OPTIMIZE), owned_by=owned_by)
    async with LLMGateway(_config(url, structured_output="auto")) as gw:
        for _ in range(3):
            await gw.structured("optimize", MESSAGES, "fgo_optimize", _identity)
        assert await gw.structured_mode() == expected
    assert server.model_listings == 1  # detected once, then remembered
    assert {r.body["response_format"]["type"] for r in server.requests} == {expected}


async def test_auto_mode_falls_back_to_json_schema_without_models_endpoint() -> None:
    # An endpoint that refuses connections: detection must not raise.
    async with LLMGateway(_config("http://127.0.0.1:9/v1", structured_output="auto")) as gw:
        assert await gw.structured_mode() == "json_schema"


async def test_budget_waits_for_reservations_instead_of_giving_up(
    start_llm: StartLLM, autojump_clock: trio.testing.MockClock
) -> None:
    server, url = await start_llm(latency=1.0, policy=_reply("ok"))
    # Each call reserves ~1010 tokens but spends ~5: at most two fit at once.
    cfg = _config(url, token_budget=2500, max_completion_tokens=1000, max_concurrency=4)
    async with LLMGateway(cfg) as gw, trio.open_nursery() as n:
        for _ in range(8):
            n.start_soon(gw.chat, "optimize", MESSAGES)
    assert len(server.requests) == 8
    assert server.max_in_flight == 2
    assert not gw.statistics().budget_exhausted
    assert gw.used_tokens < 100


async def test_malformed_request_fails_the_unit_not_the_endpoint(start_llm: StartLLM) -> None:
    server, url = await start_llm(faults=[Fault(status=400)], policy=_reply(GOOD_OPTIMIZE))
    async with LLMGateway(_config(url)) as gw:
        with pytest.raises(UnitFailedError, match="HTTP 400"):
            await gw.chat("optimize", MESSAGES)
        # The endpoint is fine for the next unit.
        assert await gw.chat("optimize", MESSAGES) == GOOD_OPTIMIZE
    assert len(server.requests) == 2


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("base_url", "127.0.0.1:8080/v1", "http://"),
        ("call_timeout", float("nan"), "call_timeout"),
        ("call_timeout", -1.0, "call_timeout"),
        ("retry_attempts", 0, "retry_attempts"),
        ("max_reasks", -1, "max_reasks"),
        ("max_completion_tokens", 0, "max_completion_tokens"),
    ],
)
def test_gateway_config_is_validated(field: str, value: object, message: str) -> None:
    kwargs: dict[str, Any] = {"base_url": "http://127.0.0.1:1/v1", "model": "m", field: value}
    with pytest.raises(ValueError, match=message):
        GatewayConfig(**kwargs)


@pytest.mark.parametrize("name", ["fgo_optimize", "fgo_merge"])
def test_the_wire_schema_asks_for_the_analysis_first(name: str) -> None:
    # Grammar-constrained decoding writes required properties first; the
    # reasoning must come before the edits it justifies.
    from fgo_actors._core.schemas import load_schema
    from fgo_actors._llm.gateway import SCHEMA_FILES, _wire_schema

    wire = _wire_schema(name)
    assert next(iter(wire["properties"])) == "analysis"
    assert wire["required"][0] == "analysis"
    # The protocol itself still accepts a reply without an analysis.
    assert "analysis" not in load_schema(SCHEMA_FILES[name]).get("required", [])


async def test_a_refused_reply_is_never_replayed_by_the_gateway_that_refused_it(
    start_llm: StartLLM, tmp_path: Path
) -> None:
    # The same truncated reply every time: the re-asks are byte-identical
    # (same prompt, same error), and each must still reach the LLM.
    truncated = '{"analysis": "x", "actions": [{"op": "add_rule", "text": "R'
    server, url = await start_llm(policy=_reply(truncated))
    store = AsyncStore(Store(tmp_path / "cache.sqlite"))
    try:
        async with LLMGateway(_config(url, max_reasks=2), cache=StoreCache(store)) as gw:
            with pytest.raises(UnitFailedError):
                await gw.structured("optimize", MESSAGES, "fgo_optimize", _identity)
            assert len(server.requests) == 3
            assert server.requests[1].body == server.requests[2].body
            assert gw.statistics().cached == {}
            # A rerun against a healthy endpoint is answered by it, not by the
            # cache, and its good reply is the one kept.
            server.policy = _reply(GOOD_OPTIMIZE)
            reply = await gw.structured("optimize", MESSAGES, "fgo_optimize", _identity)
            assert reply == json.loads(GOOD_OPTIMIZE)
            assert len(server.requests) == 4
            again = await gw.structured("optimize", MESSAGES, "fgo_optimize", _identity)
            assert again == reply
            assert len(server.requests) == 4
            assert gw.statistics().cached == {"optimize": 1}
    finally:
        store.sync.close()


async def test_a_reply_cut_off_at_the_cap_is_refused_and_not_replayed(
    start_llm: StartLLM, tmp_path: Path
) -> None:
    cut = Fault(content="a reply that ran out of", finish_reason="length")
    server, url = await start_llm(faults=[cut], policy=_reply(GOOD_OPTIMIZE))
    store = AsyncStore(Store(tmp_path / "cache.sqlite"))
    try:
        async with LLMGateway(_config(url), cache=StoreCache(store)) as gw:
            with pytest.raises(ReplyRejectedError, match="cut off at"):
                await gw.chat("agent", MESSAGES, max_tokens=7)
            # The refused reply is not replayed: the same request is sent again.
            assert await gw.chat("agent", MESSAGES, max_tokens=7) == GOOD_OPTIMIZE
        assert len(server.requests) == 2
    finally:
        store.sync.close()


async def test_a_rerun_replays_a_refused_reply_and_its_re_ask_without_paying(
    start_llm: StartLLM, tmp_path: Path
) -> None:
    """Refused replies were paid for too. A rerun (a new gateway on the same
    cache, as after a crash) replays the refused reply, checks it again (the
    check may have been fixed since), and replays the re-ask after it."""
    first = json.dumps({"actions": [{"op": "add_rule", "text": "first"}]})
    replies = iter([first, GOOD_OPTIMIZE])
    server, url = await start_llm(policy=lambda body: next(replies))

    def strict(reply: dict[str, Any]) -> dict[str, Any]:
        if reply == json.loads(first):
            raise ReplyRejectedError("not the rule wanted")
        return reply

    path = tmp_path / "cache.sqlite"
    for run in range(2):
        store = AsyncStore(Store(path))
        try:
            async with LLMGateway(_config(url), cache=StoreCache(store)) as gw:
                with structlog.testing.capture_logs() as logs:
                    reply = await gw.structured("optimize", MESSAGES, "fgo_optimize", strict)
                assert reply == json.loads(GOOD_OPTIMIZE)
                # Re-asks are counted as they are sent; a replayed one is a cached call.
                assert gw.statistics().reasks == (1 if run == 0 else 0)
                assert gw.statistics().cached == ({} if run == 0 else {"optimize": 2})
        finally:
            store.sync.close()
        assert len(server.requests) == 2
        assert [e["event"] for e in logs if e["event"].startswith("llm_reply")] == [
            "llm_reply_rejected"
        ]
    # A check fixed since accepts the refused reply as it is, at no cost.
    store = AsyncStore(Store(path))
    try:
        async with LLMGateway(_config(url), cache=StoreCache(store)) as gw:
            reply = await gw.structured("optimize", MESSAGES, "fgo_optimize", _identity)
            assert reply == json.loads(first)
            assert gw.statistics().cached == {"optimize": 1}
    finally:
        store.sync.close()
    assert len(server.requests) == 2


async def test_a_structured_reply_cut_off_keeps_its_whole_actions(
    start_llm: StartLLM, tmp_path: Path
) -> None:
    whole = [{"op": "add_rule", "text": "be careful"}, {"op": "add_rule", "text": "look first"}]
    text = json.dumps({"analysis": "a", "actions": [*whole, {"op": "add_rule", "text": "x"}]})
    cut = Fault(content=text[: text.rindex('"x"')], finish_reason="length")
    server, url = await start_llm(faults=[cut], policy=_reply(GOOD_OPTIMIZE))
    store = AsyncStore(Store(tmp_path / "cache.sqlite"))
    try:
        async with LLMGateway(_config(url), cache=StoreCache(store)) as gw:
            reply = await gw.structured("optimize", MESSAGES, "fgo_optimize", _identity)
            assert reply == {"analysis": "a", "actions": whole}
            stats = gw.statistics()
            assert (stats.salvaged, stats.reasks) == (1, 0)
            # Kept as paid work: the same call replays it from the cache.
            again = await gw.structured("optimize", MESSAGES, "fgo_optimize", _identity)
            assert again == reply
        assert len(server.requests) == 1
    finally:
        store.sync.close()


async def test_a_structured_reply_cut_off_before_any_whole_action_is_reasked(
    start_llm: StartLLM,
) -> None:
    cut = Fault(content='{"analysis": "I think that the', finish_reason="length")
    server, url = await start_llm(faults=[cut], policy=_reply(GOOD_OPTIMIZE))
    async with LLMGateway(_config(url)) as gw:
        reply = await gw.structured("optimize", MESSAGES, "fgo_optimize", _identity)
        assert reply == json.loads(GOOD_OPTIMIZE)
        assert (gw.statistics().salvaged, gw.statistics().reasks) == (0, 1)
    assert "cut off at" in server.requests[1].body["messages"][-1]["content"]


async def test_retry_after_as_an_http_date_is_honoured(
    start_llm: StartLLM, autojump_clock: trio.testing.MockClock
) -> None:
    import email.utils
    import time

    when = email.utils.formatdate(time.time() + 20, usegmt=True)
    server, url = await start_llm(faults=[Fault(status=500, retry_after=when)], policy=_reply("ok"))
    async with LLMGateway(_config(url, retry_wait_max=1.0)) as gw:
        assert await gw.chat("optimize", MESSAGES) == "ok"
    first, second = server.requests
    assert first.finished is not None
    # About 20 s (the date has one-second resolution), not the 1 s backoff cap.
    assert 17.0 <= second.started - first.finished <= 21.0


async def test_the_api_key_goes_in_the_authorization_header(start_llm: StartLLM) -> None:
    server, url = await start_llm(policy=_reply("ok"))
    async with LLMGateway(_config(url, api_key="sk-test-123")) as gw:
        await gw.chat("optimize", MESSAGES)
    async with LLMGateway(_config(url)) as gw:
        await gw.chat("optimize", MESSAGES)
    with_key, without = server.requests
    assert with_key.headers["authorization"] == "Bearer sk-test-123"
    assert "authorization" not in without.headers


async def test_structured_output_none_sends_no_response_format(start_llm: StartLLM) -> None:
    server, url = await start_llm(policy=_reply(GOOD_OPTIMIZE))
    async with LLMGateway(_config(url, structured_output="none")) as gw:
        reply = await gw.structured("optimize", MESSAGES, "fgo_optimize", _identity)
    assert reply == json.loads(GOOD_OPTIMIZE)  # still validated and parsed
    assert "response_format" not in server.requests[0].body


async def test_no_strict_sends_the_plain_schema_with_strict_false(start_llm: StartLLM) -> None:
    server, url = await start_llm(policy=_reply(GOOD_OPTIMIZE))
    async with LLMGateway(_config(url, structured_output="json_schema", strict=False)) as gw:
        await gw.structured("optimize", MESSAGES, "fgo_optimize", _identity)
    from fgo_actors._llm.gateway import _strict_wire_schema, _wire_schema

    sent = server.requests[0].body["response_format"]["json_schema"]
    assert sent["strict"] is False
    # The protocol's own schema, not the strict variant.
    assert sent["schema"] == _wire_schema("fgo_optimize")
    assert sent["schema"] != _strict_wire_schema("fgo_optimize")[0]


def _unit(name: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"unit {name}"}]


def _unit_of(request: Any) -> str:
    return str(request.body["messages"][0]["content"])


async def test_a_reask_goes_out_before_units_that_queued_meanwhile(
    start_llm: StartLLM, autojump_clock: trio.testing.MockClock
) -> None:
    """With one place, a rejected reply's re-ask is sent next, while the server
    still holds its prompt, not after the units that asked in the meantime."""
    server, url = await start_llm(latency=1.0, policy=_reply(GOOD_OPTIMIZE))
    rejected: set[str] = set()

    def check_for(name: str) -> Any:
        async def check(reply: dict[str, Any]) -> str:
            await trio.sleep(0.5)  # a check that runs something, and yields
            if name == "a" and name not in rejected:
                rejected.add(name)
                raise ReplyRejectedError("function 'f' does not compile")
            return name

        return check

    async with LLMGateway(_config(url, max_concurrency=1)) as gw, trio.open_nursery() as n:
        for name in "abc":
            n.start_soon(gw.structured, "optimize", _unit(name), "fgo_optimize", check_for(name))
            await trio.sleep(0.01)  # a first, then b and c queue behind it
    order = [
        _unit_of(r) + (" re-ask" if len(r.body["messages"]) > 1 else "") for r in server.requests
    ]
    assert order == ["unit a", "unit a re-ask", "unit b", "unit c"]
    assert server.max_in_flight == 1
    stats = gw.statistics()
    assert stats.reasks == 1
    assert stats.in_flight == 0


async def test_a_place_kept_for_a_reask_is_given_back_on_every_way_out(
    start_llm: StartLLM, autojump_clock: trio.testing.MockClock
) -> None:
    # Accepted, failed after its re-asks, and cancelled mid-check: each time the
    # one place is free again, or the next call would never be sent.
    server, url = await start_llm(latency=1.0, policy=_reply(GOOD_OPTIMIZE))

    def never(reply: dict[str, Any]) -> str:
        raise ReplyRejectedError("never good enough")

    async def slow(reply: dict[str, Any]) -> str:
        await trio.sleep(100)
        return "late"

    async with LLMGateway(_config(url, max_concurrency=1, max_reasks=1)) as gw:
        assert await gw.structured("optimize", MESSAGES, "fgo_optimize", _identity)
        with pytest.raises(UnitFailedError, match="never good enough"):
            await gw.structured("optimize", _unit("x"), "fgo_optimize", never)
        with trio.move_on_after(10):
            await gw.structured("optimize", _unit("y"), "fgo_optimize", slow)
        with trio.fail_after(5):
            assert await gw.chat("optimize", _unit("z")) == GOOD_OPTIMIZE
    assert [_unit_of(r) for r in server.requests][-1] == "unit z"


async def test_twin_reasks_with_one_place_do_not_wait_for_each_other(
    start_llm: StartLLM, tmp_path: Path
) -> None:
    # Two units ask the same thing; the second is answered from the cache, so
    # it holds no place. Both replies are refused with the same error, and the
    # second's re-ask goes first and needs the place the first still keeps:
    # the first gives it up while it waits for that twin request.
    server, url = await start_llm(latency=0.2, policy=_reply(GOOD_OPTIMIZE))
    refused: set[str] = set()

    def check_for(name: str, pause: float) -> Any:
        async def check(reply: dict[str, Any]) -> str:
            await trio.sleep(pause)
            if name not in refused:
                refused.add(name)
                raise ReplyRejectedError("function 'f' does not compile")
            return name

        return check

    store = AsyncStore(Store(tmp_path / "cache.sqlite"))
    try:
        async with LLMGateway(_config(url, max_concurrency=1), cache=StoreCache(store)) as gw:
            with trio.fail_after(20):
                async with trio.open_nursery() as n:
                    n.start_soon(
                        gw.structured, "optimize", MESSAGES, "fgo_optimize", check_for("a", 0.5)
                    )
                    await trio.sleep(0.05)
                    n.start_soon(
                        gw.structured, "optimize", MESSAGES, "fgo_optimize", check_for("b", 0.1)
                    )
        assert refused == {"a", "b"}
        assert gw.statistics().in_flight == 0
        # The first request once, the shared re-ask once: the twin came from the cache.
        assert len(server.requests) == 2
    finally:
        store.sync.close()


async def test_a_check_that_crashes_refuses_the_reply_instead_of_ending_the_run(
    start_llm: StartLLM, tmp_path: Path
) -> None:
    """A bug in reading an unforeseen reply (here a TypeError on the first
    reply) is logged with its traceback and re-asked like a reply that does
    not parse; the run goes on, and so would a rerun that met it again."""
    server, url = await start_llm(policy=_reply(GOOD_OPTIMIZE))
    seen: list[int] = []

    def crashes_once(reply: dict[str, Any]) -> dict[str, Any]:
        seen.append(1)
        if len(seen) == 1:
            raise TypeError("unhashable type: 'list'")
        return reply

    store = AsyncStore(Store(tmp_path / "cache.sqlite"))
    try:
        async with LLMGateway(_config(url), cache=StoreCache(store)) as gw:
            with structlog.testing.capture_logs() as logs:
                reply = await gw.structured("optimize", MESSAGES, "fgo_optimize", crashes_once)
            assert reply == json.loads(GOOD_OPTIMIZE)
            assert gw.statistics().reasks == 1
            # The refused first request is not answered from the cache again.
            again = await gw.structured("optimize", MESSAGES, "fgo_optimize", _identity)
            assert again == reply
    finally:
        store.sync.close()
    assert len(server.requests) == 3
    reask = server.requests[1].body["messages"][-1]["content"]
    assert "the reply could not be read (TypeError: unhashable type: 'list')" in reask
    (failed,) = [e for e in logs if e["event"] == "llm_reply_check_failed"]
    assert (failed["role"], failed["log_level"], failed["exc_info"]) == ("optimize", "error", True)


async def test_a_check_that_always_crashes_fails_the_unit_and_our_errors_pass_through(
    start_llm: StartLLM,
) -> None:
    server, url = await start_llm(policy=_reply(GOOD_OPTIMIZE))

    def always(reply: dict[str, Any]) -> None:
        raise KeyError("x")

    def budget(reply: dict[str, Any]) -> None:
        raise BudgetExhaustedError("spent inside the check")

    async with LLMGateway(_config(url)) as gw:
        with pytest.raises(UnitFailedError) as caught:
            await gw.structured("optimize", MESSAGES, "fgo_optimize", always)
        assert str(caught.value) == (
            "optimize reply still invalid after 3 attempts: "
            "the reply could not be read (KeyError: 'x')"
        )
        with pytest.raises(BudgetExhaustedError, match="spent inside the check"):
            await gw.structured("optimize", MESSAGES, "fgo_optimize", budget)
    assert len(server.requests) == 4
