"""Environments the reference agent acts in, behind one small protocol."""

from ._base import FOLDS, Environment, Fold, StepResult, Task, TaskSet
from ._textworld import TextWorldExpress

TEXTWORLD_GAMES = ("twc", "cookingworld", "coin", "mapreader", "arithmetic", "sorting")


def make_env(name: str, *, step_limit: int = 100) -> Environment:
    """An environment for a task set's ``env`` name (a TextWorldExpress game name)."""
    if name in TEXTWORLD_GAMES:
        return TextWorldExpress(step_limit=step_limit)
    raise ValueError(f"unknown environment {name!r}; known: {', '.join(TEXTWORLD_GAMES)}")


def parse_tasks(spec: str, params: str = "") -> list[Task]:
    """The tasks of ``ENV:FOLD:SEEDS``, checking that ENV is an environment we have."""
    task_set = TaskSet.parse(spec, params=params)
    if task_set.env not in TEXTWORLD_GAMES:
        raise ValueError(
            f"task set {spec!r}: unknown environment {task_set.env!r}; "
            f"known: {', '.join(TEXTWORLD_GAMES)}"
        )
    return task_set.tasks()


__all__ = [
    "FOLDS",
    "Environment",
    "Fold",
    "StepResult",
    "Task",
    "TaskSet",
    "TextWorldExpress",
    "make_env",
    "parse_tasks",
]
