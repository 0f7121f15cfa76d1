"""What a bench is and what it found: its config, its arms and results, and its
progress with a time estimate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import attrs
import trio

from .._core.model import Module, RunReport, Strategy, Trajectory
from .._core.prompts import render_module
from .._core.stats import PairedComparison
from .._llm.gateway import LLMGateway
from .._storage.diskcache import Spent
from ..actors.state import RunConfig
from ..agent.envs import Task
from ..agent.eval import EvalSummary
from ..agent.rollout import AgentConfig

STRATEGIES: tuple[Strategy, ...] = ("all-at-once", "batch", "fgo")


BASE = "base"


Policy = Literal["llm", "oracle"]


POLICIES: tuple[Policy, ...] = ("llm", "oracle")


STATE_FILE = "bench-state.json"


CACHE_FILE = "llm-cache.sqlite"


TRAIN_FILE = "train.jsonl"


HELD_OUT_DIR = "held-out"  # one journal per arm: held-out/<arm>.jsonl


STATE_FORMAT = 1


# What the bench writes in its out dir: --fresh removes these, nothing else.
OWNED_FILES = (
    STATE_FILE,
    CACHE_FILE,
    f"{CACHE_FILE}-wal",
    f"{CACHE_FILE}-shm",
    TRAIN_FILE,
    HELD_OUT_DIR,
    "modules",
    "reports",
    "bench.json",
    "bench.md",
    "bench.png",
    "episodes.jsonl",
)


class BenchStateError(ValueError):
    """The out dir holds work the bench cannot continue: made with other
    settings, or damaged. The message says what differs and how to go on."""


@attrs.frozen
class BenchConfig:
    """What to bench. ``run`` is the template every strategy's RunConfig is made from.

    ``policy`` plays the training episodes: ``llm`` is the reference agent
    with the base module; ``oracle`` plays the gold path with a share of
    random valid actions drawn per episode from [0, ``epsilon``] (seeded by
    ``run.seed``), and makes no LLM call.
    """

    train: Sequence[Task]
    test: Sequence[Task]
    base: Module = attrs.field(factory=Module)
    strategies: tuple[Strategy, ...] = STRATEGIES
    run: RunConfig = attrs.field(factory=RunConfig)
    agent: AgentConfig = attrs.field(factory=AgentConfig)
    workers: int = 1
    policy: Policy = "llm"
    epsilon: float = 0.3

    def __attrs_post_init__(self) -> None:
        if not self.train:
            raise ValueError("the bench needs at least one training task")
        if not self.test:
            raise ValueError("the bench needs at least one held-out task")
        overlap = {t.id for t in self.train} & {t.id for t in self.test}
        if overlap:
            raise ValueError(
                f"training and held-out tasks overlap ({len(overlap)}, e.g. {min(overlap)}): "
                "use different folds or seeds"
            )
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown or not self.strategies or len(set(self.strategies)) != len(self.strategies):
            raise ValueError(
                f"strategies must be distinct names from {', '.join(STRATEGIES)}; "
                f"got {', '.join(self.strategies) or 'none'}"
            )
        if self.policy not in POLICIES:
            raise ValueError(
                f"the training policy must be one of {', '.join(POLICIES)}; got {self.policy!r}"
            )
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"epsilon must be between 0 and 1; got {self.epsilon}")


def llm_calls(report: RunReport) -> int:
    """Optimize and merge calls made (re-asks included; ``retries`` and
    ``reasks`` in the report are counts, not roles)."""
    calls = report.llm_calls if isinstance(report.llm_calls, dict) else {}
    return int(calls.get("optimize", 0)) + int(calls.get("merge", 0))


def module_size(module: Module, gateway: LLMGateway) -> tuple[int, int, int]:
    """(rules, functions, tokens): the tokens of the module as the optimizer
    sees it, counted with the gateway's counter."""
    tokens = gateway.counter.count(render_module(module))
    return len(module.rules), len(module.functions), tokens


@attrs.frozen
class Arm:
    """One row of the comparison: the base module, or one strategy's result.

    ``spent`` and ``optimization_seconds`` are what the optimization paid over
    every run of the bench; without them, the run report's figures are used.
    """

    name: str
    module: Module | None  # None when the optimization failed
    evaluation: EvalSummary | None
    optimization: RunReport | None = None  # None for the base
    versus_base: PairedComparison | None = None
    error: str | None = None
    spent: Spent | None = None
    optimization_seconds: float | None = None
    module_tokens: int | None = None
    # The run report as written (a cached one, as read back), for write_outputs.
    report_json: dict[str, Any] | None = attrs.field(default=None, eq=False)

    @property
    def optimization_spent(self) -> Spent | None:
        if self.spent is not None:
            return self.spent
        r = self.optimization
        if r is None:
            return None
        calls = {role: int(r.llm_calls.get(role, 0)) for role in ("optimize", "merge")}
        return Spent(r.prompt_tokens, r.completion_tokens, calls)

    @property
    def optimization_tokens(self) -> int:
        spent = self.optimization_spent
        return 0 if spent is None else spent.total_tokens

    @property
    def optimization_calls(self) -> int | None:
        spent = self.optimization_spent
        return None if spent is None else sum(spent.calls.values())

    @property
    def optimization_wall_seconds(self) -> float | None:
        if self.optimization_seconds is not None:
            return self.optimization_seconds
        return None if self.optimization is None else self.optimization.wall_seconds

    def to_json(self) -> dict[str, Any]:
        r = self.optimization
        spent = self.optimization_spent
        wall = self.optimization_wall_seconds
        return {
            "name": self.name,
            "error": self.error,
            "evaluation": self.evaluation.to_json() if self.evaluation else None,
            "versus_base": (
                {**self.versus_base.to_json(), "test": "McNemar exact, two-sided"}
                if self.versus_base
                else None
            ),
            "optimization": None
            if spent is None
            else {
                "status": r.status if r is not None else "failed",
                "prompt_tokens": spent.prompt_tokens,
                "completion_tokens": spent.completion_tokens,
                "llm_calls": self.optimization_calls,
                "llm_calls_by_role": dict(spent.calls),
                "wall_seconds": None if wall is None else round(wall, 3),
                "subsets": r.subsets if r is not None else None,
                "cut_trajectories": r.cut_trajectories if r is not None else None,
                "truncated_trajectories": r.truncated_trajectories if r is not None else None,
                "failures": len(r.failures) if r is not None else None,
            },
            "module_rules": None if self.module is None else len(self.module.rules),
            "module_functions": None if self.module is None else len(self.module.functions),
            "module_tokens": self.module_tokens,
        }


@attrs.frozen
class BenchResult:
    arms: tuple[Arm, ...]
    train: tuple[Trajectory, ...]
    episodes: dict[str, tuple[Trajectory, ...]]  # arm name -> held-out episodes
    collect_seconds: float
    collect_tokens: int
    wall_seconds: float
    config: dict[str, Any]
    runs: int = 1  # how many runs of the bench made these results

    def to_json(self) -> dict[str, Any]:
        solved = sum(t.outcome.success for t in self.train)
        return {
            "config": self.config,
            "training_episodes": len(self.train),
            "training_solved": solved,
            "collect_seconds": round(self.collect_seconds, 3),
            "collect_tokens": self.collect_tokens,
            "wall_seconds": round(self.wall_seconds, 3),
            "runs": self.runs,
            "arms": [a.to_json() for a in self.arms],
        }


class BenchProgress:
    """Counts the bench's work and estimates the time left (see ``remaining_seconds``).

    Work an earlier run finished is counted as done by ``restore``; it and
    episodes that make no LLM call (the oracle's) are not timed, so the mean
    time per episode is that of the episodes still to come. ``on_change`` is
    called after every change with the progress itself; the CLI draws it on a
    terminal or logs it as JSON.
    """

    def __init__(
        self,
        *,
        episodes: int,
        optimizations: int,
        training_episodes: int,
        on_change: Callable[[BenchProgress], None] | None = None,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.episodes_total = episodes
        self.optimizations_total = optimizations
        self.training_episodes = training_episodes
        self.episodes_done = 0
        self.optimizations_done = 0
        self.episodes_timed = 0
        self.optimizations_timed = 0
        self.episodes_cached = 0
        self.optimizations_cached = 0
        self.episode_seconds = 0.0
        self.optimization_seconds = 0.0
        self.phase = "starting"
        self._optimizing = False
        self._clock = clock
        self._started = clock()
        self._mark = self._started
        self._on_change = on_change

    def begin(self, phase: str) -> None:
        self.phase = phase
        self._optimizing = phase.startswith("optimize")
        self._mark = self._clock()
        self._changed()

    def restore(
        self,
        *,
        episodes: int,
        optimizations: int,
        episode_seconds: float = 0.0,
        timed_episodes: int = 0,
        optimization_seconds: float = 0.0,
        timed_optimizations: int = 0,
    ) -> None:
        """Count work an earlier run finished as done. Its measured times, when
        given, inform the estimate until this run has measured its own."""
        self.episodes_done += episodes
        self.episodes_cached += episodes
        self.optimizations_done += optimizations
        self.optimizations_cached += optimizations
        if timed_episodes > 0:
            self.episodes_timed += timed_episodes
            self.episode_seconds += episode_seconds
        if timed_optimizations > 0:
            self.optimizations_timed += timed_optimizations
            self.optimization_seconds += optimization_seconds
        self._changed()

    def episode_done(self, seconds: float, *, timed: bool = True) -> None:
        """An episode ended; ``timed=False`` for one whose time says nothing
        about the LLM episodes to come."""
        self.episodes_done += 1
        if timed:
            self.episodes_timed += 1
            self.episode_seconds += seconds
        self._changed()

    def optimization_done(self, *, failed: bool = False, episodes_dropped: int = 0) -> None:
        """An optimization ended. A failed one does not count towards the mean
        time, and the held-out episodes it will not play leave the total."""
        self.optimizations_done += 1
        if failed:
            self.optimizations_total -= 1
            self.optimizations_done -= 1
        else:
            self.optimizations_timed += 1
            self.optimization_seconds += self._clock() - self._mark
        self.episodes_total -= episodes_dropped
        self._optimizing = False
        self._mark = self._clock()
        self._changed()

    @property
    def elapsed(self) -> float:
        return self._clock() - self._started

    def remaining_seconds(self) -> float | None:
        return remaining_seconds(
            episodes_done=self.episodes_done,
            episodes_total=self.episodes_total,
            episode_seconds=self.episode_seconds,
            optimizations_done=self.optimizations_done,
            optimizations_total=self.optimizations_total,
            optimization_seconds=self.optimization_seconds,
            training_episodes=self.training_episodes,
            current_optimization_seconds=self._clock() - self._mark if self._optimizing else 0.0,
            episodes_timed=self.episodes_timed,
            optimizations_timed=self.optimizations_timed,
        )

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self)


def remaining_seconds(
    *,
    episodes_done: int,
    episodes_total: int,
    episode_seconds: float,
    optimizations_done: int,
    optimizations_total: int,
    optimization_seconds: float,
    training_episodes: int,
    current_optimization_seconds: float = 0.0,
    episodes_timed: int | None = None,
    optimizations_timed: int | None = None,
) -> float | None:
    """Seconds left, from the mean time of the episodes and optimizations so far.

    The means are over the timed ones (``episodes_timed``,
    ``optimizations_timed``; default: all that are done): ``episode_seconds``
    and ``optimization_seconds`` are their summed times. Before any
    optimization has been timed, one is guessed to cost as much as playing
    half of the training episodes it learns from (an optimize call reads them
    all and writes a few hundred tokens). The time already spent on the
    optimization under way is taken off. None while there is work left and
    nothing to estimate it from (no episode timed yet); 0 when all is done.
    """
    timed_e = episodes_done if episodes_timed is None else episodes_timed
    timed_o = optimizations_done if optimizations_timed is None else optimizations_timed
    episodes_left = max(0, episodes_total - episodes_done)
    pending = max(0, optimizations_total - optimizations_done)
    if not episodes_left and not pending:
        return 0.0
    per_episode = episode_seconds / timed_e if timed_e > 0 else None
    if timed_o > 0:
        per_optimization: float | None = optimization_seconds / timed_o
    elif per_episode is not None:
        per_optimization = per_episode * max(1.0, training_episodes / 2)
    else:
        per_optimization = None
    if (episodes_left and per_episode is None) or (pending and per_optimization is None):
        return None
    left = episodes_left * (per_episode or 0.0)
    if pending:
        assert per_optimization is not None
        left += pending * per_optimization
        left -= min(current_optimization_seconds, per_optimization)
    return max(0.0, left)
