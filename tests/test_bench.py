"""``fgo bench``: the pure estimate, the whole bench on the real game against
the loopback server, and the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fgo_actors import GatewayConfig, LLMGateway
from fgo_actors._agent import AgentConfig
from fgo_actors._bench import (
    BenchConfig,
    BenchProgress,
    bench,
    markdown_table,
    remaining_seconds,
    write_outputs,
)
from fgo_actors._schemas import schema_error
from fgo_actors._state import RunConfig
from fgo_actors.envs import TaskSet
from fgo_actors.testing import schema_name_of, scripted_reply

from .conftest import TWC, StartLLM, expert_tidy, run_fgo

pytest.importorskip("textworld_express")

TIDY = expert_tidy()


def test_remaining_time_is_unknown_until_an_episode_ends() -> None:
    kwargs: dict[str, Any] = {
        "training_episodes": 4,
        "episodes_total": 10,
        "episode_seconds": 0.0,
        "optimizations_done": 0,
        "optimizations_total": 3,
        "optimization_seconds": 0.0,
    }
    assert remaining_seconds(episodes_done=0, **kwargs) is None


def test_remaining_time_uses_measured_means() -> None:
    measured: dict[str, Any] = {
        "episodes_done": 4,
        "episodes_total": 10,
        "episode_seconds": 40.0,
        "optimizations_total": 3,
        "training_episodes": 8,
    }
    left = remaining_seconds(optimizations_done=1, optimization_seconds=100.0, **measured)
    assert left == pytest.approx(6 * 10.0 + 2 * 100.0)
    # 30 s into the second optimization: 30 s less to go.
    later = remaining_seconds(
        optimizations_done=1,
        optimization_seconds=100.0,
        current_optimization_seconds=30.0,
        **measured,
    )
    assert later == pytest.approx(6 * 10.0 + 2 * 100.0 - 30.0)
    # Before any optimization: one is guessed at half the training episodes.
    guess = remaining_seconds(optimizations_done=0, optimization_seconds=0.0, **measured)
    assert guess == pytest.approx(6 * 10.0 + 3 * 4 * 10.0)


@given(
    done=st.integers(1, 50),
    extra=st.integers(0, 50),
    per=st.floats(0.01, 100),
    opt_done=st.integers(0, 3),
)
def test_remaining_time_never_negative_and_zero_when_done(
    done: int, extra: int, per: float, opt_done: int
) -> None:
    common: dict[str, Any] = {
        "episode_seconds": per * done,
        "optimizations_total": 3,
        "training_episodes": 8,
    }
    left = remaining_seconds(
        episodes_done=done,
        episodes_total=done + extra,
        optimizations_done=opt_done,
        optimization_seconds=per * opt_done,
        **common,
    )
    assert left is not None
    assert left >= 0
    finished = remaining_seconds(
        episodes_done=done,
        episodes_total=done,
        optimizations_done=3,
        optimization_seconds=3.0,
        **common,
    )
    assert finished == 0


def test_bench_config_rejects_overlapping_splits_and_unknown_strategies() -> None:
    train = TaskSet.parse("twc:train:0-3").tasks()
    with pytest.raises(ValueError, match="overlap"):
        BenchConfig(train=train, test=train[:1])
    test = TaskSet.parse("twc:test:0-1").tasks()
    with pytest.raises(ValueError, match="strategies"):
        BenchConfig(train=train, test=test, strategies=("fgo", "magic"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="strategies"):
        BenchConfig(train=train, test=test, strategies=("fgo", "fgo"))


def learns_the_tidy_function(body: dict[str, Any]) -> str:
    """Optimize: add the expert's tidy function (merges keep functions); agent
    turns: the scripted agent, which prefers module shortcuts."""
    if schema_name_of(body) == "fgo_optimize":
        action = {"op": "add_function", "function": TIDY}
        prompt = "\n".join(str(m.get("content")) for m in body["messages"])
        if '"name": "tidy"' in prompt:
            action = {"op": "add_rule", "text": "Prefer the tidy shortcut.", "evidence": []}
        return json.dumps({"analysis": "learned where things go", "actions": [action]})
    return scripted_reply(body)


async def test_bench_compares_every_strategy_on_the_same_held_out_seeds(
    start_llm: StartLLM, tmp_path: Path
) -> None:
    server, url = await start_llm(policy=learns_the_tidy_function)
    config = BenchConfig(
        train=TaskSet.parse("twc:train:0-3", params=TWC).tasks(),
        test=TaskSet.parse("twc:test:0-3", params=TWC).tasks(),
        # Room for a module that holds the 2.2k-token tidy function.
        run=RunConfig(context_tokens=16384, subset_tokens=4600, module_tokens=3000),
        agent=AgentConfig(max_steps=4),
    )
    seen: list[tuple[str, int, float | None]] = []
    progress = BenchProgress(
        episodes=4 + 4 * 4,
        optimizations=3,
        training_episodes=4,
        on_change=lambda p: seen.append((p.phase, p.episodes_done, p.remaining_seconds())),
    )
    async with LLMGateway(GatewayConfig(base_url=url, model="m", max_concurrency=2)) as gw:
        result = await bench(config, gw, progress, out_dir=tmp_path / "early")
    # Written as they came: the training episodes and each optimized module.
    assert len((tmp_path / "early" / "train.jsonl").read_text().splitlines()) == 4
    assert sorted(p.stem for p in (tmp_path / "early" / "modules").iterdir()) == [
        "all-at-once",
        "batch",
        "fgo",
    ]

    names = [a.name for a in result.arms]
    assert names == ["base", "all-at-once", "batch", "fgo"]
    base = result.arms[0]
    assert base.evaluation is not None
    assert base.optimization is None
    for arm in result.arms[1:]:
        assert arm.error is None
        assert arm.module is not None
        assert [f.name for f in arm.module.functions] == ["tidy"]
        assert arm.optimization is not None
        assert arm.optimization_tokens > 0
        assert arm.evaluation is not None
        # Same seeds as the base: the paired test covers all of them.
        assert arm.versus_base is not None
        assert arm.versus_base.pairs == 4
        assert set(arm.evaluation.outcomes) == set(base.evaluation.outcomes)
        # The learned macro makes the scripted agent solve more held-out games.
        assert arm.evaluation.successes > base.evaluation.successes
        assert arm.evaluation.macro_turns > 0
    assert base.evaluation.macro_turns == 0
    assert base.evaluation.turns > 0
    # FGO splits the data: more calls than all-at-once's single call.
    calls = {a.name: a.to_json()["optimization"]["llm_calls"] for a in result.arms[1:]}
    assert calls["all-at-once"] == 1
    assert calls["fgo"] > 1
    fgo_report = result.arms[3].optimization
    assert fgo_report is not None
    # Calls by role only: the report's retry and re-ask counters are not calls.
    assert calls["fgo"] == fgo_report.llm_calls["optimize"] + fgo_report.llm_calls["merge"]
    # Progress: phases in order, every episode counted, an estimate once one ended.
    phases = [phase for phase, _, _ in seen]
    assert phases.index("collect") < phases.index("optimize fgo") < phases.index("evaluate fgo")
    assert seen[-1][:2] == ("done", 20)
    assert all(eta is not None for _, done, eta in seen if done > 0)

    paths = write_outputs(result, tmp_path / "out")
    report = json.loads(paths["json"].read_text())
    assert [a["name"] for a in report["arms"]] == names
    assert report["config"]["test"] == [t.id for t in config.test]
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = paths["markdown"].read_text()
    assert table == markdown_table(result)
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 5  # header + 4 arms
    for line in paths["episodes"].read_text().splitlines():
        assert schema_error("trajectory", json.loads(line)) is None
    module = json.loads((tmp_path / "out" / "modules" / "fgo.json").read_text())
    assert schema_error("module", module) is None
    run_report = json.loads((tmp_path / "out" / "reports" / "fgo.json").read_text())
    assert schema_error("report", run_report) is None
    assert run_report["strategy"] == "fgo"
    assert not list((tmp_path / "out").glob(".*.tmp"))
    assert server.requests  # everything went over the loopback server


def test_bench_command_writes_the_table_and_plot(server_url: str, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    done = run_fgo(
        "bench",
        "--base-url",
        server_url,
        "--train",
        "twc:train:0-1",
        "--test",
        "twc:test:0-1",
        "--max-steps",
        "3",
        "--context-tokens",
        "4096",
        "--out-dir",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    assert "| fgo |" in done.stdout
    assert (out / "bench.png").is_file()
    events = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    progress = [e for e in events if e.get("event") == "bench_progress"]
    assert progress
    assert progress[-1]["phase"] == "done"
    assert "eta_s" in progress[-1]


def test_bench_command_rejects_overlapping_splits(tmp_path: Path) -> None:
    done = run_fgo(
        "bench",
        "--base-url",
        "http://127.0.0.1:9/v1",
        "--train",
        "twc:test:0-3",
        "--test",
        "twc:test:2-5",
        "--out-dir",
        str(tmp_path / "b"),
    )
    assert done.returncode == 2
    assert "overlap" in done.stderr
    assert not (tmp_path / "b" / "bench.json").exists()


async def test_a_failed_strategy_is_reported_and_the_others_still_run(
    start_llm: StartLLM, tmp_path: Path
) -> None:
    # The server refuses every optimize call of the second strategy (batch):
    # all-at-once makes 1 call, so calls 2.. belong to batch until it gives up.
    calls = {"optimize": 0}

    def policy(body: dict[str, Any]) -> str:
        if schema_name_of(body) == "fgo_optimize":
            calls["optimize"] += 1
            if calls["optimize"] >= 2:
                return "not json"
        return scripted_reply(body)

    server, url = await start_llm(policy=policy)
    config = BenchConfig(
        train=TaskSet.parse("twc:train:0-1", params=TWC).tasks(),
        test=TaskSet.parse("twc:test:0-1", params=TWC).tasks(),
        strategies=("all-at-once", "batch"),
        run=RunConfig(context_tokens=8192),
        agent=AgentConfig(max_steps=2),
    )
    totals: list[int] = []
    progress = BenchProgress(
        episodes=2 + 3 * 2,
        optimizations=2,
        training_episodes=2,
        on_change=lambda p: totals.append(p.episodes_total),
    )
    async with LLMGateway(GatewayConfig(base_url=url, model="m")) as gw:
        result = await bench(config, gw, progress)
    arms = {a.name: a for a in result.arms}
    assert arms["batch"].error is not None
    assert arms["batch"].evaluation is None
    assert arms["all-at-once"].evaluation is not None
    # The failed arm's held-out episodes left the total as soon as it failed.
    assert totals[-1] == 2 + 2 * 2
    assert progress.episodes_done == progress.episodes_total
    assert "failed" in markdown_table(result)
    assert server.requests
