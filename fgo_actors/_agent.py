"""The reference agent: acts in an Environment with a Module, and records a Trajectory.

Built so that a module can steer a small model:
- the module's instructions and rules open the system prompt, and the rules
  are restated next to every observation (small models follow recent text);
- the valid actions are offered as a numbered list and the reply is taken by
  number, with no fuzzy mapping that could change what the model meant; a
  reply that names no listed number is an invalid turn, recorded as such;
- the prompt only grows from step to step (system prompt, then the turns so
  far), so llama.cpp reuses its cached prefix and evaluates just the new
  turn; when the turns outgrow their token budget, the oldest half is
  dropped at once, which costs one cache miss rather than one per step.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import attrs
import structlog
import trio

from ._errors import ReplyRejectedError
from ._gateway import LLMGateway
from ._model import Module, Outcome, Step, Trajectory
from ._tokens import TokenCounter
from .envs import Environment, StepResult, Task

AGENT_SYSTEM = """\
You are an agent acting in a text environment to complete a task. Each turn \
you see what happened and a numbered list of the actions you can take now. \
Reply with the number of ONE action and nothing else."""

_NUMBER = re.compile(r"\d+")


@attrs.frozen
class AgentConfig:
    max_steps: int = 25
    history_tokens: int = 2000  # budget for earlier turns in the prompt
    max_reply_tokens: int = 8
    max_invalid: int = 3  # invalid replies in a row that end the episode


def system_prompt(module: Module) -> str:
    parts = [AGENT_SYSTEM]
    if module.instructions.strip():
        parts.append("Instructions:\n" + module.instructions.strip())
    if module.rules:
        parts.append("Rules learned from experience:\n" + _rule_lines(module))
    return "\n\n".join(parts)


def _rule_lines(module: Module) -> str:
    return "\n".join(f"- {r.text}" for r in module.rules)


def turn_message(
    observation: str, actions: Sequence[str], module: Module, note: str | None = None
) -> str:
    parts = [observation.strip()]
    if note:
        parts.append(note)
    if module.rules:
        parts.append("Remember:\n" + _rule_lines(module))
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


def parse_choice(reply: str, n_actions: int) -> int | None:
    """The 0-based index of the action the reply names by number, or None."""
    match = _NUMBER.search(reply)
    if match is None:
        return None
    number = int(match.group())
    return number - 1 if 1 <= number <= n_actions else None


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
    description = getattr(env, "task_description", "") or task.id
    system = system_prompt(module)
    recorded: list[Step] = [Step(role="system", content=system)]
    window: list[dict[str, str]] = []
    invalid_in_a_row = invalid_total = steps = 0
    note: str | None = None
    while not result.done and steps < config.max_steps:
        actions = list(result.valid_actions)
        if not actions:
            break
        user = turn_message(f"Task: {description}\n\n{result.observation}", actions, module, note)
        messages = [
            {"role": "system", "content": system},
            *window,
            {"role": "user", "content": user},
        ]
        try:
            reply = await gateway.chat(
                "agent", messages, max_tokens=config.max_reply_tokens, accept_cut=True
            )
        except ReplyRejectedError as e:  # an empty reply: an invalid turn
            reply = f"(no usable reply: {e})"
        steps += 1
        window += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        if gateway.counter.count_messages(window) > config.history_tokens:
            window = _drop_oldest_half(window, gateway.counter, config.history_tokens)
        choice = parse_choice(reply, len(actions))
        # The record is compact (what an optimizer needs to read): the
        # observation, and the reply with the action it chose; not the action
        # list and restated rules the prompt carried.
        seen = result.observation if note is None else f"{result.observation}\n({note})"
        chosen = reply.strip() if choice is None else f"{reply.strip()} -> {actions[choice]}"
        recorded += [Step(role="user", content=seen), Step(role="assistant", content=chosen)]
        if choice is None:
            invalid_in_a_row += 1
            invalid_total += 1
            note = f"Your last reply ({reply.strip()[:40]!r}) named no listed action number."
            if invalid_in_a_row >= config.max_invalid:
                break
            continue
        invalid_in_a_row = 0
        note = None
        result = await trio.to_thread.run_sync(env.step, actions[choice])
    ended = (
        "task solved"
        if result.success
        else ("task failed" if result.done else f"stopped after {steps} steps")
    )
    recorded.append(Step(role="user", content=result.observation))
    log.info("rollout_done", task=task.id, success=result.success, steps=steps)
    return Trajectory(
        id=trajectory_id or task.id,
        task=description,
        steps=tuple(recorded),
        outcome=Outcome(
            success=result.success,
            score=result.score,
            feedback=f"{ended}; score {result.score:g}; {invalid_total} invalid replies",
        ),
        metadata={
            "task_type": task.env,
            "env": task.env,
            "fold": task.fold,
            "seed": task.seed,
            "params": task.params,
            "steps": steps,
            "invalid_replies": invalid_total,
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
    from .envs import make_env as default_make_env

    factory = make_env or default_make_env
    send_tasks, receive_tasks = trio.open_memory_channel[Task](0)

    async def feed() -> None:
        with send_tasks:
            for task in tasks:
                await send_tasks.send(task)

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
                    await outbox.send(await rollout(env, task, module, gateway, config))
        finally:
            for env in envs.values():
                await trio.to_thread.run_sync(env.close)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed)
        with receive_tasks, out:
            for i in range(max(1, workers)):
                nursery.start_soon(worker, f"agent-{i + 1}", receive_tasks.clone(), out.clone())
