"""Playbooks: plays mined from scores, merged by counts, replayed in the sandbox.

The episodes here are a made-up lab (vials, freezers, shelves), not any
environment FGO ships with: the mining must not depend on a vocabulary.
"""

from __future__ import annotations

import ast
import json
from typing import Any

import attrs
import hypothesis.strategies as st
from hypothesis import given, settings

from fgo_actors import Module, Rule
from fgo_actors._core.edits import MergeChild, apply_actions, apply_merge, merge_input
from fgo_actors._core.model import Outcome, Step, Trajectory, Turn, turns_of
from fgo_actors._core.playbook import (
    MAX_OBJECTS,
    PLAYBOOK,
    _longest_run,
    _rewarded,
    candidate_plays,
    merge_plays,
    mine,
    plays_of,
    to_function,
    with_plays,
)
from fgo_actors._core.prompts import module_for_prompt, render_module
from fgo_actors.agent.fncheck import static_problems
from fgo_actors.agent.sandbox import run_function

PLACES = {"vial": "freezer", "flask": "shelf", "glove": "bin"}


def _episode(objects: list[str], *, noise: bool = False) -> list[Turn]:
    """Pick up each object (scored), open its place, store it there (scored)."""
    turns: list[Turn] = []
    score = 0.0
    step = 1.0 / (2 * len(objects))
    if noise:
        turns.append(Turn("a lab", ("look around", "wait"), ("look around",), 0.0))
    for obj in objects:
        place = PLACES[obj.split()[-1]]
        score += step
        turns.append(Turn("lab", (f"pick up {obj}",), (f"pick up {obj}",), score))
        turns.append(Turn("lab", (f"open {place}",), (f"open {place}",), score))
        score += step
        turns.append(Turn("lab", (f"store {obj} in {place}",), (f"store {obj} in {place}",), score))
    return turns


def _trajectory(i: int, turns: list[Turn]) -> Trajectory:
    steps = [Step(role="system", content="You are a lab robot.")]
    for t in turns:
        steps.append(
            Step(role="user", content=t.observation, extra={"valid_actions": list(t.valid_actions)})
        )
        steps.append(
            Step(
                role="assistant",
                content=t.played[0],
                extra={"played": list(t.played), "score": t.score},
            )
        )
    return Trajectory(
        id=f"lab{i}",
        task="tidy the lab",
        steps=tuple(steps),
        outcome=Outcome(success=True, score=1.0),
    )


def test_a_play_is_the_object_its_lead_up_and_the_rewarded_action() -> None:
    earlier = ["look around", "pick up red vial", "open freezer"]
    plays = candidate_plays("store red vial in freezer", earlier)
    assert plays[0] == (("pick up {x}", "open freezer", "store {x} in freezer"), "red vial")


def test_a_shared_command_word_is_not_an_object() -> None:
    assert candidate_plays("pick up red vial", ["pick up blue flask"]) == []


def test_mining_reads_the_varying_object_not_the_recurring_place() -> None:
    # "store used glove in bin" shares "used glove" with "pick up used glove"
    # and "bin" with "open bin"; over many episodes the object is what varies.
    episodes = [_episode([f"{c} vial", "used glove"]) for c in ("red", "blue", "green")]
    plays = mine(episodes)
    assert ("pick up {x}", "open bin", "store {x} in bin") in plays
    assert plays[("pick up {x}", "open freezer", "store {x} in freezer")] == {
        "blue vial": 1,
        "green vial": 1,
        "red vial": 1,
    }
    assert all("used glove" not in " ".join(steps) for steps in plays)


def test_points_won_back_after_a_loss_are_not_a_play() -> None:
    turns = [
        Turn("", (), ("pick up red vial",), 0.5),
        Turn("", (), ("drop red vial",), 0.0),
        Turn("", (), ("pick up red vial",), 0.5),
    ]
    assert mine([turns]) == {}


def test_turns_are_read_from_recorded_trajectories() -> None:
    traj = _trajectory(0, _episode(["red vial"], noise=True))
    assert mine([turns_of(traj)]) == {
        ("pick up {x}", "open freezer", "store {x} in freezer"): {"red vial": 1}
    }


_tables = st.lists(
    st.dictionaries(
        st.tuples(st.sampled_from(["take {x}", "open a", "put {x} in a", "put {x} in b"])),
        st.dictionaries(st.text("abc ", min_size=1, max_size=6), st.integers(1, 5), max_size=8),
        max_size=4,
    ),
    max_size=5,
)


@given(_tables)
@settings(max_examples=200, deadline=None)
def test_merging_adds_counts_whatever_the_order(tables: list[dict[Any, dict[str, int]]]) -> None:
    merged = merge_plays(tables)
    assert merged == merge_plays(reversed(tables))
    assert sum(len(row) for row in merged.values()) <= MAX_OBJECTS
    for steps, row in merged.items():
        for obj, n in row.items():
            assert n == sum(t.get(steps, {}).get(obj, 0) for t in tables)


def test_the_cap_keeps_the_most_seen_objects() -> None:
    table: dict[tuple[str, ...], dict[str, int]] = {
        ("take {x}", "put {x} in a"): {f"o{i}": 1 + (i % 3) for i in range(MAX_OBJECTS + 50)}
    }
    merged = merge_plays([table])
    row = merged[("take {x}", "put {x} in a")]
    assert len(row) == MAX_OBJECTS
    assert sum(1 for n in row.values() if n == 3) == (MAX_OBJECTS + 50 + 2) // 3


def test_the_function_round_trips_and_passes_the_static_checks() -> None:
    plays = mine([_episode(["red vial", "clean flask"])])
    fn = to_function(plays)
    assert fn.name == PLAYBOOK
    assert plays_of(fn) == plays
    assert static_problems(fn) == []
    ast.parse(fn.code)


async def test_the_function_offers_plays_for_new_objects_by_analogy_in_the_sandbox() -> None:
    pairs = [("red", "small"), ("blue", "large"), ("green", "empty"), ("pink", "round")]
    episodes = [_episode([f"{a} vial", f"{b} flask"]) for a, b in pairs]
    fn = to_function(mine(episodes))
    arguments: dict[str, Any] = {
        "task": "tidy the lab",
        "observation": "You see a cracked vial, a tall flask, a freezer and a shelf.",
        "valid_actions": [
            "look around",
            "pick up cracked vial",
            "pick up tall flask",
            "open freezer",
        ],
        "history": [],
    }
    result = await run_function(fn.code, fn.name, arguments)
    assert result.ok, result.error
    assert sorted(result.value) == [
        ["pick up cracked vial", "open freezer", "store cracked vial in freezer"],
        ["pick up tall flask", "store tall flask in shelf"],
    ]
    # Holding the vial, with the freezer open: only the last step is left.
    arguments["valid_actions"] = ["store cracked vial in freezer", "store cracked vial in shelf"]
    history = [["pick up cracked vial", "ok"], ["open freezer", "ok"]]
    arguments["history"] = history
    result = await run_function(fn.code, fn.name, arguments)
    assert result.ok
    assert result.value == [["store cracked vial in freezer"]]
    # Put away: not offered again.
    history.append(["store cracked vial in freezer", "ok"])
    arguments["valid_actions"] = ["pick up cracked vial"]
    result = await run_function(fn.code, fn.name, arguments)
    assert result.ok
    assert result.value == []


def test_with_plays_adds_to_an_existing_playbook_and_leaves_a_users_function_alone() -> None:
    once = with_plays(Module(), [_episode(["red vial"])])
    twice = with_plays(once, [_episode(["red vial"])])
    table = plays_of(twice.functions[0])
    assert table is not None
    assert table[("pick up {x}", "open freezer", "store {x} in freezer")] == {"red vial": 2}
    assert with_plays(Module(), [[]]) == Module()
    theirs = attrs.evolve(to_function({}), code="def playbook(**kw):\n    return []\n")
    user = Module(functions=(theirs,))
    assert with_plays(user, [_episode(["red vial"])]) == user


def test_the_llm_does_not_see_the_playbook_and_may_not_edit_it() -> None:
    module = with_plays(Module(rules=(Rule(id="r1", text="Be tidy."),)), [_episode(["red vial"])])
    assert module_for_prompt(module)["functions"] == []
    assert PLAYBOOK not in render_module(module)
    for action in (
        {"op": "remove_function", "name": PLAYBOOK},
        {"op": "revise_function", "function": {**module.functions[0].to_json()}},
    ):
        result = apply_actions(module, [action], subset_id="s", trajectory_ids=["lab0"])
        assert result.module == module
        assert any("playbook" in e for e in result.errors)


def test_a_merge_unites_the_childrens_playbooks_and_cannot_drop_them() -> None:
    a = with_plays(Module(), [_episode(["red vial"])])
    b = with_plays(Module(), [_episode(["blue vial"]), _episode(["red vial"])])
    inp = merge_input([MergeChild("a", a), MergeChild("b", b)], node_id="m")
    assert inp.conflicts == ()
    reply = {"decisions": [{"op": "drop", "id": PLAYBOOK, "reason": "too narrow"}]}
    result = apply_merge(
        inp, reply, node_id="m", size=lambda m: len(json.dumps(module_for_prompt(m))), cap=10_000
    )
    (fn,) = result.module.functions
    assert plays_of(fn) == {
        ("pick up {x}", "open freezer", "store {x} in freezer"): {"red vial": 2, "blue vial": 1}
    }
    assert result.dropped_functions == ()


def _longest_run_spec(a: list[str], b: list[str]) -> tuple[int, int]:
    """The same answer, found another way: the longest slice of ``a`` that
    occurs in ``b`` other than in the same place inside the shared command
    prefix; the first such slice of ``a`` on ties; (0, 0) when none."""
    prefix = 0
    while prefix < min(len(a), len(b)) and a[prefix] == b[prefix]:
        prefix += 1
    for length in range(min(len(a), len(b)), 0, -1):
        for i in range(len(a) - length + 1):
            for j in range(len(b) - length + 1):
                if a[i : i + length] == b[j : j + length] and not (i == j and i < prefix):
                    return (i, length)
    return (0, 0)


@settings(max_examples=300, deadline=None)
@given(
    a=st.lists(st.sampled_from(["take", "put", "red", "x", "in", "box"]), max_size=7),
    b=st.lists(st.sampled_from(["take", "put", "red", "x", "in", "box"]), max_size=7),
)
def test_longest_run_is_the_longest_shared_run_outside_the_command(
    a: list[str], b: list[str]
) -> None:
    assert _longest_run(a, b) == _longest_run_spec(a, b)


def test_longest_run_examples() -> None:
    put = ["put", "dirty", "red", "shirt", "in", "laundry", "basket"]
    assert _longest_run(put, ["take", "dirty", "red", "shirt"]) == (1, 3)
    # The command both start with is left out; a later shared word is a run.
    assert _longest_run(["put", "x", "in", "box"], ["put", "y", "in", "bag"]) == (2, 1)
    assert _longest_run(["open", "box"], ["open", "bag"]) == (0, 0)
    assert _longest_run([], ["a"]) == (0, 0)


def test_only_actions_that_reach_a_new_high_score_are_rewarded() -> None:
    def turn(played: tuple[str, ...], score: float | None) -> Turn:
        return Turn(observation="o", valid_actions=played, played=played, score=score)

    turns = [
        turn(("take x",), 0.0),
        turn(("open box", "put x in box"), 0.25),  # a macro: its last action earned it
        turn(("drop x",), 0.0),  # a mistake...
        turn(("take x",), 0.25),  # ...won back: no new high, no lesson
        turn((), 0.9),  # nothing played
        turn(("look",), None),  # no score recorded
        turn(("put x in shelf",), 0.5),
    ]
    assert list(_rewarded(turns)) == [
        ("put x in box", ["take x", "open box"]),
        ("put x in shelf", ["take x", "open box", "put x in box", "drop x", "take x", "look"]),
    ]
