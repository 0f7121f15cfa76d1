"""The oracle behaviour policy and the turn record, on the real TextWorldExpress simulator.

The oracle plays the simulator's gold path with random detours and no LLM;
the reference agent records the same turn fields (``valid_actions``, ``played``,
``score``) against the real loopback LLM server.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

import pytest
import trio

from fgo_actors import (
    FunctionSpec,
    GatewayConfig,
    LLMGateway,
    Module,
    Trajectory,
    default_counter,
    load_trajectories,
)
from fgo_actors._core.model import turns_of
from fgo_actors._core.prompts import render_trajectory
from fgo_actors._core.schemas import schema_error
from fgo_actors.agent.envs import Environment, StepResult, Task, TaskSet, TextWorldExpress
from fgo_actors.agent.oracle import collect_oracle, play_oracle
from fgo_actors.agent.rollout import rollout

from .helpers import TWC, StartLLM, run_fgo
from .test_agent import gold_path, numbered_actions

pytest.importorskip("textworld_express")


async def oracle_episodes(tasks: list[Task], **kwargs: Any) -> dict[str, Trajectory]:
    """Every task played by ``collect_oracle`` (keyword arguments passed on), by task id."""
    got: dict[str, Trajectory] = {}
    send, receive = trio.open_memory_channel[Trajectory](0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: collect_oracle(tasks, send, **kwargs))
        async with receive:
            async for traj in receive:
                assert traj.id not in got
                got[traj.id] = traj
    assert sorted(got) == sorted(t.id for t in tasks)
    return got


def twc(spec: str) -> list[Task]:
    return TaskSet.parse(spec, params=TWC).tasks()


def assert_turn_records(traj: Trajectory) -> None:
    """The trajectory's turns, read back by ``turns_of`` (after a JSON round trip):
    one per step, each playing one valid action, ending at the outcome's score."""
    again = Trajectory.from_json(json.loads(json.dumps(traj.to_json())))
    turns = turns_of(again)
    assert turns == turns_of(traj)
    assert traj.metadata is not None
    assert len(turns) == traj.metadata["steps"]
    replies = [s.content for s in traj.steps if s.role == "assistant"]
    for turn, reply in zip(turns, replies, strict=True):
        assert turn.valid_actions
        assert len(turn.played) == 1
        assert turn.played[0] in turn.valid_actions
        assert reply == turn.played[0]
        assert turn.score is not None
    assert turns[-1].score == pytest.approx(traj.outcome.score)


async def test_oracle_without_detours_solves_every_task_on_the_gold_path() -> None:
    tasks = twc("twc:train:0-4")
    got = await oracle_episodes(tasks, epsilon=0.0)
    for task in tasks:
        traj = got[task.id]
        gold = await trio.to_thread.run_sync(gold_path, task)
        assert schema_error("trajectory", traj.to_json()) is None
        assert traj.outcome.success, traj.outcome.feedback
        assert traj.outcome.score == pytest.approx(1.0)
        assert traj.metadata is not None
        assert traj.metadata["policy"] == "oracle"
        assert traj.metadata["epsilon"] == 0.0
        assert traj.metadata["random_actions"] == 0
        assert traj.metadata["steps"] == len(gold)
        assert traj.metadata["task_type"] == "twc"
        # The agent's format: system, (user, assistant) per step, the last observation.
        assert [s.role for s in traj.steps] == [
            "system",
            *["user", "assistant"] * len(gold),
            "user",
        ]
        assert [turn.played[0] for turn in turns_of(traj)] == gold
        assert_turn_records(traj)
        scores = [turn.score or 0.0 for turn in turns_of(traj)]
        assert scores == sorted(scores)  # the gold path never loses points


async def test_oracle_with_detours_fails_some_tasks_and_records_them() -> None:
    tasks = twc("twc:train:0-9")
    got = await oracle_episodes(tasks, epsilon=1.0, max_steps=8, workers=2)
    failures = [t for t in got.values() if not t.outcome.success]
    assert failures
    for traj in got.values():
        assert traj.metadata is not None
        assert 0.0 <= traj.metadata["epsilon"] <= 1.0
        assert traj.metadata["steps"] <= 8
        assert_turn_records(traj)
    assert sum(t.metadata["random_actions"] for t in got.values() if t.metadata) > 10
    # Each episode draws its own epsilon.
    assert len({t.metadata["epsilon"] for t in got.values() if t.metadata}) == len(tasks)


async def test_oracle_episodes_are_reproducible_per_seed_and_task() -> None:
    tasks = twc("twc:train:0-5")
    a = await oracle_episodes(tasks, epsilon=0.8, seed=3, max_steps=10)
    b = await oracle_episodes(tasks[::-1], epsilon=0.8, seed=3, max_steps=10, workers=2)
    c = await oracle_episodes(tasks, epsilon=0.8, seed=4, max_steps=10)
    assert {k: t.to_json() for k, t in a.items()} == {k: t.to_json() for k, t in b.items()}
    assert {k: t.to_json() for k, t in a.items()} != {k: t.to_json() for k, t in c.items()}

    def epsilon(traj: Trajectory) -> float:
        assert traj.metadata is not None
        return float(traj.metadata["epsilon"])

    assert all(epsilon(a[k]) != epsilon(c[k]) for k in a)  # drawn from the seed and task


def test_oracle_refuses_an_environment_without_a_gold_path() -> None:
    class Walk:
        """A real, tiny environment with valid actions but no ``gold_actions``."""

        name = "walk"
        task_description = "Walk to the end."
        functions = ()

        def reset(self, task: Task) -> StepResult:
            return StepResult(observation="A corridor.", valid_actions=("go north",))

        def step(self, action: str) -> StepResult:
            return StepResult(observation="The end.", done=True, score=1.0, success=True)

        def close(self) -> None:
            pass

    env: Environment = Walk()
    with pytest.raises(ValueError, match=r"'walk' \(tasks 'twc'\) has no gold_actions"):
        play_oracle(env, Task("twc", "train", 0), epsilon=0.0)
    with pytest.raises(ValueError, match="epsilon must be between 0 and 1"):
        play_oracle(env, Task("twc", "train", 0), epsilon=1.5)


async def test_oracle_episodes_render_the_points_each_action_earned() -> None:
    traj = (await oracle_episodes(twc("twc:train:2"), epsilon=0.0))["twc/train/2"]
    text = render_trajectory(traj, default_counter(), 10**6).text
    annotated = [line for line in text.splitlines() if "[score " in line]
    scores = [0.0, *(t.score or 0.0 for t in turns_of(traj))]
    changed = [(a, b) for a, b in itertools.pairwise(scores) if a != b]
    assert len(changed) >= 2  # two items put away, one after the other
    assert len(annotated) == len(changed)
    for line, (before, after) in zip(annotated, changed, strict=True):
        assert line.startswith("[assistant] ")
        assert line.endswith(f"[score {after - before:+g} -> {after:g}]")
    assert annotated[-1].endswith("-> 1]")


async def test_the_agent_records_its_turns(start_llm: StartLLM) -> None:
    """An invalid reply (nothing played), then a macro that plays the rest of
    the gold path: ``turns_of`` reads back what each turn played and scored."""
    task = Task("twc", "train", 3, TWC)
    gold = await trio.to_thread.run_sync(gold_path, task)
    code = f"def finish(task, observation, valid_actions, history):\n    return [{gold!r}]\n"
    module = Module(
        functions=(
            FunctionSpec(name="finish", description="", parameters={"type": "object"}, code=code),
        )
    )
    replies = iter(["banana", "1"])
    seen: list[dict[str, int]] = []

    def policy(body: dict[str, Any]) -> str:
        seen.append(numbered_actions(body))
        return next(replies)

    _server, url = await start_llm(policy=policy)
    env = await trio.to_thread.run_sync(TextWorldExpress)
    try:
        async with LLMGateway(GatewayConfig(base_url=url, model="m")) as gw:
            traj = await rollout(env, task, module, gw)
    finally:
        await trio.to_thread.run_sync(env.close)
    assert traj.outcome.success
    turns = turns_of(Trajectory.from_json(traj.to_json()))
    assert [t.played for t in turns] == [(), tuple(gold)]
    assert [t.score for t in turns] == [0.0, 1.0]
    # The environment's options, without the macro the prompt also offered.
    assert all(gold[0] in t.valid_actions for t in turns)
    assert all(not a.startswith("[finish]") for t in turns for a in t.valid_actions)
    assert set(turns[0].valid_actions) == {a for a in seen[0] if not a.startswith("[")}
    assert traj.metadata is not None
    assert traj.metadata["policy"] == "llm"


def test_collect_command_with_the_oracle_needs_no_llm(tmp_path: Path) -> None:
    out = tmp_path / "oracle.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FGO_")}
    proc = run_fgo(
        "collect",
        "--policy",
        "oracle",
        "--epsilon",
        "0",
        "--tasks",
        "twc:train:0-3",
        "--params",
        TWC,
        "--out",
        str(out),
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "4 episodes, 4 solved" in proc.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == [f"twc/train/{s}" for s in range(4)]
    assert all(r["metadata"]["policy"] == "oracle" for r in rows)
    logs = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    done = [e for e in logs if e["event"] == "rollout_done"]
    assert sorted(e["task"] for e in done) == sorted(r["id"] for r in rows)
    assert {e["actor"] for e in done} == {"oracle-1"}
    loaded = load_trajectories(out)  # what fgo optimize reads
    assert all(turns_of(t) for t in loaded)
    assert not (tmp_path / "oracle.jsonl.partial").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epsilon", "1.5"], "must be between 0 and 1"),
        (["--epsilon", "-0.1"], "must be between 0 and 1"),
        (["--module", "m.json"], "--module is for --policy llm"),
    ],
)
def test_collect_command_rejects_bad_oracle_options(
    tmp_path: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "o.jsonl"
    proc = run_fgo(
        "collect", "--policy", "oracle", "--tasks", "twc:train:0", "--out", str(out), *args
    )
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not out.exists()
