"""The optimize prompt shows a long line that earlier trajectories already
showed as a reference to it, once per prompt (``share_repeated_lines``)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from fgo_actors import Module, Outcome, Step, Trajectory
from fgo_actors._core.model import RenderedTrajectory
from fgo_actors._core.prompts import (
    REPEAT_MIN_CHARS,
    optimize_messages,
    render_trajectory,
    share_repeated_lines,
)
from fgo_actors._core.tokens import default_counter

SYSTEM = "You are an agent in a text world. Reply with the number of one action, nothing else."
TASK = "Put every object you find in its usual place, then stop when the room is tidy again."


def item(id: str, text: str) -> RenderedTrajectory:
    return RenderedTrajectory(id=id, text=text, tokens=1, success=True, group="")


def episode(id: str, observation: str) -> RenderedTrajectory:
    traj = Trajectory(
        id=id,
        task=TASK,
        steps=(
            Step(role="system", content=SYSTEM),
            Step(role="user", content=observation),
            Step(role="assistant", content="take the red apple"),
        ),
        outcome=Outcome(success=True, score=1.0),
    )
    return render_trajectory(traj, default_counter(), 10_000)


def test_the_system_prompt_and_task_are_shown_once_per_prompt() -> None:
    """The second episode names the first for its system prompt and task, keeps
    the heads ``Task:`` and ``[system]``, and keeps its own observation."""
    a = episode("t1", "You see a red apple on the floor.")
    b = episode("t2", "You see a green pear on the table.")
    first, second = share_repeated_lines([a, b])
    assert first == a.text
    assert second.split("\n") == [
        "### Trajectory t2",
        "Task: (same as in trajectory t1)",
        "Steps:",
        "[system] (same as in trajectory t1)",
        "[user] You see a green pear on the table.",
        "[assistant] take the red apple",
        "Outcome: SUCCESS (score 1)",
    ]


def test_the_optimize_prompt_pays_for_a_repeated_system_prompt_once() -> None:
    items = [episode(f"t{n}", f"You see {n} red apples.") for n in range(5)]
    user = optimize_messages(Module(), items, module_tokens=500)[1]["content"]
    assert user.count(SYSTEM) == 1
    assert user.count(TASK) == 1
    assert user.count("[system] (same as in trajectory t0)") == 4
    whole = sum(default_counter().count(i.text) for i in items)
    shared = sum(default_counter().count(t) for t in share_repeated_lines(items))
    assert shared < whole - 3 * 20


def test_short_lines_and_lines_of_the_same_trajectory_stay() -> None:
    """Lines of at most REPEAT_MIN_CHARS repeat as they are, and a long line
    repeated inside its own trajectory is left to the rendering."""
    short = "x" * REPEAT_MIN_CHARS
    long = "y" * (REPEAT_MIN_CHARS + 1)
    texts = share_repeated_lines([item("a", f"{short}\n{long}\n{long}"), item("b", short)])
    assert texts == [f"{short}\n{long}\n{long}", short]


def test_an_outcome_is_always_shown_in_full() -> None:
    outcome = "Outcome: FAILURE (score 0.5). Feedback: " + "f" * REPEAT_MIN_CHARS
    assert share_repeated_lines([item("a", outcome), item("b", outcome)]) == [outcome, outcome]


def test_a_run_of_lines_from_one_place_is_one_reference() -> None:
    """Continuation lines that follow on in the source join the reference
    above them; a line from elsewhere in the source starts a new one, and so
    does a line with a head of its own."""
    lines = [f"line {n} " + "z" * REPEAT_MIN_CHARS for n in range(4)]
    a = item("a", "\n".join(["[system] " + lines[0], *lines[1:]]))
    b = item(
        "b",
        "\n".join(["[system] " + lines[0], lines[1], lines[2], "short", lines[3], lines[1]]),
    )
    c = item("c", "\n".join([lines[1], lines[3], "[user] " + lines[0]]))
    assert share_repeated_lines([a, b, c])[1:] == [
        "\n".join(
            [
                "[system] (same 3 lines as in trajectory a)",
                "short",
                "(same as in trajectory a)",
                "(same as in trajectory a)",
            ]
        ),
        "\n".join(
            [
                "(same as in trajectory a)",
                "(same as in trajectory a)",
                "[user] " + lines[0],
            ]
        ),
    ]


LINE = st.sampled_from(
    [
        "short",
        "[user] short",
        "[system] " + "s" * REPEAT_MIN_CHARS,
        "Task: " + "t" * REPEAT_MIN_CHARS,
        "c" * (REPEAT_MIN_CHARS + 5),
        "d" * (REPEAT_MIN_CHARS + 9),
        "[user] " + "o" * REPEAT_MIN_CHARS,
        "Outcome: SUCCESS " + "e" * REPEAT_MIN_CHARS,
    ]
)
TEXTS = st.lists(st.lists(LINE, min_size=1, max_size=8), min_size=1, max_size=6)


@settings(max_examples=200, deadline=None)
@given(TEXTS)
def test_each_long_line_is_shown_once_and_none_is_lost(texts: list[list[str]]) -> None:
    """Across a prompt, each long line but an outcome appears in the text of
    exactly one trajectory (the first that has it, unchanged); every other
    line is kept or is a reference to an earlier trajectory; nothing grows."""
    items = [item(f"i{n}", "\n".join(lines)) for n, lines in enumerate(texts)]
    shared = share_repeated_lines(items)
    assert shared[0] == items[0].text
    for n, (before, after) in enumerate(zip(items, shared, strict=True)):
        out = after.split("\n")
        assert len(out) <= len(before.text.split("\n"))
        for line in out:
            if "(same " in line:
                source = line.rsplit("trajectory ", 1)[1].rstrip(")")
                assert source in {i.id for i in items[:n]}
            else:
                assert line in before.text.split("\n")
    long_lines = {line for lines in texts for line in lines if len(line) > REPEAT_MIN_CHARS}
    for line in long_lines - {line for line in long_lines if line.startswith("Outcome: ")}:
        holders = [n for n, text in enumerate(shared) if line in text.split("\n")]
        owner = next(n for n, lines in enumerate(texts) if line in lines)
        assert holders == [owner]
