"""The BFCL multi-turn adapter and the agent's tool-call mode.

Everything runs against the real bfcl-eval package: its tasks, its reference
calls, its API classes and its checker functions. The agent talks to the real
loopback LLM server, whose policy here replays scripted calls.
"""

from __future__ import annotations

import itertools
import json
import keyword
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fgo_actors import GatewayConfig, LLMGateway, Module, Rule
from fgo_actors._core.schemas import schema_error
from fgo_actors.agent.envs import (
    BFCL_ENVS,
    FOLDS,
    BFCLMultiTurn,
    StepResult,
    Task,
    make_env,
    parse_tasks,
)
from fgo_actors.agent.envs._bfcl import (
    BFCL_CATEGORIES,
    FOLD_SIZES,
    TASKS_PER_CATEGORY,
    CallError,
    _category,
    fold_indices,
    parse_call,
    task_index,
)
from fgo_actors.agent.rollout import AgentConfig, parse_call_reply, rollout

from .helpers import StartLLM, run_fgo

pytest.importorskip("bfcl_eval")

# multi_turn_base_136: buy 50 ZETA shares, check, cancel the order, show the account.
TRADING = Task("bfcl_base", "train", 0)


@pytest.fixture
def env() -> Iterator[BFCLMultiTurn]:
    environment = BFCLMultiTurn()
    yield environment
    environment.close()


def play(env: BFCLMultiTurn, task: Task, actions: list[str]) -> StepResult:
    result = env.reset(task)
    for action in actions:
        assert not result.done
        result = env.step(action)
    return result


def test_every_reference_solution_succeeds(env: BFCLMultiTurn) -> None:
    episodes = 0
    for name in BFCL_ENVS:
        for fold in FOLDS:
            for seed in range(FOLD_SIZES[fold]):
                task = Task(name, fold, seed)
                result = play(env, task, env.gold_actions(task))
                assert result.done, task
                assert result.success, (task, result.observation)
                assert result.score == 1.0
                episodes += 1
    assert episodes == len(BFCL_ENVS) * TASKS_PER_CATEGORY == 800


def test_a_request_shows_the_user_text_and_calls_return_results(env: BFCLMultiTurn) -> None:
    first = env.reset(TRADING)
    assert first.valid_actions == ()
    assert not first.done
    assert first.observation.startswith("User request 1 of 4: Give me an update on where Zeta")
    assert "multi_turn_base_136" in env.task_description
    names = [line.split("(", 1)[0] for line in env.functions]
    assert "place_order" in names
    assert "add" in names  # MathAPI is the task's other class
    assert "cd" not in names  # no file system in this task
    assert all(len(line) < 260 for line in env.functions)
    result = env.step("get_stock_info(symbol='ZETA')")
    assert result.observation.startswith('Result: {"price": 150.75')
    assert "Current request (1 of 4): Give me an update" in result.observation
    assert not result.done
    assert result.reward == 0.0


def test_signatures_show_allowed_values_and_formats(env: BFCLMultiTurn) -> None:
    env.reset(Task("bfcl_base", "train", 1))  # a vehicle task
    lines = {line.split("(", 1)[0]: line for line in env.functions}
    assert lines["startEngine"].startswith("startEngine(ignitionMode: 'START' | 'STOP'): ")
    assert "door: list['driver' | 'passenger' | 'rear_left' | 'rear_right']" in lines["lockDoors"]
    assert "unit: 'celsius' | 'fahrenheit' = 'celsius'" in lines["adjustClimateControl"]


def test_a_wrong_call_fails_its_request(env: BFCLMultiTurn) -> None:
    gold = env.gold_actions(TRADING)
    wrong = [a.replace("amount=50", "amount=5") for a in gold]
    assert wrong != gold
    result = play(env, TRADING, wrong[:3])  # request 1, with 5 shares bought, closed
    assert result.info["passed"] == [False]
    assert result.reward == 0.0
    assert "request 1" not in result.observation  # no verdict before the end
    result = play(env, TRADING, wrong)
    assert result.done
    assert not result.success
    assert result.score < 1.0
    assert "- request 1: failed: the TradingBot state differs in orders" in result.observation
    # Closing a request without any call fails it too.
    result = play(env, TRADING, ["done"])
    assert result.info["passed"] == [False]
    result = play(env, TRADING, [*gold[:3], *gold[3:]])
    assert result.success


def test_rewards_add_up_to_the_score(env: BFCLMultiTurn) -> None:
    env.reset(TRADING)
    total = 0.0
    for action in env.gold_actions(TRADING):
        result = env.step(action)
        total += result.reward
    assert result.success
    assert total == pytest.approx(1.0)
    with pytest.raises(RuntimeError, match="episode is over"):
        env.step("done")


@pytest.mark.parametrize(
    ("action", "error"),
    [
        ("get_stock_info(symbol='ZETA'", "not Python call syntax"),
        ("buy 50 shares", "not Python call syntax"),
        ("", "the action is empty"),
        ("get_stock_info", "not a function call"),
        ("__import__('os')", "there is no function '__import__'"),
        ("__import__('os').system('touch /tmp/fgo-bfcl-pwned')", "plain name"),
        ("os.system('ls')", "plain name"),
        ("get_stock_info(symbol=open('/etc/passwd').read())", "argument 'symbol' is not a literal"),
        ("get_stock_info(*['ZETA'])", "*arguments are not allowed"),
        ("get_stock_info(**{'symbol': 'ZETA'})", "**arguments are not allowed"),
        ("get_stock_info(symbol='ZETA'); cancel_order(order_id=1)", "not Python call syntax"),
        ("[get_stock_info(symbol='ZETA'), get_account_info()]", "not a function call"),
        ("get_stock_info(ticker='ZETA')", "bad arguments for get_stock_info"),
        ("rm(file_name='x')", "there is no function 'rm'; the functions are: "),
        ("power(base=10, exponent=10**9)", "argument 'exponent' is not a literal"),
        ("power(base=10, exponent=1000000000)", "integer exponents above"),
        ("logarithm(value=2, base=10, precision=100000000)", "precision above"),
    ],
)
def test_bad_actions_get_a_clear_error_and_run_nothing(
    env: BFCLMultiTurn, action: str, error: str
) -> None:
    gold = env.gold_actions(TRADING)
    env.reset(TRADING)
    result = env.step(action)
    assert result.observation.startswith("Error: ")
    assert error in result.observation
    assert not result.done
    # Nothing ran: the episode still plays to success from here.
    for step in gold:
        result = env.step(step)
    assert result.success


def test_an_error_raised_inside_the_api_is_a_result(env: BFCLMultiTurn) -> None:
    env.reset(TRADING)
    result = env.step("get_order_details(order_id='not a number')")
    assert result.observation.startswith("Result: ")
    assert not result.done


def test_held_out_functions_are_announced_in_their_request(env: BFCLMultiTurn) -> None:
    task = Task("bfcl_miss_func", "train", 0)
    gold = env.gold_actions(task)
    first = env.reset(task)
    shown = set(env.functions)
    held_out = env._held_out
    assert len(held_out) == 1
    (turn, names), *_ = held_out.items()
    assert not any(line.split("(", 1)[0] in names for line in shown)
    closes = [i for i, a in enumerate(gold) if a == "done"]
    result = first
    for action in gold[: closes[turn - 1] + 1]:
        result = env.step(action)
    assert f"User request {turn + 1} of " in result.observation
    assert "I have updated some more functions" in result.observation
    assert "New functions:\n" + names[0] + "(" in result.observation
    assert {line.split("(", 1)[0] for line in env.functions} >= set(names)


def test_long_results_are_clipped_in_the_observation(env: BFCLMultiTurn) -> None:
    for seed in range(FOLD_SIZES["train"]):
        task = Task("bfcl_long_context", "train", seed)
        env.reset(task)
        if any(line.startswith("find(") for line in env.functions):
            break
    result = env.step("find()")
    assert "more characters]" in result.observation
    assert len(result.observation) < env.result_chars + 1000


def test_too_many_actions_in_one_request_end_the_episode() -> None:
    env = BFCLMultiTurn(turn_step_limit=3)
    env.reset(TRADING)
    for _ in range(3):
        assert not env.step("get_account_info()").done
    result = env.step("get_account_info()")
    assert result.done
    assert not result.success
    assert "- request 1: failed: cut off after 3 actions" in result.observation
    assert "- request 4: not reached" in result.observation


def test_verdicts_agree_with_bfcl_own_checker(env: BFCLMultiTurn) -> None:
    """Reference solutions with one call dropped, swapped or repeated: our
    success is BFCL's multi_turn_checker verdict. (The checker evals the call
    strings; here they are the package's own reference calls.)"""
    from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker import multi_turn_checker

    rng = random.Random(7)
    verdicts = []
    names = itertools.count()
    for name, category in BFCL_CATEGORIES.items():
        questions, answers = _category(category)
        for seed in rng.sample(range(FOLD_SIZES["dev"]), 4):
            index = task_index("dev", seed)
            reference: list[list[str]] = answers[index]["ground_truth"]
            every_call = [call for calls in reference for call in calls]
            for change in ("drop", "swap", "repeat"):
                turns = [list(calls) for calls in reference]
                calls = rng.choice([t for t in turns if t])
                k = rng.randrange(len(calls))
                if change == "drop":
                    del calls[k]
                elif change == "swap":
                    calls[k] = rng.choice(every_call)
                else:
                    calls.insert(k, calls[k])
                ours = play(env, Task(name, "dev", seed), [a for t in turns for a in [*t, "done"]])
                theirs = multi_turn_checker(
                    [[[call] for call in t] for t in turns],
                    reference,
                    dict(questions[index]),
                    category,
                    f"fgo_test_{next(names)}",
                )
                verdicts.append((ours.success, theirs["valid"]))
    assert all(ours == theirs for ours, theirs in verdicts)
    assert {ours for ours, _ in verdicts} == {True, False}  # both kinds were seen


def test_folds_are_deterministic_disjoint_and_cover_every_task() -> None:
    folds = {fold: fold_indices(fold) for fold in FOLDS}
    assert {fold: len(ix) for fold, ix in folds.items()} == FOLD_SIZES
    every = [i for ix in folds.values() for i in ix]
    assert sorted(every) == list(range(TASKS_PER_CATEGORY))
    # Pinned: a changed split would silently mix test tasks into training.
    assert folds["train"][:3] == (136, 84, 88)
    assert folds["test"][:3] == (37, 100, 197)


@given(st.sampled_from(FOLDS), st.integers(min_value=-5, max_value=120))
def test_seeds_name_tasks_of_their_fold_only(fold: Any, seed: int) -> None:
    if 0 <= seed < FOLD_SIZES[fold]:
        index = task_index(fold, seed)
        assert index == fold_indices(fold)[seed]
        assert all(index not in fold_indices(other) for other in FOLDS if other != fold)
    else:
        with pytest.raises(ValueError, match="seeds are 0-"):
            task_index(fold, seed)


_LITERALS = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


_NAMES = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True).filter(
    lambda name: not keyword.iskeyword(name)  # `as=1` is not a keyword argument
)


@given(st.dictionaries(_NAMES, _LITERALS))
def test_call_arguments_round_trip(kwargs: dict[str, Any]) -> None:
    text = "f(" + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")"
    assert parse_call(text) == ("f", (), kwargs)


@given(st.text(max_size=80))
def test_any_text_parses_or_is_refused_cleanly(text: str) -> None:
    try:
        name, args, kwargs = parse_call(text)
    except CallError:
        return
    assert name.isidentifier()
    assert isinstance(args, tuple)
    assert isinstance(kwargs, dict)


def test_task_specs_and_make_env() -> None:
    tasks = parse_tasks("bfcl_base:test:0-2,59")
    assert [t.id for t in tasks] == [f"bfcl_base/test/{s}" for s in (0, 1, 2, 59)]
    assert isinstance(make_env("bfcl_long_context"), BFCLMultiTurn)
    with pytest.raises(ValueError, match="seeds are 0-59"):
        parse_tasks("bfcl_base:test:58-60")
    with pytest.raises(ValueError, match="no parameters"):
        parse_tasks("bfcl_miss_func:dev:0", params="x=1")
    with pytest.raises(ValueError, match=r"known: .*bfcl_base, bfcl_miss_func"):
        parse_tasks("bfcl_nope:dev:0")
    with pytest.raises(ValueError, match="known: twc,"):
        make_env("nope")
    assert schema_error("environment", tasks[0].to_json()) is None


def test_a_call_reply_is_its_first_call_line() -> None:
    assert parse_call_reply("cd(folder='docs')") == "cd(folder='docs')"
    assert parse_call_reply("```python\nls(a=True)\n```") == "ls(a=True)"
    assert parse_call_reply("`pwd()`") == "pwd()"
    assert parse_call_reply("[mkdir(dir_name='temp')]") == "mkdir(dir_name='temp')"
    assert parse_call_reply("I will list them:\nls()\ncd(folder='x')") == "ls()"
    assert parse_call_reply("Sure: get_account_info() now") == "get_account_info()"
    assert parse_call_reply("Done.") == "done"
    assert parse_call_reply("done()") == "done"
    assert parse_call_reply("os.system('ls')") == "os.system('ls')"  # refused by the env
    assert parse_call_reply("The request is complete.") is None
    assert parse_call_reply("") is None


def replay(plan: Iterator[str]) -> Any:
    """A policy that answers each agent turn with the next planned reply."""

    def policy(body: dict[str, Any]) -> str:
        return next(plan)

    return policy


async def test_rollout_in_tool_call_mode_plays_the_reference_to_success(
    start_llm: StartLLM,
) -> None:
    gold = BFCLMultiTurn().gold_actions(TRADING)
    fenced = [f"```python\n{a}\n```" if i % 2 else a for i, a in enumerate(gold)]
    server, url = await start_llm(policy=replay(iter(fenced)))
    module = Module(rules=(Rule(id="r1", text="Check the stock price before an order."),))
    env = BFCLMultiTurn()
    config = AgentConfig(max_steps=40, restate_rules=1)
    async with LLMGateway(GatewayConfig(base_url=url, model="m")) as gw:
        traj = await rollout(env, TRADING, module, gw, config, trajectory_id="b-1")
    assert schema_error("trajectory", traj.to_json()) is None
    assert traj.outcome.success
    assert traj.outcome.score == pytest.approx(1.0)
    assert traj.metadata is not None
    assert traj.metadata["steps"] == len(gold) == len(server.requests)
    assert traj.metadata["invalid_replies"] == 0
    assert traj.metadata["task_type"] == "bfcl_base"
    assert "multi_turn_base_136" in traj.task
    # The model sees every function's signature; the record names them only.
    system = server.requests[0].body["messages"][0]["content"]
    assert system.startswith("You are an assistant that carries out a user's requests")
    assert "\nplace_order(order_type: str, symbol: str, price: float, amount: int): " in system
    assert "Check the stock price before an order." in system
    record = traj.steps[0].content or ""
    assert "place_order, " in record
    assert "price: float" not in record
    assert all(r.body["messages"][0]["content"] == system for r in server.requests)
    assert all(r.body["max_tokens"] == config.max_call_tokens for r in server.requests)
    last = server.requests[-1].body["messages"][-1]["content"]
    assert last.endswith("Reply with one function call, or done.")
    assert "Remember:\n- Check the stock price before an order." in server.requests[0].prompt
    # A fenced reply is recorded with the call taken from it.
    replies = [s.content or "" for s in traj.steps if s.role == "assistant"]
    assert replies[1] == f"```python\n{gold[1]}\n```".strip() + f" -> {gold[1]}"
    assert "- request 4: passed" in (traj.steps[-1].content or "")


async def test_rollout_in_tool_call_mode_fails_on_wrong_calls(start_llm: StartLLM) -> None:
    wrong = ["get_account_info()", "done"] * 4
    _server, url = await start_llm(policy=replay(iter(wrong)))
    async with LLMGateway(GatewayConfig(base_url=url, model="m")) as gw:
        traj = await rollout(BFCLMultiTurn(), TRADING, Module(), gw, AgentConfig(max_steps=40))
    assert not traj.outcome.success
    assert traj.outcome.score is not None
    assert traj.outcome.score < 1.0
    assert traj.metadata is not None
    assert traj.metadata["steps"] == len(wrong)
    assert "task failed" in (traj.outcome.feedback or "")
    assert "failed" in (traj.steps[-1].content or "")


async def test_tool_call_mode_replies_that_name_no_call_are_invalid(start_llm: StartLLM) -> None:
    server, url = await start_llm(policy=lambda body: "I would buy the shares.")
    async with LLMGateway(GatewayConfig(base_url=url, model="m")) as gw:
        traj = await rollout(BFCLMultiTurn(), TRADING, Module(), gw)
    assert traj.metadata is not None
    assert traj.metadata["invalid_replies"] == AgentConfig().max_invalid
    assert len(server.requests) == AgentConfig().max_invalid
    assert "was neither a function call nor done" in server.requests[-1].prompt
    assert not traj.outcome.success
    assert "stopped after 3 steps" in (traj.outcome.feedback or "")


def test_eval_command_plays_bfcl_tasks(server_url: str, tmp_path: Path) -> None:
    """``fgo eval`` on BFCL from the command line: the scripted agent ends every
    request at once, so each episode fails cleanly, with no invalid reply."""
    out = tmp_path / "eval.json"
    module = tmp_path / "m.json"
    rule = Rule(id="r1", text="List a folder before you change it.")
    module.write_text(json.dumps(Module(rules=(rule,)).to_json()))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FGO_")}
    proc = run_fgo(
        "eval",
        "--tasks",
        "bfcl_base:test:0-1",
        "--module",
        str(module),
        "--baseline",
        "empty",
        "--out",
        str(out),
        "--max-steps",
        "10",
        "--base-url",
        server_url,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert [r["label"] for r in results] == ["m", "empty"]
    for result in results:
        assert (result["episodes"], result["successes"], result["invalid_replies"]) == (2, 0, 0)
        assert result["turns"] >= 2
