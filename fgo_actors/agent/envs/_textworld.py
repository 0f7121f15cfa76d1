"""TextWorldExpress (PyPI ``textworld-express``, the ``[envs]`` extra) as an Environment.

The package drives a Java simulator through py4j; each adapter owns one JVM
gateway. Steps take well under a millisecond of simulator time.
"""

from __future__ import annotations

import subprocess
from typing import Any

from ._base import StepResult, Task

DEFAULT_PARAMS = {
    "twc": "numLocations=1,numItemsToPutAway=2,includeDoors=0",
}


class TextWorldExpress:
    """One TextWorldExpress simulator. ``step_limit`` caps an episode's steps."""

    def __init__(self, step_limit: int = 100) -> None:
        try:
            from textworld_express import TextWorldExpressEnv
        except ImportError as e:  # pragma: no cover - depends on the extra
            raise RuntimeError(
                "TextWorldExpress is not installed: pip install 'fgo-actors[envs]' (needs Java 17)"
            ) from e
        self.name = "textworld-express"
        self._env: Any = TextWorldExpressEnv(envStepLimit=step_limit)
        self._task_description = ""

    def reset(self, task: Task, *, gold: bool = False) -> StepResult:
        params = task.params or DEFAULT_PARAMS.get(task.env, "")
        obs, infos = self._env.reset(
            seed=task.seed,
            gameFold=task.fold,
            gameName=task.env,
            gameParams=params,
            generateGoldPath=gold,
        )
        self._task_description = str(infos.get("taskDescription", ""))
        return self._result(obs, 0.0, False, infos)

    def gold_actions(self, task: Task) -> list[str]:
        """A solution of ``task`` (the simulator's gold path); leaves the episode reset."""
        self.reset(task, gold=True)
        return [str(a) for a in self._env.getGoldActionSequence()]

    def step(self, action: str) -> StepResult:
        obs, reward, done, infos = self._env.step(action)
        return self._result(obs, float(reward), bool(done), infos)

    def close(self) -> None:
        """Stop the JVM and release its pipes (the package's own close leaves them open)."""
        process = self._env._gateway.java_process
        self._env.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - a stuck JVM
            process.kill()
            process.wait()
        for pipe in (process.stdin, process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()

    @property
    def task_description(self) -> str:
        return self._task_description

    @property
    def functions(self) -> tuple[str, ...]:
        return ()  # text commands, offered as valid actions

    @staticmethod
    def _result(obs: str, reward: float, done: bool, infos: dict[str, Any]) -> StepResult:
        success = bool(infos.get("tasksuccess", False))
        return StepResult(
            observation=str(obs).strip(),
            reward=reward,
            done=done or success or bool(infos.get("taskfailure", False)),
            valid_actions=tuple(sorted(str(a) for a in infos.get("validActions", []))),
            score=float(infos.get("score", 0.0)),
            success=success,
            info={"moves": infos.get("numMoves"), "failure": infos.get("taskfailure", False)},
        )
