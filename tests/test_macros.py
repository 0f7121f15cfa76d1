"""Module functions as macro-actions: offered by number, played while valid, sandboxed.

The rollouts play the real TextWorldExpress game against the loopback LLM
server; the functions run in the real sandbox (a subprocess per call).
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import trio

from fgo_actors import FunctionSpec, GatewayConfig, LLMGateway, Module, Trajectory, load_module
from fgo_actors._core.schemas import schema_error
from fgo_actors.agent.envs import Task, TextWorldExpress
from fgo_actors.agent.rollout import AgentConfig, Macro, macros_from, offer_macros, rollout

from .helpers import EXAMPLES_DIR, TWC, StartLLM

pytest.importorskip("textworld_express")

ARGS = ("task", "observation", "valid_actions", "history")
CONFIG = AgentConfig()


def function(name: str, body: str) -> FunctionSpec:
    code = f"def {name}(task, observation, valid_actions, history):\n" + "".join(
        f"    {line}\n" for line in body.splitlines()
    )
    return FunctionSpec(name=name, description="test", parameters={}, code=code)


def test_macros_must_start_with_a_valid_action_and_are_deduplicated() -> None:
    valid = ["open box", "take cup", "look around"]
    value = [
        ["open box", "put cup in box"],
        "look around",
        ["fly away"],
        ["open box", "put cup in box"],
    ]
    macros, problem = macros_from("f", value, valid, CONFIG)
    assert macros == [Macro("f", ("open box", "put cup in box")), Macro("f", ("look around",))]
    assert problem is None
    assert macros[0].label == "[f] open box, then put cup in box"


def test_macros_are_capped_per_function_and_in_length() -> None:
    config = AgentConfig(max_macros=2, max_macro_actions=3)
    value = [["a"] * 5, ["b"], ["a", "b"]]
    macros, _ = macros_from("f", value, ["a", "b"], config)
    assert macros == [Macro("f", ("a", "a", "a")), Macro("f", ("b",))]


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ({"a": 1}, "returned dict, not a list of action lists"),
        ([["a", 3]], "not a list of action strings"),
        ([[]], "not a list of action strings"),
        ([["nowhere"]], "none starting with a valid action"),
    ],
)
def test_bad_return_values_are_problems_not_crashes(value: Any, problem: str) -> None:
    macros, found = macros_from("f", value, ["a"], CONFIG)
    assert macros == []
    assert found is not None
    assert problem in found


async def test_functions_run_in_the_sandbox_with_the_four_arguments() -> None:
    # The function echoes what it was given, and where it runs, as "actions".
    echo = function(
        "echo",
        "names = repr(sorted(locals()))\n"
        "import os\n"
        "return [[names], [repr(history)], [os.getcwd()], ['look']]",
    )
    seen = [repr(sorted(ARGS)), repr([["take cup", "You take the cup."]])]
    macros, problems = await offer_macros(
        [echo],
        task="t",
        observation="o",
        valid_actions=[*seen, "look"],
        history=[("take cup", "You take the cup.")],
        config=CONFIG,
    )
    assert problems == []
    # The scratch cwd is not a valid action, so that item is dropped.
    assert [m.actions[0] for m in macros] == [*seen, "look"]


async def test_a_failing_function_is_reported_and_the_others_still_offer() -> None:
    broken = function("broken", "raise ValueError('no idea')")
    slow = function("slow", "while True:\n    pass")
    fine = function("fine", "return [['look around']]")
    # The loop is stopped by the CPU limit (1 s) or the wall-clock timeout; the
    # timeout leaves the other two functions room for a slow interpreter start.
    config = AgentConfig(sandbox=attrs_limits(timeout=3.0, cpu_seconds=1))
    macros, problems = await offer_macros(
        [broken, slow, fine],
        task="t",
        observation="o",
        valid_actions=["look around"],
        history=[],
        config=config,
    )
    assert macros == [Macro("fine", ("look around",))]
    assert any(p.startswith("broken failed: ValueError: no idea") for p in problems)
    assert any(p.startswith("slow failed:") for p in problems)


def attrs_limits(**kwargs: Any) -> Any:
    from fgo_actors.agent.sandbox import SandboxLimits

    return SandboxLimits(**{"memory_mb": 256, "cpu_seconds": 2, **kwargs})


def test_example_modules_carry_their_source_files() -> None:
    for module_name, fn_name, source in [
        ("twc_expert.json", "tidy", "twc_tidy.py"),
        ("twc_harmful.json", "stash", "twc_stash.py"),
    ]:
        raw = json.loads((EXAMPLES_DIR / module_name).read_text(encoding="utf-8"))
        assert schema_error("module", raw) is None
        (fn,) = [f for f in raw["functions"] if f["name"] == fn_name]
        assert fn["code"] == (EXAMPLES_DIR / source).read_text(encoding="utf-8"), (
            f"run scripts/sync_example_modules.py: {module_name} is out of step with {source}"
        )
        assert set(fn["parameters"]["required"]) == set(ARGS)


async def play_test_seed_0(
    url: str, module: Module, config: AgentConfig | None = None
) -> Trajectory:
    """One rollout of twc test seed 0 in the real game, against the server at ``url``."""
    env = await trio.to_thread.run_sync(TextWorldExpress)
    try:
        async with LLMGateway(GatewayConfig(base_url=url, model="m")) as gw:
            return await rollout(env, Task("twc", "test", 0, TWC), module, gw, config)
    finally:
        await trio.to_thread.run_sync(env.close)


OPTION = re.compile(r"^(\d+)\. (.+)$", re.MULTILINE)


def first_macro(body: dict[str, Any]) -> str:
    """Choose the first [tidy] option, else 'look around'."""
    options = OPTION.findall(body["messages"][-1]["content"])
    for number, text in options:
        if text.startswith("[tidy]"):
            return str(number)
    return str(next(n for n, text in options if text == "look around"))


async def test_the_expert_macro_solves_a_game_in_two_turns(start_llm: StartLLM) -> None:
    server, url = await start_llm(policy=first_macro)
    module = load_module(EXAMPLES_DIR / "twc_expert.json")
    traj = await play_test_seed_0(url, module)
    assert traj.outcome.success
    assert traj.metadata is not None
    assert traj.metadata["steps"] == 2
    assert traj.metadata["macros_played"] == 2
    assert traj.metadata["function_problems"] == []
    assert schema_error("trajectory", traj.to_json()) is None
    # The shortcut is explained once, in the stable system prompt.
    assert "shortcuts from your module" in server.requests[0].body["messages"][0]["content"]
    chosen = [s.content or "" for s in traj.steps if s.role == "assistant"]
    assert all("-> [tidy] take " in c for c in chosen)
    # The record shows every action the macro played, with its observation.
    assert "> open " in (traj.steps[-1].content or "") or "> put " in (traj.steps[-1].content or "")


async def test_a_macro_stops_at_the_first_action_that_is_not_possible(
    start_llm: StartLLM,
) -> None:
    # Offer "take X, then fly, then look around": only the take is played.
    wander = function(
        "wander",
        "takes = [a for a in valid_actions if a.startswith('take ')]\n"
        "return [[takes[0], 'fly to the moon', 'look around']] if takes else []",
    )
    _server, url = await start_llm(policy=lambda body: "1")
    module = Module(functions=(wander,))
    traj = await play_test_seed_0(url, module, AgentConfig(max_steps=1))
    last = traj.steps[-1].content or ""
    assert last.startswith("> take ")
    assert "shortcut stopped: 'fly to the moon' is not possible now" in last
    assert "look around" not in last


async def test_function_failures_reach_the_trajectory_for_the_optimizer(
    start_llm: StartLLM,
) -> None:
    broken = function("broken", "return 1 / 0")
    _server, url = await start_llm(policy=lambda body: "1")
    traj = await play_test_seed_0(url, Module(functions=(broken,)), AgentConfig(max_steps=2))
    assert traj.metadata is not None
    assert traj.metadata["steps"] == 2
    assert traj.metadata["macros_played"] == 0
    assert traj.metadata["function_problems"] == [
        "broken failed: ZeroDivisionError: division by zero"
    ]
    assert "(function broken failed: ZeroDivisionError" in (traj.steps[1].content or "")
    # Recorded once, where it first happened, not on every turn.
    assert "function broken failed" not in (traj.steps[3].content or "")


async def test_functions_can_be_switched_off(start_llm: StartLLM) -> None:
    server, url = await start_llm(policy=lambda body: "2")
    module = load_module(EXAMPLES_DIR / "twc_expert.json")
    traj = await play_test_seed_0(url, module, AgentConfig(max_steps=2, use_functions=False))
    assert traj.metadata is not None
    assert traj.metadata["macros_played"] == 0
    for request in server.requests:
        assert "shortcuts from your module" not in request.prompt
        assert not any(text.startswith("[") for _, text in OPTION.findall(request.prompt))
