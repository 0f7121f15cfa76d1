"""Where episodes are played: threads of this process, or tasks on a Ray cluster.

Optimizing from logs is cheap; playing the agent is what costs. An executor
plays a list of tasks with one :class:`Policy` and sends each Trajectory to
a channel as it finishes, so every caller (``fgo collect``, ``fgo eval``,
``fgo bench``, ``fgo optimize --env``, ``fgo serve --validate``) streams
results, shows progress and caches episodes the same way whichever executor
runs them.

- :class:`LocalExecutor` is the reference agent's worker threads
  (``rollout.play_tasks``), unchanged: the agent's LLM calls go through the
  caller's gateway, with its limiter, statistics and response cache.
- :class:`RayExecutor` runs each episode as a Ray task. Only the policy and
  the task travel, as small attrs records; the environment is made on the
  worker (and kept there for the worker's next episodes), never pickled
  from the driver. The agent's LLM calls go from the worker to the
  configured endpoint through a gateway of its own, and LLM-written
  functions run in the sandbox on the worker, as they do locally.

Ray's API blocks (and its async API is asyncio's), so the driver calls it
from worker threads (``trio.to_thread``) and never blocks the trio loop. At
most ``max_in_flight`` tasks are submitted at once (backpressure, as in the
rest of the engine). A worker that dies mid-episode is retried by Ray, up to
``max_retries`` times, and its episode is counted once: only a finished
task's result is read. A task that raises becomes a failed episode that
records its error (:func:`failed_episode`). Cancelling the caller (Ctrl-C,
SIGTERM, a stopped bench) cancels the tasks still in flight.

The workers' LLM tokens count against the caller's ``token_budget`` too
(``LLMGateway.book_elsewhere``), as each episode's result comes back; no
episode starts once the budget is spent (BudgetExhaustedError, as from a
call in threads). The episodes already in flight then are finished and
delivered, so the budget can be overrun by at most what they spend.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import functools
import os
import socket
import traceback
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol

import attrs
import structlog
import trio

from .._core.errors import BudgetExhaustedError, ClusterUnavailableError
from .._core.model import Module, Outcome, Trajectory
from .._llm.gateway import GatewayConfig, LLMGateway
from .envs import Environment, Task
from .rollout import AgentConfig

PolicyKind = Literal["llm", "oracle"]


ExecutorKind = Literal["local", "ray"]


EXECUTOR_KINDS: tuple[ExecutorKind, ...] = ("local", "ray")


@attrs.frozen
class Policy:
    """Who plays an episode, as data that travels to a worker.

    ``llm``: the reference agent with ``module`` and ``agent`` settings, its
    LLM at ``gateway`` (required by the Ray executor, which makes the
    worker's own gateway from it). ``oracle``: the environment's gold path
    with random detours (``agent.oracle``), seeded by ``seed`` and the task.
    """

    kind: PolicyKind = "llm"
    module: Module = attrs.field(factory=Module)
    agent: AgentConfig = attrs.field(factory=AgentConfig)
    gateway: GatewayConfig | None = None
    epsilon: float = 0.3
    seed: int = 0


class Executor(Protocol):
    """Plays ``tasks`` with ``policy``; sends each Trajectory to ``out`` as it
    finishes, then closes ``out``. ``gateway`` is the caller's, for executors
    that call the LLM from this process."""

    async def play(
        self,
        tasks: Sequence[Task],
        policy: Policy,
        out: trio.MemorySendChannel[Trajectory],
        *,
        gateway: LLMGateway | None = None,
    ) -> None: ...

    @property
    def usage(self) -> LLMUsage:
        """What its workers spent on the LLM outside the caller's gateway, so far."""
        ...


@attrs.frozen
class LocalExecutor:
    """Episodes in ``workers`` concurrent threads of this process (today's agent)."""

    workers: int = 2
    make_env: Callable[[str], Environment] | None = None

    @property
    def usage(self) -> LLMUsage:
        return LLMUsage()  # every call goes through the caller's gateway

    async def play(
        self,
        tasks: Sequence[Task],
        policy: Policy,
        out: trio.MemorySendChannel[Trajectory],
        *,
        gateway: LLMGateway | None = None,
    ) -> None:
        from .oracle import collect_oracle
        from .rollout import collect

        if policy.kind == "oracle":
            await collect_oracle(
                tasks,
                out,
                epsilon=policy.epsilon,
                seed=policy.seed,
                workers=self.workers,
                max_steps=policy.agent.max_steps,
                make_env=self.make_env,
            )
            return
        if gateway is None:
            raise ValueError("the llm policy plays through a gateway; none was given")
        await collect(
            tasks,
            policy.module,
            gateway,
            out,
            workers=self.workers,
            config=policy.agent,
            make_env=self.make_env,
        )


def failed_episode(task: Task, policy: Policy, error: str) -> Trajectory:
    """The record of an episode that could not be played: no steps, a failed
    outcome whose feedback gives the error, and the error in the metadata.
    It counts as a failure wherever it is summarised, and it is never a
    silent gap."""
    return Trajectory(
        id=task.id,
        task=task.id,
        steps=(),
        outcome=Outcome(success=False, score=0.0, feedback=f"episode failed: {error}"),
        metadata={
            **task.metadata(),
            "policy": policy.kind,
            "error": error,
        },
    )


def make_executor(
    kind: str, *, address: str | None = None, workers: int | None = None, local_workers: int = 1
) -> Executor:
    """The executor ``kind`` names: Ray tasks at ``address`` (None: ``RAY_ADDRESS``,
    else a local Ray), ``workers`` of them in flight (None: one per CPU of
    the cluster); or ``workers or local_workers`` threads of this process."""
    if kind == "ray":
        return RayExecutor(address=address, max_in_flight=workers)
    if kind == "local":
        return LocalExecutor(workers=workers or local_workers)
    raise ValueError(f"the executor must be one of {', '.join(EXECUTOR_KINDS)}; got {kind!r}")


# -- on the worker ------------------------------------------------------------------
#
# A worker process keeps its environments between tasks: a TextWorldExpress
# environment starts a JVM, which costs more than an episode.

_WORKER_ENVS: dict[str, Environment] = {}


def _close_worker_envs() -> None:
    for env in _WORKER_ENVS.values():
        with contextlib.suppress(Exception):  # a process on its way out closes what it can
            env.close()
    _WORKER_ENVS.clear()


atexit.register(_close_worker_envs)


def _worker_env(name: str) -> Environment:
    from .envs import make_env

    env = _WORKER_ENVS.get(name)
    if env is None:
        env = _WORKER_ENVS[name] = make_env(name)
    return env


@attrs.frozen
class LLMUsage:
    """LLM calls and tokens an executor's workers spent outside the caller's gateway."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def __add__(self, other: LLMUsage) -> LLMUsage:
        return LLMUsage(
            self.calls + other.calls,
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
        )

    def __sub__(self, other: LLMUsage) -> LLMUsage:
        return LLMUsage(
            self.calls - other.calls,
            self.prompt_tokens - other.prompt_tokens,
            self.completion_tokens - other.completion_tokens,
        )


def play_episode(policy: Policy, task: Task) -> tuple[dict[str, Any], LLMUsage]:
    """Play one episode here, synchronously: its Trajectory as JSON, and the
    LLM usage of its own gateway.

    What a Ray task runs (also callable directly). The environment comes from
    this process's cache; an llm policy opens a gateway of its own for the
    episode. An episode that raises drops its environment (its state is
    unknown) and the error propagates: the driver records it.
    """
    env = _worker_env(task.env)
    usage = LLMUsage()
    try:
        if policy.kind == "oracle":
            from .oracle import play_oracle

            traj = play_oracle(
                env,
                task,
                epsilon=policy.epsilon,
                seed=policy.seed,
                max_steps=policy.agent.max_steps,
            )
        else:
            traj, usage = trio.run(_llm_episode, env, policy, task)
    except BaseException:
        _WORKER_ENVS.pop(task.env, None)
        with contextlib.suppress(Exception):  # the episode's error is the one to report
            env.close()
        raise
    return traj.to_json(), usage


async def _llm_episode(env: Environment, policy: Policy, task: Task) -> tuple[Trajectory, LLMUsage]:
    from .rollout import rollout

    if policy.gateway is None:
        raise ValueError("the llm policy needs a gateway config to play on a worker")
    async with LLMGateway(policy.gateway) as gateway:
        traj = await rollout(env, task, policy.module, gateway, policy.agent)
        stats = gateway.statistics()
    usage = LLMUsage(
        sum(stats.calls.values()),
        sum(stats.prompt_tokens.values()),
        sum(stats.completion_tokens.values()),
    )
    return traj, usage


# -- on the driver ------------------------------------------------------------------


def _ray() -> Any:
    try:
        import ray
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ClusterUnavailableError(
            "the ray executor needs Ray: pip install 'fgo-actors[ray]'"
        ) from e
    return ray


def connect_ray(address: str | None, *, num_cpus: int | None = None) -> None:
    """Connect to the Ray cluster at ``address`` (or ``RAY_ADDRESS``), or start
    a local one when neither is given. Idempotent. ClusterUnavailableError
    when the cluster cannot be reached."""
    ray = _ray()
    if ray.is_initialized():
        return
    _probe(address or os.environ.get("RAY_ADDRESS"))
    try:
        ray.init(
            address=address,
            num_cpus=num_cpus if address is None else None,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = address or "a local Ray (or RAY_ADDRESS)"
        raise ClusterUnavailableError(f"cannot reach the Ray cluster at {where}: {e}") from e


def _probe(address: str | None, timeout: float = 5.0) -> None:
    """Fail fast when ``address`` names a host and port that do not answer:
    Ray itself waits about a minute for a cluster that is not there."""
    if not address or address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return  # not host:port; Ray says what it makes of it
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ClusterUnavailableError(
            f"cannot reach the Ray cluster at {address}: {e.strerror or e}"
        ) from e


@attrs.define
class RayExecutor:
    """Episodes as Ray tasks, at most ``max_in_flight`` at once.

    ``address`` is a cluster's (``ray://...`` or ``host:port``); None uses
    ``RAY_ADDRESS`` or starts a local Ray with ``num_cpus``. Without
    ``max_in_flight``, one task per ``cpus_per_episode`` of the cluster's CPUs. A worker that
    dies mid-episode is retried up to ``max_retries`` times; an episode that
    raises, or whose retries are spent, becomes a :func:`failed_episode`.
    Each task asks Ray for ``cpus_per_episode`` CPUs.
    """

    address: str | None = None
    max_in_flight: int | None = None  # None: as many as the cluster has CPUs for
    max_retries: int = 2
    num_cpus: int | None = None
    cpus_per_episode: float = 1.0
    poll_seconds: float = 0.2
    usage: LLMUsage = attrs.field(factory=LLMUsage, init=False)

    async def connect(self) -> None:
        """Reach the cluster now (or start the local Ray): a long-running caller
        (``fgo serve --validate``) fails at its start, not at its first
        episode. ClusterUnavailableError when it cannot."""
        await trio.to_thread.run_sync(lambda: connect_ray(self.address, num_cpus=self.num_cpus))

    async def play(
        self,
        tasks: Sequence[Task],
        policy: Policy,
        out: trio.MemorySendChannel[Trajectory],
        *,
        gateway: LLMGateway | None = None,
    ) -> None:
        if policy.kind == "llm" and policy.gateway is None:
            raise ValueError("the ray executor needs the llm policy's gateway config")
        await self.connect()
        ray = _ray()
        in_flight = self.max_in_flight or max(
            1, int(ray.cluster_resources().get("CPU", 1) // self.cpus_per_episode)
        )
        remote = ray.remote(
            num_cpus=self.cpus_per_episode,
            max_retries=self.max_retries,
            retry_exceptions=False,
        )(play_episode)
        log = structlog.get_logger()
        pending: dict[Any, Task] = {}
        queue = collections.deque(tasks)
        with out:
            spent: BudgetExhaustedError | None = None
            try:
                while pending or (queue and spent is None):
                    while queue and spent is None and len(pending) < in_flight:
                        try:  # the caller's budget, which the workers spend too
                            if gateway is not None:
                                gateway.check_budget()
                        except BudgetExhaustedError as e:
                            spent = e  # start no more; finish (and keep) those in flight
                            log.warning("episodes_stopped_by_budget", left=len(queue))
                            break
                        task = queue.popleft()
                        pending[remote.remote(policy, task)] = task
                    if not pending:
                        break
                    ready, _ = await trio.to_thread.run_sync(
                        lambda: ray.wait(list(pending), num_returns=1, timeout=self.poll_seconds),
                        abandon_on_cancel=True,
                    )
                    for ref in ready:
                        task = pending.pop(ref)
                        traj, used = await trio.to_thread.run_sync(
                            functools.partial(_result, ray, ref, task, policy),
                            abandon_on_cancel=True,
                        )
                        self.usage += used
                        if gateway is not None:
                            gateway.book_elsewhere(used.prompt_tokens + used.completion_tokens)
                        error = (traj.metadata or {}).get("error")
                        if error:
                            log.warning("episode_failed", task=task.id, error=error)
                        await out.send(traj)
                if spent is not None:
                    raise spent
            finally:
                if pending:
                    refs = list(pending)
                    with trio.CancelScope(shield=True):
                        await trio.to_thread.run_sync(lambda: _cancel(ray, refs))
                    log.info("ray_tasks_cancelled", tasks=len(refs))


def _result(ray: Any, ref: Any, task: Task, policy: Policy) -> tuple[Trajectory, LLMUsage]:
    """The finished task's Trajectory and usage, or the failed episode its error makes
    (the calls of a failed episode are not known to the driver)."""
    try:
        traj, used = ray.get(ref)
        return Trajectory.from_json(traj), used
    except ray.exceptions.RayTaskError as e:
        cause = e.cause if getattr(e, "cause", None) is not None else e
        error = "".join(traceback.format_exception_only(type(cause), cause)).strip()
        return failed_episode(task, policy, error), LLMUsage()
    except ray.exceptions.RayError as e:  # the worker died and its retries are spent
        first = str(e).splitlines()[0] if str(e) else ""
        return failed_episode(task, policy, f"{type(e).__name__}: {first}"), LLMUsage()


def _cancel(ray: Any, refs: list[Any]) -> None:
    for ref in refs:
        with contextlib.suppress(Exception):  # a task that just finished cannot be cancelled
            ray.cancel(ref, force=True)
