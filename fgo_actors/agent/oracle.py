"""The oracle behaviour policy: an environment's gold path, with random detours, and no LLM.

``fgo optimize`` learns from the difference between runs that succeed and runs
that fail, and a small model's own episodes rarely succeed. The oracle plays
the environment's gold path (``env.gold_actions(task)``, a known solution);
with probability ε at each step it takes a uniformly random valid action
instead. When the next gold action is not valid now (a detour got in its
way), it takes a random valid action, and tries the gold path again from the
same point on the next turn. Each episode draws its own ε uniformly from
``[0, epsilon]``, so one collection holds clean solutions, recoveries and
failures. All randomness is seeded from ``seed`` and the task id: an episode
comes out the same whatever the other tasks and the number of workers.

Episodes are recorded in the reference agent's format (``rollout.rollout``),
so ``fgo optimize`` reads them the same way: the system prompt, one (user,
assistant) pair per turn with the turn record ``turns_of`` reads back (the
user step's ``valid_actions``, the assistant step's ``played`` and
``score``), the last observation, and the outcome. An assistant step's
content is the action played. The metadata says ``"policy": "oracle"`` and
the episode's drawn ``epsilon``, and counts its ``random_actions``.

The environment must list its valid actions (the numbered-options mode of the
agent) and have a ``gold_actions(task)`` method; an episode takes a few
milliseconds of simulator time per step.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import trio

from .._core.model import Module, Step, Trajectory
from .envs import Environment, Task
from .rollout import _finish, play_tasks, system_prompt, turn_reply


def check_epsilon(epsilon: float) -> float:
    """``epsilon`` if it is a probability, else ValueError."""
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be between 0 and 1, got {epsilon:g}")
    return epsilon


def play_oracle(
    env: Environment,
    task: Task,
    *,
    epsilon: float,
    seed: int = 0,
    max_steps: int = 25,
    trajectory_id: str | None = None,
) -> Trajectory:
    """Play one episode of ``task`` with the oracle policy; its Trajectory.

    Synchronous (it drives the environment directly): run it in a worker thread.
    """
    check_epsilon(epsilon)
    gold_actions: Callable[[Task], Sequence[str]] | None = getattr(env, "gold_actions", None)
    if not callable(gold_actions):
        raise ValueError(
            f"the oracle policy plays an environment's gold path, and environment "
            f"{env.name!r} (tasks {task.env!r}) has no gold_actions"
        )
    rng = random.Random(f"{seed}:{task.id}")
    drawn = rng.uniform(0.0, epsilon)
    gold = [str(a) for a in gold_actions(task)]
    result = env.reset(task)
    if not result.valid_actions and not result.done:
        raise ValueError(
            f"the oracle policy picks among listed valid actions, and environment "
            f"{env.name!r} (tasks {task.env!r}) lists none"
        )
    description = env.task_description or task.id
    recorded: list[Step] = [Step(role="system", content=system_prompt(Module()))]
    observation = result.observation
    steps = on_path = random_actions = 0
    while not result.done and steps < max_steps:
        actions = list(result.valid_actions)
        if not actions:
            break
        planned = gold[on_path] if on_path < len(gold) else None
        detour = rng.random() < drawn  # drawn every step, so one choice never shifts the next
        if planned in actions and not detour:
            action = planned
        else:
            action = rng.choice(actions)
            random_actions += 1
        if action == planned:
            on_path += 1
        recorded.append(Step(role="user", content=observation, extra={"valid_actions": actions}))
        result = env.step(action)
        observation = result.observation
        steps += 1
        recorded.append(turn_reply(action, [action], result.score))
    return _finish(
        task,
        description,
        recorded,
        result,
        observation,
        trajectory_id=trajectory_id,
        steps=steps,
        invalid_replies=0,
        macros_played=0,
        function_problems=[],
        metadata={"policy": "oracle", "epsilon": drawn, "random_actions": random_actions},
    )


async def collect_oracle(
    tasks: Sequence[Task],
    out: trio.MemorySendChannel[Trajectory],
    *,
    epsilon: float,
    seed: int = 0,
    workers: int = 1,
    max_steps: int = 25,
    make_env: Callable[[str], Environment] | None = None,
) -> None:
    """Play every task with the oracle policy in ``workers`` concurrent workers
    (each owns its environments); send each Trajectory to ``out`` and close it.

    ``epsilon`` bounds each episode's probability of a random action (0 plays
    the gold path; 1 is a random walk). An environment with no gold path is a
    ValueError, raised from the workers' nursery (in an ExceptionGroup).
    """
    check_epsilon(epsilon)

    async def play(env: Environment, task: Task) -> Trajectory:
        return await trio.to_thread.run_sync(
            lambda: play_oracle(env, task, epsilon=epsilon, seed=seed, max_steps=max_steps)
        )

    await play_tasks(tasks, out, play, workers=workers, make_env=make_env, actor="oracle")
