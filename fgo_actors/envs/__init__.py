"""Environments the reference agent acts in, behind one small protocol."""

from ._base import FOLDS, Environment, Fold, StepResult, Task, TaskSet
from ._textworld import TextWorldExpress


def make_env(name: str, *, step_limit: int = 100) -> Environment:
    """An environment for a task set's ``env`` name (a TextWorldExpress game name)."""
    if name in ("twc", "cookingworld", "coin", "mapreader", "arithmetic", "sorting"):
        return TextWorldExpress(step_limit=step_limit)
    raise ValueError(f"unknown environment {name!r}; known: twc, cookingworld, coin, ...")


__all__ = [
    "FOLDS",
    "Environment",
    "Fold",
    "StepResult",
    "Task",
    "TaskSet",
    "TextWorldExpress",
    "make_env",
]
