"""Tests aimed at single-line mistakes a mutation probe found uncaught.

Each test names the mistake it catches; all run against the real code, and
the gateway tests against the real loopback server.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import pytest
import trio
import trio.testing

from fgo_actors import (
    BudgetExhaustedError,
    GatewayConfig,
    LLMGateway,
    Module,
    Rule,
    Subset,
    default_counter,
)
from fgo_actors._core.edits import apply_actions, merge_input
from fgo_actors._core.prompts import (
    REASK_TOKENS,
    merge_messages,
    optimize_messages,
    reask_message,
    render_trajectory,
)
from fgo_actors._core.stats import Z95, mean_interval
from fgo_actors._daemon.bridge import _acquire_guest, _release_guest
from fgo_actors.testing import Fault, synthetic_trajectory

from .helpers import StartLLM

MESSAGES = [{"role": "user", "content": "hi"}]


def _reply(content: str) -> Any:
    return lambda body: content


# -- 1. the asyncio bridge ------------------------------------------------------------


def test_cancelling_the_awaiting_asyncio_task_cancels_the_trio_task() -> None:
    """Catches: an asyncio cancellation not forwarded to trio (the trio task runs on)."""
    seen: list[str] = []

    async def trio_side() -> None:
        seen.append("started")
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            seen.append("cancelled")
            raise

    async def until(word: str) -> None:
        for _ in range(300):  # up to 3 s
            if word in seen:
                return
            await asyncio.sleep(0.01)

    async def program() -> tuple[list[str], bool]:
        guest = await _acquire_guest()

        async def call() -> None:
            await guest.run(trio_side)

        try:
            task = asyncio.create_task(call())
            await until("started")
            assert seen == ["started"]
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # The guest run is still up: only a forwarded cancel ends the trio task now.
            await until("cancelled")
            return list(seen), task.cancelled()
        finally:
            await _release_guest(guest)

    seen_before_stop, cancelled = asyncio.run(program())
    assert cancelled
    assert seen_before_stop == ["started", "cancelled"]


# -- 2. success and failure counts in prompts -----------------------------------------


def _three_successes_one_failure() -> list[Any]:
    # synthetic_trajectory(i) fails when i % 3 == 0: 1, 2, 4 succeed, 3 fails.
    counter = default_counter()
    return [render_trajectory(synthetic_trajectory(i), counter, 2000) for i in (1, 2, 3, 4)]


def test_optimize_prompt_puts_each_count_next_to_its_word() -> None:
    """Catches: successes and failures swapped in the optimize prompt's count line."""
    items = _three_successes_one_failure()
    assert [i.success for i in items] == [True, True, False, True]
    prompt = optimize_messages(Module(), items, module_tokens=400)[1]["content"]
    assert "Trajectories (4: 3 succeeded, 1 failed):" in prompt


def test_merge_prompt_shows_each_childs_successes_and_failures() -> None:
    """Catches: a subset's successes and failures swapped in the stats a merge prompt shows."""
    subset = Subset(id="s1", items=tuple(_three_successes_one_failure()))
    prompt = merge_messages(
        merge_input([], node_id="m"),
        [("leaf1", subset.stats())],
        module_tokens=400,
        module_size=0,
    )[1]["content"]
    line = re.search(r"^Version leaf1: (.*)$", prompt, re.MULTILINE)
    assert line is not None
    stats = json.loads(line.group(1))
    assert (stats["trajectories"], stats["successes"], stats["failures"]) == (4, 3, 1)


# -- 3. the re-ask note ---------------------------------------------------------------


def test_reask_note_for_a_very_long_error_stays_within_its_token_limit() -> None:
    """Catches: the re-ask note's error never cut to REASK_TOKENS."""
    counter = default_counter()
    error = "actions[0]: revise_rule names unknown rule id 'x'; " * 400
    assert counter.count(error) > 10 * REASK_TOKENS
    note = reask_message(counter, error)
    assert note["role"] == "user"
    assert counter.count(note["content"]) <= REASK_TOKENS
    assert note["content"].startswith("Your previous reply was rejected: actions[0]")
    assert note["content"].endswith("\nReply again with one corrected JSON object.")


# -- 4. revise_rule and the duplicate check -------------------------------------------


def test_revise_rule_that_only_rewords_a_rule_is_not_its_own_duplicate() -> None:
    """Catches: the duplicate check of revise_rule not skipping the rule being revised."""
    module = Module(rules=(Rule(id="s0.r1", text="Close the door after you.", subsets=("s0",)),))
    result = apply_actions(
        module,
        [{"op": "revise_rule", "id": "s0.r1", "text": "close the  DOOR after you."}],
        subset_id="s1",
        trajectory_ids=["t1"],
    )
    assert result.errors == ()
    assert result.applied == 1
    (rule,) = result.module.rules
    assert (rule.id, rule.text, rule.subsets) == (
        "s0.r1",
        "close the  DOOR after you.",
        ("s0", "s1"),
    )


# -- 5. mean_interval ------------------------------------------------------------------


def test_mean_interval_uses_the_sample_variance() -> None:
    """Catches: population variance (divide by n) instead of sample variance (n - 1)."""
    # [1, 3]: mean 2, sample variance ((1-2)^2 + (3-2)^2) / 1 = 2, so the
    # half-width is z * sqrt(2 / 2) = z (population variance would give z / sqrt 2).
    mean, lo, hi = mean_interval([1.0, 3.0])
    assert mean == 2.0
    assert lo == pytest.approx(2.0 - Z95)
    assert hi == pytest.approx(2.0 + Z95)


# -- 6. the Retry-After cap -----------------------------------------------------------


async def test_huge_retry_after_is_capped_at_retry_after_max(
    start_llm: StartLLM, autojump_clock: trio.testing.MockClock
) -> None:
    """Catches: retry_after_max ignored, so a 500's Retry-After of 10000 s is waited in full."""
    server, url = await start_llm(
        faults=[Fault(status=500, retry_after=10000)], policy=_reply("ok")
    )
    cfg = GatewayConfig(
        base_url=url,
        model="m",
        adaptive=False,
        retry_after_max=5.0,
        retry_wait_initial=0.5,
        retry_wait_max=2.0,
    )
    async with LLMGateway(cfg) as gw:
        assert await gw.chat("optimize", MESSAGES) == "ok"
    first, second = server.requests
    assert first.fault is not None
    assert first.fault.status == 500
    assert first.finished is not None
    waited = second.started - first.finished
    assert 5.0 <= waited < 5.5
    assert gw.statistics().retries == 1


# -- 7. the token budget's boundaries -------------------------------------------------


def _budget_config(url: str, budget: int) -> GatewayConfig:
    return GatewayConfig(base_url=url, model="m", token_budget=budget, max_completion_tokens=16)


async def test_budget_equal_to_the_tokens_used_is_exhausted(start_llm: StartLLM) -> None:
    """Catches: ``>`` for ``>=`` where spent tokens are judged to exhaust the budget."""
    # The server reports len(text) // 4 + 1 tokens: 1 for the prompt "hi",
    # 101 for a 400-character reply, 102 in all.
    server, url = await start_llm(policy=_reply("y" * 400))
    async with LLMGateway(_budget_config(url, 102)) as gw:
        await gw.chat("optimize", MESSAGES, max_tokens=16)
        assert gw.used_tokens == 102
        assert gw.statistics().budget_exhausted
        with pytest.raises(BudgetExhaustedError, match="token budget of 102 reached"):
            await gw.chat("optimize", MESSAGES, max_tokens=16)
    assert len(server.requests) == 1


async def test_call_whose_worst_case_exactly_fits_the_budget_is_sent(
    start_llm: StartLLM, autojump_clock: trio.testing.MockClock
) -> None:
    """Catches: ``>=`` for ``>`` (or ``<`` for ``<=``) where a reservation is judged not to fit."""
    server, url = await start_llm(policy=_reply("ok"))
    need = default_counter().count_messages(MESSAGES) + 16  # prompt estimate + reply cap
    async with LLMGateway(_budget_config(url, need)) as gw:
        with trio.fail_after(60):  # a reservation that waits for room never given
            assert await gw.chat("optimize", MESSAGES) == "ok"
        assert not gw.statistics().budget_exhausted
    assert len(server.requests) == 1
