"""Online optimization: explore, optimize, evaluate per subset with rollback and
patience, and merges gated on validation. Real TextWorldExpress games, the real
sandbox, and the loopback LLM server."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel
from hypothesis import given
from hypothesis import strategies as st

from fgo_actors import GatewayConfig, LLMGateway
from fgo_actors._core.playbook import PLAYBOOK, plays_of
from fgo_actors._core.schemas import schema_error
from fgo_actors._daemon.optimizer import same_content
from fgo_actors.actors.online import (
    OnlineConfig,
    gate_verdict,
    optimize_online,
    split_tasks,
    step_verdict,
)
from fgo_actors.actors.state import RunState
from fgo_actors.agent.envs import Task, TaskSet
from fgo_actors.agent.rollout import AgentConfig
from fgo_actors.testing import schema_name_of, scripted_reply

from .helpers import EXAMPLES_DIR, TWC, StartLLM, expert_tidy, run_fgo

pytest.importorskip("textworld_express")

TIDY = expert_tidy()


def test_a_step_is_kept_unless_it_makes_things_worse() -> None:
    assert step_verdict((0.5, 0.0), (0.75, 0.5)) == (True, True)
    assert step_verdict((0.5, 0.5), (0.5, 0.5)) == (True, False)
    assert step_verdict((0.5, 0.5), (0.5, 0.25)) == (False, False)  # success breaks the tie
    assert step_verdict((0.5, 0.0), (0.25, 1.0)) == (False, False)  # score comes first
    assert step_verdict((0.5, 0.0), None) == (False, False)  # the optimize call failed


def test_the_merge_gate_keeps_the_merge_unless_a_child_is_better() -> None:
    assert gate_verdict("m1", (0.5, 0.5), {"s1": (0.5, 0.5), "s2": (0.25, 0.0)}) == "m1"
    assert gate_verdict("m1", (0.4, 0.5), {"s1": (0.5, 0.0), "s2": (0.6, 0.0)}) == "s2"
    assert gate_verdict("m1", (0.4, 0.5), {"s1": (0.6, 0.0), "s2": (0.6, 0.0)}) == "s1"


@given(n=st.integers(1, 60), size=st.integers(1, 10), seed=st.integers(0, 3))
def test_split_covers_every_task_once_in_balanced_subsets(n: int, size: int, seed: int) -> None:
    tasks = [Task("twc", "train", i, "") for i in range(n)]
    chunks = split_tasks(tasks, size, seed)
    assert sorted(t.seed for c in chunks for t in c) == list(range(n))
    assert all(c for c in chunks)
    if len(chunks) > 1:
        assert all(len(c) * 2 >= size for c in chunks)
        assert all(len(c) < 2 * size for c in chunks)
    assert chunks == split_tasks(tasks, size, seed)


def optimizer_that_learns_then_forgets(merge_keeps_functions: bool) -> Any:
    """Round 1: add the tidy function (helps the scripted agent). Round 2: remove
    it (hurts, so it must be rolled back). Merges keep or drop functions."""

    def policy(body: dict[str, Any]) -> str:
        name = schema_name_of(body)
        prompt = "\n".join(str(m.get("content")) for m in body["messages"])
        if name == "fgo_optimize":
            if '"name": "tidy"' in prompt:
                action: dict[str, Any] = {"op": "remove_function", "name": "tidy"}
            else:
                action = {"op": "add_function", "function": TIDY}
            return json.dumps({"analysis": "-", "actions": [action]})
        if name == "fgo_merge" and not merge_keeps_functions:
            merged = json.loads(scripted_reply(body))
            merged["decisions"].append({"op": "drop", "id": "tidy", "reason": "unhelpful"})
            return json.dumps(merged)
        return scripted_reply(body)

    return policy


def online_config(**kwargs: Any) -> OnlineConfig:
    # These tests follow the scripted optimizer's tidy function; the playbook
    # (on by default) learns from tidy's episodes too, so they turn it off.
    kwargs.setdefault("playbook", False)
    return OnlineConfig(
        tasks_per_subset=2,
        rounds=3,
        patience=1,
        module_tokens=3000,
        item_tokens=800,
        agent=AgentConfig(max_steps=4),
        **kwargs,
    )


async def test_a_worse_step_is_rolled_back_and_patience_ends_the_subset(
    start_llm: StartLLM,
) -> None:
    server, url = await start_llm(policy=optimizer_that_learns_then_forgets(True))
    tasks = TaskSet.parse("twc:test:0-3", params=TWC).tasks()
    async with LLMGateway(GatewayConfig(base_url=url, model="m")) as gw:
        result = await optimize_online(tasks, gw, online_config())
    by_subset: dict[str, list[Any]] = {}
    for step in result.steps:
        by_subset.setdefault(step.subset, []).append(step)
    assert sorted(by_subset) == ["s001", "s002"]
    for steps in by_subset.values():
        # Round 1 adds tidy and is kept; round 2 removes it, is worse, and is
        # rolled back; patience 1 then ends the subset before round 3.
        assert [s.round for s in steps] == [1, 2]
        assert steps[0].accepted
        assert steps[0].improved
        assert not steps[1].accepted
        assert steps[1].after is not None
        assert steps[1].after < steps[1].before
    # Both leaves kept tidy; the merge keeps it and passes the gate.
    assert [f.name for f in result.module.functions] == ["tidy"]
    (gate,) = result.gates
    assert gate.kept == gate.node == result.root
    assert gate.tasks == 4
    report = result.report()
    assert schema_error("online_report", report) is None
    assert [s["decision"] for s in report["steps"]].count("rolled back") == 2
    assert report["merge_gates"][0]["decision"] == "merged"
    assert report["llm_calls"]["optimize"] == 4
    assert report["llm_calls"]["merge"] == 1
    # Episodes are cached by (module, task): each subset plays the empty
    # module and +tidy on its 2 tasks; "-tidy" is the empty module again, and
    # the merged module and both children are the same +tidy module, so the
    # gate finds every episode it needs in the cache.
    assert result.episodes == 2 * 2 * 2
    assert server.requests


async def test_a_merge_that_is_worse_than_a_child_is_not_kept(start_llm: StartLLM) -> None:
    _server, url = await start_llm(policy=optimizer_that_learns_then_forgets(False))
    tasks = TaskSet.parse("twc:test:0-3", params=TWC).tasks()
    async with LLMGateway(GatewayConfig(base_url=url, model="m")) as gw:
        result = await optimize_online(tasks, gw, online_config())
    (gate,) = result.gates
    assert gate.kept != gate.node
    assert gate.kept in gate.children
    assert gate.merged < gate.child_values[gate.kept]
    # The root is the merge node, carrying the better child's module.
    assert result.root == gate.node
    assert result.nodes[result.root].method == "gate"
    assert result.module == result.nodes[gate.kept].module
    assert [f.name for f in result.module.functions] == ["tidy"]
    report = result.report()
    assert schema_error("online_report", report) is None
    assert report["merge_gates"][0]["decision"] == f"kept child {gate.kept}"


async def test_rounds_add_their_episodes_plays_to_the_playbook(start_llm: StartLLM) -> None:
    _server, url = await start_llm(policy=optimizer_that_learns_then_forgets(True))
    tasks = TaskSet.parse("twc:test:0-3", params=TWC).tasks()
    async with LLMGateway(GatewayConfig(base_url=url, model="m")) as gw:
        result = await optimize_online(tasks, gw, online_config(playbook=True))
    playbook = result.module.function(PLAYBOOK)
    assert playbook is not None
    plays = plays_of(playbook)
    assert plays  # the tidy episodes' scored puts, as plays with an {x}
    assert all("{x}" in steps[-1] for steps in plays)


async def test_without_the_gate_the_merge_is_always_kept(start_llm: StartLLM) -> None:
    _server, url = await start_llm(policy=optimizer_that_learns_then_forgets(False))
    tasks = TaskSet.parse("twc:test:0-3", params=TWC).tasks()
    async with LLMGateway(GatewayConfig(base_url=url, model="m")) as gw:
        result = await optimize_online(tasks, gw, online_config(gate_merges=False))
    assert result.gates == ()
    assert result.root.startswith("m")
    assert result.module.functions == ()


def optimize_env(server_url: str, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``fgo optimize --env`` on 4 small games in 2 subsets, against ``server_url``."""
    return run_fgo(
        "optimize",
        "--env",
        "twc:train:0-3",
        "--params",
        TWC,
        "--tasks-per-subset",
        "2",
        "--max-steps",
        "3",
        "--context-tokens",
        "8192",
        "--base-url",
        server_url,
        "--out",
        str(out),
        *extra,
    )


def test_optimize_env_writes_the_module_and_the_decisions(server_url: str, tmp_path: Path) -> None:
    out = tmp_path / "online.json"
    done = optimize_env(server_url, out)
    assert done.returncode == 0, done.stderr
    assert schema_error("module", json.loads(out.read_text())) is None
    report = json.loads((tmp_path / "online.report.json").read_text())
    assert schema_error("online_report", report) is None
    assert report["mode"] == "online"
    assert {s["subset"] for s in report["steps"]} == {"s001", "s002"}
    assert len(report["merge_gates"]) == 1
    assert "merges gated: 1" in done.stdout


def test_optimize_needs_exactly_one_source(tmp_path: Path) -> None:
    neither = run_fgo("optimize", "--out", str(tmp_path / "m.json"))
    assert neither.returncode == 2
    assert "exactly one of TRAJECTORIES and --env" in neither.stderr
    both = run_fgo(
        "optimize",
        str(EXAMPLES_DIR / "trajectories.jsonl"),
        "--env",
        "twc:train:0-1",
        "--out",
        str(tmp_path / "m.json"),
    )
    assert both.returncode == 2


async def test_online_optimization_on_ray_makes_the_same_steps_and_gates(
    local_ray: Any, start_llm: StartLLM
) -> None:
    from fgo_actors.agent.executor import RayExecutor

    server, url = await start_llm(policy=optimizer_that_learns_then_forgets(False))
    tasks = TaskSet.parse("twc:test:0-3", params=TWC).tasks()
    async with LLMGateway(GatewayConfig(base_url=url, model="m")) as gw:
        local = await optimize_online(tasks, gw, online_config())
    agent_calls = sum(1 for r in server.requests if r.schema_name is None)
    executor = RayExecutor(max_in_flight=2)
    async with LLMGateway(GatewayConfig(base_url=url, model="m")) as gw:
        remote = await optimize_online(tasks, gw, online_config(), executor=executor)
        assert gw.statistics().calls.get("agent", 0) == 0  # every episode played on Ray

    # Which subset finishes first (and so comes first in the merge, and wins a
    # tie at the gate) is up to trio's scheduler, in threads as on Ray; the
    # rest is compared as it is.
    def steps(result: Any) -> list[dict[str, Any]]:
        return sorted((s.to_json() for s in result.steps), key=lambda s: (s["subset"], s["round"]))

    def gates(result: Any) -> list[dict[str, Any]]:
        return [
            {
                **g.to_json(),
                "children": sorted(g.children),
                "kept": "merged" if g.kept == g.node else g.child_values[g.kept],
                "decision": None,
            }
            for g in result.gates
        ]

    assert steps(remote) == steps(local)
    assert len(steps(local)) == 4
    assert gates(remote) == gates(local)
    assert remote.gates[0].kept != remote.gates[0].node  # the gate's values decided it
    assert same_content(remote.module, local.module)
    assert [f.name for f in remote.module.functions] == ["tidy"]
    # The merge dropped tidy: it is the empty module, whose episodes are cached.
    assert remote.episodes == local.episodes == 2 * 2 * 2
    # The workers' agent calls are counted under the agent role, as in threads.
    assert executor.usage.calls == agent_calls == local.calls["agent"]
    assert remote.calls == local.calls
    assert remote.prompt_tokens["agent"] == local.prompt_tokens["agent"]
    assert remote.completion_tokens["agent"] == local.completion_tokens["agent"]


async def test_a_spent_budget_keeps_the_finished_subsets(start_llm: StartLLM) -> None:
    """The budget runs out as the second subset starts playing: the run ends
    with what was done (the first subset's module), marked budget_exhausted."""
    _server, url = await start_llm(policy=optimizer_that_learns_then_forgets(True))
    tasks = TaskSet.parse("twc:test:0-3", params=TWC).tasks()
    state = RunState()
    first_done: list[int] = []

    async def note_first_subset(gw: LLMGateway) -> None:
        while state.subsets_done < 1:
            await trio.lowlevel.checkpoint()
        first_done.append(gw.used_tokens)

    async with (
        LLMGateway(GatewayConfig(base_url=url, model="m")) as gw,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(note_first_subset, gw)
        full = await optimize_online(tasks, gw, online_config(), state=state)
    assert full.status == "ok"
    # Subsets run one at a time: the next call after the first subset is an
    # episode's, which needs more than 1 token.
    budget = GatewayConfig(base_url=url, model="m", token_budget=first_done[0] + 1)
    async with LLMGateway(budget) as gw:
        result = await optimize_online(tasks, gw, online_config())
        assert gw.statistics().budget_exhausted
    assert result.status == "budget_exhausted"
    assert result.root == "partial"
    (leaf,) = result.nodes.values()  # the one subset that had finished
    assert leaf.kind == "leaf"
    assert result.module == leaf.module
    assert [f.name for f in result.module.functions] == ["tidy"]
    report = result.report()
    assert schema_error("online_report", report) is None
    assert report["status"] == "budget_exhausted"


def test_optimize_env_out_of_budget_writes_the_partial_result_and_exits_4(
    server_url: str, tmp_path: Path
) -> None:
    out = tmp_path / "online.json"
    done = optimize_env(server_url, out, "--token-budget", "3000")
    assert done.returncode == 4, done.stderr
    assert "token budget exhausted" in done.stderr
    assert "Traceback" not in done.stderr
    assert schema_error("module", json.loads(out.read_text())) is None
    report = json.loads((tmp_path / "online.report.json").read_text())
    assert schema_error("online_report", report) is None
    assert report["status"] == "budget_exhausted"
