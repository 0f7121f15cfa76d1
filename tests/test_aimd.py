"""Adaptive concurrency: the pure window, and a gateway against a loopback
server with a hidden capacity."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from fgo_actors import GatewayConfig, LLMGateway, LLMUnavailableError
from fgo_actors._llm.aimd import Window
from fgo_actors.testing import Fault

from .helpers import StartLLM


@given(
    ceiling=st.integers(1, 64),
    events=st.lists(st.tuples(st.booleans(), st.integers(0, 5)), max_size=300),
)
def test_the_window_stays_between_one_and_the_ceiling(
    ceiling: int, events: list[tuple[bool, int]]
) -> None:
    window = Window(ceiling)
    tokens: list[int] = []
    for ok, age in events:
        tokens.append(window.sent())
        token = tokens[max(0, len(tokens) - 1 - age)]  # a call sent a while ago
        if ok:
            window.succeeded()
        else:
            before, current = window.size, window.sent()
            ours = window.refused(token)
            # Only a refusal with the window already at 1, for a call sent
            # after the last cut, is the endpoint failing.
            assert ours == (before > 1 or token != current)
            assert window.size in (before, max(1, before * 3 // 4))
        assert 1 <= window.size <= ceiling


def test_a_burst_of_refusals_cuts_the_window_once() -> None:
    window = Window(16)
    tokens = [window.sent() for _ in range(16)]
    assert all(window.refused(t) for t in tokens)
    assert (window.size, window.cuts) == (12, 1)
    # The next burst, sent with the smaller window, cuts it again.
    assert window.refused(window.sent())
    assert window.size == 9


def test_the_window_grows_back_after_a_run_of_successes() -> None:
    window = Window(4)
    window.refused(window.sent())
    assert window.size == 3
    for _ in range(3):
        window.succeeded()
    assert window.size == 4
    for _ in range(10):
        window.succeeded()
    assert window.size == 4


def test_each_step_up_takes_as_many_successes_as_the_window_is_wide() -> None:
    window = Window(8)
    window.refused(window.sent())  # 8 -> 6
    window.refused(window.sent())  # 6 -> 4
    assert (window.size, window.cuts) == (4, 2)
    for expected in [4, 4, 4, 5, 5, 5, 5, 5, 6]:
        window.succeeded()
        assert window.size == expected


def test_a_window_of_two_is_cut_to_one() -> None:
    window = Window(2)
    assert window.refused(window.sent())
    assert window.size == 1


def test_at_one_a_refusal_is_the_endpoints() -> None:
    window = Window(1)
    assert not window.refused(window.sent())
    with pytest.raises(ValueError, match=r"^the window's ceiling must be at least 1$"):
        Window(0)


class Capacity:
    """A server that takes ``n`` calls at once: each taken call answers after
    ``latency`` seconds; one more is refused at once with a 429."""

    def __init__(self, n: int, latency: float) -> None:
        self.n = n
        self.latency_s = latency
        self.in_flight = 0
        self.refused: set[int] = set()
        self.refusals = 0

    def latency(self, body: dict[str, Any]) -> float:
        if self.in_flight >= self.n:
            self.refused.add(id(body))
            return 0.0
        self.in_flight += 1
        return self.latency_s

    def fault_for(self, body: dict[str, Any]) -> Fault | None:
        if id(body) in self.refused:
            self.refused.discard(id(body))
            self.refusals += 1
            return Fault(status=429, retry_after=0.05)
        self.in_flight -= 1
        return None


def _config(url: str, ceiling: int, **kw: Any) -> GatewayConfig:
    return GatewayConfig(
        base_url=url,
        model="m",
        max_concurrency=ceiling,
        retry_attempts=2,
        retry_wait_initial=0.1,
        **kw,
    )


async def _wall(start_llm: StartLLM, capacity: int, ceiling: int, calls: int) -> tuple[float, Any]:
    cap = Capacity(capacity, latency=1.0)
    _server, url = await start_llm(latency=cap.latency, fault_for=cap.fault_for)
    config = _config(url, ceiling)
    started = trio.current_time()
    async with LLMGateway(config) as gw, trio.open_nursery() as nursery:
        for i in range(calls):
            nursery.start_soon(gw.chat, "optimize", [{"role": "user", "content": f"call {i}"}])
    stats = gw.statistics()
    assert stats.calls == {"optimize": calls}, "every call was answered"
    assert stats.retries == 0, "refusals of our own making spend no retries"
    return trio.current_time() - started, stats


async def test_a_ceiling_four_times_the_hidden_capacity_costs_little_time(
    start_llm: StartLLM, autojump_clock: trio.testing.MockClock
) -> None:
    told, told_stats = await _wall(start_llm, capacity=4, ceiling=4, calls=400)
    over, over_stats = await _wall(start_llm, capacity=4, ceiling=16, calls=400)
    assert told_stats.throttled == 0
    assert over_stats.throttled > 0
    assert over_stats.window_cuts > 0
    print(
        f"hidden capacity 4, 400 calls of 1 s: told 4 {told:.1f} s, told 16 {over:.1f} s "
        f"({over / told:.3f}x; window {over_stats.window}, {over_stats.window_cuts} cuts, "
        f"{over_stats.throttled} calls sent again)"
    )
    assert over <= 1.2 * told, (over, told)


async def test_without_adaptive_concurrency_the_same_ceiling_fails(
    start_llm: StartLLM, autojump_clock: trio.testing.MockClock
) -> None:
    """What the window prevents: a fixed 16 against a capacity of 4 spends
    the retries on refusals it caused, and the run fails."""
    cap = Capacity(4, latency=1.0)
    _server, url = await start_llm(latency=cap.latency, fault_for=cap.fault_for)
    failed: list[str] = []

    async def call(gw: LLMGateway, i: int) -> None:
        try:
            await gw.chat("optimize", [{"role": "user", "content": f"call {i}"}])
        except LLMUnavailableError as e:
            failed.append(str(e))

    async with LLMGateway(_config(url, 16, adaptive=False)) as gw, trio.open_nursery() as n:
        for i in range(64):
            n.start_soon(call, gw, i)
    assert failed
    assert all("429" in f for f in failed)
