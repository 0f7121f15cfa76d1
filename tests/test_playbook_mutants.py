"""Playbooks pinned on hand-worked plays: the shared run, the lead-up and its
limits, the rewarded turns, the order of a merged table, and every table
the parser must refuse.

Written against the mutants that test_playbook.py lets live
(``scripts/mutation.sh fgo_actors/_core/playbook.py tests/test_playbook.py``):
each test names the mistake it catches.
"""

from __future__ import annotations

import pytest

from fgo_actors import FunctionSpec, Module
from fgo_actors._core.model import Turn
from fgo_actors._core.playbook import (
    PLAYBOOK,
    Plays,
    _longest_run,
    _rewarded,
    candidate_plays,
    is_playbook,
    merge_functions,
    merge_plays,
    mine,
    plays_of,
    to_function,
    with_plays,
)


def turn(played: tuple[str, ...], score: float | None) -> Turn:
    return Turn(observation="o", valid_actions=played, played=played, score=score)


# -- the shared run -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "run"),
    [
        ("take red ball", "put red ball in box", (1, 2)),
        ("a b c", "a b c", (0, 0)),  # all command: nothing shared past it
        ("open x y", "open z x y", (1, 2)),  # the same words at other places count
        ("pick up red cup", "pick up red box", (0, 0)),  # the common start is the command
        ("go to the box", "take the box", (2, 2)),
        ("x", "y", (0, 0)),
    ],
)
def test_longest_run(a: str, b: str, run: tuple[int, int]) -> None:
    assert _longest_run(a.split(), b.split()) == run


# -- candidate plays ------------------------------------------------------------------------


def test_the_lead_up_is_the_last_naming_action_and_the_last_two_related_since() -> None:
    """After ``pick up vial``: ``open freezer``, ``check freezer`` (twice, kept
    once) and ``close freezer`` each share more than half their words with
    the rest of ``put vial in freezer``; ``open the freezer door`` shares one
    of three, ``look around`` none. At most MAX_LEADUP (3) steps before the
    rewarded one: the last two related ones. The other object, ``freezer``,
    comes second (equal length, seen later)."""
    earlier = [
        "pick up vial",
        "open freezer",
        "look around",
        "open the freezer door",
        "check freezer",
        "check freezer",
        "close freezer",
    ]
    assert candidate_plays("put vial in freezer", earlier) == [
        (("pick up {x}", "check freezer", "close freezer", "put {x} in freezer"), "vial"),
        (("close {x}", "put vial in {x}"), "freezer"),
    ]


def test_the_longest_object_comes_first() -> None:
    earlier = ["take dirty red shirt", "open laundry basket"]
    assert candidate_plays("put dirty red shirt in laundry basket", earlier) == [
        (("take {x}", "open laundry basket", "put {x} in laundry basket"), "dirty red shirt"),
        (("open {x}", "put dirty red shirt in {x}"), "laundry basket"),
    ]


def test_an_object_of_more_than_eight_words_is_none() -> None:
    """MAX_SLOT_WORDS is 8: eight words are an object, nine are not."""
    eight = "a b c d e f g h"
    assert candidate_plays(f"put {eight} in box", [f"take {eight}"]) == [
        (("take {x}", "put {x} in box"), eight)
    ]
    assert candidate_plays(f"put {eight} i in box", [f"take {eight} i"]) == []


def test_a_play_must_differ_from_the_action_that_named_its_object() -> None:
    """The whole rewarded action shared is no object; neither is one named by
    the same command; nor a play whose rewarded step is the command alone."""
    assert candidate_plays("take key", ["take key"]) == []
    assert candidate_plays("take red key", ["take blue key"]) == []
    assert candidate_plays("use key", ["look at key"]) == []


def test_no_earlier_actions_no_plays() -> None:
    assert candidate_plays("put vial in freezer", []) == []


# -- rewarded turns -------------------------------------------------------------------------------


def test_rewarded_actions_take_the_score_to_a_new_high() -> None:
    """Scored 0.5 first (from 0): rewarded. The same 0.5, a rise under 1e-9,
    a fall and an unscored turn are not; 0.75 is. Each rewarded action comes
    with every action before it, its own turn's earlier ones included; a turn
    that played nothing is skipped."""
    turns = [
        turn((), 0.5),
        turn(("a", "b"), 0.5),
        turn(("c",), None),
        turn(("d", "e"), 0.5 + 1e-10),
        turn(("f",), 0.25),
        turn(("g",), 0.75),
    ]
    assert list(_rewarded(turns)) == [("b", ["a"]), ("g", ["a", "b", "c", "d", "e", "f"])]


def test_a_zero_score_rewards_nothing() -> None:
    assert list(_rewarded([turn(("a",), 0.0), turn(("b",), -1.0)])) == []


# -- mining ---------------------------------------------------------------------------------------


def episode(obj: str) -> list[Turn]:
    return [turn((f"take {obj}",), 0.0), turn((f"put {obj} in box",), 1.0)]


def test_mine_counts_each_object_once_per_episode() -> None:
    """Two episodes with ``ball``, one with ``cup``: 2 and 1; a repeat within
    one episode counts once."""
    twice = [*episode("ball"), turn(("take ball",), 1.0), turn(("put ball in box",), 2.0)]
    assert mine([episode("ball"), twice, episode("cup")]) == {
        ("take {x}", "put {x} in box"): {"ball": 2, "cup": 1}
    }


def test_mine_reads_an_ambiguous_object_by_the_play_that_recurs() -> None:
    """In the last episode ``used tissue`` or ``trash can`` could be the
    object; the play ``take {x}`` / ``open trash can`` / ``put {x} in trash
    can`` recurs in all three episodes, so the tissue it is."""

    def ep(obj: str) -> list[Turn]:
        return [
            turn((f"take {obj}",), 0.0),
            turn(("open trash can",), 0.0),
            turn((f"put {obj} in trash can",), 1.0),
        ]

    play = ("take {x}", "open trash can", "put {x} in trash can")
    assert mine([ep("old box"), ep("paper"), ep("used tissue")]) == {
        play: {"old box": 1, "paper": 1, "used tissue": 1}
    }


def test_an_episode_without_plays_adds_nothing() -> None:
    assert mine([[turn(("look",), 1.0)], []]) == {}


# -- merging tables --------------------------------------------------------------------------------


def test_merge_plays_adds_counts_and_orders_most_seen_first() -> None:
    """Rows by their total (then steps), objects by count (then name); counts
    given as other numbers are read as int."""
    a: Plays = {("x {x}",): {"b": 1, "a": 1}, ("y {x}",): {"c": 3}}
    b: Plays = {("x {x}",): {"a": 2}, ("z {x}",): {"d": 1, "e": 2}}
    merged = merge_plays([a, b])
    assert merged == {
        ("x {x}",): {"a": 3, "b": 1},
        ("y {x}",): {"c": 3},
        ("z {x}",): {"e": 2, "d": 1},
    }
    assert [list(row) for row in merged.values()] == [["a", "b"], ["c"], ["e", "d"]]
    assert list(merged) == [("x {x}",), ("y {x}",), ("z {x}",)]
    assert merge_plays([{("w {x}",): {"k": True}}, {("w {x}",): {"k": 2}}]) == {
        ("w {x}",): {"k": 3}
    }


def test_merge_plays_cuts_the_least_seen_objects_at_the_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a cap of 3: the three most seen cells stay, ties broken by steps
    then object; a row left empty goes."""
    monkeypatch.setattr("fgo_actors._core.playbook.MAX_OBJECTS", 3)
    table: Plays = {
        ("a {x}",): {"p": 5, "q": 1},
        ("b {x}",): {"r": 1, "s": 1},
        ("c {x}",): {"t": 1},
    }
    assert merge_plays([table]) == {("a {x}",): {"p": 5, "q": 1}, ("b {x}",): {"r": 1}}


# -- the function and its table ------------------------------------------------------------------


def test_to_function_describes_its_table_and_holds_it_as_data() -> None:
    table = {("take {x}", "put {x} in box"): {"ball": 2, "cup": 1}, ("eat {x}",): {"pie": 1}}
    f = to_function(table)
    assert f.name == PLAYBOOK
    assert f.description == (
        "Offers again, for objects like the ones it was seen with, the action "
        "sequences that earned score in the logs (2 sequences, 3 objects)."
    )
    assert (
        "PLAYS = {('take {x}', 'put {x} in box'): {'ball': 2, 'cup': 1}, "
        "('eat {x}',): {'pie': 1}}\n" in f.code
    )
    assert f.parameters["required"] == ["task", "observation", "valid_actions", "history"]
    assert plays_of(f) == table
    assert is_playbook(f)


def test_plays_of_is_a_copy() -> None:
    f = to_function({("go {x}",): {"n": 1}})
    table = plays_of(f)
    assert table is not None
    table[("go {x}",)]["n"] = 99
    assert plays_of(f) == {("go {x}",): {"n": 1}}


def code_fn(code: str, name: str = PLAYBOOK) -> FunctionSpec:
    return FunctionSpec(name=name, description="d", parameters={"type": "object"}, code=code)


@pytest.mark.parametrize(
    "code",
    [
        "PLAYS = {",  # not Python
        "PLAYS = [('a',)]",  # not a dict
        "PLAYS = {('a',): {'x': y}}",  # not a literal
        "PLAYS = {'a': {'x': 1}}",  # steps not a tuple
        "PLAYS = {('a', 1): {'x': 1}}",  # a step not text
        "PLAYS = {('a',): [1]}",  # a row not a dict
        "PLAYS = {('a',): {1: 1}}",  # an object not text
        "PLAYS = {('a',): {'x': 1.5}}",  # a count not a whole number
        "A = PLAYS = {('a',): {'x': 1}}",  # two targets: not the table
        "PLAYS.x = {('a',): {'x': 1}}",  # not a plain name
        "TABLE = {('a',): {'x': 1}}",  # another name
        "def f():\n    PLAYS = {('a',): {'x': 1}}",  # not at the top level
    ],
)
def test_a_table_that_is_not_one_is_no_playbook(code: str) -> None:
    f = code_fn(code)
    assert plays_of(f) is None
    assert not is_playbook(f)


def test_the_first_table_found_after_other_statements_is_read() -> None:
    f = code_fn("import re\nX = 1\nPLAYS = {('a',): {'x': 1}}\nPLAYS = {('b',): {'y': 2}}\n")
    assert plays_of(f) == {("a",): {"x": 1}}


def test_a_table_under_another_name_is_not_a_playbook() -> None:
    f = code_fn("PLAYS = {('a',): {'x': 1}}", name="other")
    assert plays_of(f) is None
    assert not is_playbook(f)


def test_merge_functions_unites_tables_or_refuses_a_non_playbook() -> None:
    a = to_function({("go {x}",): {"n": 1}})
    b = to_function({("go {x}",): {"n": 2, "s": 1}})
    merged = merge_functions([a, b])
    assert merged is not None
    assert plays_of(merged) == {("go {x}",): {"n": 3, "s": 1}}
    assert merge_functions([a, code_fn("PLAYS = 1")]) is None


# -- with_plays -----------------------------------------------------------------------------------


def test_with_plays_adds_a_playbook_last_and_leaves_the_rest() -> None:
    other = code_fn("pass", name="lookup")
    module = Module(instructions="i", functions=(other,))
    new = with_plays(module, [episode("ball")])
    assert new.instructions == "i"
    assert [f.name for f in new.functions] == ["lookup", PLAYBOOK]
    assert plays_of(new.functions[1]) == {("take {x}", "put {x} in box"): {"ball": 1}}


def test_with_plays_adds_to_the_existing_table_and_moves_it_last() -> None:
    old = to_function({("take {x}", "put {x} in box"): {"cup": 3}})
    module = Module(functions=(old, code_fn("pass", name="lookup")))
    new = with_plays(module, [episode("ball"), episode("cup")])
    assert [f.name for f in new.functions] == ["lookup", PLAYBOOK]
    assert plays_of(new.functions[1]) == {("take {x}", "put {x} in box"): {"cup": 4, "ball": 1}}


def test_with_plays_without_plays_or_with_a_users_playbook_changes_nothing() -> None:
    module = Module(functions=(code_fn("pass", name="lookup"),))
    assert with_plays(module, [[turn(("look",), 1.0)]]) is module
    users = Module(functions=(code_fn("def playbook(): pass"),))
    assert with_plays(users, [episode("ball")]) is users
