"""Whole runs of the actor pipeline against a real loopback server."""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

import pytest
import trio
import trio.testing

from fgo_actors import (
    GatewayConfig,
    LLMGateway,
    MergeNode,
    Module,
    Rule,
    RunConfig,
    RunFailedError,
    RunReport,
    RunResult,
    RunState,
    Trajectory,
    default_counter,
    load_trajectories,
    run,
)
from fgo_actors._core.forest import expected_merges
from fgo_actors._core.prompts import render_module
from fgo_actors._core.schemas import schema_error
from fgo_actors.actors.run import prompt_budgets
from fgo_actors.testing import (
    FakeLLMServer,
    Fault,
    RecordedRequest,
    consolidating_merge_policy,
    merge_prompt_rules,
    schema_name_of,
    scripted_reply,
)

from .helpers import EXAMPLES, MODULE_V, REPORT_V, StartLLM, errors_of, make_trajectories

TRAJ_ID = re.compile(r"^### Trajectory (\S+)$", re.MULTILINE)


def _gw(url: str, **kw: Any) -> LLMGateway:
    cfg: dict[str, Any] = {"base_url": url, "model": "m", "max_concurrency": 4}
    cfg.update(kw)
    return LLMGateway(GatewayConfig(**cfg))


def _optimize_requests(server_requests: list[RecordedRequest]) -> list[RecordedRequest]:
    return [r for r in server_requests if r.schema_name == "fgo_optimize"]


def _ids_in(request: RecordedRequest) -> list[str]:
    return TRAJ_ID.findall(request.body["messages"][1]["content"])


def _nodes(result: RunResult, kind: str) -> list[MergeNode]:
    return [n for n in result.report.merge_tree if n.kind == kind]


def _leaves_under(result: RunResult, node_id: str) -> set[str]:
    by_id = {n.id: n for n in result.report.merge_tree}
    node = by_id[node_id]
    if node.kind == "leaf":
        return {node.id}
    return set().union(*(_leaves_under(result, c) for c in node.children))


async def _run(url: str, trajectories: list[Trajectory], config: RunConfig, **gw: Any) -> RunResult:
    async with _gw(url, **gw) as gateway:
        return await run(trajectories, gateway, config)


async def test_fgo_end_to_end_partition_merges_and_provenance(start_llm: StartLLM) -> None:
    server, url = await start_llm()
    trajectories = make_trajectories(60)
    config = RunConfig(context_tokens=4096, subset_tokens=1600, module_tokens=700)
    result = await _run(url, trajectories, config)
    report = result.report
    assert report.status == "ok"
    assert schema_error("report", report.to_json()) is None
    assert result.module is not None
    assert schema_error("module", result.module.to_json()) is None

    # Divide: every trajectory lands in exactly one optimize prompt.
    optimize = _optimize_requests(server.requests)
    seen = Counter(i for r in optimize for i in _ids_in(r))
    assert set(seen) == {t.id for t in trajectories}
    assert set(seen.values()) == {1}
    assert report.subsets == len(optimize) > 4

    # Merge: exactly subsets - 1 merges at fan-in 2, one root covering every subset.
    leaves, merges = _nodes(result, "leaf"), _nodes(result, "merge")
    assert len(leaves) == report.subsets
    assert len(merges) == report.subsets - 1
    assert report.llm_calls["merge"] == len(merges)
    assert report.root is not None
    assert _leaves_under(result, report.root) == {n.id for n in leaves}

    # Every subset's rule reaches the root (the scripted merge consolidates but
    # drops nothing), with provenance naming its subset and lineage through merges.
    assert 0 < len(result.module.rules) <= 6
    assert {s for r in result.module.rules for s in r.subsets} == {n.id for n in leaves}
    assert all(not n.stats["dropped_rules"] for n in merges)
    assert report.failures == ()
    # A rule is a leaf's own (kept by id) or a merged one with its lineage.
    leaf_ids = {n.id for n in leaves}
    assert all(r.merged_from or r.id.split(".")[0] in leaf_ids for r in result.module.rules)
    traj_ids = {t.id for t in trajectories}
    assert all(set(r.trajectories) <= traj_ids and r.trajectories for r in result.module.rules)


@pytest.mark.parametrize(
    ("n", "steps", "words", "epochs", "subset_tokens"),
    [(40, 4, 12, 1, 1200), (12, 60, 40, 3, 1200), (30, 6, 30, 2, 1100), (5, 400, 30, 1, 2000)],
)
async def test_no_optimize_prompt_exceeds_subset_budget(
    start_llm: StartLLM, n: int, steps: int, words: int, epochs: int, subset_tokens: int
) -> None:
    server, url = await start_llm()
    trajectories = make_trajectories(n, steps=steps, words=words)
    config = RunConfig(
        context_tokens=8192, subset_tokens=subset_tokens, module_tokens=300, epochs=epochs
    )
    result = await _run(url, trajectories, config)
    counter = default_counter()
    optimize = _optimize_requests(server.requests)
    assert result.report.failures == ()
    assert len(optimize) == result.report.subsets * epochs
    sizes = [counter.count_messages(r.body["messages"]) for r in optimize]
    assert max(sizes) <= subset_tokens
    # Long trajectories are truncated, not dropped: each still appears once per epoch.
    seen = Counter(i for r in optimize for i in _ids_in(r))
    assert set(seen) == {t.id for t in trajectories}
    if steps >= 60:
        assert result.report.truncated_trajectories > 0
        assert "middle omitted" in optimize[0].body["messages"][1]["content"]


async def test_leaf_prompts_spend_the_module_cap_on_trajectories(start_llm: StartLLM) -> None:
    """An FGO leaf's prompt shows the initial module, so the room a grown module
    would need goes to trajectories; batch shows a growing module and keeps it."""
    server, url = await start_llm()
    trajectories = make_trajectories(40)
    subset_tokens, cap = 1600, 700
    config = RunConfig(context_tokens=4096, subset_tokens=subset_tokens, module_tokens=cap)
    counter = default_counter()

    fgo = await _run(url, trajectories, config)
    fgo_sizes = [
        counter.count_messages(r.body["messages"]) for r in _optimize_requests(server.requests)
    ]
    assert max(fgo_sizes) <= subset_tokens
    assert max(fgo_sizes) > subset_tokens - cap  # impossible with the cap set aside

    server.requests.clear()
    batch = await _run(
        url,
        trajectories,
        RunConfig(
            strategy="batch", context_tokens=4096, subset_tokens=subset_tokens, module_tokens=cap
        ),
    )
    batch_sizes = [
        counter.count_messages(r.body["messages"]) for r in _optimize_requests(server.requests)
    ]
    assert max(batch_sizes) <= subset_tokens
    assert batch.report.subsets > fgo.report.subsets


def _grows_the_module(body: dict[str, Any]) -> str:
    """Optimize: the first reply adds one long rule (most of a 300-token cap),
    later ones change nothing; merges as scripted."""
    if schema_name_of(body) != "fgo_optimize":
        return scripted_reply(body)
    prompt = str(body["messages"][1]["content"])
    actions = []
    if "Always check the" not in prompt:
        text = "Always check the " + " ".join(f"item{i} shelf" for i in range(80)) + "."
        actions = [{"op": "add_rule", "text": text}]
    return json.dumps({"analysis": "grow", "actions": actions})


@pytest.mark.parametrize("strategy", ["fgo", "all-at-once"])
async def test_a_later_epoch_shows_a_grown_module_and_still_fits(
    start_llm: StartLLM, strategy: str
) -> None:
    """With two epochs the second prompt shows the module the first one grew,
    near its cap, so the cap must have been set aside."""
    server, url = await start_llm(policy=_grows_the_module)
    subset_tokens = 1600
    config = RunConfig(
        strategy=strategy,  # type: ignore[arg-type]
        context_tokens=4096,
        subset_tokens=subset_tokens,
        module_tokens=300,
        epochs=2,
    )
    result = await _run(url, make_trajectories(60), config, max_completion_tokens=1024)
    assert result.report.failures == ()
    counter = default_counter()
    sizes = [
        counter.count_messages(r.body["messages"]) for r in _optimize_requests(server.requests)
    ]
    grown = [
        s
        for s, r in zip(sizes, _optimize_requests(server.requests), strict=True)
        if "Always check the" in r.body["messages"][1]["content"]
    ]
    assert grown, "no prompt showed the grown module"
    # FGO's prompts fit the subset budget; all-at-once's one prompt, the context.
    limit = subset_tokens if strategy == "fgo" else config.context_tokens - 1024
    assert max(sizes) <= limit


async def test_the_daemon_budget_does_not_shrink_with_a_larger_initial_module(
    start_llm: StartLLM,
) -> None:
    """The daemon measures and seals against its room once, and keeps both in
    its store: a restart with a larger initial module must find the same room."""
    _server, url = await start_llm()
    config = RunConfig(context_tokens=8192, module_tokens=1000)
    bigger = Module(rules=tuple(Rule(id=f"i.r{i}", text=f"Rule number {i}.") for i in range(30)))
    async with _gw(url) as gateway:
        small_room = prompt_budgets(gateway, config, Module(), streaming=True)
        big_room = prompt_budgets(gateway, config, bigger, streaming=True)
        run_small = prompt_budgets(gateway, config, Module())
        run_big = prompt_budgets(gateway, config, bigger)
    assert small_room == big_room
    # A batch FGO run (one epoch) sets aside only the initial module it shows.
    assert run_small[1] > run_big[1] > small_room[1]


async def test_merge_starts_before_slowest_subset_finishes(
    start_llm: StartLLM, autojump_clock: trio.testing.MockClock
) -> None:
    trajectories = make_trajectories(40)
    slow_id = trajectories[-1].id

    def latency(body: dict[str, Any]) -> float:
        prompt = body["messages"][1]["content"]
        if "fgo_optimize" in json.dumps(body["response_format"]) and slow_id in prompt:
            return 500.0
        return 1.0

    _server, url = await start_llm(latency=latency)
    config = RunConfig(context_tokens=4096, subset_tokens=1600, module_tokens=700)
    result = await _run(url, trajectories, config)
    leaves = _nodes(result, "leaf")
    slow = max(leaves, key=lambda n: n.finished_at)
    assert slow.finished_at >= 500
    merges = _nodes(result, "merge")
    early = [m for m in merges if m.finished_at < slow.finished_at]
    # Merges of the fast subsets ran (and finished) while the slow one was still going.
    assert len(early) >= len(leaves) // 2
    assert min(m.started_at for m in merges) < 10
    # Only merges on the slow leaf's path to the root wait for it.
    assert len(merges) - len(early) <= len(leaves).bit_length() + 1


async def test_barrier_mode_waits_for_all_subsets(
    start_llm: StartLLM, autojump_clock: trio.testing.MockClock
) -> None:
    _server, url = await start_llm(latency=1.0)
    config = RunConfig(
        context_tokens=4096, subset_tokens=1600, module_tokens=700, eager_merge=False
    )
    result = await _run(url, make_trajectories(40), config)
    last_leaf = max(n.finished_at for n in _nodes(result, "leaf"))
    assert min(n.started_at for n in _nodes(result, "merge")) >= last_leaf


@pytest.mark.parametrize("limit", [1, 3, 8])
async def test_in_flight_never_exceeds_max_concurrency(
    start_llm: StartLLM, autojump_clock: trio.testing.MockClock, limit: int
) -> None:
    server, url = await start_llm(latency=2.0)
    config = RunConfig(context_tokens=4096, subset_tokens=1500, module_tokens=700)
    result = await _run(url, make_trajectories(50), config, max_concurrency=limit)
    assert result.report.subsets > 8
    assert server.max_in_flight == limit
    assert result.report.max_in_flight == limit


@pytest.mark.parametrize("fan_in", [3, 4])
async def test_fan_in(start_llm: StartLLM, fan_in: int) -> None:
    _server, url = await start_llm()
    config = RunConfig(context_tokens=8192, subset_tokens=1500, module_tokens=700, fan_in=fan_in)
    result = await _run(url, make_trajectories(50), config)
    merges = _nodes(result, "merge")
    assert all(2 <= len(m.children) <= fan_in for m in merges)
    assert len(merges) <= expected_merges(result.report.subsets, 2)
    assert result.report.root is not None
    assert len(_leaves_under(result, result.report.root)) == result.report.subsets


async def test_a_merge_reply_cannot_erase_its_children(start_llm: StartLLM) -> None:
    def policy(body: dict[str, Any]) -> str:
        if schema_name_of(body) != "fgo_merge":
            return scripted_reply(body)
        prompt = str(body["messages"][-1]["content"])
        drops = [{"op": "drop", "id": rid} for rid, _text in merge_prompt_rules(prompt)]
        return json.dumps({"decisions": drops})  # drop everything, no reasons

    _server, url = await start_llm(policy=policy)
    config = RunConfig(context_tokens=4096, subset_tokens=1600, module_tokens=700)
    result = await _run(url, make_trajectories(30), config)
    assert result.module is not None
    merges = _nodes(result, "merge")
    # At most half of a merge's rules can go; each drop is recorded with a reason.
    assert len(result.module.rules) >= 1
    for node in merges:
        children = [n for n in result.report.merge_tree if n.id in node.children]
        before = sum(len(c.module.rules) for c in children)
        assert len(node.module.rules) >= before - before // 2
        assert all(d["reason"] for d in node.stats["dropped_rules"])
    assert any(node.stats["dropped_rules"] for node in merges)
    assert result.report.llm_calls["reasks"] == 0


@pytest.mark.parametrize("merge_policy", ["consolidate", "keep"])
async def test_merges_cost_one_call_each_fit_the_cap_and_account_for_every_rule(
    start_llm: StartLLM, merge_policy: str
) -> None:
    policy = consolidating_merge_policy if merge_policy == "consolidate" else scripted_reply
    _server, url = await start_llm(policy=policy)
    config = RunConfig(context_tokens=8192, subset_tokens=2048, module_tokens=150)
    result = await _run(url, make_trajectories(120), config)
    report = result.report
    assert result.module is not None
    assert report.subsets > 8
    assert report.llm_calls["merge"] <= 1.1 * (report.subsets - 1)
    assert report.llm_calls["reasks"] == 0
    counter = default_counter()
    nodes = {n.id: n for n in report.merge_tree}
    for node in nodes.values():
        if node.kind != "merge":
            continue
        assert counter.count(render_module(node.module)) <= 150
        carried = {r.id for r in node.module.rules} | {
            s for r in node.module.rules for s in r.merged_from
        }
        recorded = {s for d in node.stats["dropped_rules"] for s in d["from"]}
        for child in node.children:
            for rule in nodes[child].module.rules:
                assert rule.id in carried | recorded
    if merge_policy == "consolidate":
        assert len(result.module.rules) == 1
        assert result.module.rules[0].lineage_inferred
    else:  # six kept rules do not fit 150 tokens: the weakest are cut, on record
        cuts = [d for n in nodes.values() for d in n.stats.get("dropped_rules", [])]
        assert cuts
        assert all(d["reason"].startswith("module cap") for d in cuts)


async def test_token_budget_stops_cleanly_with_partial_result(start_llm: StartLLM) -> None:
    _server, url = await start_llm()
    config = RunConfig(context_tokens=4096, subset_tokens=1600, module_tokens=700)
    result = await _run(
        url, make_trajectories(60), config, token_budget=12_000, max_completion_tokens=512
    )
    report = result.report
    assert report.status == "budget_exhausted"
    assert report.prompt_tokens + report.completion_tokens <= 12_000
    assert any(f.kind == "budget" for f in report.failures)
    # The partial module still holds what the optimized subsets learned.
    assert result.module is not None
    assert result.module.rules
    assert schema_error("report", report.to_json()) is None


async def test_initial_module_rules_are_kept_and_revisable(start_llm: StartLLM) -> None:
    def policy(body: dict[str, Any]) -> str:
        if "fgo_optimize" in json.dumps(body.get("response_format")):
            return json.dumps(
                {"actions": [{"op": "revise_rule", "id": "base.r1", "text": "Open containers."}]}
            )
        return scripted_reply(body)

    _server, url = await start_llm(policy=policy)
    initial = Module(instructions="Tidy the house.", rules=(Rule(id="base.r1", text="Be tidy."),))
    async with _gw(url) as gateway:
        result = await run(
            make_trajectories(10),
            gateway,
            RunConfig(context_tokens=4096, subset_tokens=1800, module_tokens=700),
            initial=initial,
        )
    assert result.module is not None
    assert [r.text for r in result.module.rules] == ["Open containers."]
    assert result.module.instructions == "Tidy the house."
    (rule,) = result.module.rules
    assert set(rule.subsets) == {n.id for n in _nodes(result, "leaf")}


async def test_all_at_once_cuts_what_does_not_fit(start_llm: StartLLM) -> None:
    server, url = await start_llm()
    trajectories = make_trajectories(80)
    config = RunConfig(strategy="all-at-once", context_tokens=3000, module_tokens=300, epochs=2)
    result = await _run(url, trajectories, config, max_completion_tokens=512)
    report = result.report
    optimize = _optimize_requests(server.requests)
    assert len(optimize) == 2
    assert report.merge_tree == ()
    included = set(_ids_in(optimize[0]))
    assert report.cut_trajectories == len(trajectories) - len(included) > 0
    counter = default_counter()
    assert counter.count_messages(optimize[0].body["messages"]) <= 3000 - 512


async def test_batch_is_sequential_over_one_module(start_llm: StartLLM) -> None:
    server, url = await start_llm()
    config = RunConfig(
        strategy="batch", context_tokens=4096, subset_tokens=1600, module_tokens=700, epochs=2
    )
    result = await _run(url, make_trajectories(30), config)
    report = result.report
    optimize = _optimize_requests(server.requests)
    assert len(optimize) == report.subsets * 2
    assert server.max_in_flight == 1
    assert report.llm_calls["merge"] == 0
    assert report.failures == ()
    assert result.module is not None
    # One module, updated in turn: the scripted optimizer adds, then revises.
    assert len(result.module.rules) == 6


async def test_unreachable_endpoint_fails_the_run_with_a_report(
    autojump_clock: trio.testing.MockClock,
) -> None:
    state = RunState()
    async with _gw("http://127.0.0.1:9/v1", retry_attempts=2) as gateway:
        with pytest.raises(RunFailedError) as info:
            await run(make_trajectories(10), gateway, RunConfig(), state=state)
    assert info.value.result.module is None
    assert info.value.result.report.status == "failed"
    assert "ConnectError" in (info.value.result.report.error or "")


async def test_all_optimize_calls_invalid_fails_the_run(start_llm: StartLLM) -> None:
    _server, url = await start_llm(policy=lambda body: "no json here")
    with pytest.raises(RunFailedError, match="every optimize call failed") as info:
        await _run(url, make_trajectories(10), RunConfig(context_tokens=4096), max_reasks=1)
    report = info.value.result.report
    assert report.status == "failed"
    assert report.failures
    assert all(f.kind == "optimize" for f in report.failures)
    assert report.llm_calls["reasks"] == report.llm_calls["optimize"] // 2


async def test_statistics_snapshot_tracks_progress(start_llm: StartLLM) -> None:
    _server, url = await start_llm()
    state = RunState()
    config = RunConfig(context_tokens=4096, subset_tokens=1600, module_tokens=700)
    async with _gw(url) as gateway:
        result = await run(make_trajectories(30), gateway, config, state=state)
    stats = state.statistics()
    assert stats.phase == "done"
    assert stats.subsets_total == stats.subsets_done == result.report.subsets
    assert stats.merges_done == stats.merges_expected == result.report.subsets - 1


async def test_reasked_prompts_stay_within_the_subset_budget(start_llm: StartLLM) -> None:
    long_error = "x" * 5000  # not JSON: the parse error quotes nothing, but it is re-asked
    server, url = await start_llm(faults=[Fault(content=long_error)] * 4)
    config = RunConfig(context_tokens=4096, subset_tokens=1200, module_tokens=300)
    result = await _run(url, make_trajectories(20, words=30), config, max_concurrency=1)
    optimize = _optimize_requests(server.requests)
    assert result.report.llm_calls["reasks"] >= 2
    counter = default_counter()
    assert max(counter.count_messages(r.body["messages"]) for r in optimize) <= 1200
    assert any(len(r.body["messages"]) == 3 for r in optimize)


async def test_check_errors_are_reasked_with_their_message(start_llm: StartLLM) -> None:
    # A reply whose only action is no edit (a rule about the editing, not the task).
    bad = json.dumps({"actions": [{"op": "add_rule", "text": "Use remove_rule on nope.r9."}]})
    server, url = await start_llm(faults=[Fault(content=bad)])
    config = RunConfig(context_tokens=4096, subset_tokens=1600, module_tokens=700)
    result = await _run(url, make_trajectories(8), config, max_concurrency=1)
    assert result.report.status == "ok"
    reask = server.requests[1].body["messages"][-1]["content"]
    assert "actions[0]: add_rule text names 'remove_rule'" in reask
    # The rejected action was not applied silently, and the retry's edit was.
    assert result.module is not None
    assert result.module.rules


async def test_a_reply_with_usable_actions_is_kept_without_a_reask(start_llm: StartLLM) -> None:
    mixed = json.dumps(
        {
            "actions": [
                {"op": "revise_rule", "id": "nope.r9", "text": "Read the task twice."},
                {"op": "remove_rule", "id": "nope.r8"},
                {"op": "add_rule", "text": "Use add_rule."},
            ]
        }
    )
    _server, url = await start_llm(faults=[Fault(content=mixed)])
    config = RunConfig(context_tokens=4096, subset_tokens=1600, module_tokens=700)
    result = await _run(url, make_trajectories(8), config, max_concurrency=1)
    assert result.report.llm_calls["reasks"] == 0
    assert result.module is not None
    # The unknown id's revision went in as a new rule; the echo did not.
    texts = [r.text for r in result.module.rules]
    assert "Read the task twice." in texts
    assert "Use add_rule." not in texts


async def test_reports_count_only_their_own_run_on_a_shared_gateway(start_llm: StartLLM) -> None:
    server, url = await start_llm()
    config = RunConfig(context_tokens=4096, subset_tokens=1600, module_tokens=700)
    async with _gw(url) as gateway:
        first = await run(make_trajectories(20), gateway, config)
        second = await run(make_trajectories(20), gateway, config)
    assert first.report.llm_calls == second.report.llm_calls
    # Each report holds its own tokens: together they are what the server billed.
    billed = [
        sum(len(m["content"] or "") for m in r.body["messages"]) // 4 + 1 for r in server.requests
    ]
    assert first.report.prompt_tokens + second.report.prompt_tokens == sum(billed)
    assert first.report.prompt_tokens == sum(billed[: len(billed) // 2])
    total = first.report.llm_calls["optimize"] + first.report.llm_calls["merge"]
    assert len(server.requests) == 2 * total


async def test_all_at_once_respects_a_large_initial_module(start_llm: StartLLM) -> None:
    server, url = await start_llm()
    initial = Module(
        rules=tuple(
            Rule(id=f"base.r{i}", text=f"Rule number {i}: " + "be careful " * 8) for i in range(40)
        )
    )
    config = RunConfig(strategy="all-at-once", context_tokens=8192, module_tokens=300)
    async with _gw(url, max_completion_tokens=1024) as gateway:
        result = await run(make_trajectories(30), gateway, config, initial=initial)
    assert result.report.status == "ok"
    counter = default_counter()
    (request,) = _optimize_requests(server.requests)
    assert counter.count_messages(request.body["messages"]) <= 8192 - 1024


async def test_merge_prompts_must_fit_the_context(start_llm: StartLLM) -> None:
    _server, url = await start_llm()
    config = RunConfig(context_tokens=4096, subset_tokens=2000, module_tokens=1500, fan_in=3)
    async with _gw(url, max_completion_tokens=1024) as gateway:
        with pytest.raises(ValueError, match="a merge of 3 modules") as caught:
            await run(make_trajectories(10), gateway, config)
    # Called from Python, the error names the settings, not the CLI's flags.
    assert "lower module_tokens or fan_in" in str(caught.value)
    assert "--" not in str(caught.value)


async def test_tool_calls_are_rendered_whatever_their_arguments(start_llm: StartLLM) -> None:
    server, url = await start_llm()
    call = {"id": "c1", "type": "function", "function": {"name": "act", "arguments": {"x": 1}}}
    trajectory = Trajectory.from_json(
        {
            "id": "tc",
            "task": "use a tool",
            "steps": [{"role": "assistant", "content": None, "tool_calls": [call]}],
            "outcome": {"success": True},
        }
    )
    async with _gw(url) as gateway:
        await run([trajectory], gateway, RunConfig(context_tokens=4096))
    assert '-> call act({"x": 1})' in _optimize_requests(server.requests)[0].prompt


async def _run_pipeline(strategy: str, **config: Any) -> RunReport:
    trajectories = load_trajectories(EXAMPLES)
    server = FakeLLMServer()
    async with trio.open_nursery() as nursery:
        url = await nursery.start(server.serve)
        gw_config = GatewayConfig(
            base_url=url, model="fake", max_concurrency=3, max_completion_tokens=512
        )
        async with LLMGateway(gw_config) as gateway:
            result = await run(
                trajectories,
                gateway,
                RunConfig(strategy=strategy, **config),  # type: ignore[arg-type]
            )
        nursery.cancel_scope.cancel()
    assert result.module is not None
    assert errors_of(MODULE_V, result.module.to_json()) == []
    return result.report


@pytest.mark.parametrize(
    ("strategy", "config"),
    [
        ("fgo", {"context_tokens": 3000}),
        ("fgo", {"context_tokens": 3000, "fan_in": 3}),
        ("batch", {"context_tokens": 3000}),
        ("all-at-once", {}),
    ],
)
async def test_pipeline_report_validates(strategy: str, config: dict[str, Any]) -> None:
    report = await _run_pipeline(strategy, **config)
    out = report.to_json()
    assert errors_of(REPORT_V, out) == []
    assert out["status"] == "ok"
    assert out["strategy"] == strategy
    assert out["trajectories"] == 24
    assert out["llm_calls"]["optimize"] >= 1
    if strategy == "fgo":
        leaves = [n for n in out["merge_tree"] if n["kind"] == "leaf"]
        assert len(leaves) == out["subsets"] > 1
        root = next(n for n in out["merge_tree"] if n["id"] == out["root"])
        assert sorted(root["subsets"]) == sorted(n["id"] for n in leaves)
    else:
        assert out["merge_tree"] == []
        assert out["llm_calls"]["merge"] == 0
    if strategy == "all-at-once":
        assert out["cut_trajectories"] == 0
        assert out["subsets"] == 1
