"""Evaluate modules with the reference agent on a task set, with confidence intervals."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
import trio

from .._core.model import Module, Trajectory
from .._core.stats import mean_interval, wilson_interval
from .._llm.gateway import LLMGateway
from .envs import Task
from .executor import Executor, LocalExecutor, Policy
from .rollout import AgentConfig


@attrs.frozen
class EvalSummary:
    """How one module did on a task set."""

    label: str
    episodes: int
    successes: int
    success_rate: float
    success_ci: tuple[float, float]
    score_mean: float
    score_ci: tuple[float, float]
    llm_calls: int
    prompt_tokens: int
    completion_tokens: int
    wall_seconds: float
    outcomes: dict[str, bool] = attrs.field(eq=False)
    # Agent turns in all, turns that played a module function's macro, and
    # replies that named no listed option: did the module's functions get used?
    turns: int = 0
    macro_turns: int = 0
    invalid_replies: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "episodes": self.episodes,
            "successes": self.successes,
            "success_rate": round(self.success_rate, 4),
            "success_ci95": [round(x, 4) for x in self.success_ci],
            "score_mean": round(self.score_mean, 4),
            "score_ci95": [round(x, 4) for x in self.score_ci],
            "llm_calls": self.llm_calls,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "wall_seconds": round(self.wall_seconds, 3),
            "turns": self.turns,
            "macro_turns": self.macro_turns,
            "invalid_replies": self.invalid_replies,
            "outcomes": dict(sorted(self.outcomes.items())),
        }


async def evaluate(
    tasks: Sequence[Task],
    module: Module,
    gateway: LLMGateway,
    *,
    label: str = "module",
    workers: int = 2,
    config: AgentConfig | None = None,
    on_episode: Callable[[Trajectory], None] | None = None,
    executor: Executor | None = None,
) -> tuple[EvalSummary, list[Trajectory]]:
    """Play every task once with ``module``; summarise successes, scores and cost.

    ``on_episode`` is called with each trajectory as its episode ends. The
    episodes run on ``executor`` (by default ``workers`` threads here, through
    ``gateway``); the cost counts the calls of its workers too.
    """
    executor = executor or LocalExecutor(workers=workers)
    policy = Policy(
        kind="llm", module=module, agent=config or AgentConfig(), gateway=gateway.config
    )
    before, spent_before = gateway.statistics(), executor.usage
    started = trio.current_time()
    trajectories: list[Trajectory] = []
    send, receive = trio.open_memory_channel[Trajectory](0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: executor.play(tasks, policy, send, gateway=gateway))
        async with receive:
            async for traj in receive:
                trajectories.append(traj)
                if on_episode is not None:
                    on_episode(traj)
    used = gateway.statistics().since(before)
    spent = executor.usage
    summary = summarise(
        label,
        trajectories,
        llm_calls=sum(used.calls.values()) + spent.calls - spent_before.calls,
        prompt_tokens=sum(used.prompt_tokens.values())
        + spent.prompt_tokens
        - spent_before.prompt_tokens,
        completion_tokens=sum(used.completion_tokens.values())
        + spent.completion_tokens
        - spent_before.completion_tokens,
        wall_seconds=trio.current_time() - started,
    )
    return summary, sorted(trajectories, key=lambda t: t.id)


def summarise(
    label: str,
    trajectories: Sequence[Trajectory],
    *,
    llm_calls: int,
    prompt_tokens: int,
    completion_tokens: int,
    wall_seconds: float,
) -> EvalSummary:
    """Successes, scores and turn counts of ``trajectories``, with what they cost."""
    outcomes = {t.id: t.outcome.success for t in sorted(trajectories, key=lambda t: t.id)}
    successes = sum(outcomes.values())
    n = len(outcomes)
    mean, lo, hi = mean_interval([t.outcome.score or 0.0 for t in trajectories])
    return EvalSummary(
        label=label,
        episodes=n,
        successes=successes,
        success_rate=successes / n if n else 0.0,
        success_ci=wilson_interval(successes, n),
        score_mean=mean,
        score_ci=(lo, hi),
        llm_calls=llm_calls,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        wall_seconds=wall_seconds,
        outcomes=outcomes,
        turns=_total(trajectories, "steps"),
        macro_turns=_total(trajectories, "macros_played"),
        invalid_replies=_total(trajectories, "invalid_replies"),
    )


def _total(trajectories: Sequence[Trajectory], key: str) -> int:
    return sum(int((t.metadata or {}).get(key, 0)) for t in trajectories)
