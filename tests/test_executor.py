"""Rollout executors: threads of this process, and tasks on a real local Ray.

Ray is started once for the session (``ray.init(num_cpus=2)``, conftest.py's
``local_ray``); the episodes play the real TextWorldExpress simulator, and
the agent's LLM is the scripted loopback server, reached from the Ray
workers over HTTP.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import trio

from fgo_actors import BudgetExhaustedError, GatewayConfig, LLMGateway, Trajectory
from fgo_actors.agent.envs import Task
from fgo_actors.agent.executor import LocalExecutor, Policy, RayExecutor
from fgo_actors.agent.rollout import AgentConfig

from .helpers import TWC, StartLLM, run_fgo

pytest.importorskip("textworld_express")
pytest.importorskip("ray")

TASKS = [Task("twc", "train", s, TWC) for s in range(4)]
AGENT = AgentConfig(max_steps=6)


def _gateway_config(url: str) -> GatewayConfig:
    return GatewayConfig(base_url=url, model="scripted", max_completion_tokens=64)


async def _play(
    executor: Any, tasks: list[Task], policy: Policy, gateway: LLMGateway | None = None
) -> list[Trajectory]:
    got: list[Trajectory] = []
    send, receive = trio.open_memory_channel[Trajectory](0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: executor.play(tasks, policy, send, gateway=gateway))
        async with receive:
            async for traj in receive:
                got.append(traj)
    return sorted(got, key=lambda t: t.id)


def _json(trajs: list[Trajectory]) -> list[dict[str, Any]]:
    return [t.to_json() for t in trajs]


def _workers_playing() -> list[int]:
    """The pids of Ray workers running an episode now (Ray names them by task)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.startswith(b"ray::play_episode"):
            pids.append(int(entry.name))
    return pids


async def test_oracle_episodes_are_the_same_on_ray_as_in_threads(local_ray: Any) -> None:
    policy = Policy(kind="oracle", epsilon=0.3, seed=7, agent=AGENT)
    local = await _play(LocalExecutor(workers=2), TASKS, policy)
    remote = await _play(RayExecutor(max_in_flight=2), TASKS, policy)
    assert [t.id for t in remote] == [t.id for t in TASKS]
    assert _json(remote) == _json(local)


async def test_agent_episodes_are_the_same_on_ray_as_in_threads(
    local_ray: Any, start_llm: StartLLM
) -> None:
    server, url = await start_llm()
    policy = Policy(kind="llm", agent=AGENT, gateway=_gateway_config(url))
    async with LLMGateway(policy.gateway) as gateway:  # type: ignore[arg-type]
        local = await _play(LocalExecutor(workers=2), TASKS[:2], policy, gateway)
    asked = len(server.requests)
    executor = RayExecutor(max_in_flight=2)
    remote = await _play(executor, TASKS[:2], policy)
    # The workers called the loopback LLM themselves, as many times again.
    assert len(server.requests) == 2 * asked
    assert executor.usage.calls == asked
    assert executor.usage.prompt_tokens > 0
    assert _json(remote) == _json(local)


async def test_the_workers_tokens_count_against_the_callers_budget(
    local_ray: Any, start_llm: StartLLM
) -> None:
    """Episodes on workers spend the caller's ``token_budget``: once it is
    spent no episode starts, the one in flight is kept, and the run stops
    with BudgetExhaustedError, as a call in threads would."""
    server, url = await start_llm()
    policy = Policy(kind="llm", agent=AGENT, gateway=_gateway_config(url))
    async with LLMGateway(policy.gateway) as gateway:  # type: ignore[arg-type]
        await _play(LocalExecutor(workers=1), TASKS[:1], policy, gateway)
        one_episode = gateway.used_tokens
    asked = len(server.requests)
    # Room for the first episode and a little more: the second starts, the third does not.
    budgeted = GatewayConfig(
        base_url=url, model="scripted", max_completion_tokens=64, token_budget=one_episode + 1
    )
    executor = RayExecutor(max_in_flight=1)
    got: list[Trajectory] = []
    send, receive = trio.open_memory_channel[Trajectory](0)
    async with LLMGateway(budgeted) as gateway:
        with pytest.RaisesGroup(BudgetExhaustedError):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: executor.play(TASKS, policy, send, gateway=gateway))
                async with receive:
                    async for traj in receive:
                        got.append(traj)
        assert [t.id for t in got] == [t.id for t in TASKS[:2]]
        assert all("error" not in (t.metadata or {}) for t in got)
        spent = executor.usage.prompt_tokens + executor.usage.completion_tokens
        assert gateway.used_tokens == spent > one_episode
        assert sum(gateway.statistics().calls.values()) == 0  # the workers made every call
    assert len(server.requests) == asked + executor.usage.calls


async def test_a_task_that_raises_is_a_recorded_failed_episode(local_ray: Any) -> None:
    bad = Task("no-such-env", "train", 0)
    policy = Policy(kind="oracle", agent=AGENT)
    got = await _play(RayExecutor(), [TASKS[0], bad], policy)
    by_id = {t.id: t for t in got}
    assert set(by_id) == {TASKS[0].id, bad.id}
    failed = by_id[bad.id]
    assert failed.outcome.success is False
    assert "unknown environment 'no-such-env'" in str((failed.metadata or {})["error"])
    assert failed.outcome.feedback is not None
    assert failed.outcome.feedback.startswith("episode failed: ValueError")
    assert "error" not in (by_id[TASKS[0].id].metadata or {})


async def test_a_worker_killed_mid_episode_is_retried_and_counted_once(
    local_ray: Any, start_llm: StartLLM
) -> None:
    server, url = await start_llm(latency=0.3)
    policy = Policy(kind="llm", agent=AGENT, gateway=_gateway_config(url))
    async with LLMGateway(policy.gateway) as gateway:  # type: ignore[arg-type]
        expected = await _play(LocalExecutor(workers=1), TASKS[:2], policy, gateway)
    killed: list[int] = []

    async def kill_one_worker() -> None:
        while not killed:
            await trio.sleep(0.2)
            pids = _workers_playing()
            if pids and len(server.requests) > len(expected) + 1:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(kill_one_worker)
        got = await _play(RayExecutor(max_in_flight=2, max_retries=2), TASKS[:2], policy)
        nursery.cancel_scope.cancel()
    assert killed, "no worker was seen playing"
    assert [t.id for t in got] == [t.id for t in TASKS[:2]]  # each episode once
    assert _json(got) == _json(expected)


async def test_cancelling_the_caller_cancels_the_tasks_in_flight(
    local_ray: Any, start_llm: StartLLM
) -> None:
    server, url = await start_llm(latency=0.5)
    policy = Policy(kind="llm", agent=AgentConfig(max_steps=25), gateway=_gateway_config(url))
    with trio.move_on_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: _play(RayExecutor(max_in_flight=2), TASKS, policy))
            while len(server.requests) < 2:  # noqa: ASYNC110 - the server has no event to wait on
                await trio.sleep(0.1)
            nursery.cancel_scope.cancel()
    seen = len(server.requests)
    # The forced cancel kills the workers: no episode goes on calling the LLM.
    with trio.fail_after(20):
        while _workers_playing():  # noqa: ASYNC110 - processes, not trio tasks
            await trio.sleep(0.2)
    await trio.sleep(1.5)
    assert len(server.requests) <= seen + 2  # at most the calls already on their way


def test_an_unreachable_cluster_is_exit_3_naming_it(tmp_path: Path) -> None:
    out = tmp_path / "t.jsonl"
    args = ["collect", "--tasks", "twc:train:0-1", "--policy", "oracle", "--out", str(out)]
    result = run_fgo(*args, "--executor", "ray", "--ray-address", "127.0.0.1:1", timeout=120)
    assert result.returncode == 3, result.stderr
    assert "cannot reach the Ray cluster at 127.0.0.1:1" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    ("command", "output"),
    [
        (["bench", "--train", "twc:train:0", "--test", "twc:test:0", "--policy", "oracle"], "b"),
        (["optimize", "--env", "twc:train:0-1", "--out", "{out}/m.json"], "m.json"),
        (["serve", "--validate", "twc:test:0", "--store", "{out}/fgo.db", "--port", "0"], "fgo.db"),
    ],
    ids=["bench", "optimize-env", "serve-validate"],
)
def test_every_command_that_plays_takes_the_ray_executor(
    command: list[str], output: str, tmp_path: Path
) -> None:
    """--executor ray reaches the executor (an unreachable cluster, named, exit
    3, before anything is written; no Ray is started for this)."""
    args = [a.replace("{out}", str(tmp_path)) for a in command]
    if command[0] == "bench":
        args += ["--out-dir", str(tmp_path / "b")]
    result = run_fgo(
        *args,
        *("--base-url", "http://127.0.0.1:9/v1", "--executor", "ray"),
        *("--ray-address", "127.0.0.1:1"),
        timeout=120,
    )
    assert result.returncode == 3, result.stderr
    assert "cannot reach the Ray cluster at 127.0.0.1:1" in result.stderr
    assert not (tmp_path / output / "bench.json").exists()
    assert not (tmp_path / output).is_file()


def test_optimizing_from_a_file_plays_nothing_to_put_on_ray(tmp_path: Path) -> None:
    trajectories = tmp_path / "t.jsonl"
    trajectories.write_text("")
    result = run_fgo(
        *("optimize", str(trajectories), "--out", str(tmp_path / "m.json")),
        *("--executor", "ray"),
        timeout=60,
    )
    assert result.returncode == 2
    assert "--executor applies to --env" in result.stderr


def test_fgo_collect_on_a_local_ray_writes_what_threads_write(tmp_path: Path) -> None:
    """The command line starts its own local Ray (no address, no RAY_ADDRESS)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    args = ["collect", "--tasks", "twc:train:0-2", "--policy", "oracle", "--max-steps", "6"]
    local = run_fgo(*args, "--out", str(tmp_path / "local.jsonl"), env=env)
    assert local.returncode == 0, local.stderr
    remote = run_fgo(
        *args, "--out", str(tmp_path / "ray.jsonl"), "--executor", "ray", env=env, timeout=300
    )
    assert remote.returncode == 0, remote.stderr
    lines = sorted((tmp_path / "ray.jsonl").read_text().splitlines())
    assert lines == sorted((tmp_path / "local.jsonl").read_text().splitlines())
    assert len(lines) == 3
