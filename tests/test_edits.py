"""Tests for applying optimizer edit actions and merge replies to modules."""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fgo_actors import FunctionSpec, Module, Rule
from fgo_actors._edits import apply_actions, apply_merge, union_merge

SETTINGS = settings(max_examples=150, deadline=None)

TRAJ = ("t1", "t2", "t3")


def fn(name: str, code: str = "pass", description: str = "d") -> FunctionSpec:
    return FunctionSpec(
        name=name,
        description=description,
        parameters={"type": "object", "properties": {}},
        code=code,
    )


def fn_json(name: str, code: str = "pass", description: str = "d") -> dict[str, Any]:
    return fn(name, code, description).to_json()


BASE = Module(
    instructions="Be careful.",
    rules=(
        Rule(id="r1", text="Check the input first.", subsets=("s000",), trajectories=("t0",)),
        Rule(id="s001.r3", text="Retry on timeout.", subsets=("s001",), trajectories=("t1",)),
    ),
    functions=(fn("lookup"), fn("search")),
)
BASE_JSON = copy.deepcopy(BASE.to_json())


def apply(
    actions: Sequence[dict[str, Any]], module: Module = BASE, **kw: Any
) -> tuple[Module, tuple[str, ...], int]:
    kw.setdefault("subset_id", "s001")
    kw.setdefault("trajectory_ids", TRAJ)
    snapshot = copy.deepcopy(list(actions))
    before = copy.deepcopy(module.to_json())
    result = apply_actions(module, actions, **kw)
    # Neither the module nor the actions are changed in place.
    assert module.to_json() == before
    assert list(actions) == snapshot
    return result.module, result.errors, result.applied


# -- apply_actions: each op ----------------------------------------------------------


def test_set_instructions() -> None:
    new, errors, applied = apply([{"op": "set_instructions", "text": "Be quick."}])
    assert errors == ()
    assert applied == 1
    assert new.instructions == "Be quick."
    assert new.rules == BASE.rules
    assert new.functions == BASE.functions
    assert BASE.instructions == "Be careful."


def test_add_rule_gets_next_id_and_subset_provenance() -> None:
    new, errors, applied = apply(
        [
            {"op": "add_rule", "text": "  Read the error message.  "},
            {"op": "add_rule", "text": "Cite the source.", "evidence": ["t2"]},
        ]
    )
    assert errors == ()
    assert applied == 2
    assert new.rules[:2] == BASE.rules
    # s001.r3 exists, so numbering for the subset continues at r4.
    assert new.rules[2] == Rule(
        id="s001.r4", text="Read the error message.", subsets=("s001",), trajectories=TRAJ
    )
    assert new.rules[3] == Rule(
        id="s001.r5", text="Cite the source.", subsets=("s001",), trajectories=("t2",)
    )


def test_add_rule_fresh_subset_starts_at_r1() -> None:
    new, errors, _ = apply([{"op": "add_rule", "text": "New."}], subset_id="s007")
    assert errors == ()
    assert new.rules[-1].id == "s007.r1"
    assert new.rules[-1].subsets == ("s007",)


def test_add_rule_id_prefix() -> None:
    new, errors, _ = apply(
        [{"op": "add_rule", "text": "New."}], subset_id="s001", id_prefix="e2.s001"
    )
    assert errors == ()
    assert new.rules[-1].id == "e2.s001.r1"
    assert new.rules[-1].subsets == ("s001",)


def test_add_rule_empty_evidence_means_whole_subset() -> None:
    new, errors, _ = apply([{"op": "add_rule", "text": "New.", "evidence": []}])
    assert errors == ()
    assert new.rules[-1].trajectories == TRAJ


def test_add_rule_evidence_is_recorded_once_per_trajectory() -> None:
    new, errors, _ = apply([{"op": "add_rule", "text": "New.", "evidence": ["t2", "t2", "t1"]}])
    assert errors == ()
    assert new.rules[-1].trajectories == ("t2", "t1")


def test_add_rule_after_remove_does_not_reuse_an_id() -> None:
    new, errors, _ = apply(
        [{"op": "remove_rule", "id": "s001.r3"}, {"op": "add_rule", "text": "Other."}]
    )
    assert errors == ()
    assert [r.id for r in new.rules] == ["r1", "s001.r4"]


def test_revise_rule_keeps_id_and_unions_provenance() -> None:
    new, errors, applied = apply(
        [{"op": "revise_rule", "id": "r1", "text": " Check inputs. ", "evidence": ["t3", "t0"]}],
        trajectory_ids=("t0", "t3"),
    )
    assert errors == ()
    assert applied == 1
    assert new.rules[0] == Rule(
        id="r1", text="Check inputs.", subsets=("s000", "s001"), trajectories=("t0", "t3")
    )
    assert new.rules[1] == BASE.rules[1]


def test_revise_rule_without_evidence_adds_whole_subset() -> None:
    new, errors, _ = apply([{"op": "revise_rule", "id": "s001.r3", "text": "Retry twice."}])
    assert errors == ()
    r = new.rule("s001.r3")
    assert r is not None
    assert r.text == "Retry twice."
    assert r.subsets == ("s001",)
    assert r.trajectories == ("t1", "t2", "t3")


def test_remove_rule() -> None:
    new, errors, applied = apply([{"op": "remove_rule", "id": "r1"}])
    assert errors == ()
    assert applied == 1
    assert [r.id for r in new.rules] == ["s001.r3"]


def test_function_ops() -> None:
    new, errors, applied = apply(
        [
            {"op": "add_function", "function": fn_json("compute", "return 1")},
            {"op": "revise_function", "function": fn_json("lookup", "return 2", "better")},
            {"op": "remove_function", "name": "search"},
        ]
    )
    assert errors == ()
    assert applied == 3
    assert [f.name for f in new.functions] == ["lookup", "compute"]
    lookup = new.function("lookup")
    assert lookup is not None
    assert (lookup.code, lookup.description) == ("return 2", "better")
    compute = new.function("compute")
    assert compute is not None
    assert compute.code == "return 1"


# -- apply_actions: errors are reported, never silently applied -------------------------


@pytest.mark.parametrize(
    ("action", "needle"),
    [
        ({"op": "revise_rule", "id": "ghost.r9", "text": "x"}, "'ghost.r9'"),
        ({"op": "remove_rule", "id": "ghost.r9"}, "'ghost.r9'"),
        ({"op": "revise_function", "function": fn_json("ghost_fn")}, "'ghost_fn'"),
        ({"op": "remove_function", "name": "ghost_fn"}, "'ghost_fn'"),
        ({"op": "add_function", "function": fn_json("lookup", "other")}, "'lookup'"),
        ({"op": "add_rule", "text": "check THE input   first."}, "'r1'"),
        ({"op": "add_rule", "text": "New.", "evidence": ["t1", "t99"]}, "t99"),
        ({"op": "revise_rule", "id": "r1", "text": "x", "evidence": ["t99"]}, "t99"),
        ({"op": "frobnicate"}, "'frobnicate'"),
    ],
)
def test_bad_action_is_an_error_naming_it(action: dict[str, Any], needle: str) -> None:
    new, errors, applied = apply(
        [{"op": "set_instructions", "text": "Changed."}, action, {"op": "add_rule", "text": "Z."}]
    )
    assert len(errors) == 1
    assert errors[0].startswith("actions[1]:")
    assert needle in errors[0]
    assert applied == 2
    # The good actions around it are applied; the bad one changes nothing.
    assert new.instructions == "Changed."
    assert new.rules[: len(BASE.rules)] == BASE.rules
    assert [r.text for r in new.rules[len(BASE.rules) :]] == ["Z."]
    assert new.functions == BASE.functions
    lookup = new.function("lookup")
    assert lookup is not None
    assert lookup.code == "pass"


@pytest.mark.parametrize(
    "action",
    [
        {"op": "add_rule", "text": "   "},
        {"op": "revise_rule", "id": "r1", "text": " \n "},
    ],
)
def test_blank_rule_text_is_an_error(action: dict[str, Any]) -> None:
    # A rule whose text strips to "" breaks the module schema (text minLength 1), so
    # the saved module could not be loaded again; it must be reported, not applied.
    new, errors, applied = apply([action])
    assert len(errors) == 1
    assert applied == 0
    assert new.rules == BASE.rules
    assert Module.from_json(new.to_json()) == new


def test_duplicate_within_one_reply_is_an_error() -> None:
    new, errors, applied = apply(
        [{"op": "add_rule", "text": "Use tools."}, {"op": "add_rule", "text": "use  tools."}]
    )
    assert applied == 1
    assert len(errors) == 1
    assert "'s001.r4'" in errors[0]
    assert [r.text for r in new.rules].count("Use tools.") == 1


def test_remove_then_revise_same_rule_is_an_error() -> None:
    new, errors, _ = apply(
        [{"op": "remove_rule", "id": "r1"}, {"op": "revise_rule", "id": "r1", "text": "x"}]
    )
    assert len(errors) == 1
    assert "'r1'" in errors[0]
    assert new.rule("r1") is None


# -- apply_actions: random action lists ------------------------------------------------

rule_texts = st.sampled_from(["Alpha.", "alpha.", "Beta rule.", "Gamma!", "Delta", "  Eps  "])
rule_ids = st.sampled_from(["r1", "s001.r3", "s001.r4", "s001.r5", "nope"])
fn_names = st.sampled_from(["lookup", "search", "compute", "ghost"])
evidence = st.one_of(
    st.none(), st.lists(st.sampled_from(["t1", "t2", "t3", "t9"]), max_size=3, unique=True)
)


def _with_evidence(action: dict[str, Any], ev: list[str] | None) -> dict[str, Any]:
    return action if ev is None else {**action, "evidence": ev}


actions_st = st.lists(
    st.one_of(
        st.builds(lambda t: {"op": "set_instructions", "text": t}, rule_texts),
        st.builds(
            lambda t, e: _with_evidence({"op": "add_rule", "text": t}, e), rule_texts, evidence
        ),
        st.builds(
            lambda i, t, e: _with_evidence({"op": "revise_rule", "id": i, "text": t}, e),
            rule_ids,
            rule_texts,
            evidence,
        ),
        st.builds(lambda i: {"op": "remove_rule", "id": i}, rule_ids),
        st.builds(lambda n: {"op": "add_function", "function": fn_json(n, "new")}, fn_names),
        st.builds(lambda n: {"op": "revise_function", "function": fn_json(n, "rev")}, fn_names),
        st.builds(lambda n: {"op": "remove_function", "name": n}, fn_names),
    ),
    max_size=12,
)


@SETTINGS
@given(actions=actions_st)
def test_random_actions_are_each_applied_or_reported(actions: list[dict[str, Any]]) -> None:
    new, errors, applied = apply(actions)
    assert applied + len(errors) == len(actions)
    for e in errors:
        assert re.match(r"actions\[\d+\]: ", e)
    ids = [r.id for r in new.rules]
    assert len(ids) == len(set(ids))
    names = [f.name for f in new.functions]
    assert len(names) == len(set(names))
    old_ids = {r.id for r in BASE.rules}
    for r in new.rules:
        assert r.text == r.text.strip()
        if r.id not in old_ids:
            assert re.fullmatch(r"s001\.r\d+", r.id)
            assert int(r.id.rsplit(".r", 1)[1]) >= 4
            assert r.subsets == ("s001",)
            assert set(r.trajectories) <= set(TRAJ)
        else:
            old = BASE.rule(r.id)
            assert old is not None
            # Provenance only grows.
            assert set(old.subsets) <= set(r.subsets)
            assert set(old.trajectories) <= set(r.trajectories)


# -- apply_merge ---------------------------------------------------------------------

CHILD_A = Module(
    instructions="A",
    rules=(
        Rule(id="s001.r1", text="Use search.", subsets=("s001",), trajectories=("t1", "t2")),
        Rule(id="s001.r2", text="Be brief.", subsets=("s001",), trajectories=("t2",)),
    ),
    functions=(fn("lookup"),),
)
CHILD_B = Module(
    instructions="B",
    rules=(
        Rule(id="s002.r1", text="Search first.", subsets=("s002",), trajectories=("t5",)),
        Rule(
            id="m1.r1",
            text="Verify.",
            subsets=("s003", "s004"),
            trajectories=("t7", "t8"),
            merged_from=("s003.r1", "s004.r1"),
        ),
    ),
)


def merge_reply(
    rules: list[dict[str, Any]], functions: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    return {"instructions": "Merged.", "rules": rules, "functions": functions or []}


def test_apply_merge_carries_provenance_along_lineage() -> None:
    reply = merge_reply(
        [
            {"text": " Search before answering. ", "from": ["s001.r1", "s002.r1"]},
            {"text": "Verify briefly.", "from": ["m1.r1", "s001.r2"]},
        ],
        [fn_json("lookup")],
    )
    before = (CHILD_A.to_json(), CHILD_B.to_json())
    result = apply_merge([CHILD_A, CHILD_B], reply, node_id="m7")
    assert (CHILD_A.to_json(), CHILD_B.to_json()) == before
    assert result.errors == ()
    assert result.dropped_rules == ()
    assert result.module.instructions == "Merged."
    assert result.module.rules == (
        Rule(
            id="m7.r1",
            text="Search before answering.",
            subsets=("s001", "s002"),
            trajectories=("t1", "t2", "t5"),
            merged_from=("s001.r1", "s002.r1"),
        ),
        Rule(
            id="m7.r2",
            text="Verify briefly.",
            subsets=("s003", "s004", "s001"),
            trajectories=("t7", "t8", "t2"),
            merged_from=("m1.r1", "s001.r2"),
        ),
    )
    assert [f.name for f in result.module.functions] == ["lookup"]


def test_apply_merge_unknown_from_is_an_error() -> None:
    reply = merge_reply(
        [
            {"text": "Keep.", "from": ["s001.r1"]},
            {"text": "Invented.", "from": ["s001.r2", "s009.r4"]},
        ]
    )
    result = apply_merge([CHILD_A, CHILD_B], reply, node_id="m7")
    assert len(result.errors) == 1
    assert "rules[1]" in result.errors[0]
    assert "s009.r4" in result.errors[0]
    assert [r.text for r in result.module.rules] == ["Keep."]


def test_apply_merge_lists_dropped_rules() -> None:
    reply = merge_reply([{"text": "Search.", "from": ["s002.r1", "s001.r1"]}])
    result = apply_merge([CHILD_A, CHILD_B], reply, node_id="m7")
    assert result.errors == ()
    assert set(result.dropped_rules) == {"s001.r2", "m1.r1"}


def test_apply_merge_duplicate_function_is_an_error() -> None:
    reply = merge_reply([], [fn_json("lookup"), fn_json("lookup", "other")])
    result = apply_merge([CHILD_A], reply, node_id="m7")
    assert len(result.errors) == 1
    assert "'lookup'" in result.errors[0]


def test_apply_merge_shared_rule_id_unions_both_children() -> None:
    a = Module(rules=(Rule(id="r1", text="x", subsets=("s1",), trajectories=("t1",)),))
    b = Module(rules=(Rule(id="r1", text="x'", subsets=("s2",), trajectories=("t2",)),))
    result = apply_merge([a, b], merge_reply([{"text": "x", "from": ["r1"]}]), node_id="m3")
    assert result.errors == ()
    assert result.module.rules[0].subsets == ("s1", "s2")
    assert result.module.rules[0].trajectories == ("t1", "t2")
    assert result.module.rules[0].merged_from == ("r1",)


# -- random modules ------------------------------------------------------------------

# A small text pool with case/space variants so that duplicates are common.
TEXT_POOL = ["Use tools.", "use  tools.", "USE TOOLS.", "Be brief.", "Check twice.", "Ask."]


@st.composite
def modules(draw: st.DrawFn, tag: str) -> Module:
    n = draw(st.integers(min_value=0, max_value=5))
    rules = tuple(
        Rule(
            id=f"{tag}.r{i}",
            text=draw(st.sampled_from(TEXT_POOL)),
            subsets=tuple(draw(st.lists(st.sampled_from(["s1", "s2", "s3", "s4"]), unique=True))),
            trajectories=tuple(
                draw(st.lists(st.sampled_from([f"t{k}" for k in range(8)]), unique=True))
            ),
        )
        for i in range(1, n + 1)
    )
    functions = tuple(
        fn(name, code=f"{tag}-{name}")
        for name in draw(st.lists(st.sampled_from(["f", "g", "h"]), unique=True))
    )
    instructions = draw(st.sampled_from(["", "Be good.", "Be fast.", "Be good. "]))
    return Module(instructions=instructions, rules=rules, functions=functions)


children_st = st.integers(min_value=1, max_value=4).flatmap(
    lambda k: st.tuples(*(modules(f"c{i}") for i in range(k)))
)


def norm(text: str) -> str:
    return " ".join(text.lower().split())


@SETTINGS
@given(children=children_st)
def test_union_merge_keeps_every_rule_and_its_provenance(children: tuple[Module, ...]) -> None:
    before = [c.to_json() for c in children]
    merged = union_merge(children, node_id="m5")
    assert [c.to_json() for c in children] == before

    all_rules = [r for c in children for r in c.rules]
    assert {norm(r.text) for r in merged.rules} == {norm(r.text) for r in all_rules}
    assert len(merged.rules) == len({norm(r.text) for r in all_rules})
    assert [r.id for r in merged.rules] == [f"m5.r{i}" for i in range(1, len(merged.rules) + 1)]

    by_norm = {norm(r.text): r for r in merged.rules}
    for r in all_rules:
        m = by_norm[norm(r.text)]
        assert set(r.subsets) <= set(m.subsets)
        assert set(r.trajectories) <= set(m.trajectories)
        assert r.id in m.merged_from
    for m in merged.rules:
        sources = [r for r in all_rules if norm(r.text) == norm(m.text)]
        # Nothing invented, nothing repeated.
        assert set(m.subsets) == {s for r in sources for s in r.subsets}
        assert set(m.trajectories) == {t for r in sources for t in r.trajectories}
        assert len(m.subsets) == len(set(m.subsets))
        assert len(m.trajectories) == len(set(m.trajectories))
        assert set(m.merged_from) == {r.id for r in sources}
        assert m.text in {r.text for r in sources}

    names = {f.name for c in children for f in c.functions}
    assert {f.name for f in merged.functions} == names
    for f in merged.functions:
        # The first child that has a function supplies it.
        first = next(c for c in children if c.function(f.name) is not None)
        assert f == first.function(f.name)
    for c in children:
        assert c.instructions.strip() in merged.instructions


@SETTINGS
@given(children=children_st, data=st.data())
def test_apply_merge_provenance_is_the_union_of_its_sources(
    children: tuple[Module, ...], data: st.DataObject
) -> None:
    by_id = {r.id: r for c in children for r in c.rules}
    ids = sorted(by_id)
    items: list[dict[str, Any]] = data.draw(
        st.lists(
            st.fixed_dictionaries(
                {
                    "text": st.sampled_from(TEXT_POOL),
                    "from": st.lists(st.sampled_from([*ids, "bogus.r1"]), min_size=1, max_size=3),
                }
            ),
            max_size=6,
        )
    )
    result = apply_merge(children, merge_reply(items), node_id="m9")
    good = [it for it in items if "bogus.r1" not in it["from"]]
    assert len(result.errors) == len(items) - len(good)
    for e in result.errors:
        assert "bogus.r1" in e
    assert len(result.module.rules) == len(good)
    for i, (rule, item) in enumerate(zip(result.module.rules, good, strict=True), start=1):
        assert rule.id == f"m9.r{i}"
        assert rule.text == item["text"].strip()
        sources = [by_id[s] for s in item["from"]]
        assert rule.subsets == tuple(dict.fromkeys(s for r in sources for s in r.subsets))
        assert rule.trajectories == tuple(dict.fromkeys(t for r in sources for t in r.trajectories))
        assert rule.merged_from == tuple(dict.fromkeys(item["from"]))
    referenced = {s for it in good for s in it["from"]}
    assert set(result.dropped_rules) == set(ids) - referenced
    assert len(result.dropped_rules) == len(set(result.dropped_rules))


def test_union_merge_example() -> None:
    merged = union_merge([CHILD_A, CHILD_B, CHILD_A], node_id="m2")
    assert merged.instructions == "A\n\nB"
    assert [r.text for r in merged.rules] == [
        "Use search.",
        "Be brief.",
        "Search first.",
        "Verify.",
    ]
    assert merged.rules[0].merged_from == ("s001.r1",)
    assert merged.rules[3] == Rule(
        id="m2.r4",
        text="Verify.",
        subsets=("s003", "s004"),
        trajectories=("t7", "t8"),
        merged_from=("m1.r1",),
    )
    assert [f.name for f in merged.functions] == ["lookup"]


def test_records_are_frozen() -> None:
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        BASE.instructions = "x"  # type: ignore[misc]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        BASE.rules[0].text = "x"  # type: ignore[misc]
    assert BASE.to_json() == BASE_JSON


def test_apply_merge_rejects_a_rule_without_lineage() -> None:
    child = Module(rules=(Rule(id="s1.r1", text="a"),))
    result = apply_merge([child], merge_reply([{"text": "new", "from": []}]), node_id="m1")
    assert result.module.rules == ()
    assert len(result.errors) == 1
    assert "rules[0].from is empty" in result.errors[0]


def test_merged_ids_never_collide_with_a_childs() -> None:
    # An initial module from an earlier run may already hold m1.r1.
    child = Module(rules=(Rule(id="m1.r1", text="old"), Rule(id="s1.r1", text="new")))
    reply = merge_reply([{"text": "old", "from": ["m1.r1"]}, {"text": "new", "from": ["s1.r1"]}])
    result = apply_merge([child], reply, node_id="m1")
    assert [r.id for r in result.module.rules] == ["m1.r2", "m1.r3"]
    assert result.module.rules[0].merged_from == ("m1.r1",)
    union = union_merge([child], node_id="m1")
    assert [r.id for r in union.rules] == ["m1.r2", "m1.r3"]
