"""Prompts pinned on exact text: the module as the LLM sees it, each step's
line, the outcome, truncation, the scoring line, the merge prompt and the
re-ask note, measured with a counter of one token per character so that every
size is worked out by hand.

Written against the mutants that the prompt tests elsewhere let live
(``scripts/mutation.sh fgo_actors/_core/prompts.py ...``): each test names the
mistake it catches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from fgo_actors import FunctionSpec, Module, Outcome, Rule, Step, Trajectory
from fgo_actors._core.edits import FunctionConflict, MergeInput
from fgo_actors._core.errors import ReplyRejectedError
from fgo_actors._core.model import RenderedTrajectory, Turn
from fgo_actors._core.playbook import to_function
from fgo_actors._core.prompts import (
    MERGE_SYSTEM,
    OPTIMIZE_SYSTEM,
    accept_edits,
    group_key_of,
    merge_messages,
    module_for_prompt,
    optimize_messages,
    optimize_overhead_tokens,
    reask_message,
    render_module,
    render_trajectory,
    scoring_actions,
    scoring_line,
)
from fgo_actors._core.tokens import TokenCounter


class _Chars:
    """One token per character: sizes are string lengths."""

    name = "chars"

    def encode_ordinary(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, tokens: Sequence[int]) -> str:
        return "".join(chr(t) for t in tokens)


CHARS = TokenCounter(_Chars())
SCHEMA = {"type": "object", "properties": {}}


def fn(name: str, code: str = "pass", description: str = "d") -> FunctionSpec:
    return FunctionSpec(name=name, description=description, parameters=SCHEMA, code=code)


def traj(
    steps: Sequence[Step],
    *,
    success: bool = True,
    score: float | None = None,
    feedback: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> Trajectory:
    return Trajectory(
        id="t1",
        task="Do it.",
        steps=tuple(steps),
        outcome=Outcome(success=success, score=score, feedback=feedback),
        metadata=metadata,
    )


def body(t: Trajectory) -> str:
    """The steps part of a rendered trajectory."""
    text = render_trajectory(t, CHARS, 10_000).text
    return text.split("\nSteps:\n", 1)[1].rsplit("\nOutcome: ", 1)[0]


# -- the module as the LLM sees it ---------------------------------------------------


def test_the_prompt_module_has_ids_texts_and_functions_but_no_playbook() -> None:
    """No provenance, every non-playbook function whole, the playbook left out
    (and a function merely named ``playbook`` that holds no table kept)."""
    playbook = to_function({("take {x}",): {"key": 1}})
    fake = fn("playbook", "x = 1")
    module = Module(
        instructions="Be careful.",
        rules=(Rule(id="r1", text="Look first.", subsets=("s1",), trajectories=("t1",)),),
        functions=(fn("lookup"), playbook, fake),
    )
    assert module_for_prompt(module) == {
        "instructions": "Be careful.",
        "rules": [{"id": "r1", "text": "Look first."}],
        "functions": [fn("lookup").to_json(), fake.to_json()],
    }


def test_render_module_is_indented_json_that_keeps_non_ascii() -> None:
    module = Module(instructions="Café", rules=(Rule(id="r1", text="Ünïcode."),))
    assert render_module(module) == (
        '{\n "instructions": "Café",\n "rules": [\n  {\n   "id": "r1",\n'
        '   "text": "Ünïcode."\n  }\n ],\n "functions": []\n}'
    )


def test_accept_edits_joins_the_errors_and_checks_the_cap_inclusively() -> None:
    """Errors are joined with "; "; a module exactly at the cap passes, one
    token over is refused with its size, the cap and the advice."""
    module = Module(instructions="Be careful.")
    size = len(render_module(module))
    with pytest.raises(ReplyRejectedError) as e:
        accept_edits(CHARS, module, ["a: x", "b: y"], 10_000, "advice")
    assert str(e.value) == "a: x; b: y"
    assert accept_edits(CHARS, module, [], size, "advice") is module
    with pytest.raises(ReplyRejectedError) as e:
        accept_edits(CHARS, module, (), size - 1, "cut rules")
    assert str(e.value) == (
        f"the resulting module is {size} tokens, above the limit of {size - 1}; cut rules"
    )


# -- each step's line ------------------------------------------------------------------


def test_a_steps_line_shows_role_name_content_and_each_call() -> None:
    """``[role:name]``, the content, each tool call by name with its
    arguments (a dict written as JSON, a missing name as ``?``), and a call of
    another shape written whole."""
    step = Step(
        role="assistant",
        name="bot",
        content="Let me look.",
        tool_calls=(
            {"function": {"name": "search", "arguments": '{"q": "x"}'}},
            {"function": {"arguments": {"q": "é"}}},
            {"type": "other", "id": 7},
        ),
    )
    assert body(traj([step, Step(role="user")])) == (
        '[assistant:bot] Let me look. -> call search({"q": "x"}) -> call ?({"q": "é"}) '
        '-> call {"type": "other", "id": 7}\n[user]'
    )


def test_score_changes_are_shown_on_the_step_that_records_them() -> None:
    """An episode starts at 0; a rise and a fall are signed, a repeated score
    and a step with no score show nothing, and neither do a bool, a string or
    a user step's score."""
    steps = [
        Step(role="assistant", content="a", extra={"score": 0.25}),
        Step(role="assistant", content="b", extra={"score": 0.25}),
        Step(role="assistant", content="c"),
        Step(role="assistant", content="d", extra={"score": 1}),
        Step(role="assistant", content="e", extra={"score": True}),
        Step(role="assistant", content="f", extra={"score": "2"}),
        Step(role="user", content="g", extra={"score": 0.0}),
        Step(role="assistant", content="h", extra={"score": 0.5}),
    ]
    assert body(traj(steps)).splitlines() == [
        "[assistant] a [score +0.25 -> 0.25]",
        "[assistant] b",
        "[assistant] c",
        "[assistant] d [score +0.75 -> 1]",
        "[assistant] e",
        "[assistant] f",
        "[user] g",
        "[assistant] h [score -0.5 -> 0.5]",
    ]


def test_a_score_of_zero_recorded_first_changes_nothing() -> None:
    assert body(traj([Step(role="assistant", content="a", extra={"score": 0})])) == (
        "[assistant] a"
    )


def test_only_long_repeated_texts_of_the_same_role_become_references() -> None:
    """Over 80 characters, same role and text, no tool calls: named by the
    first step; exactly 80, another role, or a step with calls: repeated."""
    long = "x" * 81
    edge = "y" * 80
    call = ({"function": {"name": "f", "arguments": ""}},)
    steps = [
        Step(role="user", content=long),
        Step(role="assistant", content=long),
        Step(role="user", content=long),
        Step(role="user", content=edge),
        Step(role="user", content=edge),
        Step(role="assistant", content=long, tool_calls=call),
        Step(role="assistant", content=long),
    ]
    assert body(traj(steps)).splitlines() == [
        f"[user] {long}",
        f"[assistant] {long}",
        "[user] (same text as step 1)",
        f"[user] {edge}",
        f"[user] {edge}",
        f"[assistant] {long} -> call f()",
        "[assistant] (same text as step 2)",
    ]


# -- outcome, header, group --------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "line"),
    [
        (Outcome(success=True), "Outcome: SUCCESS"),
        (Outcome(success=False, score=0.5), "Outcome: FAILURE (score 0.5)"),
        (
            Outcome(success=True, score=1.0, feedback="ok"),
            "Outcome: SUCCESS (score 1). Feedback: ok",
        ),
        (Outcome(success=False, score=0.0, feedback=""), "Outcome: FAILURE (score 0)"),
    ],
)
def test_the_outcome_line(outcome: Outcome, line: str) -> None:
    t = traj([Step(role="user", content="hi")])
    t = Trajectory(id="t1", task="Do it.", steps=t.steps, outcome=outcome)
    assert render_trajectory(t, CHARS, 10_000).text.endswith("\n" + line)


def test_a_rendered_trajectory_whole_and_its_fields() -> None:
    t = traj(
        [Step(role="user", content="hi")],
        success=False,
        score=0.5,
        metadata={"task_type": "cook", "level": 3},
    )
    text = (
        "### Trajectory t1\nTask: Do it.\nTask type: cook\nSteps:\n[user] hi\n"
        "Outcome: FAILURE (score 0.5)"
    )
    r = render_trajectory(t, CHARS, len(text))
    assert r == RenderedTrajectory(
        id="t1",
        text=text,
        tokens=len(text),
        success=False,
        group="cook",
        truncated=False,
        score=0.5,
    )
    assert r.task == "Do it."
    assert render_trajectory(t, CHARS, 100, group_key="level").group == "3"


def test_group_key_of_reads_the_metadata_as_text() -> None:
    assert group_key_of(traj([], metadata=None), "task_type") == ""
    assert group_key_of(traj([], metadata={"other": 1}), "task_type") == ""
    assert group_key_of(traj([], metadata={"task_type": 7}), "task_type") == "7"


def test_max_tokens_below_the_minimum_is_refused_and_the_minimum_itself_is_not() -> None:
    t = traj([Step(role="user", content="hi")])
    with pytest.raises(ValueError, match=r"^max_tokens must be at least 16, got 15$"):
        render_trajectory(t, CHARS, 15)
    r = render_trajectory(t, CHARS, 16)
    assert r.tokens <= 16
    assert r.truncated


def test_a_long_trajectory_keeps_header_outcome_and_both_ends_of_its_steps() -> None:
    """Cut to exactly the budget: the header and outcome whole, the marker
    naming the step count, the first and the last step's text kept."""
    steps = [Step(role="user", content=f"step {k:02d} " + "w" * 40) for k in range(20)]
    t = traj(steps, score=1.0)
    full = render_trajectory(t, CHARS, 100_000)
    assert not full.truncated
    r = render_trajectory(t, CHARS, 300)
    assert r.truncated
    assert r.tokens == len(r.text) <= 300
    assert r.text.startswith("### Trajectory t1\nTask: Do it.\nSteps:\n[user] step 00 ")
    assert r.text.endswith("w" * 20 + "\nOutcome: SUCCESS (score 1)")
    assert "\n[... 20 steps, middle omitted to fit budget ...]\n" in r.text


def test_a_budget_too_small_for_header_and_outcome_cuts_those_too() -> None:
    """No room for any step: header and outcome are cut in their middle, to
    40 - 7 (the marker) - 2 = 31 tokens, 15 of the head and 16 of the tail."""
    t = Trajectory(
        id="t1",
        task="A very long task text " * 5,
        steps=(Step(role="user", content="hi"),),
        outcome=Outcome(success=True),
    )
    r = render_trajectory(t, CHARS, 40)
    assert r.truncated
    assert r.text == "### Trajectory  [...] Outcome: SUCCESS"
    assert r.tokens == 38


# -- the actions that earned score ---------------------------------------------------------


def item(*turns: Turn) -> RenderedTrajectory:
    return RenderedTrajectory(id="t", text="", tokens=0, success=True, group="", turns=turns)


def turn(played: Sequence[str], score: float | None) -> Turn:
    return Turn(observation="", valid_actions=(), played=tuple(played), score=score)


def test_scoring_actions_are_those_of_rising_turns_first_seen_first() -> None:
    """A rise counts all the turn's actions; an unscored turn is passed over
    (it does not reset the score), a fall and a level turn do not count, and
    each action is cut to 60 characters."""
    long = "a" * 70
    items = [
        item(
            turn(["open door", "go north"], 0.5),
            turn(["look"], None),
            turn(["wait"], 0.5),
            turn(["drop key"], 0.25),
            turn([long], 1.0),
        ),
        item(turn(["go north", "take key"], 1.0), turn(["eat"], 0.0)),
    ]
    assert scoring_actions(items) == ["open door", "go north", "a" * 60, "take key"]


def test_scoring_line_is_left_out_when_no_action_fits() -> None:
    """With one token per character the head alone (45) is over SCORING_TOKENS
    (32): no action fits, and the line is left out, as when none scored."""
    items = [item(turn(["open door"], 1.0))]
    assert scoring_line(items, CHARS) is None
    assert scoring_line([item(turn(["look"], None))], CHARS) is None


class _Words:
    """One token per space-separated word."""

    name = "words"

    def encode_ordinary(self, text: str) -> list[int]:
        return [0] * len(text.split())

    def decode(self, tokens: Sequence[int]) -> str:  # pragma: no cover - not needed
        raise NotImplementedError


WORDS = TokenCounter(_Words())


def test_scoring_line_stops_at_the_first_action_that_does_not_fit() -> None:
    """The head is 8 words; each action of one word adds one: 24 fit in 32,
    the 25th does not, and no later one is tried."""
    actions = [f"a{k}" for k in range(30)]
    line = scoring_line([item(turn(actions, 1.0))], WORDS)
    assert line == (
        "Actions that raised the score in these runs: ["
        + ", ".join(f'"a{k}"' for k in range(24))
        + "]"
    )


# -- the optimize prompt -----------------------------------------------------------------------


def test_the_optimize_prompt_whole() -> None:
    module = Module(instructions="Be careful.")
    items = [
        RenderedTrajectory(id="a", text="TEXT A", tokens=1, success=True, group=""),
        RenderedTrajectory(
            id="b",
            text="TEXT B",
            tokens=1,
            success=False,
            group="",
            turns=(turn(["go"], 1.0),),
        ),
    ]
    messages = optimize_messages(module, items, module_tokens=321, counter=WORDS)
    assert messages == [
        {"role": "system", "content": OPTIMIZE_SYSTEM},
        {
            "role": "user",
            "content": "Current module:\n<module>\n"
            + render_module(module)
            + "\n</module>\n\nKeep the whole module under 321 tokens.\n\n"
            "Trajectories (2: 1 succeeded, 1 failed):\n\nTEXT A\n\nTEXT B\n\n"
            'Actions that raised the score in these runs: ["go"]\n\n'
            "Reply with the JSON object now.",
        },
    ]


def test_the_optimize_overhead_is_the_empty_prompt_plus_the_reserves() -> None:
    """The empty prompt less the empty module, plus the module's tokens, the
    re-ask note's 160, the scoring line's 32 and 16 of slack."""
    user = (
        "Current module:\n<module>\n"
        + render_module(Module())
        + "\n</module>\n\nKeep the whole module under 500 tokens.\n\n"
        "Trajectories (0: 0 succeeded, 0 failed):\n\nReply with the JSON object now."
    )
    prompt = 3 + 4 + len(OPTIMIZE_SYSTEM) + 4 + len(user)
    expected = prompt - len(render_module(Module())) + 500 + 160 + 32 + 16
    assert optimize_overhead_tokens(CHARS, 500) == expected


# -- the merge prompt ---------------------------------------------------------------------------


def test_the_merge_prompt_with_nothing_to_decide() -> None:
    inp = MergeInput(
        rules=(), covers={}, functions=(), conflicts=(), instructions=("A",), child_rule_ids=()
    )
    messages = merge_messages(inp, [("s1", {"b": 2, "a": 1})], module_tokens=100, module_size=100)
    assert messages == [
        {"role": "system", "content": MERGE_SYSTEM},
        {
            "role": "user",
            "content": 'Version s1: {"a": 1, "b": 2}\n\nRules:\n(none)\n\n'
            "Reply with the JSON object now.",
        },
    ]


def test_the_merge_prompt_with_everything_to_decide() -> None:
    """Rules with their evidence, editable functions (not the playbook),
    differing instructions, each conflict's versions, and the size over the cap."""
    inp = MergeInput(
        rules=(
            Rule(id="r1", text="Look.", subsets=("s1", "s2"), trajectories=("t1",)),
            Rule(id="r2", text="Wait."),
        ),
        covers={},
        functions=(fn("lookup", description="Finds."), to_function({("go {x}",): {"n": 1}})),
        conflicts=(FunctionConflict("code", (("s1", fn("code", "x")), ("s2", fn("code", "y")))),),
        instructions=("A", "B"),
        child_rule_ids=(),
    )
    content = merge_messages(
        inp, [("s1", {}), ("s2", {"n": 1})], module_tokens=100, module_size=130
    )[1]["content"]
    v1 = (
        '{"name": "code", "description": "d", '
        '"parameters": {"type": "object", "properties": {}}, "code": "x"}'
    )
    v2 = v1.replace('"code": "x"', '"code": "y"')
    assert content.split("\n\n") == [
        'Version s1: {}\nVersion s2: {"n": 1}',
        "Rules:\n- [r1] (2 subsets, 1 runs) Look.\n- [r2] (0 subsets, 0 runs) Wait.",
        "Functions (kept unless dropped):\n- lookup: Finds.",
        'The versions\' instructions differ; give merged "instructions":\n'
        "<instructions>\nA\n</instructions>\n<instructions>\nB\n</instructions>",
        "Function 'code' has 2 versions; give one merged version in \"functions\":\n"
        f'<function name="code" version="s1">\n{v1}\n</function>\n'
        f'<function name="code" version="s2">\n{v2}\n</function>',
        "Kept as they are, these make a module of 130 tokens, over its limit of 100: "
        "combine or drop rules to save about 30 tokens, or the rules with least evidence are cut.",
        "Reply with the JSON object now.",
    ]


# -- the re-ask note ----------------------------------------------------------------------------


def test_the_reask_note_keeps_the_error_whole_when_it_fits() -> None:
    assert reask_message(CHARS, "bad id") == {
        "role": "user",
        "content": "Your previous reply was rejected: bad id\n"
        "Reply again with one corrected JSON object.",
    }


def test_the_reask_note_cuts_a_long_error_to_its_room() -> None:
    """Room: 160 less head and tail (34 + 44 characters) less 8 = 74 tokens;
    the cut keeps 74 - 5 - 2 = 67 of them around " ... "."""
    error = "".join(chr(ord("a") + k % 26) for k in range(500))
    note = reask_message(CHARS, error)["content"]
    head = "Your previous reply was rejected: "
    tail = "\nReply again with one corrected JSON object."
    assert (len(head), len(tail)) == (34, 44)
    assert note == head + error[:33] + " ... " + error[-34:] + tail
