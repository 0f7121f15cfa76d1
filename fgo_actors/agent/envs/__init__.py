"""Environments the reference agent acts in, behind one small protocol."""

from ._base import FOLDS, Environment, Fold, StepResult, Task, TaskSet
from ._bfcl import BFCL_CATEGORIES, BFCLMultiTurn, task_index
from ._textworld import TextWorldExpress

TEXTWORLD_GAMES = ("twc", "cookingworld", "coin", "mapreader", "arithmetic", "sorting")
BFCL_ENVS = tuple(BFCL_CATEGORIES)
KNOWN_ENVS = TEXTWORLD_GAMES + BFCL_ENVS


def make_env(name: str, *, step_limit: int = 100) -> Environment:
    """An environment for a task set's ``env`` name: a TextWorldExpress game
    (``step_limit`` caps its episodes) or a BFCL multi-turn category."""
    if name in TEXTWORLD_GAMES:
        return TextWorldExpress(step_limit=step_limit)
    if name in BFCL_ENVS:
        return BFCLMultiTurn()
    raise ValueError(f"unknown environment {name!r}; known: {', '.join(KNOWN_ENVS)}")


def parse_tasks(spec: str, params: str = "") -> list[Task]:
    """The tasks of ``ENV:FOLD:SEEDS``, checking that ENV is an environment we have
    (and, for BFCL, that the seeds exist and no parameters are given)."""
    task_set = TaskSet.parse(spec, params=params)
    if task_set.env not in KNOWN_ENVS:
        raise ValueError(
            f"task set {spec!r}: unknown environment {task_set.env!r}; "
            f"known: {', '.join(KNOWN_ENVS)}"
        )
    if task_set.env in BFCL_ENVS:
        if params:
            raise ValueError(f"task set {spec!r}: BFCL tasks take no parameters")
        for seed in task_set.seeds:
            try:
                task_index(task_set.fold, seed)
            except ValueError as e:
                raise ValueError(f"task set {spec!r}: {e}") from None
    return task_set.tasks()


__all__ = [
    "BFCL_ENVS",
    "FOLDS",
    "KNOWN_ENVS",
    "BFCLMultiTurn",
    "Environment",
    "Fold",
    "StepResult",
    "Task",
    "TaskSet",
    "TextWorldExpress",
    "make_env",
    "parse_tasks",
]
