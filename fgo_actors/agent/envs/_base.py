"""The Environment protocol: what the reference agent acts in.

An environment is synchronous and single-threaded (the real ones drive a JVM
or a Python simulator); callers run it in a worker thread. ``reset(task)``
starts an episode and returns the first observation; ``step(action)`` returns
the next observation, the reward, whether the episode is over, and details.
Task sets are (environment, fold, seeds, params); the folds are train, dev
and test, and a seed names one reproducible episode.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal, Protocol

import attrs

Fold = Literal["train", "dev", "test"]
FOLDS: tuple[Fold, ...] = ("train", "dev", "test")


@attrs.frozen
class Task:
    """One reproducible episode: environment, fold, seed and generation parameters."""

    env: str
    fold: Fold
    seed: int
    params: str = ""

    @property
    def id(self) -> str:
        return f"{self.env}/{self.fold}/{self.seed}"

    def to_json(self) -> dict[str, Any]:
        return {"env": self.env, "fold": self.fold, "seed": self.seed, "params": self.params}

    def metadata(self) -> dict[str, Any]:
        """What an episode's trajectory records of its task (its ``task_type``
        is the environment, so the partitioner groups by it)."""
        return {"task_type": self.env, **self.to_json()}


@attrs.frozen
class StepResult:
    """What the environment says after ``reset`` or ``step``.

    ``valid_actions`` lists the actions the environment accepts now, when it
    knows them; ``score`` is the task score so far (0..1 where the environment
    normalises it) and ``success`` whether the task is solved.
    """

    observation: str
    reward: float = 0.0
    done: bool = False
    valid_actions: tuple[str, ...] = ()
    score: float = 0.0
    success: bool = False
    info: dict[str, Any] = attrs.field(factory=dict, eq=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "observation": self.observation,
            "reward": self.reward,
            "done": self.done,
            "valid_actions": list(self.valid_actions),
            "score": self.score,
            "success": self.success,
        }


class Environment(Protocol):
    """A task environment. Not thread-safe: one episode at a time, one thread."""

    name: str

    @property
    def task_description(self) -> str:
        """What the current task asks, in words ("" when only the observation says it)."""
        ...

    @property
    def functions(self) -> Sequence[str]:
        """The functions the agent may call now, one line each (``name(arg: type):
        description``); empty for an environment of text commands."""
        ...

    def reset(self, task: Task) -> StepResult: ...

    def step(self, action: str) -> StepResult: ...

    def close(self) -> None: ...


@attrs.frozen
class TaskSet:
    """Seeds of one environment fold, e.g. ``twc:test:0-19``."""

    env: str
    fold: Fold
    seeds: tuple[int, ...]
    params: str = ""

    def tasks(self) -> list[Task]:
        return [Task(self.env, self.fold, s, self.params) for s in self.seeds]

    @classmethod
    def parse(cls, spec: str, params: str = "") -> TaskSet:
        """Parse ``ENV:FOLD:SEEDS`` where SEEDS is like ``0-19`` or ``1,4,9`` or ``0-4,10``."""
        parts = spec.split(":")
        if len(parts) != 3:
            raise ValueError(f"task set {spec!r} must look like ENV:FOLD:SEEDS, e.g. twc:test:0-19")
        env, fold, seeds_text = parts
        if fold not in FOLDS:
            raise ValueError(f"task set {spec!r}: fold must be one of {', '.join(FOLDS)}")
        seeds: list[int] = []
        for chunk in seeds_text.split(","):
            m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", chunk)
            if m is None:
                raise ValueError(f"task set {spec!r}: bad seeds {chunk!r} (use 0-19 or 1,4,9)")
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) is not None else lo
            if hi < lo:
                raise ValueError(f"task set {spec!r}: seed range {chunk!r} runs backwards")
            seeds.extend(range(lo, hi + 1))
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"task set {spec!r} repeats a seed")
        return cls(env=env, fold=fold, seeds=tuple(seeds), params=params)
