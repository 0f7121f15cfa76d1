"""Merges as decisions applied by code: nothing lost unrecorded, the cap always holds."""

from __future__ import annotations

import ast
import json
from typing import Any

import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from fgo_actors import (
    FunctionSpec,
    GatewayConfig,
    LLMGateway,
    MergeForest,
    MergeJob,
    Module,
    Outcome,
    Rule,
    RunConfig,
    Step,
    Trajectory,
    run,
)
from fgo_actors._core.edits import (
    MergeChild,
    apply_merge,
    fit_to_cap,
    infer_lineage,
    merge_input,
    union_merge,
)
from fgo_actors.actors.merger import ForestRunner
from fgo_actors.testing import schema_name_of, scripted_reply

from .helpers import StartLLM

SETTINGS = settings(max_examples=200, deadline=None)


def size(module: Module) -> int:
    """A stand-in for token counting: deterministic, monotone in content."""
    return len(json.dumps(module.to_json())) // 4


def fn(
    name: str, code: str = "def f(task, observation, valid_actions, history):\n    return []"
) -> FunctionSpec:
    return FunctionSpec(name=name, description="d", parameters={"type": "object"}, code=code)


CHILD_A = Module(
    instructions="A",
    rules=(
        Rule(
            id="s001.r1",
            text="Open the container first.",
            subsets=("s001",),
            trajectories=("t1", "t2"),
        ),
        Rule(id="s001.r2", text="Be brief.", subsets=("s001",), trajectories=("t2",)),
    ),
    functions=(fn("lookup"),),
)
CHILD_B = Module(
    instructions="A",
    rules=(
        Rule(
            id="s002.r1",
            text="Open each closed container first.",
            subsets=("s002",),
            trajectories=("t5",),
        ),
        Rule(
            id="m1.r1",
            text="Verify.",
            subsets=("s003", "s004"),
            trajectories=("t7", "t8"),
            merged_from=("s003.r1", "s004.r1"),
        ),
    ),
)


def two() -> Any:
    return merge_input([MergeChild("s001", CHILD_A, 1), MergeChild("m1", CHILD_B, 3)], node_id="m7")


def test_unmentioned_rules_are_kept_with_their_ids() -> None:
    result = apply_merge(two(), {"decisions": []}, node_id="m7", size=size, cap=10_000)
    assert [r.id for r in result.module.rules] == ["s001.r1", "s001.r2", "s002.r1", "m1.r1"]
    assert result.dropped == ()
    assert result.module.instructions == "A"
    assert [f.name for f in result.module.functions] == ["lookup"]


def test_combine_replaces_its_sources_and_carries_provenance() -> None:
    reply = {
        "decisions": [
            {"op": "combine", "ids": ["s001.r1", "s002.r1"], "text": " Open containers first. "},
            {"op": "drop", "id": "s001.r2", "reason": "too vague"},
        ]
    }
    result = apply_merge(two(), reply, node_id="m7", size=size, cap=10_000)
    assert [r.id for r in result.module.rules] == ["m1.r1", "m7.r1"]
    merged = result.module.rules[1]
    assert merged == Rule(
        id="m7.r1",
        text="Open containers first.",
        subsets=("s001", "s002"),
        trajectories=("t1", "t2", "t5"),
        merged_from=("s001.r1", "s002.r1"),
    )
    assert [d.to_json() for d in result.dropped] == [
        {"id": "s001.r2", "from": ["s001.r2"], "reason": "merge: too vague"}
    ]
    assert result.dropped_rules == ("s001.r2",)


def test_combine_without_ids_infers_lineage_and_flags_it() -> None:
    reply = {"decisions": [{"op": "combine", "text": "Open every closed container first."}]}
    result = apply_merge(two(), reply, node_id="m7", size=size, cap=10_000)
    merged = result.module.rules[-1]
    assert merged.lineage_inferred
    assert set(merged.merged_from) == {"s001.r1", "s002.r1"}
    assert merged.to_json()["from_inferred"] is True
    assert {r.id for r in result.module.rules} == {"s001.r2", "m1.r1", merged.id}
    assert any("inferred" in n for n in result.notes)


def test_a_combine_text_about_the_merge_is_ignored_and_its_sources_kept() -> None:
    # Written by the local model in a bench merge.
    reply = {
        "decisions": [
            {
                "op": "combine",
                "ids": ["s001.r1", "s002.r1"],
                "text": "[s001.r1], [s002.r1] into one",
            }
        ]
    }
    result = apply_merge(two(), reply, node_id="m7", size=size, cap=10_000)
    assert [r.id for r in result.module.rules] == ["s001.r1", "s001.r2", "s002.r1", "m1.r1"]
    assert any("combine text names 's001.r1'" in n for n in result.notes)


def test_unknown_ids_are_ignored_not_re_asked() -> None:
    reply = {
        "decisions": [
            {"op": "combine", "ids": ["bogus.r9", "s001.r2"], "text": "Be short."},
            {"op": "drop", "id": "nope", "reason": "x"},
        ]
    }
    result = apply_merge(two(), reply, node_id="m7", size=size, cap=10_000)
    assert result.errors == ()
    assert result.module.rules[-1].merged_from == ("s001.r2",)
    assert len(result.notes) == 2


def test_a_reply_cannot_drop_most_rules() -> None:
    reply = {
        "decisions": [
            {"op": "drop", "id": rid, "reason": "x"}
            for rid in ("s001.r1", "s001.r2", "s002.r1", "m1.r1")
        ]
    }
    result = apply_merge(two(), reply, node_id="m7", size=size, cap=10_000)
    assert len(result.dropped) == 2
    assert len(result.module.rules) == 2


def test_exact_duplicates_collapse_before_the_llm_sees_them() -> None:
    a = Module(rules=(Rule(id="s1.r1", text="Use tools.", subsets=("s1",), trajectories=("t1",)),))
    b = Module(rules=(Rule(id="s2.r1", text="use  TOOLS.", subsets=("s2",), trajectories=("t2",)),))
    inp = merge_input([MergeChild("s1", a), MergeChild("s2", b)], node_id="m1")
    assert len(inp.rules) == 1
    (rule,) = inp.rules
    assert rule.id == "m1.r1"
    assert rule.merged_from == ("s1.r1", "s2.r1")
    assert rule.subsets == ("s1", "s2")


def test_a_rule_revised_in_two_children_keeps_both_texts() -> None:
    a = Module(rules=(Rule(id="r1", text="x one"),))
    b = Module(rules=(Rule(id="r1", text="x two"),))
    inp = merge_input([MergeChild("s1", a), MergeChild("s2", b)], node_id="m3")
    assert [(r.id, r.text) for r in inp.rules] == [("r1", "x one"), ("m3.r1", "x two")]
    assert inp.rules[1].merged_from == ("r1",)


def test_function_conflict_goes_to_the_reply_else_the_stronger_child() -> None:
    a = Module(
        functions=(
            fn("f", "def f(task, observation, valid_actions, history):\n    return [['a']]"),
        )
    )
    b = Module(
        functions=(
            fn("f", "def f(task, observation, valid_actions, history):\n    return [['b']]"),
        )
    )
    inp = merge_input([MergeChild("s1", a, 0), MergeChild("s2", b, 5)], node_id="m1")
    assert [c.name for c in inp.conflicts] == ["f"]
    fallback = union_merge(inp, node_id="m1", size=size, cap=10_000, successes={"s1": 0, "s2": 5})
    assert fallback.module.functions == b.functions
    resolved = fn("f", "def f(task, observation, valid_actions, history):\n    return [['c']]")
    reply = {"decisions": [], "functions": [resolved.to_json(), fn("new").to_json()]}
    result = apply_merge(inp, reply, node_id="m1", size=size, cap=10_000)
    assert result.module.functions == (resolved,)  # "new" is not invented by a merge


def test_instructions_change_only_when_the_children_disagree() -> None:
    same = apply_merge(
        two(), {"decisions": [], "instructions": "Other."}, node_id="m7", size=size, cap=10_000
    )
    assert same.module.instructions == "A"
    a = Module(instructions="A")
    b = Module(instructions="B")
    inp = merge_input([MergeChild("s1", a), MergeChild("s2", b)], node_id="m1")
    assert (
        apply_merge(
            inp, {"decisions": [], "instructions": "AB"}, node_id="m1", size=size, cap=999
        ).module.instructions
        == "AB"
    )
    assert union_merge(inp, node_id="m1", size=size, cap=999).module.instructions == "A\n\nB"


def test_the_cap_cuts_the_weakest_evidence_first() -> None:
    rules = tuple(
        Rule(
            id=f"s1.r{i}",
            text=f"Rule number {i} " + "word " * 10,
            subsets=tuple(f"s{k}" for k in range(i)),
        )
        for i in range(1, 9)
    )
    module = Module(rules=rules)
    cap = size(Module(rules=rules[4:]))
    fitted, drops, fn_drops = fit_to_cap(module, size=size, cap=cap)
    assert size(fitted) <= cap
    assert [d.id for d in drops] == ["s1.r1", "s1.r2", "s1.r3", "s1.r4"]
    assert all("module cap" in d.reason for d in drops)
    assert fn_drops == ()


def test_infer_lineage() -> None:
    candidates = [Rule(id="a", text="Open the fridge first."), Rule(id="b", text="Never sleep.")]
    assert infer_lineage("Always open a fridge first", candidates) == ("a",)
    assert infer_lineage("zzz", candidates) == ()


# -- properties ---------------------------------------------------------------------

WORDS = ["open", "close", "fridge", "box", "take", "apple", "look", "first", "never", "always"]


@st.composite
def children(draw: st.DrawFn) -> list[MergeChild]:
    k = draw(st.integers(min_value=1, max_value=4))
    out = []
    for c in range(k):
        n = draw(st.integers(min_value=0, max_value=8))
        rules = tuple(
            Rule(
                id=draw(st.sampled_from([f"s{c}.r{i}", "r1", "m1.r1"])) if i == 0 else f"s{c}.r{i}",
                text=" ".join(draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=6))),
                subsets=tuple(
                    draw(st.lists(st.sampled_from(["s0", "s1", "s2", "s3"]), unique=True))
                ),
                trajectories=tuple(
                    draw(st.lists(st.sampled_from([f"t{j}" for j in range(6)]), unique=True))
                ),
            )
            for i in range(n)
        )
        # Rule ids are unique within a module.
        rules = tuple({r.id: r for r in rules}.values())
        functions = tuple(
            fn(name, code=f"# {draw(st.sampled_from(['x', 'y']))}")
            for name in draw(st.lists(st.sampled_from(["f", "g"]), unique=True))
        )
        instructions = draw(st.sampled_from(["", "Be good.", "Be fast."]))
        out.append(
            MergeChild(f"c{c}", Module(instructions, rules, functions), draw(st.integers(0, 3)))
        )
    return out


@st.composite
def replies(draw: st.DrawFn, ids: list[str]) -> dict[str, Any]:
    pick = st.sampled_from([*ids, "bogus.r1"]) if ids else st.just("bogus.r1")
    decision = st.one_of(
        st.fixed_dictionaries(
            {
                "op": st.just("combine"),
                "text": st.sampled_from(["", "open first", "take apple always", "zz"]),
            },
            optional={"ids": st.lists(pick, max_size=4)},
        ),
        st.fixed_dictionaries(
            {"op": st.just("drop"), "id": pick}, optional={"reason": st.sampled_from(["", "bad"])}
        ),
        st.fixed_dictionaries({"op": st.just("rewrite")}),
    )
    return {"decisions": draw(st.lists(decision, max_size=8))}


@SETTINGS
@given(kids=children(), data=st.data())
def test_no_child_rule_is_lost_without_a_recorded_reason_and_the_cap_holds(
    kids: list[MergeChild], data: st.DataObject
) -> None:
    inp = merge_input(kids, node_id="m9")
    child_ids = {r.id for c in kids for r in c.module.rules}
    assert set(inp.child_rule_ids) == child_ids
    reply = data.draw(replies([r.id for r in inp.rules]))
    floor = size(Module())
    cap = data.draw(st.integers(min_value=floor, max_value=floor + 400))
    before = [c.module.to_json() for c in kids]
    result = apply_merge(inp, reply, node_id="m9", size=size, cap=cap)
    assert [c.module.to_json() for c in kids] == before  # children are not changed
    module = result.module
    assert size(module) <= cap
    ids = [r.id for r in module.rules]
    assert len(ids) == len(set(ids))
    carried = set(ids) | {s for r in module.rules for s in r.merged_from}
    recorded = {s for d in result.dropped for s in d.covers}
    assert child_ids <= carried | recorded
    assert all(d.reason for d in (*result.dropped, *result.dropped_functions))
    # Provenance only comes from the children.
    subsets = {s for c in kids for r in c.module.rules for s in r.subsets}
    assert {s for r in module.rules for s in r.subsets} <= subsets
    # Function names are the children's; each kept or recorded as cut.
    names = {f.name for c in kids for f in c.module.functions}
    assert {f.name for f in module.functions} | {d.id for d in result.dropped_functions} == names


@SETTINGS
@given(kids=children(), data=st.data())
def test_the_fallback_keeps_everything_that_fits(
    kids: list[MergeChild], data: st.DataObject
) -> None:
    inp = merge_input(kids, node_id="m2")
    cap = data.draw(st.integers(min_value=size(Module()), max_value=size(Module()) + 600))
    result = union_merge(inp, node_id="m2", size=size, cap=cap)
    assert size(result.module) <= cap
    assert all("module cap" in d.reason for d in result.dropped)
    kept = {r.id for r in result.module.rules}
    assert kept | {d.id for d in result.dropped} == {r.id for r in inp.rules}
    # Whatever fits is not cut: with no cap pressure, nothing is dropped.
    roomy = union_merge(inp, node_id="m2", size=size, cap=10**9)
    assert roomy.dropped == ()
    assert len(roomy.module.rules) == len(inp.rules)


TABLE_CODE = """PLACES = {places}
def route(task, observation, valid_actions, history):
    return [[a] for a in valid_actions if any(k in a for k in PLACES)]
"""


def test_functions_that_differ_only_in_data_merge_by_union() -> None:
    a = fn("route", TABLE_CODE.format(places={"invoice": "accounts", "memo": "staff"}))
    b = fn("route", TABLE_CODE.format(places={"invoice": "billing", "resume": "hiring"}))
    inp = merge_input(
        [MergeChild("s1", Module(functions=(a,))), MergeChild("s2", Module(functions=(b,)))],
        node_id="m1",
    )
    assert inp.conflicts == ()
    (merged,) = inp.functions
    compile(merged.code, "<merged>", "exec")
    # Read the merged table back without running the function's code.
    table = next(
        ast.literal_eval(stmt.value)
        for stmt in ast.parse(merged.code).body
        if isinstance(stmt, ast.Assign)
    )
    assert table == {"invoice": "accounts", "memo": "staff", "resume": "hiring"}
    # Different logic is a real conflict, for the LLM.
    c = fn("route", TABLE_CODE.format(places={}).replace("any(", "all("))
    inp = merge_input(
        [MergeChild("s1", Module(functions=(a,))), MergeChild("s3", Module(functions=(c,)))],
        node_id="m1",
    )
    assert [x.name for x in inp.conflicts] == ["route"]


# -- end to end: a function is judged on turns it was not written from ---------------

NARROW = (
    "def narrow(task, observation, valid_actions, history):\n"
    "    if 'alpha' not in observation:\n"
    "        raise KeyError('only ever saw alpha rooms')\n"
    "    return [[valid_actions[0]]]\n"
)


def _episode(i: int, word: str) -> Trajectory:
    steps: list[Step] = []
    for k in range(3):
        actions = [f"act {k}", "wait"]
        steps += [
            Step(role="user", content=f"{word} room {i}.{k}", extra={"valid_actions": actions}),
            Step(
                role="assistant", content=actions[0], extra={"played": [actions[0]], "score": k / 2}
            ),
        ]
    return Trajectory(
        id=f"{word}{i}",
        task="do the thing",
        steps=tuple(steps),
        outcome=Outcome(success=True, score=1.0),
        metadata={"task_type": word},
    )


async def test_a_function_that_fails_on_a_sibling_subsets_turns_is_cut_on_record(
    start_llm: StartLLM,
) -> None:
    def policy(body: dict[str, Any]) -> str:
        if schema_name_of(body) == "fgo_optimize" and "alpha room" in str(
            body["messages"][1]["content"]
        ):
            function = {
                "name": "narrow",
                "description": "d",
                "parameters": {"type": "object"},
                "code": NARROW,
            }
            return json.dumps({"actions": [{"op": "add_function", "function": function}]})
        return scripted_reply(body)

    _server, url = await start_llm(policy=policy)
    data = [_episode(i, "alpha") for i in range(3)] + [_episode(i, "beta") for i in range(3)]
    gateway = LLMGateway(GatewayConfig(base_url=url, model="m", max_concurrency=2))
    async with gateway:
        result = await run(
            data,
            gateway,
            RunConfig(
                context_tokens=4096, subset_tokens=1300, module_tokens=300, group_key="task_type"
            ),
        )
    nodes = {n.id: n for n in result.report.merge_tree}
    leaves = [n for n in nodes.values() if n.kind == "leaf"]
    assert any(n.module.function("narrow") for n in leaves)  # it passed its own subset's turns
    assert result.module is not None
    assert result.module.function("narrow") is None
    cuts = [d for n in nodes.values() for d in n.stats.get("dropped_functions", [])]
    assert [d["id"] for d in cuts] == ["narrow"]
    assert "not written from" in cuts[0]["reason"]
    assert "only ever saw alpha rooms" in cuts[0]["reason"]


async def test_the_forest_runner_starts_each_merge_once_as_soon_as_it_is_scheduled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    forest = MergeForest(2)
    started: list[tuple[str, float]] = []
    finished: list[str] = []

    async def merge(job: MergeJob) -> str:
        started.append((job.id, trio.current_time()))
        await trio.sleep(10)
        return job.id

    async def done(job: MergeJob, node_id: str) -> None:
        finished.append(node_id)
        runner.complete(job, node_id)

    async with trio.open_nursery() as nursery:
        runner = ForestRunner(forest, nursery, merge, done)
        for i in range(5):
            runner.add_leaf(f"s{i}")
        assert runner.running == 2  # s0+s1 and s2+s3, at once
        runner.close()
    # Five leaves make four merges, each run once; the second rank waited for the first.
    assert [t for _, t in started] == [0.0, 0.0, 10.0, 20.0]
    assert sorted(finished) == sorted(job for job, _ in started)
    assert runner.running == 0
    assert forest.root() == started[-1][0]
