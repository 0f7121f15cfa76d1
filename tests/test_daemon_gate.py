"""The daemon's validation gate: real TextWorldExpress games, the real sandbox
and the loopback LLM server with a scripted optimizer and agent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import pytest

from fgo_actors import FunctionSpec, GatewayConfig, Module, RunConfig, open_optimizer
from fgo_actors._daemon.optimizer import DaemonConfig, ValidationConfig
from fgo_actors.agent.envs import TaskSet
from fgo_actors.agent.executor import Executor, LocalExecutor, RayExecutor
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


def _config(
    tmp_path: Path, url: str, initial: Module, executor: Executor | None = None
) -> DaemonConfig:
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
            executor=executor,
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


async def test_a_budget_spent_validating_rejects_the_candidate_and_the_daemon_goes_on(
    start_llm: StartLLM, tmp_path: Path
) -> None:
    """Validation runs out of tokens part way: the candidate is kept as rejected,
    with the reason, nothing is published, and the daemon keeps serving."""
    _server, url = await start_llm(policy=optimizer({"op": "add_function", "function": TIDY}))
    cfg = _config(tmp_path, url, Module())
    # Room for the optimize call, not for 2 modules x 4 validation episodes.
    cfg = attrs.evolve(cfg, gateway=attrs.evolve(cfg.gateway, token_budget=8000))
    async with open_optimizer(cfg) as opt:
        await opt.submit_many(make_trajectories(4))
        await opt.wait_idle()
        assert opt.latest_version() is None
        (rejected,) = await opt.list_versions()
        assert opt.statistics().versions_rejected == 1
        assert opt.latest_module() is None  # nothing published: agents keep their own
    assert rejected.status == "rejected"
    assert [f.name for f in rejected.module.functions] == ["tidy"]  # the paid work is kept
    assert rejected.lineage["scores"] is None
    assert rejected.lineage["validation_error"].startswith("validation stopped: token budget")


async def test_validation_on_ray_scores_the_candidate_as_threads_do(
    local_ray: Any, start_llm: StartLLM, tmp_path: Path
) -> None:
    server, url = await start_llm(policy=optimizer({"op": "add_function", "function": TIDY}))
    published = {}
    for name, executor in (("local", None), ("ray", RayExecutor(max_in_flight=2))):
        before = len(server.requests)
        (tmp_path / name).mkdir()
        async with open_optimizer(_config(tmp_path / name, url, Module(), executor)) as opt:
            await opt.submit_many(make_trajectories(4))
            await opt.wait_idle()
            published[name] = opt.latest_version()
        agent_calls = sum(1 for r in server.requests[before:] if r.schema_name is None)
        if executor is not None:
            # Both modules' validation episodes were played by the Ray workers.
            assert executor.usage.calls == agent_calls > 0
    local, remote = published["local"], published["ray"]
    assert local is not None
    assert remote is not None
    assert remote.status == local.status == "published"
    assert remote.module == local.module
    assert remote.lineage["scores"] == local.lineage["scores"]
    assert remote.lineage["scores"]["candidate"]["tasks"] == 4


def test_the_validation_executor_comes_from_the_settings_file(tmp_path: Path) -> None:
    from fgo_actors import GatewayConfig
    from fgo_actors._daemon.serve import ServeSettings, daemon_config

    gateway = GatewayConfig(base_url="http://127.0.0.1:9/v1", model="m")
    settings_file = tmp_path / "fgo.toml"
    settings_file.write_text(
        'validate = "twc:test:0-1"\nexecutor = "ray"\nray_address = "head:6379"\n'
        "validate_workers = 3\n"
    )
    settings = ServeSettings.load(settings_file, {"store": tmp_path / "fgo.db"})
    validation = daemon_config(settings, gateway, 4096).validation
    assert validation is not None
    assert validation.executor == RayExecutor(address="head:6379", max_in_flight=3)
    # A flag wins over the file; without either, threads (one by default).
    flags = {"store": tmp_path / "fgo.db", "executor": "local"}
    validation = daemon_config(ServeSettings.load(settings_file, flags), gateway, 4096).validation
    assert validation is not None
    assert validation.executor == LocalExecutor(workers=3)
    plain = ServeSettings.load(None, {"store": tmp_path / "fgo.db", "validate": "twc:test:0"})
    validation = daemon_config(plain, gateway, 4096).validation
    assert validation is not None
    assert validation.executor == LocalExecutor(workers=1)
    assert validation.workers == 1
    settings_file.write_text('executor = "slurm"\n')
    with pytest.raises(ValueError, match="'executor' must be in"):
        ServeSettings.load(settings_file, {})
