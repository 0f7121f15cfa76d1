"""Checks a function the optimizer proposes must pass before it is kept.

A module function is LLM-written code: the reference agent calls it every turn
as ``name(task, observation, valid_actions, history)`` (keyword arguments) and
offers each action list it returns as one macro (``rollout.offer_macros``).
Two checks guard that contract, both worded for a re-ask to the LLM:

- ``static_problems``: pure, no I/O, the code is only ever compiled, never
  run. The name is an identifier, ``parameters`` is a JSON Schema object, the
  code compiles and defines a top-level ``def`` of that name that accepts
  the four arguments.
- ``replay_problems``: calls the function in the sandbox (``run_function``,
  a fresh ``python -I`` per call) on a bounded, deterministic sample of the
  subset's recorded turns (``RenderedTrajectory.turns``). It must not fail,
  must return what the agent can use (``rollout.macros_from`` judges the
  shape), and on the successful trajectories its macros must start with the
  action the run actually played on at least one sampled turn.
  Trajectories with no recorded turns (other runtimes, the daemon's store)
  are not replayed: only the static checks apply.
"""

from __future__ import annotations

import ast
import keyword
from collections.abc import Sequence
from typing import Any

import attrs
import jsonschema
import trio

from .._core.model import FunctionSpec, Module, RenderedTrajectory, Turn
from .rollout import AgentConfig, macros_from
from .sandbox import SandboxLimits, SandboxResult, run_function

ARGUMENTS = ("task", "observation", "valid_actions", "history")
SIGNATURE = "(" + ", ".join(ARGUMENTS) + ")"
# At most this many recorded turns are replayed per function, this many at once:
# a sandbox call costs 50-100 ms, so a function is checked in well under a second.
REPLAY_TURNS = 12
REPLAY_CONCURRENCY = 4
# A sandbox error is cut to this many characters: a re-ask note is short.
_ERROR_CHARS = 240


def _signature(args: ast.arguments) -> str:
    names = [a.arg for a in args.posonlyargs]
    if args.posonlyargs:
        names.append("/")
    names += [a.arg for a in args.args]
    if args.vararg is not None:
        names.append("*" + args.vararg.arg)
    elif args.kwonlyargs:
        names.append("*")
    names += [a.arg for a in args.kwonlyargs]
    if args.kwarg is not None:
        names.append("**" + args.kwarg.arg)
    return "(" + ", ".join(names) + ")"


def _binding_problem(args: ast.arguments) -> str | None:
    """Why ``f(task=..., observation=..., valid_actions=..., history=...)`` would
    not bind to these parameters, or None when it would."""
    positional = [*args.posonlyargs, *args.args]
    first_default = len(positional) - len(args.defaults)
    by_keyword = {a.arg for a in args.args} | {a.arg for a in args.kwonlyargs}
    missing = [n for n in ARGUMENTS if n not in by_keyword and args.kwarg is None]
    required = [
        a.arg
        for i, a in enumerate(positional)
        if i < first_default and (a.arg not in ARGUMENTS or i < len(args.posonlyargs))
    ]
    required += [
        a.arg
        for a, default in zip(args.kwonlyargs, args.kw_defaults, strict=True)
        if default is None and a.arg not in ARGUMENTS
    ]
    if missing:
        return f"has no parameter {', '.join(missing)}"
    if required:
        return f"requires {', '.join(required)}, which the agent does not pass"
    return None


def static_problems(fn: FunctionSpec) -> list[str]:
    """What is wrong with ``fn`` before it ever runs; empty when nothing is.

    The code is parsed and compiled, never executed.
    """
    name = fn.name
    problems: list[str] = []
    if not name.isidentifier() or keyword.iskeyword(name):
        problems.append(f"function name {name!r} is not a Python identifier")
    params = fn.parameters
    try:
        jsonschema.Draft202012Validator.check_schema(params)
    except jsonschema.SchemaError as e:
        problems.append(
            f"function {name!r}: parameters is not a valid JSON Schema ({e.message[:120]}); "
            'use {"type": "object", "properties": {...}}'
        )
    else:
        if params.get("type") != "object":
            problems.append(
                f'function {name!r}: parameters must be a JSON Schema with "type": "object"'
            )
    try:
        tree = ast.parse(fn.code, filename="<tool>")
        compile(tree, "<tool>", "exec")
    except SyntaxError as e:
        where = f"line {e.lineno}: " if e.lineno else ""
        text = f" in {e.text.strip()[:60]!r}" if e.text and e.text.strip() else ""
        problems.append(f"function {name!r}: code does not compile: {where}{e.msg}{text}")
        return problems
    except ValueError as e:  # e.g. a NUL byte in the source
        problems.append(f"function {name!r}: code does not compile: {e}")
        return problems
    defs = [
        node
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name
    ]
    if not defs:
        defined = [
            node.name
            for node in tree.body
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        ]
        listed = ", ".join(defined[:10]) if defined else "no function"
        problems.append(
            f"function {name!r}: the code has no top-level 'def {name}{SIGNATURE}:' "
            f"(it defines {listed})"
        )
        return problems
    node = defs[-1]  # the last definition is the one a call finds
    if isinstance(node, ast.AsyncFunctionDef):
        problems.append(f"function {name!r} (line {node.lineno}) is async; write a plain def")
    binding = _binding_problem(node.args)
    if binding is not None:
        problems.append(
            f"function {name!r} (line {node.lineno}) must take {SIGNATURE}; "
            f"it takes {_signature(node.args)} and {binding}"
        )
    return problems


def changed_functions(before: Module, after: Module) -> list[FunctionSpec]:
    """The functions of ``after`` that ``before`` does not hold as they are:
    added ones and revised ones (any field changed)."""
    return [
        f
        for f in after.functions
        if (old := before.function(f.name)) is None or old.to_json() != f.to_json()
    ]


@attrs.frozen
class ReplayCall:
    """One recorded turn to replay: trajectory ``item``'s turn ``number`` (1-based)."""

    item: RenderedTrajectory
    number: int
    turn: Turn
    arguments: dict[str, Any]


def _spread(n: int, k: int) -> list[int]:
    """``k`` of the indices ``0..n-1``, evenly spread, first and last included."""
    if k >= n:
        return list(range(n))
    if k == 1:
        return [0]
    return sorted({round(j * (n - 1) / (k - 1)) for j in range(k)})


def replay_calls(
    items: Sequence[RenderedTrajectory], *, max_turns: int, history_pairs: int
) -> list[ReplayCall]:
    """A deterministic sample of at most ``max_turns`` recorded turns, with the
    arguments the agent would have passed there.

    Turns are shared out round-robin across trajectories, successful ones
    first, and spread evenly within each. ``history`` is rebuilt from the
    earlier turns: each action a turn played, paired with the observation
    the next turn starts from (a macro's actions share that observation);
    like the agent, only the last ``history_pairs`` pairs are passed.
    """
    order = sorted((i for i in items if i.turns), key=lambda i: not i.success)
    quota = dict.fromkeys(range(len(order)), 0)
    left = max_turns
    while left > 0:
        grew = False
        for k, item in enumerate(order):
            if left > 0 and quota[k] < len(item.turns):
                quota[k] += 1
                left -= 1
                grew = True
        if not grew:
            break
    calls: list[ReplayCall] = []
    for k, item in enumerate(order):
        turns = item.turns
        for index in _spread(len(turns), quota[k]):
            history = [
                [action, turns[t + 1].observation]
                for t in range(index)
                for action in turns[t].played
            ]
            turn = turns[index]
            arguments = {
                "task": item.task,
                "observation": turn.observation,
                "valid_actions": list(turn.valid_actions),
                "history": history[-history_pairs:] if history_pairs > 0 else [],
            }
            calls.append(ReplayCall(item, index + 1, turn, arguments))
    return calls


def _quote(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


async def _run_all(
    fn: FunctionSpec, calls: Sequence[ReplayCall], limits: SandboxLimits
) -> list[SandboxResult]:
    """``fn`` on each of ``calls`` in the sandbox, all at once; results in order."""
    results: list[SandboxResult | None] = [None] * len(calls)

    async def one(slot: int, c: ReplayCall) -> None:
        results[slot] = await run_function(fn.code, fn.name, c.arguments, limits)

    async with trio.open_nursery() as nursery:
        for slot, c in enumerate(calls):
            nursery.start_soon(one, slot, c)
    return [r for r in results if r is not None]


async def replay_problems(
    fn: FunctionSpec,
    items: Sequence[RenderedTrajectory],
    limits: SandboxLimits | None = None,
    *,
    max_turns: int = REPLAY_TURNS,
    config: AgentConfig | None = None,
    require_match: bool = True,
) -> list[str]:
    """What goes wrong when ``fn`` runs on the recorded turns of ``items``.

    Runs ``fn`` in the sandbox (``limits``, by default the agent's) on at most
    ``max_turns`` sampled turns, ``REPLAY_CONCURRENCY`` at a time, and stops at
    the first turn (in sample order) where it fails or returns something the
    agent cannot use, naming the trajectory and turn. If it passes them all,
    it must also offer, on at least one sampled turn of a successful
    trajectory, a macro that starts with the action the run played there
    (unless ``require_match`` is False: on turns of other subsets, a function
    whose knowledge does not cover them is not wrong for that).
    Returns [] when there are no recorded turns. Assumes ``static_problems``
    found nothing.
    """
    config = config or AgentConfig()
    limits = limits or config.sandbox
    calls = replay_calls(items, max_turns=max_turns, history_pairs=config.history_pairs)
    success_turns = 0
    matched = False
    example: str | None = None
    for start in range(0, len(calls), REPLAY_CONCURRENCY):
        batch = calls[start : start + REPLAY_CONCURRENCY]
        results = await _run_all(fn, batch, limits)
        for c, result in zip(batch, results, strict=True):
            where = f"trajectory {c.item.id} turn {c.number}"
            if not result.ok:
                error = str(result.error)
                if len(error) > _ERROR_CHARS:
                    error = error[: _ERROR_CHARS - 3] + "..."
                return [f"{where}: {fn.name} failed: {error}"]
            macros, problem = macros_from(fn.name, result.value, c.turn.valid_actions, config)
            if problem is not None:
                return [f"{where}: {problem} (valid_actions holds the actions possible now)"]
            if not (c.item.success and c.turn.played):
                continue
            success_turns += 1
            played = c.turn.played[0]
            if any(m.actions[0] == played for m in macros):
                matched = True
            elif example is None:
                offered = _quote(macros[0].actions[0]) if macros else "nothing"
                example = f"{where} played {_quote(played)}, {fn.name} offered {offered}"
    if matched or success_turns == 0 or not require_match:
        return []
    return [
        f"{fn.name} never offered a macro starting with the action a successful run played, "
        f"on {success_turns} sampled turns (e.g. {example}); offer steps that lead to success"
    ]


async def function_problems(
    functions: Sequence[FunctionSpec],
    items: Sequence[RenderedTrajectory],
    limits: SandboxLimits | None = None,
    *,
    max_turns: int = REPLAY_TURNS,
) -> list[str]:
    """The replay problems of each of ``functions`` on ``items``, in order."""
    problems: list[str] = []
    for fn in functions:
        problems += await replay_problems(fn, items, limits, max_turns=max_turns)
    return problems
