"""The daemon's validation gate: real TextWorldExpress games, the real sandbox
and the loopback LLM server with a scripted optimizer and agent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fgo_actors import FunctionSpec, GatewayConfig, Module, RunConfig, open_optimizer
from fgo_actors._daemon.optimizer import DaemonConfig, ValidationConfig
from fgo_actors.agent.envs import TaskSet
from fgo_actors.agent.rollout import AgentConfig
from fgo_actors.testing import schema_name_of, scripted_reply

from .helpers import TWC, StartLLM, expert_tidy, make_trajectories

pytest.importorskip("textworld_express")

TIDY = expert_tidy()


def optimizer(action: dict[str, Any]) -> Any:
    """Every optimize call answers ``action``; merges keep functions."""

    def policy(body: dict[str, Any]) -> str:
        if schema_name_of(body) == "fgo_optimize":
            return json.dumps({"analysis": "-", "actions": [action]})
        return scripted_reply(body)

    return policy


def _config(tmp_path: Path, url: str, initial: Module) -> DaemonConfig:
    return DaemonConfig(
        store=tmp_path / "fgo.db",
        gateway=GatewayConfig(base_url=url, model="m", max_concurrency=2),
        run=RunConfig(context_tokens=16384, subset_tokens=6000, module_tokens=3000),
        initial=initial,
        max_wait=0.2,
        publish_interval=0.0,
        validation=ValidationConfig(
            tasks=tuple(TaskSet.parse("twc:test:0-3", params=TWC).tasks()),
            agent=AgentConfig(max_steps=4),
        ),
    )


async def test_a_candidate_that_validates_better_is_published_with_its_scores(
    start_llm: StartLLM, tmp_path: Path
) -> None:
    _server, url = await start_llm(policy=optimizer({"op": "add_function", "function": TIDY}))
    async with open_optimizer(_config(tmp_path, url, Module())) as opt:
        await opt.submit_many(make_trajectories(4))
        await opt.wait_idle()
        version = opt.latest_version()
    assert version is not None
    assert [f.name for f in version.module.functions] == ["tidy"]
    scores = version.lineage["scores"]
    assert scores["current"]["version"] is None  # compared with the initial module
    assert scores["candidate"]["score"] > scores["current"]["score"]
    assert scores["candidate"]["tasks"] == 4


async def test_a_candidate_that_validates_worse_is_kept_as_rejected(
    start_llm: StartLLM, tmp_path: Path
) -> None:
    expert = Module(functions=(FunctionSpec.from_json(TIDY),))
    _server, url = await start_llm(policy=optimizer({"op": "remove_function", "name": "tidy"}))
    async with open_optimizer(_config(tmp_path, url, expert)) as opt:
        await opt.submit_many(make_trajectories(4))
        await opt.wait_idle()
        assert opt.latest_version() is None  # nothing better than the initial module
        (rejected,) = await opt.list_versions()
        assert opt.statistics().versions_rejected == 1
    assert rejected.status == "rejected"
    assert rejected.module.functions == ()
    scores = rejected.lineage["scores"]
    assert scores["candidate"]["score"] < scores["current"]["score"]
