"""Edits and merges pinned on exact results: the notes and errors word for word,
each branch's count, and the data merge of functions on hand-worked tables.

Written against the mutants that test_edits.py and test_merge.py let live
(``scripts/mutation.sh fgo_actors/_core/edits.py ...``): each test names the
mistake it catches.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from fgo_actors import Module, Rule
from fgo_actors._core.edits import (
    Drop,
    MergeChild,
    MergeInput,
    apply_actions,
    apply_merge,
    fit_to_cap,
    infer_lineage,
    match_evidence,
    merge_function_data,
    merge_input,
    union_merge,
)
from fgo_actors._core.playbook import plays_of, to_function

from .test_edits import BASE, TRAJ, fn

SCHEMA = {"type": "object", "properties": {}}


def run(actions: list[dict[str, Any]], module: Module = BASE) -> Any:
    return apply_actions(module, actions, subset_id="s001", trajectory_ids=TRAJ)


# -- match_evidence ---------------------------------------------------------------------


def test_the_longest_contained_id_wins_not_the_greatest() -> None:
    """``max(inside, key=len)``: without the key, "b" (greater as a string) would
    win over "a/b", the longer id the entry names."""
    assert match_evidence("see a/b here", ("b", "a/b")) == "a/b"


# -- apply_actions: notes and errors word for word -------------------------------------


def test_evidence_notes_name_the_action_and_what_was_read() -> None:
    """Catches a lost or reworded evidence note, an unmatched id reported as
    "read as None", the whole-subset remark on the wrong branch, and the
    action index lost (``evidence_of(None, ...)``) for added and revised rules."""
    result = run(
        [
            {"op": "add_rule", "text": "Cite the source.", "evidence": ["trajectory t2", "zz"]},
            {"op": "add_rule", "text": "Check twice.", "evidence": ["zz"]},
            {"op": "revise_rule", "id": "r1", "text": "Check it.", "evidence": ["run t3"]},
        ]
    )
    assert result.notes == (
        "actions[0]: evidence 'trajectory t2' read as 't2'",
        "actions[0]: evidence names unknown trajectory ids ['zz'], left out",
        "actions[1]: evidence names unknown trajectory ids ['zz'], left out; "
        "the whole subset is the evidence",
        "actions[2]: evidence 'run t3' read as 't3'",
    )
    assert result.errors == ()
    assert result.applied == 3
    rules = {r.id: r for r in result.module.rules}
    assert rules["s001.r4"].trajectories == ("t2",)
    assert rules["s001.r5"].trajectories == TRAJ
    assert rules["r1"].trajectories == ("t0", "t3")
    assert rules["r1"].subsets == ("s000", "s001")


def test_rule_errors_word_for_word() -> None:
    """Catches reworded refusals, the "use remove_rule" hint given to the wrong
    op or to a non-empty text, and a missing text read as some other word
    (``"None"`` or ``"XXXX"``, a bare name, instead of empty)."""
    result = run(
        [
            {"op": "add_rule"},
            {"op": "revise_rule", "id": "r1", "text": "  "},
            {"op": "revise_rule", "id": "r1", "text": "Use remove_rule on r1."},
            {"op": "add_rule", "text": "playbook"},
            {"op": "add_rule", "text": ""},
        ]
    )
    assert result.errors == (
        "actions[0]: add_rule text is empty",
        "actions[1]: revise_rule text is empty; use remove_rule",
        "actions[2]: revise_rule text names 'remove_rule', a word of these edit "
        "instructions, not of the task: write a lesson about the task",
        "actions[3]: add_rule text is a name, not a lesson: write the rule as a short "
        "sentence about the task",
        "actions[4]: add_rule text is empty",
    )
    assert result.applied == 0
    assert result.notes == ()
    assert result.module == BASE


def test_a_revise_without_an_id_is_noted_with_the_empty_id() -> None:
    """A missing ``id`` reads as ``""``, not ``"None"`` or ``"XXXX"``."""
    result = run([{"op": "revise_rule", "text": "Look before you leap."}])
    assert result.notes == ("actions[0]: revise_rule of unknown rule id '' adds it",)
    assert [r.id for r in result.module.rules] == ["r1", "s001.r3", "s001.r4"]
    assert result.applied == 1


def test_a_revise_that_only_rewords_a_rule_is_not_a_repeat_of_itself() -> None:
    """Revising r1 into its own text in other case and spacing is a revise
    (the new wording and this subset's evidence kept), not a rule that would
    repeat r1 and is skipped."""
    result = run([{"op": "revise_rule", "id": "r1", "text": "check  the INPUT first."}])
    assert result.module.rules[0].text == "check  the INPUT first."
    assert result.module.rules[0].subsets == ("s000", "s001")
    assert result.notes == ()


def test_add_rule_never_revises_even_when_given_an_existing_id() -> None:
    """``old`` is looked up for revise_rule only: an add_rule that carries an
    existing id adds a new rule and leaves that one as it was."""
    result = run([{"op": "add_rule", "id": "r1", "text": "Read the manual."}])
    assert result.module.rules[0] == BASE.rules[0]
    assert [(r.id, r.text) for r in result.module.rules] == [
        ("r1", "Check the input first."),
        ("s001.r3", "Retry on timeout."),
        ("s001.r4", "Read the manual."),
    ]
    assert result.notes == ()


def test_each_action_that_changes_nothing_is_counted() -> None:
    """``unchanged += 1``, not ``= 1``: three no-op actions count three."""
    result = run(
        [
            {"op": "add_rule", "text": "retry  on TIMEOUT."},
            {"op": "remove_rule", "id": "r9"},
            {"op": "remove_function", "name": "nope"},
        ]
    )
    assert result.unchanged == 3
    assert result.applied == 0
    assert result.errors == ()
    assert result.notes == (
        "actions[0]: the module already has this rule as 's001.r3'; skipped",
        "actions[1]: remove_rule of unknown rule id 'r9'; skipped",
        "actions[2]: remove_function of unknown 'nope'; skipped",
    )


PLAYBOOK_FN = {"name": "playbook", "description": "d", "parameters": SCHEMA, "code": "pass"}


@pytest.mark.parametrize(
    "action",
    [
        {"op": "add_function", "function": PLAYBOOK_FN},
        {"op": "revise_function", "function": PLAYBOOK_FN},
        {"op": "remove_function", "name": "playbook"},
    ],
    ids=["add", "revise", "remove"],
)
def test_every_function_op_on_the_playbook_is_refused_and_the_next_action_runs(
    action: dict[str, Any],
) -> None:
    """Each of the three ops on ``playbook`` is refused with the same message,
    whether it names the function in ``function`` or in ``name`` (a misspelt
    op or key would let it through as an edit or a skipped remove), and the
    actions after it still run (``continue``, not ``break``)."""
    op = action["op"]
    result = run([action, {"op": "set_instructions", "text": "Be quick."}])
    assert result.errors == (
        f"actions[0]: {op}: 'playbook' is written from the logs' scores by the "
        "optimizer's code; leave it out of the actions",
    )
    assert result.notes == ()
    assert result.applied == 1
    assert result.module.instructions == "Be quick."
    assert result.module.functions == BASE.functions


def test_an_unknown_op_naming_the_playbook_is_an_unknown_op() -> None:
    """The playbook refusal is for function ops only (``op in (...)``, not ``not in``)."""
    result = run([{"op": "rename", "name": "playbook"}])
    assert result.errors == ("actions[0]: unknown op 'rename'",)


def test_function_op_notes_go_to_their_own_case_only() -> None:
    """``add_function`` of an existing name and ``revise_function`` of an unknown
    one are noted; a plain revise of an existing function or add of a new one
    is not (``and``, not ``or``)."""
    result = run(
        [
            {"op": "revise_function", "function": fn("lookup", "x = 1").to_json()},
            {"op": "add_function", "function": fn("fresh").to_json()},
            {"op": "add_function", "function": fn("search", "y = 2").to_json()},
            {"op": "revise_function", "function": fn("other").to_json()},
        ]
    )
    assert result.notes == (
        "actions[2]: add_function of existing 'search' revises it",
        "actions[3]: revise_function of unknown 'other' adds it",
    )
    assert result.applied == 4
    assert [(f.name, f.code) for f in result.module.functions] == [
        ("lookup", "x = 1"),
        ("search", "y = 2"),
        ("fresh", "pass"),
        ("other", "pass"),
    ]


# -- merge_function_data: data tables united -------------------------------------------


def test_a_single_version_is_regenerated_with_its_own_data() -> None:
    """One version is its own union: reading ``values[1]`` or ``parts[1]`` for
    the first version would fail on it."""
    one = fn("f", "PLACES = ['a', 'b']\ndef f():\n    return PLACES  # shown\n")
    merged = merge_function_data([one])
    assert merged is not None
    assert merged.code == "PLACES = ['a', 'b']\n\ndef f():\n    return PLACES\n"


def test_lists_and_tuples_are_united_in_first_seen_order_and_keep_their_type() -> None:
    """A list stays a list and a tuple a tuple (the type test inverted, or
    always or never taken, would make one the other and the merge fail), and
    the items are every version's, deduplicated, first seen first."""
    a = fn("f", "PLACES = ['a', 'b']\nPAIRS = ('x',)\n", description="first")
    b = fn("f", "PLACES = ['b', 'c']\nPAIRS = ('y', 'x')\n", description="second")
    merged = merge_function_data([a, b])
    assert merged is not None
    assert merged.code == "PLACES = ['a', 'b', 'c']\nPAIRS = ('x', 'y')\n"
    assert merged.description == "first"  # the first version's, not the second's


def test_a_literal_that_is_not_data_is_code_and_the_scan_goes_on() -> None:
    """``NAMES = [len]`` is no constant literal: it joins the code to compare
    (not ``None``), and the data after it is still read (``continue``, not ``break``)."""
    a = fn("f", "NAMES = [len]\nPLACES = {'a': 1}\n")
    b = fn("f", "NAMES = [len]\nPLACES = {'b': 2, 'a': 3}\n")
    merged = merge_function_data([a, b])
    assert merged is not None
    assert merged.code == "NAMES = [len]\nPLACES = {'a': 1, 'b': 2}\n"


def test_only_the_first_assignment_of_a_name_is_the_data() -> None:
    """A second ``X = [...]`` is code shared by both versions: it keeps its own
    value (``and``, not ``or``, picks the statement to rewrite)."""
    a = fn("f", "X = [1]\nX = [9]\n")
    b = fn("f", "X = [2]\nX = [9]\n")
    merged = merge_function_data([a, b])
    assert merged is not None
    assert merged.code == "X = [1, 2]\nX = [9]\n"


# -- infer_lineage ------------------------------------------------------------------------


def rule(rid: str, text: str) -> Rule:
    return Rule(id=rid, text=text, subsets=("s1",), trajectories=("t1",))


def test_lineage_share_is_a_fraction_of_the_candidates_words() -> None:
    """Shared words over the candidate's words: 1 of 4 is weak, 1 of 1 strong
    (a product instead of a quotient would make both strong)."""
    cands = [rule("a", "alpha bravo charlie delta"), rule("b", "omega")]
    assert infer_lineage("alpha omega", cands) == ("b",)


def test_lineage_share_of_exactly_half_is_strong() -> None:
    """``>= 0.5``: two candidates that each share half their words are both
    the lineage (with ``>`` only the greatest id would be)."""
    cands = [rule("a", "alpha bravo"), rule("b", "zulu kilo")]
    assert infer_lineage("alpha zulu", cands) == ("a", "b")


def test_a_weak_best_match_is_still_the_lineage() -> None:
    """With no strong candidate, the one sharing most is it, however small its
    share (not only a share above 1, not never)."""
    cands = [rule("a", "alpha bravo charlie delta"), rule("b", "echo foxtrot golf")]
    assert infer_lineage("alpha hotel", cands) == ("a",)


def test_no_candidate_with_words_is_no_lineage() -> None:
    """Without candidates, or with none that has a content word, there is no
    lineage: not a crash on an empty ``max`` and not the empty id."""
    assert infer_lineage("alpha hotel", []) == ()
    assert infer_lineage("alpha hotel", [rule("a", "a b, to 12")]) == ()


# -- apply_merge: decisions word for word ---------------------------------------------


def size(module: Module) -> int:
    return len(json.dumps(module.to_json())) // 4


CHILD_A = Module(
    instructions="A",
    rules=(rule("s001.r1", "Open the container first."), rule("s001.r2", "Be brief.")),
    functions=(fn("lookup"),),
)
CHILD_B = Module(instructions="A", rules=(rule("s002.r1", "Read the label aloud."),))


def two() -> MergeInput:
    return merge_input([MergeChild("s001", CHILD_A), MergeChild("s002", CHILD_B)], node_id="m7")


def merge(inp: MergeInput, reply: dict[str, Any]) -> Any:
    return apply_merge(inp, reply, node_id="m7", size=size, cap=10_000)


def test_merge_notes_word_for_word_and_every_decision_is_read() -> None:
    """Catches a missing combine text read as a word (``"None"``), reworded
    notes, the unknown ids reported as the known ones, a ``break`` that stops
    at the first ignored decision, and the no-reason drop's wording."""
    result = merge(
        two(),
        {
            "decisions": [
                {"op": "combine", "ids": ["s001.r2"]},
                {"op": "combine", "text": "Fold s001.r1 into s002.r1."},
                {"op": "combine", "ids": ["s001.r1", "zz"], "text": "Open and read first."},
                {"op": "drop", "id": "s001.r1", "reason": "gone"},
                {"op": "merge"},
                {"op": "drop", "id": "s002.r1", "reason": "  "},
            ]
        },
    )
    assert result.notes == (
        "decisions[0]: combine with empty text, ignored",
        "decisions[1]: combine text names 's001.r1', a word of these edit instructions, "
        "not of the task: write a lesson about the task; ignored",
        "decisions[2]: unknown or reused ids ['zz'] ignored",
        "decisions[3]: drop of unknown or reused id 's001.r1' ignored",
        "decisions[4]: unknown op 'merge' ignored",
    )
    assert [(r.id, r.text, r.merged_from) for r in result.module.rules] == [
        ("s001.r2", "Be brief.", ()),
        ("m7.r1", "Open and read first.", ("s001.r1",)),
    ]
    assert result.dropped == (
        Drop(
            "s002.r1",
            ("s002.r1",),
            "merge: dropped by the merge (no reason given)",
            "Read the label aloud.",
        ),
    )
    assert result.errors == ()


def test_a_reply_without_decisions_keeps_every_rule() -> None:
    """A reply with no ``decisions`` key reads as none (not ``None``, which
    cannot be iterated)."""
    result = merge(two(), {})
    assert [r.id for r in result.module.rules] == ["s001.r1", "s001.r2", "s002.r1"]
    assert result.notes == ()
    assert result.dropped == ()


def test_new_ids_skip_child_ids_of_this_nodes_form() -> None:
    """``taken`` holds the child rule ids as well as the candidates (a union,
    not an intersection): a child's ``m7.r1`` collapsed away is not reused."""
    inp = MergeInput(
        rules=(rule("s001.r1", "Open the container first."),),
        covers={"s001.r1": ("s001.r1", "m7.r1")},
        functions=(),
        conflicts=(),
        instructions=(),
        child_rule_ids=("s001.r1", "m7.r1"),
    )
    result = merge(inp, {"decisions": [{"op": "combine", "ids": ["s001.r1"], "text": "Look."}]})
    assert [(r.id, r.merged_from) for r in result.module.rules] == [("m7.r2", ("s001.r1", "m7.r1"))]


def test_a_function_all_children_agree_on_can_be_dropped() -> None:
    """A drop may name any function, agreed on or in conflict (their names'
    union, not intersection); it is recorded, not read as an unknown rule id."""
    both = Module(rules=(), functions=(fn("lookup"),))
    inp = merge_input([MergeChild("s001", CHILD_A), MergeChild("s002", both)], node_id="m7")
    assert [f.name for f in inp.functions] == ["lookup"]
    assert inp.conflicts == ()
    result = merge(inp, {"decisions": [{"op": "drop", "id": "lookup", "reason": "unused"}]})
    assert result.module.functions == ()
    assert result.dropped_functions == (Drop("lookup", (), "merge: unused"),)
    assert result.notes == ()


# -- fit_to_cap: what goes first, and why ---------------------------------------------


def by_parts(module: Module) -> int:
    """A size worked out by hand: 10 per rule, one per character of code and
    of instructions."""
    return (
        10 * len(module.rules)
        + sum(len(f.code) for f in module.functions)
        + len(module.instructions)
    )


def evidence_rule(rid: str, subsets: int, trajectories: int) -> Rule:
    return Rule(
        id=rid,
        text=f"Rule {rid}.",
        subsets=tuple(f"s{i}" for i in range(subsets)),
        trajectories=tuple(f"t{i}" for i in range(trajectories)),
    )


def test_the_cap_cuts_fewest_subsets_then_fewest_trajectories_then_the_later_rule() -> None:
    """40 tokens of rules under a cap of 20: the two weakest go, the later of
    two equals first, each with its evidence in the reason and its covers
    (given, or the rule itself)."""
    module = Module(
        rules=(
            evidence_rule("a", 2, 1),
            evidence_rule("b", 1, 3),
            evidence_rule("c", 1, 1),
            evidence_rule("d", 1, 1),
        )
    )
    fitted, drops, fn_drops = fit_to_cap(
        module, size=by_parts, cap=20, covers={"c": ("x.r1", "y.r1")}
    )
    assert [r.id for r in fitted.rules] == ["a", "b"]
    assert drops == (
        Drop(
            "d",
            ("d",),
            "module cap: 20 tokens; weakest evidence (1 subsets, 1 trajectories)",
            "Rule d.",
        ),
        Drop(
            "c",
            ("x.r1", "y.r1"),
            "module cap: 20 tokens; weakest evidence (1 subsets, 1 trajectories)",
            "Rule c.",
        ),
    )
    assert fn_drops == ()


def test_a_module_exactly_at_the_cap_is_left_whole() -> None:
    module = Module(rules=(evidence_rule("a", 1, 1), evidence_rule("b", 1, 1)))
    assert fit_to_cap(module, size=by_parts, cap=20) == (module, (), ())


def test_with_the_rules_gone_the_largest_function_goes_first() -> None:
    """45 characters of code under a cap of 16: the 30-character function alone
    goes, and the others keep their order."""
    module = Module(functions=(fn("f1", "x" * 5), fn("f2", "y" * 30), fn("f3", "z" * 10)))
    fitted, drops, fn_drops = fit_to_cap(module, size=by_parts, cap=16)
    assert [f.name for f in fitted.functions] == ["f1", "f3"]
    assert drops == ()
    assert fn_drops == (Drop("f2", (), "module cap: 16 tokens; largest function"),)


def test_instructions_are_cut_in_proportion_less_sixteen_and_stripped() -> None:
    """100 characters over a cap of 51: 100 * 51 // 100 - 16 = 35 kept, the
    trailing space stripped."""
    module = Module(instructions="abcd " * 20)
    fitted, drops, fn_drops = fit_to_cap(module, size=by_parts, cap=51)
    assert fitted.instructions == "abcd abcd abcd abcd abcd abcd abcd"
    assert (drops, fn_drops) == ((), ())


def test_the_instructions_cut_keeps_exactly_sixteen_characters_less_than_its_share() -> None:
    """Without spaces to strip: 100 * 51 // 100 - 16 = 35 characters, not 34."""
    fitted, _, _ = fit_to_cap(Module(instructions="x" * 100), size=by_parts, cap=51)
    assert fitted.instructions == "x" * 35


def test_instructions_that_fit_once_the_functions_are_cut_stay_whole() -> None:
    """Dropping the function lands the module exactly on the cap: the
    instructions are not cut as well."""
    module = Module(instructions="x" * 40, functions=(fn("f", "y" * 30),))
    fitted, _, fn_drops = fit_to_cap(module, size=by_parts, cap=40)
    assert fitted.instructions == "x" * 40
    assert fitted.functions == ()
    assert [d.id for d in fn_drops] == ["f"]


def test_instructions_that_can_never_fit_are_cut_to_nothing() -> None:
    """A fixed 40 tokens over a cap of 30: the instructions shrink until none are left."""
    module = Module(instructions="word " * 40)
    fitted, _, _ = fit_to_cap(module, size=lambda m: 40 + len(m.instructions), cap=30)
    assert fitted.instructions == ""


# -- merge_input --------------------------------------------------------------------------


def test_merge_input_collapses_by_text_and_renumbers_past_every_child_id() -> None:
    """Same text (any case or spacing) is one candidate with a new id past the
    children's own ``m7.r<n>``; an id two children hold with different texts
    keeps it for the first and gets a new one for the second; instructions
    are deduplicated after stripping, blanks left out."""
    a = Module(
        instructions=" Be kind. ",
        rules=(rule("m7.r4", "Open the box."), rule("r1", "Look around.")),
    )
    b = Module(
        instructions="Be kind.",
        rules=(rule("s002.r1", "open  the BOX."), rule("r1", "Look up.")),
    )
    c = Module(instructions="  ", rules=(rule("s003.r1", "Wait."),))
    inp = merge_input(
        [MergeChild("m7", a), MergeChild("s002", b), MergeChild("s003", c)], node_id="m7"
    )
    assert [(r.id, r.text, r.merged_from) for r in inp.rules] == [
        ("m7.r5", "Open the box.", ("m7.r4", "s002.r1")),
        ("r1", "Look around.", ()),
        ("m7.r6", "Look up.", ("r1",)),
        ("s003.r1", "Wait.", ()),
    ]
    assert dict(inp.covers) == {
        "m7.r5": ("m7.r4", "s002.r1"),
        "r1": ("r1",),
        "m7.r6": ("r1",),
        "s003.r1": ("s003.r1",),
    }
    assert inp.instructions == ("Be kind.",)
    assert inp.child_rule_ids == ("m7.r4", "r1", "s002.r1", "s003.r1")


def test_merge_input_sorts_functions_into_agreed_united_and_conflicting() -> None:
    """The same code is one function; data-only differences are united; any
    other difference is a conflict listing each distinct version once."""
    a = Module(functions=(fn("same"), fn("data", "T = [1]\n"), fn("code", "x = 1\n")))
    b = Module(functions=(fn("same"), fn("data", "T = [2]\n"), fn("code", "y = 1\n")))
    c = Module(functions=(fn("code", "x = 1\n"),))
    inp = merge_input([MergeChild("a", a), MergeChild("b", b), MergeChild("c", c)], node_id="m")
    assert [(f.name, f.code) for f in inp.functions] == [("same", "pass"), ("data", "T = [1, 2]\n")]
    assert [(c.name, [(cid, v.code) for cid, v in c.versions]) for c in inp.conflicts] == [
        ("code", [("a", "x = 1\n"), ("b", "y = 1\n")])
    ]


def test_merge_input_unites_two_playbooks_by_adding_their_counts() -> None:
    """Two ``playbook`` versions are one table (counts added), not a conflict."""
    one = to_function({("take {x}",): {"key": 1}})
    other = to_function({("take {x}",): {"key": 2, "map": 1}})
    inp = merge_input(
        [MergeChild("a", Module(functions=(one,))), MergeChild("b", Module(functions=(other,)))],
        node_id="m",
    )
    assert inp.conflicts == ()
    assert [plays_of(f) for f in inp.functions] == [{("take {x}",): {"key": 3, "map": 1}}]


# -- apply_merge: functions and instructions -----------------------------------------------


def conflicted() -> MergeInput:
    a = Module(instructions="Be kind.", functions=(fn("code", "x = 1\n"), fn("other", "a = 1\n")))
    b = Module(instructions="Be quick.", functions=(fn("code", "y = 1\n"), fn("other", "b = 1\n")))
    return merge_input([MergeChild("a", a), MergeChild("b", b)], node_id="m")


def test_reply_functions_resolve_conflicts_and_the_rest_goes_to_the_stronger_child() -> None:
    """A conflict resolved in ``functions`` takes that version; a name given
    twice is an error, a name not in conflict a note; an unresolved conflict
    keeps the version of the child with most successes, noted."""
    reply = {
        "functions": [
            fn("code", "z = 1\n").to_json(),
            fn("code", "w = 1\n").to_json(),
            fn("lookup").to_json(),
        ]
    }
    result = apply_merge(
        conflicted(), reply, node_id="m", size=size, cap=10_000, successes={"a": 1, "b": 4}
    )
    assert [(f.name, f.code) for f in result.module.functions] == [
        ("code", "z = 1\n"),
        ("other", "b = 1\n"),
    ]
    assert result.errors == ("functions[1]: 'code' given twice",)
    assert result.notes == (
        "functions[2]: 'lookup' is not in conflict, ignored",
        "function 'other': conflict unresolved, kept b's version",
    )


def test_the_fallback_resolves_conflicts_by_successes() -> None:
    """``union_merge`` passes ``successes`` on: the child with more wins."""
    result = union_merge(conflicted(), node_id="m", size=size, cap=10_000, successes={"a": 2})
    assert [(f.name, f.code) for f in result.module.functions] == [
        ("code", "x = 1\n"),
        ("other", "a = 1\n"),
    ]


def test_a_dropped_conflicting_function_stays_dropped() -> None:
    """A drop of a function in conflict removes it (no version is kept for it),
    once however often it is named, with the default reason when none is given."""
    reply = {
        "decisions": [{"op": "drop", "id": "code"}, {"op": "drop", "id": "code", "reason": "x"}],
        "functions": [fn("other", "c = 1\n").to_json()],
    }
    result = apply_merge(conflicted(), reply, node_id="m", size=size, cap=10_000)
    assert [(f.name, f.code) for f in result.module.functions] == [("other", "c = 1\n")]
    assert result.dropped_functions == (
        Drop("code", (), "merge: dropped by the merge (no reason given)"),
    )
    assert result.notes == ()


def test_differing_instructions_take_the_replys_else_all_of_them() -> None:
    inp = conflicted()
    assert inp.instructions == ("Be kind.", "Be quick.")
    given = apply_merge(inp, {"instructions": " Be both. "}, node_id="m", size=size, cap=10_000)
    assert given.module.instructions == "Be both."
    none = apply_merge(inp, {"instructions": None}, node_id="m", size=size, cap=10_000)
    assert none.module.instructions == "Be kind.\n\nBe quick."


def test_one_instructions_text_is_kept_whatever_the_reply_says() -> None:
    result = merge(two(), {"instructions": "Ignore me."})
    assert result.module.instructions == "A"


def test_drops_past_the_share_are_noted_with_the_limit() -> None:
    """Three candidates at the default share of 0.5: one drop; the second is
    noted with the limit and its rule kept."""
    result = merge(
        two(),
        {
            "decisions": [
                {"op": "drop", "id": "s001.r1", "reason": "vague"},
                {"op": "drop", "id": "s001.r2", "reason": "vague"},
            ]
        },
    )
    assert result.notes == ("decisions[1]: drop of 's001.r2' ignored: at most 1 drops",)
    assert [r.id for r in result.module.rules] == ["s001.r2", "s002.r1"]
    assert result.dropped == (
        Drop("s001.r1", ("s001.r1",), "merge: vague", "Open the container first."),
    )
    assert result.dropped_rules == ("s001.r1",)


def test_each_revise_that_would_repeat_a_rule_is_counted() -> None:
    """``unchanged += 1`` on the revise branch too: two count two."""
    result = run(
        [
            {"op": "revise_rule", "id": "r1", "text": "Retry on timeout."},
            {"op": "revise_rule", "id": "r1", "text": "retry on  timeout."},
        ]
    )
    assert result.unchanged == 2
    assert result.applied == 0
    assert result.notes == (
        "actions[0]: revise_rule would make 'r1' repeat 's001.r3'; skipped",
        "actions[1]: revise_rule would make 'r1' repeat 's001.r3'; skipped",
    )
    assert result.module == BASE


def test_combining_one_rule_into_its_own_text_is_a_keep_and_the_next_decision_runs() -> None:
    """One source with the same text (any case or spacing) makes no new rule
    (``len(src) == 1``), and the decisions after it still apply (``continue``)."""
    result = merge(
        two(),
        {
            "decisions": [
                {"op": "combine", "ids": ["s001.r2"], "text": "be  BRIEF."},
                {"op": "drop", "id": "s002.r1", "reason": "narrow"},
            ]
        },
    )
    assert [r.id for r in result.module.rules] == ["s001.r1", "s001.r2"]
    assert [d.id for d in result.dropped] == ["s002.r1"]
    assert result.notes == ()


def test_an_unknown_op_naming_a_function_drops_nothing() -> None:
    """Only ``drop`` drops a function: another op naming one is an unknown op."""
    result = merge(two(), {"decisions": [{"op": "remove", "id": "lookup"}]})
    assert [f.name for f in result.module.functions] == ["lookup"]
    assert result.dropped_functions == ()
    assert result.notes == ("decisions[0]: unknown op 'remove' ignored",)


def test_a_drop_without_an_id_is_noted_with_the_empty_id() -> None:
    """A missing ``id`` reads as ``""``: not ``"None"`` or ``"XXXX"``, which
    might name a rule or a function (here functions are named so)."""
    odd = Module(functions=(fn("None"), fn("XXXX")))
    inp = merge_input([MergeChild("s001", CHILD_A), MergeChild("s002", odd)], node_id="m7")
    result = merge(inp, {"decisions": [{"op": "drop", "reason": "why"}]})
    assert result.notes == ("decisions[0]: drop of unknown or reused id '' ignored",)
    assert [f.name for f in result.module.functions] == ["lookup", "None", "XXXX"]
    assert result.dropped == result.dropped_functions == ()


def test_a_drop_of_an_id_that_is_a_rule_and_a_function_drops_the_rule() -> None:
    """A rule id wins over a function of the same name (the ``id`` is looked
    up in the pool, not some other key)."""
    both = Module(
        rules=(rule("lookup", "Look it up."), rule("r2", "Wait.")), functions=(fn("lookup"),)
    )
    inp = merge_input([MergeChild("s001", both)], node_id="m7")
    result = merge(inp, {"decisions": [{"op": "drop", "id": "lookup", "reason": "narrow"}]})
    assert [r.id for r in result.module.rules] == ["r2"]
    assert [f.name for f in result.module.functions] == ["lookup"]
    assert result.dropped == (Drop("lookup", ("lookup",), "merge: narrow", "Look it up."),)
    assert result.dropped_functions == ()


def test_decisions_after_an_ignored_drop_still_apply_and_a_drop_needs_no_reason() -> None:
    """A drop past the share is skipped (``continue``, not ``break``); a drop
    with no ``reason`` key gets the stated default, not ``"None"``."""
    result = merge(
        two(),
        {
            "decisions": [
                {"op": "drop", "id": "s001.r1"},
                {"op": "drop", "id": "s001.r2"},
                {"op": "combine", "ids": ["s001.r2", "s002.r1"], "text": "Be brief and read."},
            ]
        },
    )
    assert result.dropped == (
        Drop(
            "s001.r1",
            ("s001.r1",),
            "merge: dropped by the merge (no reason given)",
            "Open the container first.",
        ),
    )
    assert [(r.id, r.merged_from) for r in result.module.rules] == [
        ("m7.r1", ("s001.r2", "s002.r1"))
    ]


def test_functions_after_one_not_in_conflict_are_still_read() -> None:
    """An ignored function is skipped (``continue``): the resolution after it applies."""
    reply = {"functions": [fn("lookup").to_json(), fn("code", "z = 1\n").to_json()]}
    result = apply_merge(conflicted(), reply, node_id="m", size=size, cap=10_000)
    assert [(f.name, f.code) for f in result.module.functions] == [
        ("code", "z = 1\n"),
        ("other", "a = 1\n"),
    ]
    assert result.notes == (
        "functions[0]: 'lookup' is not in conflict, ignored",
        "function 'other': conflict unresolved, kept a's version",
    )


def test_a_child_missing_from_successes_counts_none() -> None:
    """A child the map does not name has 0 successes (not 1): one success wins."""
    result = union_merge(conflicted(), node_id="m", size=size, cap=10_000, successes={"b": 1})
    assert [f.code for f in result.module.functions] == ["y = 1\n", "b = 1\n"]


def test_a_cut_that_lands_exactly_on_the_cap_stops_there() -> None:
    """15 tokens under a cap of 5: the rule's 10 go, the function's 5 fit
    exactly and stay (``total > cap``, not ``>=``)."""
    module = Module(rules=(evidence_rule("a", 1, 1),), functions=(fn("f", "x" * 5),))
    fitted, drops, fn_drops = fit_to_cap(module, size=by_parts, cap=5)
    assert fitted.rules == ()
    assert [f.name for f in fitted.functions] == ["f"]
    assert [d.id for d in drops] == ["a"]
    assert fn_drops == ()


def test_children_without_instructions_merge_to_none() -> None:
    """No child has instructions: the result has none (``""``), whatever the reply says."""
    inp = merge_input([MergeChild("a", Module()), MergeChild("b", Module())], node_id="m")
    assert inp.instructions == ()
    result = apply_merge(inp, {"instructions": "New."}, node_id="m", size=size, cap=10_000)
    assert result.module.instructions == ""


def test_duplicates_are_found_by_lower_case_not_upper_case() -> None:
    """``_norm`` lowers: "Straße" and "STRASSE" differ (upper-casing would make
    both "STRASSE" and skip the second rule as a repeat)."""
    module = Module(rules=(rule("r1", "Take the Straße."),))
    result = run([{"op": "add_rule", "text": "Take the STRASSE."}], module)
    assert [r.text for r in result.module.rules] == ["Take the Straße.", "Take the STRASSE."]
    assert result.notes == ()


def test_collapsed_duplicates_unite_their_provenance() -> None:
    """One candidate for two same-text rules holds both subsets and all trajectories."""
    a = Module(rules=(Rule(id="a.r1", text="Look.", subsets=("s1",), trajectories=("t1", "t2")),))
    b = Module(rules=(Rule(id="b.r1", text="look.", subsets=("s2",), trajectories=("t2", "t3")),))
    inp = merge_input([MergeChild("a", a), MergeChild("b", b)], node_id="m")
    assert [(r.id, r.subsets, r.trajectories) for r in inp.rules] == [
        ("m.r1", ("s1", "s2"), ("t1", "t2", "t3"))
    ]
