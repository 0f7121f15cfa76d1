"""The reference agent: acts in an Environment with a Module, and records a Trajectory.

Built so that a module can steer a small model:
- the module's instructions and rules open the system prompt; the most
  relevant rules can also be restated next to each observation
  (``AgentConfig.restate_rules``), which is off by default: on the dev fold
  it cost a fifth more prompt and did not help the 1.5B agent;
- the valid actions are offered as a numbered list and the reply is taken by
  number, with no fuzzy mapping that could change what the model meant; a
  reply that names no listed number is an invalid turn, recorded as such;
- the module's functions act as macro-actions: each turn, every function is
  called in a sandboxed subprocess (``sandbox.run_function``) with the
  keyword arguments ``task``, ``observation``, ``valid_actions`` and
  ``history``, and returns a list of macros (each a list of environment
  actions); each macro is offered as one numbered option, ahead of the plain
  actions, and played action by action while each is still valid;
- the prompt only grows from step to step (system prompt, then the turns so
  far), so llama.cpp reuses its cached prefix and evaluates just the new
  turn; when the turns outgrow their token budget, the oldest half is
  dropped at once, which costs one cache miss rather than one per step.

Each numbered-options turn is recorded compactly, with the extra fields that
``turns_of`` reads back: the user step carries ``valid_actions`` (the
environment's options, macros left out) and the assistant step ``played``
(the environment actions the turn played; none for an invalid reply) and
``score`` (the task score after them).

An environment that lists no valid actions at the start of an episode (BFCL
multi-turn) is played in tool-call mode instead: the system prompt carries the
task and the environment's ``functions`` (one signature line each, when it has
that attribute), each turn shows the observation and asks for ONE function call
in Python syntax, or ``done`` to end the user's current request, and the first
line of the reply that looks like a call (code fences and backticks stripped)
is the action, for the environment to parse and check. The module's functions
are not offered as macros in this mode: there are no numbered options to put
them among, and an environment call is already one free-form action.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import attrs
import structlog
import trio

from .._core.errors import ReplyRejectedError
from .._core.model import FunctionSpec, Module, Outcome, Step, Trajectory
from .._core.tokens import TokenCounter
from .._llm.gateway import LLMGateway
from .envs import Environment, StepResult, Task
from .sandbox import SandboxLimits, run_function

AGENT_SYSTEM = """\
You are an agent acting in a text environment to complete a task. Each turn \
you see what happened and a numbered list of the actions you can take now. \
Reply with the number of ONE action and nothing else."""

CALL_SYSTEM = """\
You are an assistant that carries out a user's requests by calling functions. \
Each turn you see the user's current request, or the result of your last call. \
Reply with ONE function call in Python syntax, with keyword arguments, and \
nothing else. When the current request is fully handled, or it cannot be \
handled with the functions you have, reply done."""

MACRO_NOTE = (
    "Options that start with [name] are shortcuts from your module: "
    "each plays several actions in a row."
)


_NUMBER = re.compile(r"\d+")
# A call on a reply line: a name (dotted names too, for the environment to
# refuse clearly) right before an opening parenthesis, up to the last ")".
_CALL = re.compile(r"[A-Za-z_][\w.]*\(.*\)")
_FENCE = re.compile(r"^`+(?:python|py)?\s*|`+$")
END_TURN = "done"


@attrs.frozen
class AgentConfig:
    max_steps: int = 25
    history_tokens: int = 2000  # budget for earlier turns in the prompt
    max_reply_tokens: int = 8
    max_call_tokens: int = 128  # the reply cap in tool-call mode (a call with its arguments)
    max_invalid: int = 3  # invalid replies in a row that end the episode
    # Rules restated next to each observation: the most relevant few (by words
    # shared with the observation and options), or all of them when None. The
    # system prompt always holds all of them. Off by default: on twc:dev:0-39
    # (8 steps) restating one rule solved 9/40 with a learned module against
    # 14/40 without, 15/40 either way with the expert module, and cost 12-22%
    # more prompt tokens.
    restate_rules: int | None = 0
    use_functions: bool = True  # offer the module's functions as macro-actions
    max_macros: int = 4  # options taken from each function per turn
    max_macro_actions: int = 8  # actions in one macro
    history_pairs: int = 30  # (action, observation) pairs passed to functions
    sandbox: SandboxLimits = attrs.field(
        factory=lambda: SandboxLimits(timeout=5.0, memory_mb=256, cpu_seconds=2)
    )


@attrs.frozen
class Macro:
    """A sequence of environment actions offered by the module function ``function``."""

    function: str
    actions: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"[{self.function}] " + ", then ".join(self.actions)


def system_prompt(module: Module, *, macros: bool = False) -> str:
    """The reference agent's system prompt: its opening, then the module's own
    part (``Module.system_prompt``, what any agent can load)."""
    parts = [AGENT_SYSTEM]
    if macros and module.functions:
        parts.append(MACRO_NOTE)
    if own := module.system_prompt():
        parts.append(own)
    return "\n\n".join(parts)


_WORD = re.compile(r"[a-z]{4,}")
# Words too common to tell rules apart (", then " joins every macro's actions).
_STOP_WORDS = frozenset(
    [
        "then",
        "that",
        "this",
        "with",
        "from",
        "your",
        "have",
        "into",
        "when",
        "what",
        "which",
        "there",
        "their",
        "they",
        "them",
        "were",
        "will",
        "would",
        "should",
        "could",
        "each",
        "every",
        "other",
        "only",
        "also",
        "than",
        "more",
        "most",
        "some",
        "such",
        "very",
        "just",
        "like",
        "make",
        "does",
        "done",
        "been",
        "being",
        "about",
        "after",
    ]
)


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower())) - _STOP_WORDS


def relevant_rules(module: Module, text: str, limit: int | None) -> list[str]:
    """The texts of the ``limit`` rules sharing the most words with ``text``
    (all rules when ``limit`` is None), in module order; rules sharing no word
    are left out unless all are wanted."""
    if limit is None:
        return [r.text for r in module.rules]
    words = _words(text)
    scored = [(len(words & _words(r.text)), i) for i, r in enumerate(module.rules)]
    best = sorted((s for s in scored if s[0] > 0), key=lambda s: (-s[0], s[1]))[:limit]
    return [module.rules[i].text for _, i in sorted(best, key=lambda s: s[1])]


def turn_message(
    observation: str,
    actions: Sequence[str],
    module: Module,
    note: str | None = None,
    *,
    restate: int | None = None,
) -> str:
    """One turn's user message: the observation, a note, the rules most relevant
    to this turn (``restate`` of them, or all when None), and the numbered options."""
    parts = [observation.strip()]
    if note:
        parts.append(note)
    listing_text = "\n".join(actions)
    rules = relevant_rules(module, f"{observation}\n{listing_text}", restate)
    if rules:
        parts.append("Remember:\n" + "\n".join(f"- {text}" for text in rules))
    listing = "\n".join(f"{i}. {a}" for i, a in enumerate(actions, start=1))
    parts.append(f"Actions:\n{listing}\nReply with the number of one action.")
    return "\n\n".join(parts)


def _drop_oldest_half(
    window: list[dict[str, str]], counter: TokenCounter, budget: int
) -> list[dict[str, str]]:
    """Drop whole (user, assistant) turns from the front until half the budget is left."""
    while window and counter.count_messages(window) > budget // 2:
        window = window[2:]
    return window


async def _ask(
    gateway: LLMGateway,
    system: str,
    window: list[dict[str, str]],
    user: str,
    max_tokens: int,
    history_tokens: int,
) -> tuple[str, list[dict[str, str]]]:
    """One agent turn: send the system prompt, the earlier turns and ``user``;
    return the reply (an empty one becomes a note, an invalid turn) and the
    turns so far, the oldest half dropped once they outgrow ``history_tokens``."""
    messages = [{"role": "system", "content": system}, *window, {"role": "user", "content": user}]
    try:
        reply = await gateway.chat("agent", messages, max_tokens=max_tokens, accept_cut=True)
    except ReplyRejectedError as e:
        reply = f"(no usable reply: {e})"
    window = [*window, {"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    if gateway.counter.count_messages(window) > history_tokens:
        window = _drop_oldest_half(window, gateway.counter, history_tokens)
    return reply, window


def macros_from(
    function: str, value: object, valid_actions: Sequence[str], config: AgentConfig
) -> tuple[list[Macro], str | None]:
    """The usable macros in a function's return value, and a problem to record, if any.

    A function returns a list whose items are a list of action strings (a
    macro) or one action string. A macro must start with an action that is
    valid now; later actions are checked as it is played. Empty, repeated and
    unusable items are dropped; a return value of the wrong shape is a problem.
    """
    if not isinstance(value, list):
        return [], f"{function} returned {type(value).__name__}, not a list of action lists"
    valid = set(valid_actions)
    macros: list[Macro] = []
    skipped = 0
    for item in value:
        actions = [item] if isinstance(item, str) else item
        if (
            not isinstance(actions, list)
            or not actions
            or not all(isinstance(a, str) and a.strip() for a in actions)
        ):
            return macros, f"{function} returned an item that is not a list of action strings"
        macro = Macro(function, tuple(a.strip() for a in actions[: config.max_macro_actions]))
        if macro.actions[0] not in valid:
            skipped += 1
            continue
        if macro not in macros:
            macros.append(macro)
        if len(macros) >= config.max_macros:
            break
    problem = None
    if skipped and not macros:
        problem = f"{function} offered {skipped} macros, none starting with a valid action"
    return macros, problem


async def offer_macros(
    functions: Sequence[FunctionSpec],
    *,
    task: str,
    observation: str,
    valid_actions: Sequence[str],
    history: Sequence[tuple[str, str]],
    config: AgentConfig,
) -> tuple[list[Macro], list[str]]:
    """Call every function in the sandbox; return the macros they offer and their problems."""
    arguments = {
        "task": task,
        "observation": observation,
        "valid_actions": list(valid_actions),
        "history": [list(pair) for pair in history[-config.history_pairs :]],
    }
    offered: list[Macro] = []
    problems: list[str] = []
    for fn in functions:
        result = await run_function(fn.code, fn.name, arguments, config.sandbox)
        if not result.ok:
            problems.append(f"{fn.name} failed: {result.error}")
            continue
        macros, problem = macros_from(fn.name, result.value, valid_actions, config)
        offered += [m for m in macros if m not in offered]
        if problem:
            problems.append(problem)
    return offered, problems


def play_macro(
    env: Environment, macro: Macro, first: StepResult
) -> tuple[StepResult, str, list[tuple[str, str]]]:
    """Play ``macro`` while each action is valid; the last result, a combined
    observation, and the (action, observation) pairs played. Runs in a thread."""
    result = first
    played: list[tuple[str, str]] = []
    lines: list[str] = []
    for action in macro.actions:
        if result.done:
            break
        if action not in result.valid_actions:
            lines.append(
                f"(the [{macro.function}] shortcut stopped: {action!r} is not possible now)"
            )
            break
        result = env.step(action)
        played.append((action, result.observation))
        lines.append(f"> {action}\n{result.observation.strip()}")
    return result, "\n".join(lines), played


def parse_choice(reply: str, n_actions: int) -> int | None:
    """The 0-based index of the action the reply names by number, or None."""
    match = _NUMBER.search(reply)
    if match is None:
        return None
    number = int(match.group())
    return number - 1 if 1 <= number <= n_actions else None


def call_system_prompt(
    module: Module, task: str, functions: Sequence[str], *, names_only: bool = False
) -> str:
    """The system prompt of tool-call mode: what the model is, the module's
    instructions and rules, then the episode's task and functions (their names
    only with ``names_only``, for the compact record)."""
    parts = [CALL_SYSTEM]
    if own := module.system_prompt():
        parts.append(own)
    parts.append(f"Task: {task}")
    if functions and names_only:
        names = ", ".join(f.split("(", 1)[0] for f in functions)
        parts.append(f"Functions (signatures left out of this record): {names}")
    elif functions:
        parts.append("Functions:\n" + "\n".join(functions))
    return "\n\n".join(parts)


def call_message(
    observation: str, module: Module, note: str | None = None, *, restate: int | None = None
) -> str:
    """One tool-call-mode turn: the observation, a note, the rules most relevant
    to it (``restate`` of them, or all when None), and what to reply."""
    parts = [observation.strip()]
    if note:
        parts.append(note)
    rules = relevant_rules(module, observation, restate)
    if rules:
        parts.append("Remember:\n" + "\n".join(f"- {text}" for text in rules))
    parts.append(f"Reply with one function call, or {END_TURN}.")
    return "\n\n".join(parts)


def parse_call_reply(reply: str) -> str | None:
    """The action a tool-call-mode reply names: ``done``, or its first line
    that looks like a call (code fences, backticks and one pair of enclosing
    brackets stripped), or None. The environment parses and checks the call."""
    for line in reply.splitlines():
        text = _FENCE.sub("", line.strip()).strip().rstrip(";").strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1].strip()
        if text.lower().rstrip(".!") in (END_TURN, f"{END_TURN}()"):
            return END_TURN
        match = _CALL.search(text)
        if match is not None:
            return match.group()
    return None


async def rollout(
    env: Environment,
    task: Task,
    module: Module,
    gateway: LLMGateway,
    config: AgentConfig | None = None,
    *,
    trajectory_id: str | None = None,
) -> Trajectory:
    """Play one episode of ``task`` and return it as a Trajectory (protocol format)."""
    config = config or AgentConfig()
    log = structlog.get_logger()
    result: StepResult = await trio.to_thread.run_sync(env.reset, task)
    description = env.task_description or task.id
    if not result.valid_actions and not result.done:
        return await _call_rollout(
            env, task, module, gateway, config, result, description, trajectory_id
        )
    functions = module.functions if config.use_functions else ()
    system = system_prompt(module, macros=bool(functions))
    recorded: list[Step] = [Step(role="system", content=system)]
    window: list[dict[str, str]] = []
    history: list[tuple[str, str]] = []
    invalid_in_a_row = invalid_total = steps = macros_played = 0
    function_problems: list[str] = []
    note: str | None = None
    observation = result.observation
    while not result.done and steps < config.max_steps:
        actions = list(result.valid_actions)
        if not actions:
            break
        macros: list[Macro] = []
        problems: list[str] = []
        if functions:
            macros, problems = await offer_macros(
                functions,
                task=description,
                observation=observation,
                valid_actions=actions,
                history=history,
                config=config,
            )
            # Each problem is recorded once per episode, where it first happened.
            problems = [p for p in problems if p not in function_problems]
            for problem in problems:
                function_problems.append(problem)
                log.warning("function_problem", task=task.id, problem=problem)
        options = [m.label for m in macros] + actions
        user = turn_message(
            f"Task: {description}\n\n{observation}",
            options,
            module,
            note,
            restate=config.restate_rules,
        )
        reply, window = await _ask(
            gateway, system, window, user, config.max_reply_tokens, config.history_tokens
        )
        steps += 1
        choice = parse_choice(reply, len(options))
        # The record is compact (what an optimizer needs to read): the
        # observation, and the reply with the option it chose; not the option
        # list and restated rules the prompt carried. Function failures are
        # recorded so that an optimizer can repair the function.
        seen = "\n".join(
            [observation, *(f"({n})" for n in [note] if n), *(f"(function {p})" for p in problems)]
        )
        chosen = reply.strip() if choice is None else f"{reply.strip()} -> {options[choice]}"
        # The turn record (``turns_of``): the environment's options on the user
        # step; the actions played and the score after them on the reply.
        recorded.append(Step(role="user", content=seen, extra={"valid_actions": actions}))
        if choice is None:
            recorded.append(turn_reply(chosen, [], result.score))
            invalid_in_a_row += 1
            invalid_total += 1
            note = f"Your last reply ({reply.strip()[:40]!r}) named no listed action number."
            if invalid_in_a_row >= config.max_invalid:
                break
            continue
        invalid_in_a_row = 0
        note = None
        if choice < len(macros):
            macros_played += 1
            result, observation, played = await trio.to_thread.run_sync(
                play_macro, env, macros[choice], result
            )
            history += played
            acted = [a for a, _ in played]
        else:
            action = actions[choice - len(macros)]
            result = await trio.to_thread.run_sync(env.step, action)
            observation = result.observation
            history.append((action, observation))
            acted = [action]
        recorded.append(turn_reply(chosen, acted, result.score))
    return _finish(
        task,
        description,
        recorded,
        result,
        observation,
        trajectory_id=trajectory_id,
        steps=steps,
        invalid_replies=invalid_total,
        macros_played=macros_played,
        function_problems=function_problems,
    )


async def _call_rollout(
    env: Environment,
    task: Task,
    module: Module,
    gateway: LLMGateway,
    config: AgentConfig,
    result: StepResult,
    description: str,
    trajectory_id: str | None,
) -> Trajectory:
    """``rollout`` in tool-call mode, from the reset's ``result``: each reply is
    one function call (or ``done``) for the environment to parse and run."""
    functions = tuple(str(f) for f in env.functions)
    system = call_system_prompt(module, description, functions)
    record = call_system_prompt(module, description, functions, names_only=True)
    recorded: list[Step] = [Step(role="system", content=record)]
    window: list[dict[str, str]] = []
    invalid_in_a_row = invalid_total = steps = 0
    note: str | None = None
    observation = result.observation
    while not result.done and steps < config.max_steps:
        user = call_message(observation, module, note, restate=config.restate_rules)
        reply, window = await _ask(
            gateway, system, window, user, config.max_call_tokens, config.history_tokens
        )
        steps += 1
        action = parse_call_reply(reply)
        seen = "\n".join([observation, *(f"({n})" for n in [note] if n)])
        said = reply.strip()
        recorded += [
            Step(role="user", content=seen),
            Step(
                role="assistant", content=said if action in (None, said) else f"{said} -> {action}"
            ),
        ]
        if action is None:
            invalid_in_a_row += 1
            invalid_total += 1
            note = f"Your last reply ({said[:40]!r}) was neither a function call nor {END_TURN}."
            if invalid_in_a_row >= config.max_invalid:
                break
            continue
        invalid_in_a_row = 0
        note = None
        result = await trio.to_thread.run_sync(env.step, action)
        observation = result.observation
    return _finish(
        task,
        description,
        recorded,
        result,
        observation,
        trajectory_id=trajectory_id,
        steps=steps,
        invalid_replies=invalid_total,
        macros_played=0,
        function_problems=[],
    )


def turn_reply(content: str, played: Sequence[str], score: float) -> Step:
    """A turn's assistant step: the reply as recorded, with the environment
    actions it played and the task score after them (see ``turns_of``)."""
    return Step(role="assistant", content=content, extra={"played": list(played), "score": score})


def _finish(
    task: Task,
    description: str,
    recorded: list[Step],
    result: StepResult,
    observation: str,
    *,
    trajectory_id: str | None,
    steps: int,
    invalid_replies: int,
    macros_played: int,
    function_problems: list[str],
    metadata: Mapping[str, Any] | None = None,
) -> Trajectory:
    """The episode as a Trajectory: the steps, the last observation, the outcome.
    ``metadata`` adds to (or overrides) the fields every episode records."""
    ended = (
        "task solved"
        if result.success
        else ("task failed" if result.done else f"stopped after {steps} steps")
    )
    recorded.append(Step(role="user", content=observation))
    structlog.get_logger().info("rollout_done", task=task.id, success=result.success, steps=steps)
    return Trajectory(
        id=trajectory_id or task.id,
        task=description,
        steps=tuple(recorded),
        outcome=Outcome(
            success=result.success,
            score=result.score,
            feedback=f"{ended}; score {result.score:g}; {invalid_replies} invalid replies",
        ),
        metadata={
            **task.metadata(),
            "steps": steps,
            "invalid_replies": invalid_replies,
            "macros_played": macros_played,
            "function_problems": function_problems,
            "policy": "llm",
            **(metadata or {}),
        },
    )


async def collect(
    tasks: Sequence[Task],
    module: Module,
    gateway: LLMGateway,
    out: trio.MemorySendChannel[Trajectory],
    *,
    workers: int = 2,
    config: AgentConfig | None = None,
    make_env: Callable[[str], Environment] | None = None,
) -> None:
    """Play every task with ``workers`` concurrent rollouts; send each Trajectory to ``out``.

    Each worker owns its environments (one per environment name), made and
    closed in worker threads. LLM calls are bounded by the gateway's limiter.
    """

    async def play(env: Environment, task: Task) -> Trajectory:
        return await rollout(env, task, module, gateway, config)

    await play_tasks(tasks, out, play, workers=workers, make_env=make_env, actor="agent")


async def play_tasks(
    tasks: Sequence[Task],
    out: trio.MemorySendChannel[Trajectory],
    play: Callable[[Environment, Task], Awaitable[Trajectory]],
    *,
    workers: int,
    make_env: Callable[[str], Environment] | None = None,
    actor: str = "agent",
) -> None:
    """Play every task with ``play(env, task)`` in ``workers`` concurrent
    workers (named ``<actor>-<n>``); send each Trajectory to ``out`` and close it.

    Each worker owns its environments (one per environment name), made and
    closed in worker threads.
    """
    from .envs import make_env as default_make_env

    factory = make_env or default_make_env
    send_tasks, receive_tasks = trio.open_memory_channel[Task](0)

    async def feed() -> None:
        with send_tasks:
            for task in tasks:
                try:
                    await send_tasks.send(task)
                except trio.BrokenResourceError:  # every worker stopped: a worker's error
                    return  # is the one to report, not this

    async def worker(
        name: str,
        inbox: trio.MemoryReceiveChannel[Task],
        outbox: trio.MemorySendChannel[Trajectory],
    ) -> None:
        structlog.contextvars.bind_contextvars(actor=name)
        envs: dict[str, Environment] = {}
        try:
            with inbox, outbox:
                async for task in inbox:
                    env = envs.get(task.env)
                    if env is None:
                        env = envs[task.env] = await trio.to_thread.run_sync(factory, task.env)
                    await outbox.send(await play(env, task))
        finally:
            # Shielded: on cancellation (Ctrl-C, a stopped bench) the JVMs and
            # their pipes must still be closed.
            with trio.CancelScope(shield=True):
                for env in envs.values():
                    await trio.to_thread.run_sync(env.close)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed)
        with receive_tasks, out:
            for i in range(max(1, workers)):
                nursery.start_soon(worker, f"{actor}-{i + 1}", receive_tasks.clone(), out.clone())
