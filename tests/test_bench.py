"""``fgo bench``: the pure estimate, the whole bench on the real game against
the loopback server, and the command line."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from fgo_actors import GatewayConfig, LLMGateway
from fgo_actors._bench import (
    BenchConfig,
    BenchProgress,
    BenchResult,
    BenchStateError,
    _report_from_json,
    bench,
    markdown_table,
    remaining_seconds,
    write_outputs,
)
from fgo_actors._core.model import Module, Rule
from fgo_actors._core.prompts import render_module
from fgo_actors._core.schemas import schema_error
from fgo_actors._core.tokens import default_counter
from fgo_actors._storage.diskcache import Journal
from fgo_actors.actors.state import RunConfig
from fgo_actors.agent.envs import TaskSet
from fgo_actors.agent.rollout import AgentConfig
from fgo_actors.testing import schema_name_of, scripted_reply

from .helpers import TWC, StartLLM, expert_tidy, run_fgo

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
        # Enough training episodes that FGO's subsets (whose prompts show the
        # empty initial module) cannot hold them all.
        train=TaskSet.parse("twc:train:0-11", params=TWC).tasks(),
        test=TaskSet.parse("twc:test:0-3", params=TWC).tasks(),
        # Room for a module that holds the 2.2k-token tidy function.
        run=RunConfig(context_tokens=16384, subset_tokens=4600, module_tokens=3000),
        agent=AgentConfig(max_steps=4),
    )
    seen: list[tuple[str, int, float | None]] = []
    progress = BenchProgress(
        episodes=12 + 4 * 4,
        optimizations=3,
        training_episodes=12,
        on_change=lambda p: seen.append((p.phase, p.episodes_done, p.remaining_seconds())),
    )
    async with LLMGateway(GatewayConfig(base_url=url, model="m", max_concurrency=2)) as gw:
        result = await bench(config, gw, progress, out_dir=tmp_path / "early")
    # Written as they came: the training episodes and each optimized module.
    assert len((tmp_path / "early" / "train.jsonl").read_text().splitlines()) == 12
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
        # tidy from the scripted optimizer, the playbook from the oracle's scores
        assert sorted(f.name for f in arm.module.functions) == ["playbook", "tidy"]
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
    # Module sizes: rules, functions, and tokens as the optimizer sees the module.
    counter = default_counter()
    assert base.module_tokens == counter.count(render_module(Module()))
    for arm in result.arms[1:]:
        assert arm.module is not None
        assert arm.module_tokens == counter.count(render_module(arm.module))
        assert arm.module_tokens > base.module_tokens + 1000  # it holds the tidy function
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
    assert seen[-1][:2] == ("done", 28)
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
    assert "module (rules / functions / tokens)" in rows[0]
    fgo_arm = result.arms[3]
    assert fgo_arm.module is not None
    size = f"| {len(fgo_arm.module.rules)} / 2 / {fgo_arm.module_tokens} |"  # tidy, playbook
    assert rows[4].startswith("| fgo |")
    assert rows[4].endswith(size)
    sizes = {
        a["name"]: (a["module_rules"], a["module_functions"], a["module_tokens"])
        for a in report["arms"]
    }
    assert sizes["base"] == (0, 0, base.module_tokens)
    assert sizes["fgo"] == (len(fgo_arm.module.rules), 2, fgo_arm.module_tokens)
    # A run report read back from its JSON gives the same JSON.
    fgo_json = json.loads((tmp_path / "early" / "reports" / "fgo.json").read_text())
    assert _report_from_json(fgo_json).to_json() == fgo_json
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
    command = [
        "bench",
        "--small",
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
    ]
    done = run_fgo(*command)
    assert done.returncode == 0, done.stderr
    assert "| fgo |" in done.stdout
    assert (out / "bench.png").is_file()
    events = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    progress = [e for e in events if e.get("event") == "bench_progress"]
    assert progress
    assert progress[-1]["phase"] == "done"
    assert "eta_s" in progress[-1]
    report = json.loads((out / "bench.json").read_text())
    assert report["config"]["policy"] == "llm"  # --small's
    assert report["config"]["train"] == ["twc/train/0", "twc/train/1"]  # given, so it wins

    # The same command again: everything comes from the out dir.
    again = run_fgo(*command)
    assert again.returncode == 0, again.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert [line for line in again.stdout.splitlines() if line.startswith("| ")] == rows
    events = [json.loads(line) for line in again.stderr.splitlines() if line.startswith("{")]
    first = next(e for e in events if e.get("event") == "bench_progress")
    assert first["episodes_cached"] == first["episodes_total"] == 2 + 4 * 2
    assert first["optimizations_cached"] == 3
    assert json.loads((out / "bench.json").read_text())["runs"] == 2

    # Other held-out tasks: refused, naming them; --fresh starts over.
    other = [*command[:7], "twc:test:0-2", *command[8:]]
    refused = run_fgo(*other)
    assert refused.returncode == 2
    assert "held-out tasks" in refused.stderr
    assert "--fresh" in refused.stderr
    fresh = run_fgo(*other, "--fresh")
    assert fresh.returncode == 0, fresh.stderr
    report = json.loads((out / "bench.json").read_text())
    assert report["runs"] == 1
    assert report["config"]["test"] == ["twc/test/0", "twc/test/1", "twc/test/2"]


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


# -- resuming ----------------------------------------------------------------


class Interrupter:
    """A server policy that cancels ``scope`` when the request ``when`` picks
    arrives: the bench stops there, that request unanswered, as when the
    process is killed mid-call."""

    def __init__(self, policy: Callable[[dict[str, Any]], str]) -> None:
        self.policy = policy
        self.scope: trio.CancelScope | None = None
        self.when: Callable[[dict[str, Any]], bool] | None = None

    def __call__(self, body: dict[str, Any]) -> str:
        if self.scope is not None and self.when is not None and self.when(body):
            self.when = None
            self.scope.cancel()
        return self.policy(body)

    async def stop_at(
        self, when: Callable[[dict[str, Any]], bool], go: Callable[[], Awaitable[BenchResult]]
    ) -> bool:
        """Run ``go`` until ``when`` picks a request; whether it was stopped."""
        with trio.CancelScope() as scope:
            self.scope, self.when = scope, when
            await go()
        self.scope = self.when = None
        return scope.cancelled_caught


def nth(schema: str | None, n: int) -> Callable[[dict[str, Any]], bool]:
    """The ``n``-th request of this kind (``None``: an agent turn)."""
    seen = [0]

    def pick(body: dict[str, Any]) -> bool:
        if schema_name_of(body) == schema:
            seen[0] += 1
        return seen[0] == n and schema_name_of(body) == schema

    return pick


def canonical(body: dict[str, Any]) -> str:
    return json.dumps(body, sort_keys=True)


def journal_ids(path: Path) -> list[str]:
    """The ids of a journal's records (none before its first line is written)."""
    if not path.exists():
        return []
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


async def test_an_interrupted_bench_carries_on_without_playing_or_asking_anything_twice(
    start_llm: StartLLM, tmp_path: Path
) -> None:
    stop = Interrupter(learns_the_tidy_function)
    server, url = await start_llm(policy=stop)
    config = BenchConfig(
        train=TaskSet.parse("twc:train:0-3", params=TWC).tasks(),
        test=TaskSet.parse("twc:test:0-1", params=TWC).tasks(),
        # One optimizer at a time: a merge prompt lists its children in the
        # order they finished, and replayed replies finish in another order
        # than paid ones; the test compares prompts, so the order must not vary.
        run=RunConfig(context_tokens=16384, subset_tokens=4600, module_tokens=3000, optimizers=1),
        agent=AgentConfig(max_steps=4),
    )
    out = tmp_path / "bench"

    async def once(where: Path, progress: BenchProgress | None = None) -> BenchResult:
        async with LLMGateway(GatewayConfig(base_url=url, model="m")) as gw:
            return await bench(config, gw, progress, out_dir=where)

    # What an uninterrupted bench asks, and what it finds.
    reference = await once(tmp_path / "reference")
    asked = Counter(canonical(r.body) for r in server.requests)
    mark = len(server.requests)

    # Stopped during the training episodes (the fifth agent turn)...
    assert await stop.stop_at(nth(None, 5), lambda: once(out))
    unanswered = [canonical(server.requests[-1].body)]
    assert 1 <= len(journal_ids(out / "train.jsonl")) < 4
    # ... then during batch's first optimize call (all-at-once makes one) ...
    assert await stop.stop_at(nth("fgo_optimize", 2), lambda: once(out))
    unanswered.append(canonical(server.requests[-1].body))
    assert sorted(journal_ids(out / "train.jsonl")) == sorted(t.id for t in config.train)
    state = json.loads((out / "bench-state.json").read_text())
    assert list(state["strategies"]) == ["all-at-once"]
    # ... then during the base module's held-out episodes ...
    assert await stop.stop_at(nth(None, 3), lambda: once(out))
    unanswered.append(canonical(server.requests[-1].body))
    base_done = len(journal_ids(out / "held-out" / "base.jsonl"))
    assert base_done < 2
    # ... and then to the end.
    seen: list[tuple[int, int, int, int]] = []
    progress = BenchProgress(
        episodes=4 + 4 * 2,
        optimizations=3,
        training_episodes=4,
        on_change=lambda p: seen.append(
            (p.episodes_done, p.episodes_cached, p.optimizations_done, p.optimizations_cached)
        ),
    )
    result = await once(out, progress)

    # Every request was sent once, as in the uninterrupted bench, except the
    # ones that were never answered: those were sent again.
    resumed = Counter(canonical(r.body) for r in server.requests[mark:])
    assert resumed - asked == Counter(unanswered)
    assert asked - resumed == Counter()
    # No episode was played twice.
    assert sorted(journal_ids(out / "train.jsonl")) == sorted(t.id for t in config.train)
    for arm in ("base", "all-at-once", "batch", "fgo"):
        ids = journal_ids(out / "held-out" / f"{arm}.jsonl")
        assert sorted(ids) == sorted(t.id for t in config.test), arm
    # The work earlier runs did counted as done from the start.
    cached = 4 + base_done
    assert seen[0] == (cached, cached, 3, 3)
    assert seen[-1] == (12, cached, 3, 3)
    assert result.runs == 4

    # The same results, and the same costs: a reply is paid for once.
    assert [a.name for a in result.arms] == [a.name for a in reference.arms]
    for row, ref in zip(result.arms, reference.arms, strict=True):
        assert row.module == ref.module, row.name
        assert row.evaluation is not None
        assert ref.evaluation is not None
        assert row.evaluation.outcomes == ref.evaluation.outcomes, row.name
        assert row.evaluation.llm_calls == ref.evaluation.llm_calls, row.name
        assert row.evaluation.prompt_tokens == ref.evaluation.prompt_tokens, row.name
        assert row.optimization_tokens == ref.optimization_tokens, row.name
        assert row.optimization_calls == ref.optimization_calls, row.name
    assert result.collect_tokens == reference.collect_tokens > 0
    assert [t.to_json() for t in result.train] == [t.to_json() for t in reference.train]

    # A finished bench, run again, asks nothing and finds the same.
    sent = len(server.requests)
    again = await once(out)
    assert len(server.requests) == sent
    assert [a.to_json()["evaluation"]["outcomes"] for a in again.arms] == [
        a.to_json()["evaluation"]["outcomes"] for a in result.arms
    ]
    table = markdown_table(again)
    assert table.splitlines()[:6] == markdown_table(result).splitlines()[:6]
    assert "over 5 runs" in table


async def test_a_bench_with_other_settings_is_refused_until_fresh(
    start_llm: StartLLM, tmp_path: Path
) -> None:
    server, url = await start_llm()
    config = BenchConfig(
        train=TaskSet.parse("twc:train:0-1", params=TWC).tasks(),
        test=TaskSet.parse("twc:test:0", params=TWC).tasks(),
        strategies=("all-at-once",),
        run=RunConfig(context_tokens=8192),
        agent=AgentConfig(max_steps=2),
    )
    out = tmp_path / "bench"
    gw_config = GatewayConfig(base_url=url, model="m")
    async with LLMGateway(gw_config) as gw:
        await bench(config, gw, out_dir=out)
    sent = len(server.requests)
    state = (out / "bench-state.json").read_text()

    other_base = Module(rules=(Rule(id="r1", text="Look in every container first."),))
    cases: list[tuple[BenchConfig, str, str]] = [
        (
            attrs.evolve(config, train=TaskSet.parse("twc:train:0-2", params=TWC).tasks()),
            "m",
            "training tasks (--train, --params): 2 tasks (twc/train/0 … twc/train/1)",
        ),
        (
            attrs.evolve(config, test=TaskSet.parse("twc:test:0-1", params=TWC).tasks()),
            "m",
            "held-out tasks",
        ),
        (attrs.evolve(config, base=other_base), "m", "base module (--base): 0 rules"),
        (config, "another-model", 'model (--model): "m" there, "another-model" now'),
        (
            attrs.evolve(config, run=RunConfig(context_tokens=16384)),
            "m",
            "all-at-once's context tokens (--context-tokens): 8192 there, 16384 now",
        ),
        (attrs.evolve(config, policy="oracle"), "m", "training policy (--policy)"),
        (
            attrs.evolve(config, agent=AgentConfig(max_steps=3)),
            "m",
            "agent turns per episode (--max-steps): 2 there, 3 now",
        ),
    ]
    for changed, model, named in cases:
        async with LLMGateway(attrs.evolve(gw_config, model=model)) as gw:
            with pytest.raises(BenchStateError) as raised:
                await bench(changed, gw, out_dir=out)
        assert named in str(raised.value)
        assert "--fresh" in str(raised.value)
    # Refused before anything was asked or written.
    assert len(server.requests) == sent
    assert (out / "bench-state.json").read_text() == state

    # A strategy the cached bench did not have is no conflict: it is added.
    async with LLMGateway(gw_config) as gw:
        added = await bench(
            attrs.evolve(config, strategies=("all-at-once", "batch")), gw, out_dir=out
        )
    assert [a.name for a in added.arms] == ["base", "all-at-once", "batch"]
    assert added.runs == 2

    # Starting over: the old work is gone, the new settings stand.
    changed = cases[0][0]
    async with LLMGateway(gw_config) as gw:
        fresh = await bench(changed, gw, out_dir=out, fresh=True)
    assert fresh.runs == 1
    assert len(journal_ids(out / "train.jsonl")) == 3
    assert not (out / "held-out" / "batch.jsonl").exists()


async def test_a_folder_of_unknown_bench_files_is_refused(
    start_llm: StartLLM, tmp_path: Path
) -> None:
    _, url = await start_llm()
    (tmp_path / "train.jsonl").write_text("")
    config = BenchConfig(
        train=TaskSet.parse("twc:train:0", params=TWC).tasks(),
        test=TaskSet.parse("twc:test:0", params=TWC).tasks(),
    )
    async with LLMGateway(GatewayConfig(base_url=url, model="m")) as gw:
        with pytest.raises(BenchStateError, match=r"train\.jsonl.*no bench-state\.json"):
            await bench(config, gw, out_dir=tmp_path)


def test_a_journal_drops_a_line_cut_short_by_a_crash(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.jsonl")
    assert journal.read() == []
    journal.append({"id": "a"})
    journal.append({"id": "b"})
    with journal.path.open("ab") as f:
        f.write(b'{"id": "c", "ste')  # the crash came mid-line
    assert journal.read() == [{"id": "a"}, {"id": "b"}]
    journal.append({"id": "c"})  # on a clean line of its own
    assert journal.read() == [{"id": "a"}, {"id": "b"}, {"id": "c"}]
    # A whole line that is not JSON is damage, not a crash: it is not skipped.
    with journal.path.open("ab") as f:
        f.write(b"not json\n")
    with pytest.raises(ValueError, match="line 4"):
        journal.read()


def test_remaining_time_leaves_out_what_was_not_timed() -> None:
    # 10 oracle episodes (untimed) and 2 LLM ones of 5 s each; 4 LLM episodes to go.
    left = remaining_seconds(
        episodes_done=12,
        episodes_total=16,
        episode_seconds=10.0,
        episodes_timed=2,
        optimizations_done=1,
        optimizations_total=1,
        optimization_seconds=3.0,
        training_episodes=10,
    )
    assert left == pytest.approx(4 * 5.0)
    # Nothing timed yet (only cached or oracle episodes) and work left: unknown.
    unknown = remaining_seconds(
        episodes_done=10,
        episodes_total=16,
        episode_seconds=0.0,
        episodes_timed=0,
        optimizations_done=0,
        optimizations_total=1,
        optimization_seconds=0.0,
        training_episodes=10,
    )
    assert unknown is None


# -- the oracle training policy --------------------------------------------------


async def test_the_oracle_plays_the_training_episodes_without_the_llm(
    start_llm: StartLLM, tmp_path: Path
) -> None:
    server, url = await start_llm()
    config = BenchConfig(
        train=TaskSet.parse("twc:train:0-5", params=TWC).tasks(),
        test=TaskSet.parse("twc:test:0-1", params=TWC).tasks(),
        strategies=("all-at-once",),
        run=RunConfig(context_tokens=8192),
        agent=AgentConfig(max_steps=8),
        policy="oracle",
        epsilon=0.3,
    )
    progress = BenchProgress(episodes=6 + 2 * 2, optimizations=1, training_episodes=6)
    async with LLMGateway(GatewayConfig(base_url=url, model="m")) as gw:
        result = await bench(config, gw, progress, out_dir=tmp_path)
    # The first request is the optimizer's: the training episodes asked nothing.
    assert server.requests[0].schema_name == "fgo_optimize"
    assert result.collect_tokens == 0
    assert len(result.train) == 6
    assert all((t.metadata or {}).get("policy") == "oracle" for t in result.train)
    assert all(0 <= (t.metadata or {})["epsilon"] <= 0.3 for t in result.train)
    assert any(t.outcome.success for t in result.train)  # the gold path solves games
    # Oracle episodes take no LLM time: they are not in the time per episode.
    assert progress.episodes_done == 10
    assert progress.episodes_timed == 4
    report = result.to_json()
    assert report["config"]["policy"] == "oracle"
    assert report["config"]["epsilon"] == 0.3
    assert "played by the oracle policy" in markdown_table(result)
    # The same bench again plays no oracle episode either.
    journal = (tmp_path / "train.jsonl").read_text()
    async with LLMGateway(GatewayConfig(base_url=url, model="m")) as gw:
        again = await bench(config, gw, out_dir=tmp_path)
    assert (tmp_path / "train.jsonl").read_text() == journal
    assert [t.to_json() for t in again.train] == [t.to_json() for t in result.train]


def test_small_p_values_keep_their_digits() -> None:
    from fgo_actors._bench import _p

    assert _p(0.03125) == "0.031"
    assert _p(1.0) == "1.000"
    assert _p(0.000244140625) == "0.00024"  # not "0.000"


# -- on Ray ---------------------------------------------------------------------


def _journal_lines(folder: Path) -> dict[str, list[str]]:
    """Each journal of a bench's out dir, as its sorted lines."""
    paths = [folder / "train.jsonl", *sorted((folder / "held-out").glob("*.jsonl"))]
    return {p.name: sorted(p.read_text().splitlines()) for p in paths}


async def test_a_bench_on_ray_plays_what_threads_play_and_carries_on_the_same(
    local_ray: Any, start_llm: StartLLM, tmp_path: Path
) -> None:
    from fgo_actors.agent.executor import RayExecutor

    server, url = await start_llm(policy=learns_the_tidy_function)
    config = BenchConfig(
        train=TaskSet.parse("twc:train:0-2", params=TWC).tasks(),
        test=TaskSet.parse("twc:test:0-1", params=TWC).tasks(),
        strategies=("all-at-once",),
        run=RunConfig(context_tokens=16384, subset_tokens=4600, module_tokens=3000),
        agent=AgentConfig(max_steps=4),
        policy="oracle",
    )
    gw_config = GatewayConfig(base_url=url, model="m")

    async def once(where: Path, executor: Any = None, progress: Any = None) -> BenchResult:
        async with LLMGateway(gw_config) as gw:
            return await bench(config, gw, progress, out_dir=where, executor=executor)

    local = await once(tmp_path / "local")
    agent_calls = sum(1 for r in server.requests if r.schema_name is None)
    assert agent_calls > 0
    executor = RayExecutor(max_in_flight=2)
    seen: list[tuple[str, int, float | None]] = []
    progress = BenchProgress(
        episodes=3 + 2 * 2,
        optimizations=1,
        training_episodes=3,
        on_change=lambda p: seen.append((p.phase, p.episodes_done, p.remaining_seconds())),
    )
    on_ray = await once(tmp_path / "ray", executor, progress)

    # The same episodes, modules and outcomes, and the same costs: the
    # workers' agent calls are counted, though they bypass the gateway.
    assert [t.to_json() for t in on_ray.train] == [t.to_json() for t in local.train]
    assert {a: [t.to_json() for t in ts] for a, ts in on_ray.episodes.items()} == {
        a: [t.to_json() for t in ts] for a, ts in local.episodes.items()
    }
    assert executor.usage.calls == agent_calls
    for row, ref in zip(on_ray.arms, local.arms, strict=True):
        assert row.module == ref.module, row.name
        assert row.evaluation is not None
        assert ref.evaluation is not None
        assert row.evaluation.outcomes == ref.evaluation.outcomes, row.name
        assert row.evaluation.llm_calls == ref.evaluation.llm_calls > 0, row.name
        assert row.evaluation.prompt_tokens == ref.evaluation.prompt_tokens, row.name
    assert _journal_lines(tmp_path / "ray") == _journal_lines(tmp_path / "local")
    assert on_ray.to_json()["config"]["executor"] == "ray"
    assert "executor" not in local.to_json()["config"]
    # Progress: every episode counted as it finished, with an estimate once
    # an agent episode (timed, unlike the oracle's) has ended.
    assert seen[-1][:2] == ("done", 7)
    assert [done for phase, done, _ in seen if phase == "evaluate base"][-1] == 5
    assert all(eta is not None for _, done, eta in seen if done > 3)
    state = json.loads((tmp_path / "ray" / "bench-state.json").read_text())
    spent = state["worker_spent"]
    assert sum(s["calls"]["agent"] for s in spent.values()) == agent_calls
    assert "worker_spent" not in json.loads((tmp_path / "local" / "bench-state.json").read_text())

    # A bench begun in threads carries on on Ray (the executor is no setting):
    # nothing is played or asked again.
    sent = len(server.requests)
    again = await once(tmp_path / "local", RayExecutor(max_in_flight=2))
    assert len(server.requests) == sent
    assert again.runs == 2
    assert [a.evaluation.outcomes for a in again.arms if a.evaluation] == [
        a.evaluation.outcomes for a in local.arms if a.evaluation
    ]

    # Stopped after one of base's held-out episodes: only the other is played
    # again, on Ray, and its calls add to what the first run paid.
    journal = tmp_path / "ray" / "held-out" / "base.jsonl"
    kept = [line for line in journal.read_text().splitlines() if '"twc/test/0"' in line]
    journal.write_text(kept[0] + "\n")
    resumed = await once(tmp_path / "ray", RayExecutor(max_in_flight=2))
    assert len(server.requests) > sent
    assert all(r.schema_name is None for r in server.requests[sent:])  # agent turns only
    assert _journal_lines(tmp_path / "ray") == _journal_lines(tmp_path / "local")
    assert [t.to_json() for t in resumed.episodes["base"]] == [
        t.to_json() for t in local.episodes["base"]
    ]
    base, base_before = resumed.arms[0].evaluation, on_ray.arms[0].evaluation
    assert base is not None
    assert base_before is not None
    assert base.llm_calls == base_before.llm_calls + len(server.requests) - sent
    assert resumed.runs == 2


async def test_an_episode_ray_could_not_play_counts_as_failed_and_is_played_next_run(
    local_ray: Any, start_llm: StartLLM, tmp_path: Path
) -> None:
    from fgo_actors.agent.envs import Task
    from fgo_actors.agent.executor import RayExecutor

    _server, url = await start_llm()
    bad = Task("no-such-env", "train", 0)
    config = BenchConfig(
        train=[*TaskSet.parse("twc:train:0", params=TWC).tasks(), bad],
        test=TaskSet.parse("twc:test:0", params=TWC).tasks(),
        strategies=("all-at-once",),
        run=RunConfig(context_tokens=8192),
        agent=AgentConfig(max_steps=2),
        policy="oracle",
    )
    for run in (1, 2):
        async with LLMGateway(GatewayConfig(base_url=url, model="m")) as gw:
            result = await bench(config, gw, out_dir=tmp_path, executor=RayExecutor())
        failed = {t.id: t for t in result.train}[bad.id]
        assert failed.outcome.success is False
        assert "unknown environment 'no-such-env'" in str((failed.metadata or {})["error"])
        # Not journaled: each run plays it again; the good episode stays played.
        assert journal_ids(tmp_path / "train.jsonl") == ["twc/train/0"]
        assert result.runs == run
