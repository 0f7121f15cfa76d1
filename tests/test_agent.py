"""The environment protocol, the TextWorldExpress adapter and the reference agent.

The adapter runs the real simulator (textworld-express, a JVM); the agent
talks to the real loopback LLM server, whose policy here reads the numbered
action list and answers with a number.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import trio

from fgo_actors import (
    GatewayConfig,
    LLMGateway,
    Module,
    Rule,
    Trajectory,
    default_counter,
    load_trajectories,
)
from fgo_actors._core.schemas import schema_error
from fgo_actors.agent.envs import Task, TaskSet, TextWorldExpress
from fgo_actors.agent.rollout import AgentConfig, collect, parse_choice, rollout, turn_message
from fgo_actors.testing import FakeLLMServer

from .helpers import TWC, StartLLM, run_fgo

pytest.importorskip("textworld_express")

ACTION_LINE = re.compile(r"^(\d+)\. (.+)$", re.MULTILINE)


def gold_path(task: Task) -> list[str]:
    env = TextWorldExpress()
    try:
        return env.gold_actions(task)
    finally:
        env.close()


def numbered_actions(body: dict[str, Any]) -> dict[str, int]:
    last = body["messages"][-1]["content"]
    return {action: int(n) for n, action in ACTION_LINE.findall(last)}


def test_task_set_parsing() -> None:
    ts = TaskSet.parse("twc:test:0-3,7", params=TWC)
    assert [t.id for t in ts.tasks()] == [f"twc/test/{s}" for s in (0, 1, 2, 3, 7)]
    assert ts.tasks()[0].params == TWC
    for bad in ("twc:test", "twc:prod:0-3", "twc:test:3-1", "twc:test:a", "twc:test:1,1"):
        with pytest.raises(ValueError, match="task set"):
            TaskSet.parse(bad)


def test_parse_choice_takes_the_number_only() -> None:
    assert parse_choice("3", 5) == 2
    assert parse_choice(" 2. take mug", 5) == 1
    assert parse_choice("I pick 5", 5) == 4
    assert parse_choice("6", 5) is None
    assert parse_choice("0", 5) is None
    assert parse_choice("open the wardrobe", 5) is None


def test_turn_message_restates_rules_next_to_the_observation() -> None:
    module = Module(rules=(Rule(id="r1", text="Open containers first."),))
    text = turn_message("You see a wardrobe.", ["open wardrobe", "look around"], module)
    assert text.index("You see a wardrobe.") < text.index("Remember:\n- Open containers first.")
    assert text.endswith("1. open wardrobe\n2. look around\nReply with the number of one action.")


async def test_adapter_plays_the_real_game_to_success() -> None:
    task = Task("twc", "train", 3, TWC)
    gold = await trio.to_thread.run_sync(gold_path, task)
    env = await trio.to_thread.run_sync(TextWorldExpress)
    try:
        first = await trio.to_thread.run_sync(env.reset, task)
        assert first.observation
        assert first.valid_actions
        assert not first.done
        assert "task" in env.task_description.lower()
        result = first
        for action in gold:
            assert action in result.valid_actions
            result = await trio.to_thread.run_sync(env.step, action)
        assert result.success
        assert result.done
        assert result.score == pytest.approx(1.0)
    finally:
        await trio.to_thread.run_sync(env.close)


async def play_gold(
    start_llm: StartLLM, module: Module, config: AgentConfig | None = None
) -> tuple[FakeLLMServer, list[str], Trajectory]:
    """Play twc:train:3 with a loopback LLM that picks the gold action each
    turn: the server, the gold path and the trajectory."""
    task = Task("twc", "train", 3, TWC)
    gold = await trio.to_thread.run_sync(gold_path, task)
    plan = iter(gold)

    def policy(body: dict[str, Any]) -> str:
        return str(numbered_actions(body)[next(plan)])

    server, url = await start_llm(policy=policy)
    env = await trio.to_thread.run_sync(TextWorldExpress)
    try:
        async with LLMGateway(GatewayConfig(base_url=url, model="m")) as gw:
            traj = await rollout(env, task, module, gw, config, trajectory_id="ep-1")
    finally:
        await trio.to_thread.run_sync(env.close)
    return server, gold, traj


async def test_rollout_records_a_successful_episode(start_llm: StartLLM) -> None:
    module = Module(instructions="Tidy up.", rules=(Rule(id="r1", text="Open containers."),))
    server, gold, traj = await play_gold(start_llm, module)
    assert isinstance(traj, Trajectory)
    assert schema_error("trajectory", traj.to_json()) is None
    assert traj.id == "ep-1"
    assert traj.outcome.success
    assert traj.outcome.score == pytest.approx(1.0)
    assert traj.metadata is not None
    assert traj.metadata["steps"] == len(gold)
    assert traj.metadata["invalid_replies"] == 0
    assert traj.metadata["task_type"] == "twc"
    # system, then (user, assistant) per step, then the final observation.
    assert len(traj.steps) == 2 + 2 * len(gold)
    # Every request: the same system prompt (a stable prefix) holding the rules,
    # which are not restated by default.
    systems = {r.body["messages"][0]["content"] for r in server.requests}
    assert len(systems) == 1
    assert "Open containers." in systems.pop()
    users = [m["content"] for r in server.requests for m in r.body["messages"][1:]]
    assert not any("Open containers." in u for u in users)
    assert all(r.body["max_tokens"] == AgentConfig().max_reply_tokens for r in server.requests)


async def test_rollout_restates_the_relevant_rule_when_configured(start_llm: StartLLM) -> None:
    module = Module(rules=(Rule(id="r1", text="Open containers."),))
    server, _gold, traj = await play_gold(start_llm, module, AgentConfig(restate_rules=1))
    assert traj.outcome.success
    # The rule shares a word with every turn that offers "open ..."; those
    # turns, and only those, restate it.
    restated = ["Remember:\n- Open containers." in r.prompt for r in server.requests]
    opens = ["open " in r.prompt.rsplit("Actions:", 1)[-1] for r in server.requests]
    assert any(restated)
    assert restated == opens


async def test_invalid_replies_end_the_episode_without_acting(start_llm: StartLLM) -> None:
    server, url = await start_llm(policy=lambda body: "banana")
    env = await trio.to_thread.run_sync(TextWorldExpress)
    try:
        async with LLMGateway(GatewayConfig(base_url=url, model="m")) as gw:
            traj = await rollout(env, Task("twc", "train", 1, TWC), Module(), gw)
    finally:
        await trio.to_thread.run_sync(env.close)
    assert not traj.outcome.success
    assert traj.metadata is not None
    assert traj.metadata["invalid_replies"] == AgentConfig().max_invalid
    assert len(server.requests) == AgentConfig().max_invalid
    assert "named no listed action number" in server.requests[-1].prompt
    assert "3 invalid replies" in (traj.outcome.feedback or "")


async def test_collect_plays_every_task_once(start_llm: StartLLM) -> None:
    server, url = await start_llm(policy=lambda body: "1", latency=0.01)
    tasks = TaskSet.parse("twc:dev:0-4", params=TWC).tasks()
    got: list[Trajectory] = []
    send, receive = trio.open_memory_channel[Trajectory](0)
    config = AgentConfig(max_steps=4)
    gw_config = GatewayConfig(base_url=url, model="m", max_concurrency=2)
    async with LLMGateway(gw_config) as gw, trio.open_nursery() as nursery:
        nursery.start_soon(lambda: collect(tasks, Module(), gw, send, workers=2, config=config))
        async with receive:
            async for traj in receive:
                got.append(traj)
    assert sorted(t.id for t in got) == sorted(t.id for t in tasks)
    assert all(t.metadata is not None and t.metadata["steps"] <= 4 for t in got)
    assert server.max_in_flight <= 2


def test_environment_wire_shapes_match_the_schema() -> None:
    from fgo_actors.agent.envs import StepResult

    task = Task("twc", "test", 4, TWC)
    assert schema_error("environment", task.to_json()) is None
    result = StepResult(observation="You see a mug.", valid_actions=("take mug",), score=0.5)
    assert schema_error("environment", result.to_json()) is None
    assert schema_error("environment", {"env": "twc", "fold": "prod", "seed": 1}) is not None


def test_collect_command_writes_valid_trajectories(server_url: str, tmp_path: Path) -> None:
    out = tmp_path / "trajs.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FGO_")}
    proc = run_fgo(
        "collect",
        "--tasks",
        "twc:dev:0-2",
        "--params",
        TWC,
        "--out",
        str(out),
        "--max-steps",
        "3",
        "--base-url",
        server_url,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == ["twc/dev/0", "twc/dev/1", "twc/dev/2"]
    assert all(schema_error("trajectory", r) is None for r in rows)
    assert not (tmp_path / "trajs.jsonl.partial").exists()
    assert "3 episodes" in proc.stdout
    loaded = load_trajectories(out)  # what fgo optimize reads
    assert len(loaded) == 3


def test_collect_command_rejects_a_bad_task_set(tmp_path: Path) -> None:
    proc = run_fgo(
        "collect",
        "--tasks",
        "twc:prod:0-2",
        "--out",
        str(tmp_path / "t.jsonl"),
        "--base-url",
        "http://127.0.0.1:9/v1",
    )
    assert proc.returncode == 2
    assert "fold must be one of" in proc.stderr


async def test_prompt_grows_as_a_stable_prefix_and_sheds_old_turns(start_llm: StartLLM) -> None:
    server, url = await start_llm(policy=lambda body: "1")
    env = await trio.to_thread.run_sync(TextWorldExpress)
    config = AgentConfig(max_steps=12, history_tokens=700)
    try:
        async with LLMGateway(GatewayConfig(base_url=url, model="m")) as gw:
            await rollout(env, Task("twc", "train", 2, TWC), Module(), gw, config)
    finally:
        await trio.to_thread.run_sync(env.close)
    prompts = [r.body["messages"] for r in server.requests]
    extended = drops = 0
    for before, after in itertools.pairwise(prompts):
        if after[: len(before)] == before:
            extended += 1  # the previous prompt is a prefix: the cache is reused
        else:
            drops += 1
            assert after[0] == before[0]  # the system prompt always stays
    assert drops >= 1
    assert extended >= 2 * drops
    counter = default_counter()
    assert all(counter.count_messages(p[1:-1]) <= 700 for p in prompts)


async def test_evaluate_tells_a_steering_module_from_a_bare_agent(start_llm: StartLLM) -> None:
    """An 'expert' module the fake LLM obeys (it follows the gold path) against a
    bare agent that always picks action 1, paired on the same seeds."""
    from fgo_actors._core.stats import paired
    from fgo_actors.agent.eval import evaluate

    tasks = TaskSet.parse("twc:test:0-7", params=TWC).tasks()
    golds: dict[str, list[str]] = {}
    env = await trio.to_thread.run_sync(TextWorldExpress)
    try:
        for task in tasks:
            first = await trio.to_thread.run_sync(env.reset, task)
            golds[first.observation] = await trio.to_thread.run_sync(env.gold_actions, task)
    finally:
        await trio.to_thread.run_sync(env.close)

    def policy(body: dict[str, Any]) -> str:
        messages = body["messages"]
        if "EXPERT" not in messages[0]["content"]:
            return "1"
        first_turn = messages[1]["content"]
        gold = next(g for obs, g in golds.items() if obs in first_turn)
        step = sum(1 for m in messages if m["role"] == "assistant")
        return str(numbered_actions(body)[gold[step]])

    _server, url = await start_llm(policy=policy)
    expert = Module(instructions="EXPERT: follow the plan.")
    config = AgentConfig(max_steps=12)
    async with LLMGateway(GatewayConfig(base_url=url, model="m", max_concurrency=2)) as gw:
        good, good_trajs = await evaluate(tasks, expert, gw, label="expert", config=config)
        bare, _ = await evaluate(tasks, Module(), gw, label="bare", config=config)
    assert good.successes == 8
    assert good.success_ci[0] > 0.6
    assert bare.successes < 8
    assert good.llm_calls == sum(t.metadata["steps"] for t in good_trajs if t.metadata)
    cmp = paired(good.outcomes, bare.outcomes)
    assert cmp.pairs == 8
    assert cmp.only_b == 0
    assert cmp.only_a == 8 - bare.successes
    if cmp.only_a >= 6:
        assert cmp.p_value < 0.05


def test_eval_command_writes_a_report(server_url: str, tmp_path: Path) -> None:
    module = tmp_path / "m.json"
    module.write_text(json.dumps(Module(instructions="Be tidy.").to_json()))
    out = tmp_path / "eval.json"
    trajs = tmp_path / "eval.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FGO_")}
    proc = run_fgo(
        "eval",
        "--tasks",
        "twc:test:0-2",
        "--params",
        TWC,
        "--module",
        str(module),
        "--baseline",
        "empty",
        "--out",
        str(out),
        "--trajectories-out",
        str(trajs),
        "--max-steps",
        "3",
        "--base-url",
        server_url,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [r["label"] for r in report["results"]] == ["m", "empty"]
    assert all(r["episodes"] == 3 for r in report["results"])
    assert report["paired"][0]["pairs"] == 3
    assert "McNemar p" in proc.stdout
    ids = [json.loads(line)["id"] for line in trajs.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 6


async def test_recorded_trajectory_is_compact(start_llm: StartLLM) -> None:
    _server, url = await start_llm(policy=lambda body: "1")
    module = Module(rules=(Rule(id="r1", text="Open containers first."),))
    env = await trio.to_thread.run_sync(TextWorldExpress)
    try:
        async with LLMGateway(GatewayConfig(base_url=url, model="m")) as gw:
            traj = await rollout(
                env, Task("twc", "train", 5, TWC), module, gw, AgentConfig(max_steps=3)
            )
    finally:
        await trio.to_thread.run_sync(env.close)
    users = [s.content or "" for s in traj.steps if s.role == "user"]
    replies = [s.content or "" for s in traj.steps if s.role == "assistant"]
    assert len(replies) == 3
    assert all(re.fullmatch(r"1 -> .+", r) for r in replies)
    assert not any("Actions:" in u or "Remember:" in u for u in users)


def test_only_the_most_relevant_rule_is_restated_when_one_is_asked_for() -> None:
    module = Module(
        rules=(
            Rule(id="r1", text="Open the fridge before putting food away."),
            Rule(id="r2", text="Clothes belong in the wardrobe."),
            Rule(id="r3", text="Never juggle."),
        )
    )
    text = turn_message(
        "You see a wardrobe and clothes.", ["take dirty shirt", "open wardrobe"], module, restate=1
    )
    assert "Remember:\n- Clothes belong in the wardrobe.\n\n" in text
    assert "fridge" not in text
    # No rule shares a word with the turn: nothing is restated.
    assert "Remember" not in turn_message("Darkness.", ["wait"], module, restate=1)
    # All of them, in module order, when asked.
    everything = turn_message("Darkness.", ["wait"], module)
    assert everything.index("fridge") < everything.index("wardrobe") < everything.index("juggle")
