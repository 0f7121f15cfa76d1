"""Tests for applying optimizer edit actions to modules (merges: test_merge.py)."""

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
from fgo_actors._core.edits import (
    apply_actions,
    copies_prompt,
    match_evidence,
    object_schema,
    revert_functions,
)

from .helpers import json_values

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


# -- apply_actions: what is meant is read as meant, the rest is reported -----------------


@pytest.mark.parametrize(
    ("action", "needle"),
    [
        ({"op": "frobnicate"}, "'frobnicate'"),
        ({"op": "add_rule", "text": "Use add_rule here."}, "add_rule"),
        ({"op": "revise_rule", "id": "r1", "text": "Follow s001.r3."}, "s001.r3"),
    ],
)
def test_an_action_that_is_no_edit_is_an_error_naming_it(
    action: dict[str, Any], needle: str
) -> None:
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


def result_of(actions: Sequence[dict[str, Any]], **kw: Any) -> Any:
    kw.setdefault("subset_id", "s001")
    kw.setdefault("trajectory_ids", TRAJ)
    return apply_actions(BASE, actions, **kw)


def test_revise_of_an_unknown_rule_adds_it() -> None:
    result = result_of([{"op": "revise_rule", "id": "ghost.r9", "text": "Look first."}])
    assert result.errors == ()
    assert result.applied == 1
    assert result.module.rules[-1] == Rule(
        id="s001.r4", text="Look first.", subsets=("s001",), trajectories=TRAJ
    )
    assert result.module.rule("ghost.r9") is None
    assert any("'ghost.r9'" in n for n in result.notes)


def test_function_ops_under_the_wrong_name_are_read_as_meant() -> None:
    result = result_of(
        [
            {"op": "revise_function", "function": fn_json("ghost_fn", "return 3")},
            {"op": "add_function", "function": fn_json("lookup", "return 4")},
        ]
    )
    assert result.errors == ()
    assert result.applied == 2
    functions = {f.name: f.code for f in result.module.functions}
    assert functions == {"lookup": "return 4", "search": "pass", "ghost_fn": "return 3"}
    assert len(result.notes) == 2


@pytest.mark.parametrize(
    "action",
    [
        {"op": "remove_rule", "id": "ghost.r9"},
        {"op": "remove_function", "name": "ghost_fn"},
        {"op": "add_rule", "text": "check THE input   first."},
        {"op": "revise_rule", "id": "r1", "text": "retry on  timeout."},
    ],
)
def test_an_action_that_changes_nothing_is_noted_not_an_error(action: dict[str, Any]) -> None:
    result = result_of([action])
    assert result.errors == ()
    assert (result.applied, result.unchanged) == (0, 1)
    assert result.module == BASE
    assert len(result.notes) == 1
    assert result.notes[0].startswith("actions[0]:")
    assert not result.worth_reask


@pytest.mark.parametrize(
    ("evidence", "expected"),
    [
        (["trajectory t2"], ("t2",)),
        (["t3 (score 1.0)", "t1"], ("t3", "t1")),
        (["t1", "t99"], ("t1",)),
        (["t99"], TRAJ),
    ],
)
def test_evidence_is_matched_to_the_subsets_ids(
    evidence: list[str], expected: tuple[str, ...]
) -> None:
    result = result_of([{"op": "add_rule", "text": "New.", "evidence": evidence}])
    assert result.errors == ()
    assert result.module.rules[-1].trajectories == expected
    assert bool(result.notes) == (list(expected) != evidence)


@pytest.mark.parametrize(
    ("given", "meant"),
    [
        ("twc/train/50", "twc/train/50"),
        ("trajectory twc/train/50", "twc/train/50"),
        ("twc/train/50.", "twc/train/50"),
        ("train/5", "twc/train/5"),
        ("5", "twc/train/5"),  # the one id that ends with it after a separator
        ("twc/train/7", None),
        ("", None),
    ],
)
def test_match_evidence(given: str, meant: str | None) -> None:
    known = ["twc/train/5", "twc/train/50", "twc/test/15"]
    assert match_evidence(given, known) == meant


def test_match_evidence_does_not_guess_between_two_ids() -> None:
    assert match_evidence("5", ["a/5", "b/5"]) is None


def test_a_reply_is_worth_a_reask_only_when_nothing_went_in() -> None:
    bad = {"op": "add_rule", "text": "  "}
    assert result_of([bad]).worth_reask
    assert not result_of([bad, {"op": "add_rule", "text": "Z."}]).worth_reask
    assert not result_of([]).worth_reask


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


def test_duplicate_within_one_reply_is_added_once() -> None:
    result = result_of(
        [{"op": "add_rule", "text": "Use tools."}, {"op": "add_rule", "text": "use  tools."}]
    )
    assert (result.applied, result.unchanged, result.errors) == (1, 1, ())
    assert "'s001.r4'" in result.notes[0]
    assert [r.text for r in result.module.rules].count("Use tools.") == 1


def test_remove_then_revise_same_rule_adds_it_back_under_a_new_id() -> None:
    result = result_of(
        [{"op": "remove_rule", "id": "r1"}, {"op": "revise_rule", "id": "r1", "text": "x y z"}]
    )
    assert result.errors == ()
    assert result.module.rule("r1") is None
    assert result.module.rules[-1].text == "x y z"


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
    result = result_of(actions)
    new, errors, applied = result.module, result.errors, result.applied
    assert applied + result.unchanged + len(errors) == len(actions)
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


def test_records_are_frozen() -> None:
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        BASE.instructions = "x"  # type: ignore[misc]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        BASE.rules[0].text = "x"  # type: ignore[misc]
    assert BASE.to_json() == BASE_JSON


@pytest.mark.parametrize(
    "text",
    [
        "revise_rule names unknown rule id '15'; existing ids: ['s001.r3']",
        "Use add_rule for lessons.",
        "Follow rule r1 always.",
    ],
)
def test_a_rule_that_echoes_the_edit_instructions_is_refused(text: str) -> None:
    module, errors, applied = apply([{"op": "add_rule", "text": text}])
    assert applied == 0
    assert module == BASE
    assert len(errors) == 1
    assert "not of the task" in errors[0]


@pytest.mark.parametrize(
    "text",
    ["playbook", "pick_up_object(object)", "place_object(task, history) -> action_list"],
)
def test_a_rule_that_is_a_bare_name_is_refused(text: str) -> None:
    for action in (
        {"op": "add_rule", "text": text},
        {"op": "revise_rule", "id": BASE.rules[0].id, "text": text},
    ):
        module, errors, applied = apply([action])
        assert applied == 0
        assert module == BASE
        assert len(errors) == 1
        assert "not a lesson" in errors[0]


SHOWN = """Keep rules short and imperative. Example:
THEN = {"key": ["use key"]}  # a word in an action -> what followed it in successes"""


@pytest.mark.parametrize(
    ("text", "copied"),
    [
        ("THEN = {'key': ['use key']}", True),  # other quotes: still a copy
        ('then={"KEY":["use  key"]}', True),
        ("keep rules short and imperative", True),
        ("A word in an action -> what followed it", True),
        ("short and imperative", False),  # three words: may be a real lesson
        ("use key", False),
        ("Keep rules short and clear.", False),
        ("THEN = {'door': ['open door']}", False),  # the example's form, other knowledge
        ("", False),
    ],
)
def test_copies_prompt_means_four_or_more_words_in_a_row_from_it(text: str, copied: bool) -> None:
    assert copies_prompt(text, SHOWN) is copied


def test_a_rule_copied_from_the_prompt_is_refused_and_the_others_kept() -> None:
    actions = [
        {"op": "add_rule", "text": "THEN = {'key': ['use key']}"},
        {"op": "revise_rule", "id": BASE.rules[0].id, "text": "Keep rules short and imperative."},
        {"op": "add_rule", "text": "Open the fridge first."},
    ]
    module, errors, applied = apply(actions, shown=SHOWN)
    assert applied == 1
    assert [e.split(":")[0] for e in errors] == ["actions[0]", "actions[1]"]
    assert all("copies the prompt's own instructions or example" in e for e in errors)
    assert module.rules[: len(BASE.rules)] == BASE.rules
    assert module.rules[-1].text == "Open the fridge first."
    # Without the prompt's text nothing is a copy.
    _module, errors, applied = apply(actions)
    assert (errors, applied) == ((), 3)


@given(text=st.text(max_size=80), shown=st.text(max_size=200))
def test_a_text_shorter_than_four_words_never_copies(text: str, shown: str) -> None:
    words = re.findall(r"\w+", text)
    if len(words) < 4:
        assert not copies_prompt(text, shown)
    # A passage of four words or more, taken whole, always does.
    shown_words = re.findall(r"\w+", shown)
    if len(shown_words) >= 4:
        assert copies_prompt(" ".join(shown_words[1:]) if len(shown_words) > 4 else shown, shown)


def test_a_rule_may_use_words_that_merely_contain_an_id() -> None:
    # "r1" inside another word, or an id-like token that is no rule's, is fine.
    _module, errors, applied = apply([{"op": "add_rule", "text": "Check r12 and the car1 engine."}])
    assert (errors, applied) == ((), 1)


@pytest.mark.parametrize(
    ("given", "meant"),
    [
        (
            {"task": {"type": "string"}},
            {"type": "object", "properties": {"task": {"type": "string"}}},
        ),
        (
            {"task": "string", "n": "how many"},
            {
                "type": "object",
                "properties": {"task": {"type": "string"}, "n": {"description": "how many"}},
            },
        ),
        ({"properties": {}}, {"type": "object", "properties": {}}),
        ({}, {"type": "object", "properties": {}}),
        ({"type": "object"}, None),
        ({"type": "string"}, None),  # another schema: unclear, left to the function check
        (
            # a list of type names (a local-model reply crashed the bench on it)
            {"rooms": ["string", "null"], "doors": ["left", "right"], "n": []},
            {
                "type": "object",
                "properties": {
                    "rooms": {"type": ["string", "null"]},
                    "doors": {"description": "['left', 'right']"},
                    "n": {"description": "[]"},
                },
            },
        ),
    ],
)
def test_object_schema(given: dict[str, Any], meant: dict[str, Any] | None) -> None:
    assert object_schema(given) == meant


@given(
    st.dictionaries(
        st.text(max_size=6),
        json_values | st.lists(st.sampled_from(["string", "null", "tuple"]), max_size=3),
        max_size=4,
    )
)
def test_object_schema_reads_any_json_parameters_without_raising(
    parameters: dict[str, Any],
) -> None:
    """Whatever JSON a reply gives as ``parameters``, it is read (or left
    alone), never an exception that would end the run."""
    meant = object_schema(parameters)
    if meant is not None:
        assert meant["type"] == "object"
        assert all(isinstance(p, dict) for p in meant["properties"].values())


def test_a_functions_bare_properties_are_read_as_an_object_schema() -> None:
    f = {**fn_json("compute", "return 1"), "parameters": {"task": {"type": "string"}}}
    result = result_of([{"op": "add_function", "function": f}])
    assert result.errors == ()
    compute = result.module.function("compute")
    assert compute is not None
    assert compute.parameters == {"type": "object", "properties": {"task": {"type": "string"}}}
    assert "parameters read as" in result.notes[0]


def _fn(name: str, version: int) -> FunctionSpec:
    return FunctionSpec(
        name=name,
        description=f"v{version}",
        parameters={"type": "object"},
        code=f"def {name}(task, observation, valid_actions, history):\n    return [{version}]\n",
    )


@given(
    before=st.sets(st.sampled_from("abcde")),
    after=st.sets(st.sampled_from("abcde")),
    names=st.sets(st.sampled_from("abcdef")),
)
def test_reverted_functions_are_as_before_and_the_rest_as_after(
    before: set[str], after: set[str], names: set[str]
) -> None:
    old = Module(functions=tuple(_fn(n, 1) for n in sorted(before)))
    new = Module(
        rules=(Rule(id="r1", text="Look first."),),
        functions=tuple(_fn(n, 2) for n in sorted(after)),
    )
    got = revert_functions(old, new, names)
    assert got.rules == new.rules
    for fn in got.functions:
        assert fn == (old.function(fn.name) if fn.name in names else new.function(fn.name))
    assert {f.name for f in got.functions} == {n for n in after if n not in names or n in before}
