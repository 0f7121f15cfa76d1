"""Functions the optimizer writes are checked before they are kept: statically
(compile, the def, its parameters, a JSON Schema), then replayed in the real
sandbox on the subset's recorded turns; a failing one goes to a short fix
call, through the real loopback server."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
import structlog
import structlog.testing

from fgo_actors import (
    FunctionSpec,
    GatewayConfig,
    LLMGateway,
    Module,
    Outcome,
    ReplyRejectedError,
    Step,
    Trajectory,
    UnitFailedError,
    default_counter,
)
from fgo_actors._core.model import RenderedTrajectory, Turn
from fgo_actors._core.prompts import (
    FIX_FUNCTION_SYSTEM,
    OPTIMIZE_SYSTEM,
    SCORING_TOKENS,
    optimize_messages,
    render_trajectory,
    scoring_actions,
)
from fgo_actors.actors import optimize_subset
from fgo_actors.agent.fncheck import (
    REPLAY_TURNS,
    changed_functions,
    replay_calls,
    replay_problems,
    static_problems,
)
from fgo_actors.testing import schema_name_of

from .helpers import StartLLM

ARGS = "task, observation, valid_actions, history"


def fn(code: str, name: str = "helper", parameters: dict[str, Any] | None = None) -> FunctionSpec:
    return FunctionSpec(
        name=name,
        description="offers shortcuts",
        parameters={"type": "object"} if parameters is None else parameters,
        code=code,
    )


# ---------------------------------------------------------------------------
# static checks
# ---------------------------------------------------------------------------

GOOD = f"def helper({ARGS}):\n    return [[a] for a in valid_actions if a.startswith('take ')]\n"


def test_a_good_function_has_no_static_problems() -> None:
    assert static_problems(fn(GOOD)) == []
    # Defaults, extra optional parameters and **kwargs all accept the agent's call.
    for signature in (
        f"{ARGS}, limit=3",
        "task, observation, **rest",
        "**kwargs",
        "task, *, observation, valid_actions, history",
        f"{ARGS}, *, depth=1",
    ):
        code = f"def helper({signature}):\n    return []\n"
        assert static_problems(fn(code)) == [], signature


def test_a_syntax_error_is_named_with_its_line() -> None:
    # What the 1.5B model wrote: a def with a comment for a body.
    (problem,) = static_problems(fn("def pick_up_object(object):    # code", "pick_up_object"))
    assert problem.startswith("function 'pick_up_object': code does not compile: line ")
    assert "indented block" in problem
    code = f"def helper({ARGS}):\n    out = []\n    return out +\n"
    (problem,) = static_problems(fn(code))
    assert "code does not compile: line 3: invalid syntax" in problem
    # An error only compile() finds (ast.parse accepts it).
    (problem,) = static_problems(fn(f"def helper({ARGS}):\n    return []\nreturn 1\n"))
    assert "line 3: 'return' outside function" in problem


@pytest.mark.parametrize(
    ("signature", "says"),
    [
        ("object", "it takes (object) and has no parameter task, observation"),
        ("task, observation, valid_actions", "has no parameter history"),
        ("*args", "it takes (*args) and has no parameter task"),
        (f"{ARGS}, budget", "requires budget, which the agent does not pass"),
        ("task, /, observation, valid_actions, history", "has no parameter task"),
        (f"{ARGS}, *, depth", "requires depth"),
    ],
)
def test_parameters_the_agent_cannot_pass_are_named(signature: str, says: str) -> None:
    (problem,) = static_problems(fn(f"def helper({signature}):\n    return []\n"))
    assert problem.startswith(f"function 'helper' (line 1) must take ({ARGS}); ")
    assert says in problem


def test_a_missing_or_async_def_is_named() -> None:
    (problem,) = static_problems(fn("def other(task):\n    return []\nx = 1\n"))
    assert problem == (
        f"function 'helper': the code has no top-level 'def helper({ARGS}):' (it defines other)"
    )
    (problem,) = static_problems(fn("x = 1\n"))
    assert "(it defines no function)" in problem
    nested = f"class Box:\n    def helper(self, {ARGS}):\n        return []\n"
    (problem,) = static_problems(fn(nested))
    assert "no top-level 'def helper(" in problem
    (problem,) = static_problems(fn(f"async def helper({ARGS}):\n    return []\n"))
    assert problem == "function 'helper' (line 1) is async; write a plain def"
    # The last definition is the one a call finds.
    twice = f"def helper({ARGS}):\n    return []\ndef helper(x):\n    return []\n"
    (problem,) = static_problems(fn(twice))
    assert "(line 3)" in problem
    assert "it takes (x)" in problem


@pytest.mark.parametrize(
    ("parameters", "says"),
    [
        ({"type": "objec"}, "parameters is not a valid JSON Schema"),
        ({"object": "string"}, 'parameters must be a JSON Schema with "type": "object"'),
        ({"type": "string"}, '"type": "object"'),
        ({"type": "object", "properties": {"q": {"type": 5}}}, "not a valid JSON Schema"),
    ],
)
def test_parameters_must_be_a_json_schema_object(parameters: dict[str, Any], says: str) -> None:
    (problem,) = static_problems(fn(GOOD, parameters=parameters))
    assert problem.startswith("function 'helper': parameters ")
    assert says in problem


def test_a_name_that_is_no_identifier_is_named() -> None:
    problems = static_problems(fn(GOOD, name="pick-up"))
    assert problems[0] == "function name 'pick-up' is not a Python identifier"
    assert static_problems(fn("def class():\n    pass\n", name="class"))[0].startswith(
        "function name 'class'"
    )


def test_changed_functions_are_the_added_and_the_revised() -> None:
    a, b = fn(GOOD, "a"), fn(GOOD, "b")
    before = Module(functions=(a, b))
    b2 = FunctionSpec("b", "other description", {"type": "object"}, GOOD)
    c = fn(GOOD, "c")
    after = Module(functions=(a, b2, c))
    assert changed_functions(before, after) == [b2, c]
    assert changed_functions(before, before) == []
    # parameters are not part of equality, but a changed schema is still a change.
    a2 = FunctionSpec("a", a.description, {"type": "object", "required": []}, GOOD)
    assert changed_functions(before, Module(functions=(a2, b))) == [a2]


# ---------------------------------------------------------------------------
# recorded turns
# ---------------------------------------------------------------------------

TASK = "place the key and the coin"


def recorded(
    tid: str, turns: list[tuple[str, list[str], list[str], float]], *, success: bool
) -> Trajectory:
    """A trajectory with the step extras the agent records: a user step with
    ``valid_actions``, then an assistant step with ``played`` and ``score``."""
    steps = [Step(role="system", content="You are an agent.")]
    for observation, valid, played, score in turns:
        steps.append(Step(role="user", content=observation, extra={"valid_actions": valid}))
        steps.append(
            Step(
                role="assistant",
                content="1",
                extra={"played": played, "score": score},
            )
        )
    return Trajectory(
        id=tid,
        task=TASK,
        steps=tuple(steps),
        outcome=Outcome(success=success, score=turns[-1][3]),
    )


def solved(tid: str = "ok1") -> Trajectory:
    return recorded(
        tid,
        [
            ("You see a key and a coin.", ["take key", "take coin", "look"], ["take key"], 0.0),
            (
                "You take the key.",
                ["put key in lock", "take coin", "look"],
                ["put key in lock"],
                0.5,
            ),
            # A macro turn: two actions played, one observation after them.
            (
                "The key is in the lock.",
                ["take coin", "look"],
                ["take coin", "put coin in slot"],
                1.0,
            ),
        ],
        success=True,
    )


def failed(tid: str = "bad1") -> Trajectory:
    return recorded(
        tid,
        [
            ("You see a key and a coin.", ["take key", "take coin", "look"], ["look"], 0.0),
            ("You see a key and a coin.", ["take key", "take coin", "look"], ["look"], 0.0),
        ],
        success=False,
    )


def rendered(*trajectories: Trajectory) -> tuple[RenderedTrajectory, ...]:
    counter = default_counter()
    return tuple(render_trajectory(t, counter, 2000) for t in trajectories)


def test_replay_rebuilds_what_the_agent_passed_on_each_turn() -> None:
    items = rendered(failed(), solved())
    calls = replay_calls(items, max_turns=10, history_pairs=30)
    # Successful trajectories come first; every turn fits the bound here.
    assert [(c.item.id, c.number) for c in calls] == [
        ("ok1", 1),
        ("ok1", 2),
        ("ok1", 3),
        ("bad1", 1),
        ("bad1", 2),
    ]
    third = calls[2].arguments
    assert third == {
        "task": TASK,
        "observation": "The key is in the lock.",
        "valid_actions": ["take coin", "look"],
        "history": [
            ["take key", "You take the key."],
            ["put key in lock", "The key is in the lock."],
        ],
    }
    assert calls[0].arguments["history"] == []
    # Like the agent, only the last history_pairs pairs are passed.
    assert replay_calls(items, max_turns=10, history_pairs=1)[2].arguments["history"] == [
        ["put key in lock", "The key is in the lock."]
    ]


def test_replay_samples_a_bounded_spread_deterministically() -> None:
    many = [
        recorded(
            f"t{k}",
            [(f"obs {k}.{j}", ["look"], ["look"], 0.0) for j in range(9)],
            success=k % 2 == 0,
        )
        for k in range(5)
    ]
    items = rendered(*many)
    calls = replay_calls(items, max_turns=REPLAY_TURNS, history_pairs=30)
    assert len(calls) == REPLAY_TURNS
    assert calls == replay_calls(items, max_turns=REPLAY_TURNS, history_pairs=30)
    per: dict[str, list[int]] = {}
    for c in calls:
        per.setdefault(c.item.id, []).append(c.number)
    # Shared out round-robin (successes first), first and last turn included.
    assert list(per) == ["t0", "t2", "t4", "t1", "t3"]
    assert [len(v) for v in per.values()] == [3, 3, 2, 2, 2]
    assert per["t0"] == [1, 5, 9]
    assert per["t1"] == [1, 9]
    assert replay_calls(rendered(), max_turns=REPLAY_TURNS, history_pairs=30) == []


PLACE = f"""\
PLACE = {{"key": "lock", "coin": "slot"}}
def helper({ARGS}):
    out = []
    for a in valid_actions:
        item = a[len("take "):]
        if a.startswith("take ") and item in PLACE:
            out.append([a, "put " + item + " in " + PLACE[item]])
    return out
"""


async def test_replay_passes_a_good_function() -> None:
    items = rendered(solved(), failed())
    assert await replay_problems(fn(PLACE), items) == []


async def test_replay_catches_a_function_that_raises() -> None:
    code = (
        f"def helper({ARGS}):\n    if history:\n        raise ValueError('boom')\n    return []\n"
    )
    items = rendered(solved(), failed())
    assert await replay_problems(fn(code), items) == [
        "trajectory ok1 turn 2: helper failed: ValueError: boom"
    ]


@pytest.mark.parametrize(
    ("returns", "says"),
    [
        ('"take key"', "helper returned str, not a list of action lists"),
        ("[[1, 2]]", "helper returned an item that is not a list of action strings"),
        ('[["fly away"]]', "helper offered 1 macros, none starting with a valid action"),
    ],
)
async def test_replay_catches_a_bad_shape(returns: str, says: str) -> None:
    code = f"def helper({ARGS}):\n    return {returns}\n"
    (problem,) = await replay_problems(fn(code), rendered(solved()))
    assert problem.startswith(f"trajectory ok1 turn 1: {says}")


async def test_replay_catches_a_function_that_never_offers_what_succeeded() -> None:
    code = f"def helper({ARGS}):\n    return [['look']] if 'look' in valid_actions else []\n"
    (problem,) = await replay_problems(fn(code), rendered(solved(), failed()))
    assert problem.startswith(
        "helper never offered a macro starting with the action a successful run played, "
        "on 3 sampled turns (e.g. trajectory ok1 turn 1 played 'take key', helper offered 'look')"
    )
    nothing = f"def helper({ARGS}):\n    return []\n"
    (problem,) = await replay_problems(fn(nothing), rendered(solved()))
    assert "helper offered nothing" in problem
    # With no successful trajectory there is nothing to match.
    assert await replay_problems(fn(code), rendered(failed())) == []


async def test_one_matching_turn_is_enough_but_every_turn_must_run() -> None:
    # Matches on turn 3 only ("take coin"), fails on no turn: kept.
    coin = f"def helper({ARGS}):\n    return [['take coin']] if history else []\n"
    assert await replay_problems(fn(coin), rendered(solved())) == []
    # Matches on turn 1, but fails on the failed trajectory's second turn.
    code = (
        f"def helper({ARGS}):\n"
        "    if observation == 'You see a key and a coin.' and history:\n"
        "        return {}['missing']\n"
        "    return [[a] for a in valid_actions]\n"
    )
    assert await replay_problems(fn(code), rendered(solved(), failed())) == [
        "trajectory bad1 turn 2: helper failed: KeyError: 'missing'"
    ]


async def test_no_recorded_turns_means_no_replay() -> None:
    plain = Trajectory(
        id="x1",
        task="t",
        steps=(Step(role="user", content="hi"), Step(role="assistant", content="1")),
        outcome=Outcome(success=True),
    )
    (item,) = rendered(plain)
    assert item.turns == ()
    raising = f"def helper({ARGS}):\n    raise RuntimeError('never run')\n"
    assert await replay_problems(fn(raising), [item]) == []


def test_the_prompts_worked_example_passes_the_checks() -> None:
    head = "Example:\n"
    code = OPTIMIZE_SYSTEM.split(head, 1)[1] + "\n"
    example = fn(code, "follow")
    assert static_problems(example) == []
    assert "task ==" in OPTIMIZE_SYSTEM  # the form to avoid is named


async def test_the_prompts_worked_example_replays_cleanly() -> None:
    head = "Example:\n"
    code = OPTIMIZE_SYSTEM.split(head, 1)[1] + "\n"
    assert await replay_problems(fn(code, "follow"), rendered(solved(), failed())) == []


# ---------------------------------------------------------------------------
# the prompt lists the actions that earned score
# ---------------------------------------------------------------------------


def test_scoring_actions_are_listed_once_each() -> None:
    items = rendered(solved("ok1"), failed(), solved("ok2"))
    assert scoring_actions(items) == ["put key in lock", "take coin", "put coin in slot"]
    messages = optimize_messages(Module(), items, module_tokens=500)
    user = messages[1]["content"]
    line = (
        'Actions that raised the score in these runs: ["put key in lock", "take coin", '
        '"put coin in slot"]'
    )
    assert user.count(line) == 1
    assert user.endswith(line + "\n\nReply with the JSON object now.")
    # Without recorded turns, no such line.
    plain = rendered(
        Trajectory(id="p", task="t", steps=(Step(role="user", content="x"),), outcome=Outcome(True))
    )
    assert (
        "raised the score"
        not in optimize_messages(Module(), plain, module_tokens=500)[1]["content"]
    )


def test_the_scoring_line_stays_within_its_reserve() -> None:
    many = [
        recorded(
            f"s{k}",
            [
                ("obs", [f"act {k} {j}"], [f"press the button number {k}-{j}"], float(j + 1))
                for j in range(10)
            ],
            success=True,
        )
        for k in range(10)
    ]
    counter = default_counter()
    user = optimize_messages(Module(), rendered(*many), module_tokens=500)[1]["content"]
    (line,) = [p for p in user.split("\n\n") if p.startswith("Actions that raised")]
    assert counter.count(line) <= SCORING_TOKENS
    assert '"press the button number 0-0"' in line


# ---------------------------------------------------------------------------
# wired into the optimizer, through the real loopback server
# ---------------------------------------------------------------------------

BROKEN = {
    "name": "pick_up_object",
    "description": "picks up an object",
    "parameters": {"object": "string"},
    "code": "def pick_up_object(object):    # code",
}
RAISES = {
    "name": "pick_up_object",
    "description": "picks up an object",
    "parameters": {"type": "object"},
    "code": f"def pick_up_object({ARGS}):\n    return [[valid_actions[2 + len(history)]]]\n",
}
FIXED = {
    "name": "pick_up_object",
    "description": "takes each object to its place",
    "parameters": {"type": "object"},
    "code": PLACE.replace("def helper(", "def pick_up_object("),
}


def is_fix_call(body: dict[str, Any]) -> bool:
    return str(body["messages"][0]["content"]) == FIX_FUNCTION_SYSTEM


def optimizer_policy(first: dict[str, Any], then: dict[str, Any]) -> Any:
    """An optimize reply adds a rule and ``first``; the call that fixes a
    function gets ``then`` (with the rule again, which it must not add twice)."""

    def policy(body: dict[str, Any]) -> str:
        assert schema_name_of(body) == "fgo_optimize"
        function = then if is_fix_call(body) else first
        actions = [
            {"op": "add_rule", "text": "Put each object where it belongs."},
            {"op": "add_function", "function": function},
        ]
        return json.dumps({"analysis": "-", "actions": actions})

    return policy


def prompt_tokens(body: dict[str, Any]) -> int:
    return default_counter().count_messages(body["messages"])


@pytest.mark.parametrize(
    ("first", "says"),
    [
        (
            # Its parameters ({"object": "string"}) are read as an object schema
            # (edits.object_schema); the code is what the fix call names.
            BROKEN,
            ["function 'pick_up_object': code does not compile: line 1"],
        ),
        (RAISES, ["trajectory ok1 turn 2: pick_up_object failed: IndexError"]),
    ],
)
async def test_a_failing_function_is_fixed_in_a_short_call_and_kept(
    start_llm: StartLLM, first: dict[str, Any], says: list[str]
) -> None:
    """The reply's rule is kept at once; its failing function goes to a second,
    short call that shows the function and its problems, not the trajectories."""
    server, url = await start_llm(policy=optimizer_policy(first, FIXED))
    items = rendered(solved(), failed())
    async with LLMGateway(GatewayConfig(base_url=url, model="m", max_reasks=2)) as gw:
        module = await optimize_subset(gw, Module(), items, subset_id="s001", module_tokens=800)
        assert gw.statistics().reasks == 0
    assert len(server.requests) == 2
    optimize, fix = (r.body for r in server.requests)
    assert not is_fix_call(optimize)
    assert is_fix_call(fix)
    shown = fix["messages"][-1]["content"]
    for text in says:
        assert text in shown
    # The function as it was read (parameters as an object schema).
    assert json.dumps(first["code"]) in shown
    # The trajectories stay out of it: the fix prompt is smaller than the
    # optimize prompt without them.
    assert "### Trajectory" in optimize["messages"][-1]["content"]
    assert "### Trajectory" not in shown
    assert prompt_tokens(fix) < prompt_tokens(optimize) - sum(i.tokens for i in items)
    (kept,) = module.functions
    assert kept.to_json() == FIXED
    assert [r.text for r in module.rules] == ["Put each object where it belongs."]


async def test_a_function_the_fix_call_gets_wrong_twice_is_dropped_and_the_rest_kept(
    start_llm: StartLLM,
) -> None:
    """The optimize reply's rule was paid for and passes: it is kept. The fix
    call is re-asked once in its own short conversation, then the function is
    left out (and said so in the log)."""
    server, url = await start_llm(policy=optimizer_policy(BROKEN, BROKEN))
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    async with LLMGateway(GatewayConfig(base_url=url, model="m", max_reasks=2)) as gw:
        with structlog.testing.capture_logs() as logs:
            module = await optimize_subset(
                gw, Module(), rendered(solved()), subset_id="s001", module_tokens=800
            )
        assert gw.statistics().reasks == 1
    assert [is_fix_call(r.body) for r in server.requests] == [False, True, True]
    assert "Your previous reply was rejected" in server.requests[2].body["messages"][-1]["content"]
    assert module.functions == ()
    assert [r.text for r in module.rules] == ["Put each object where it belongs."]
    (fix,) = [e for e in logs if e["event"] == "function_fix"]
    assert fix["fixed"] == []
    assert "code does not compile" in fix["functions_dropped"][0]
    assert fix["error"] is None


async def test_a_reply_with_only_a_broken_function_fails_the_unit_after_the_fix_call(
    start_llm: StartLLM,
) -> None:
    """Nothing but a function that stays broken: one optimize call, the fix
    call and its one re-ask, then the unit fails; the gateway's second re-ask
    is not spent."""

    def only_broken(body: dict[str, Any]) -> str:
        return json.dumps({"actions": [{"op": "add_function", "function": BROKEN}]})

    server, url = await start_llm(policy=only_broken)
    async with LLMGateway(GatewayConfig(base_url=url, model="m", max_reasks=2)) as gw:
        with pytest.raises(UnitFailedError, match="code does not compile"):
            await optimize_subset(
                gw, Module(), rendered(solved()), subset_id="s001", module_tokens=800
            )
    assert [is_fix_call(r.body) for r in server.requests] == [False, True, True]


async def test_a_fix_reply_that_gives_up_leaves_the_function_out(start_llm: StartLLM) -> None:
    """An empty "actions" list from the fix call means: leave it out; no re-ask."""

    def policy(body: dict[str, Any]) -> str:
        if is_fix_call(body):
            return json.dumps({"analysis": "cannot", "actions": []})
        return str(optimizer_policy(BROKEN, BROKEN)(body))

    server, url = await start_llm(policy=policy)
    async with LLMGateway(GatewayConfig(base_url=url, model="m", max_reasks=2)) as gw:
        module = await optimize_subset(
            gw, Module(), rendered(solved()), subset_id="s001", module_tokens=800
        )
    assert len(server.requests) == 2
    assert module.functions == ()
    assert [r.text for r in module.rules] == ["Put each object where it belongs."]


async def test_a_fix_call_that_cannot_be_made_keeps_the_other_edits(start_llm: StartLLM) -> None:
    """The fix call's reply never parses: the gateway's re-asks run out and the
    unit keeps what the optimize reply got right."""

    def policy(body: dict[str, Any]) -> str:
        if is_fix_call(body):
            return "not json"
        return str(optimizer_policy(BROKEN, BROKEN)(body))

    server, url = await start_llm(policy=policy)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    async with LLMGateway(GatewayConfig(base_url=url, model="m", max_reasks=1)) as gw:
        with structlog.testing.capture_logs() as logs:
            module = await optimize_subset(
                gw, Module(), rendered(solved()), subset_id="s001", module_tokens=800
            )
    assert [is_fix_call(r.body) for r in server.requests] == [False, True, True]
    assert module.functions == ()
    assert [r.text for r in module.rules] == ["Put each object where it belongs."]
    (fix,) = [e for e in logs if e["event"] == "function_fix"]
    assert "still invalid after 2 attempts" in fix["error"]


async def test_without_recorded_turns_only_static_checks_apply(start_llm: StartLLM) -> None:
    """The daemon's items carry no turns: a function that compiles is kept
    even if it would fail at run time, and a broken one still goes to the fix call."""
    server, url = await start_llm(policy=optimizer_policy(BROKEN, RAISES))
    items = (
        RenderedTrajectory(id="d1", text="### Trajectory d1", tokens=5, success=True, group=""),
    )
    async with LLMGateway(GatewayConfig(base_url=url, model="m")) as gw:
        module = await optimize_subset(gw, Module(), items, subset_id="s001", module_tokens=800)
    assert [is_fix_call(r.body) for r in server.requests] == [False, True]
    assert [f.to_json() for f in module.functions] == [RAISES]


async def test_an_unchanged_function_is_not_checked_again(start_llm: StartLLM) -> None:
    """A function already in the module (from an initial module) is the
    module's, not the reply's: an edit that leaves it alone is not rejected."""
    old = FunctionSpec.from_json(BROKEN)
    _server, url = await start_llm(
        policy=lambda body: json.dumps({"actions": [{"op": "add_rule", "text": "Look first."}]})
    )
    async with LLMGateway(GatewayConfig(base_url=url, model="m")) as gw:
        module = await optimize_subset(
            gw, Module(functions=(old,)), rendered(solved()), subset_id="s001", module_tokens=800
        )
    assert module.functions == (old,)
    assert [r.text for r in module.rules] == ["Look first."]


async def test_the_gateway_awaits_an_async_check(start_llm: StartLLM) -> None:
    _server, url = await start_llm(policy=lambda body: json.dumps({"analysis": "-", "actions": []}))
    seen: list[int] = []

    async def check(reply: dict[str, Any]) -> int:
        seen.append(len(reply["actions"]))
        if len(seen) == 1:
            raise ReplyRejectedError("try once more")
        return 42

    messages = [{"role": "user", "content": "hi"}]
    async with LLMGateway(GatewayConfig(base_url=url, model="m")) as gw:
        result: int = await gw.structured("optimize", messages, "fgo_optimize", check)
        assert gw.statistics().reasks == 1
    assert result == 42
    assert seen == [0, 0]


def test_turns_hold_the_recorded_extras() -> None:
    (item,) = rendered(solved())
    assert item.task == TASK
    assert item.turns[2] == Turn(
        observation="The key is in the lock.",
        valid_actions=("take coin", "look"),
        played=("take coin", "put coin in slot"),
        score=1.0,
    )


async def test_a_rule_copied_from_the_prompts_example_is_skipped_and_the_rest_kept(
    start_llm: StartLLM,
) -> None:
    """The 1.5B optimizer once wrote the contract's worked example as a rule.
    It came from the prompt, not the logs: that action is skipped (no re-ask,
    since the reply's other rule applied) and the real rule kept."""

    def policy(body: dict[str, Any]) -> str:
        actions = [
            {"op": "add_rule", "text": "THEN = {'key': ['use key']}"},
            {"op": "add_rule", "text": "Put each object where it belongs."},
        ]
        return json.dumps({"analysis": "-", "actions": actions})

    server, url = await start_llm(policy=policy)
    items = rendered(solved(), failed())
    async with LLMGateway(GatewayConfig(base_url=url, model="m", max_reasks=2)) as gw:
        module = await optimize_subset(gw, Module(), items, subset_id="s001", module_tokens=800)
    assert len(server.requests) == 1
    assert 'THEN = {"key": ["use key"]}' in server.requests[0].body["messages"][0]["content"]
    assert [r.text for r in module.rules] == ["Put each object where it belongs."]


async def test_a_reply_whose_only_rule_copies_the_prompt_is_re_asked(start_llm: StartLLM) -> None:
    replies = iter(
        [
            [{"op": "add_rule", "text": "Keep rules short and imperative."}],
            [{"op": "add_rule", "text": "Put each object where it belongs."}],
        ]
    )

    def policy(body: dict[str, Any]) -> str:
        return json.dumps({"analysis": "-", "actions": next(replies)})

    server, url = await start_llm(policy=policy)
    async with LLMGateway(GatewayConfig(base_url=url, model="m", max_reasks=2)) as gw:
        module = await optimize_subset(
            gw, Module(), rendered(solved()), subset_id="s001", module_tokens=800
        )
    assert len(server.requests) == 2
    assert "copies the prompt's own instructions" in server.requests[1].prompt
    assert [r.text for r in module.rules] == ["Put each object where it belongs."]
