"""Tests for keeping the whole part of a reply cut off at the cap."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from fgo_actors._llm.replies import salvage_cut_reply

ACTIONS = [
    {"op": "add_rule", "text": "Open the door before you go through it."},
    {"op": "revise_rule", "id": "s1.r2", "text": "Read the task, then act.", "evidence": ["t/1"]},
    {"op": "add_rule", "text": 'Quote "this", and \\ that; {not a brace}.'},
]


def test_the_whole_actions_before_the_cut_are_kept() -> None:
    text = json.dumps({"analysis": "Two lessons.", "actions": ACTIONS})
    cut = text[: text.index("Quote")]
    assert salvage_cut_reply(cut, "actions") == (
        {"analysis": "Two lessons.", "actions": ACTIONS[:2]},
        2,
    )


def test_a_fenced_reply_is_read_too() -> None:
    text = "```json\n" + json.dumps({"actions": ACTIONS}, indent=2)
    cut = text[: text.index("Quote")]
    assert salvage_cut_reply(cut, "actions") == ({"actions": ACTIONS[:2]}, 2)


def test_nothing_whole_is_nothing_to_keep() -> None:
    assert salvage_cut_reply('{"analysis": "I will now', "actions") is None
    assert salvage_cut_reply('{"analysis": "x", "actions": [{"op": "add_', "actions") is None
    assert salvage_cut_reply("not json at all", "actions") is None
    assert salvage_cut_reply('{"decisions": [{"op": "drop"}]', "actions") is None


def test_the_named_list_is_the_one_kept() -> None:
    decisions = [{"op": "drop", "id": "a.r1", "reason": "narrow"}, {"op": "combine", "ids": []}]
    text = json.dumps({"decisions": decisions, "instructions": "Be brief and"})
    got = salvage_cut_reply(text[:-3], "decisions")
    assert got == ({"decisions": decisions}, 2)


texts = st.text(alphabet=st.characters(codec="utf-8"), max_size=30)
action = st.fixed_dictionaries(
    {"op": st.sampled_from(["add_rule", "remove_rule"]), "text": texts},
    optional={"evidence": st.lists(texts, max_size=3)},
)
reply = st.fixed_dictionaries(
    {"actions": st.lists(action, max_size=6)}, optional={"analysis": texts}
)


@settings(max_examples=300, deadline=None)
@given(obj=reply, indent=st.sampled_from([None, 2]), data=st.data())
def test_any_cut_keeps_a_prefix_of_the_list_and_nothing_made_up(
    obj: dict[str, Any], indent: int | None, data: st.DataObject
) -> None:
    text = json.dumps(obj, indent=indent, ensure_ascii=data.draw(st.booleans()))
    cut = data.draw(st.integers(0, len(text)))
    got = salvage_cut_reply(text[:cut], "actions")
    if got is None:
        return
    kept_obj, kept = got
    assert kept >= 1
    assert kept_obj["actions"] == obj["actions"][:kept]
    for key, value in kept_obj.items():
        if key != "actions":
            assert value == obj[key]
