"""Online FGO: optimize a module by playing an environment, not from a fixed log.

``fgo optimize --env TASKS``:
1. **divide** the training tasks into subsets of ``tasks_per_subset``;
2. **improve** each subset with explore, optimize, evaluate steps: play the
   subset's tasks with the current module (explore), ask the optimizer for an
   edited module from those trajectories, play the same tasks with it
   (evaluate). A step that makes the subset's value worse is rolled back; a
   subset stops after ``patience`` steps in a row that did not improve it, or
   after ``rounds`` steps. The accepted candidate's episodes are the next
   step's exploration, so no rollout is played twice;
3. **merge** the subset modules pairwise in the merge forest, as offline.
   With ``gate_merges``, a merged module is kept only if it is not worse than
   its best child on the union of the children's tasks; otherwise the merge
   node carries the better child's module instead (method ``gate``). Every
   step and gate decision is recorded.

A module's *value* on a set of tasks is (mean score, success rate), compared
in that order: the score is finer than success and moves first. Episodes are
cached by (module, task), so a gate replays only the pairs it has not seen.
The decisions are pure functions (``step_verdict``, ``gate_verdict``) tested
on their own; the rest is a thin async shell over the agent and the engine.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import attrs
import structlog
import trio

from .._core.errors import BudgetExhaustedError, leaf_exceptions
from .._core.forest import MergeForest, MergeJob
from .._core.model import MergeNode, Module, Trajectory
from .._core.prompts import optimize_overhead_tokens
from .._core.tokens import TokenCounter
from .._llm.gateway import LLMGateway
from ..agent.envs import Task
from ..agent.eval import evaluate
from ..agent.executor import Executor, LLMUsage
from ..agent.rollout import AgentConfig
from . import optimize_unit
from .merger import ForestRunner, merge_modules
from .partitioner import render_all
from .run import partial_module
from .state import RunState

Value = tuple[float, float]  # (mean score, success rate)


@attrs.frozen
class OnlineConfig:
    tasks_per_subset: int = 4
    rounds: int = 3  # explore/optimize/evaluate steps per subset at most
    patience: int = 1  # steps in a row without improvement that end a subset
    gate_merges: bool = True
    fan_in: int = 2
    seed: int = 0
    module_tokens: int = 600
    item_tokens: int = 600  # cap on one rendered trajectory in an optimize prompt
    subsets_at_once: int = 1  # subsets improved concurrently (the local model: 1)
    agent: AgentConfig = attrs.field(factory=AgentConfig)
    workers: int = 1  # episodes played at once
    playbook: bool = True  # add each round's scored plays to the playbook (``_core.playbook``)

    def __attrs_post_init__(self) -> None:
        for name in ("tasks_per_subset", "rounds", "patience", "subsets_at_once", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.fan_in < 2:
            raise ValueError("fan_in must be at least 2")


@attrs.frozen
class StepRecord:
    subset: str
    round: int
    before: Value
    after: Value | None  # None when the optimize call failed
    accepted: bool
    improved: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "subset": self.subset,
            "round": self.round,
            "before": _value_json(self.before),
            "after": None if self.after is None else _value_json(self.after),
            "accepted": self.accepted,
            "improved": self.improved,
            "decision": "kept" if self.accepted else "rolled back",
        }


@attrs.frozen
class GateRecord:
    node: str
    children: tuple[str, ...]
    tasks: int
    merged: Value
    child_values: dict[str, Value]
    kept: str  # the merged node's id, or the child kept instead

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "children": list(self.children),
            "tasks": self.tasks,
            "merged": _value_json(self.merged),
            "children_values": {k: _value_json(v) for k, v in self.child_values.items()},
            "kept": self.kept,
            "decision": "merged" if self.kept == self.node else f"kept child {self.kept}",
        }


def _value_json(v: Value) -> dict[str, float]:
    return {"score": round(v[0], 4), "success_rate": round(v[1], 4)}


# -- pure decisions ----------------------------------------------------------
def value_of(scores: Mapping[str, float], successes: Mapping[str, bool]) -> Value:
    """(mean score, success rate) over the tasks in ``scores``."""
    n = len(scores)
    if n == 0:
        return (0.0, 0.0)
    return (sum(scores.values()) / n, sum(bool(successes[k]) for k in scores) / n)


def step_verdict(before: Value, after: Value | None) -> tuple[bool, bool]:
    """(accepted, improved): keep a candidate unless it is worse; improvement is strict."""
    if after is None:
        return False, False
    return after >= before, after > before


def gate_verdict(node: str, merged: Value, children: Mapping[str, Value]) -> str:
    """The id to keep: the merged node unless its value is below its best child's,
    in which case the best child (the first listed, on a tie)."""
    best = max(children, key=lambda c: children[c])
    return node if merged >= children[best] else best


def split_tasks(tasks: Sequence[Task], size: int, seed: int) -> list[list[Task]]:
    """Shuffle ``tasks`` with ``seed`` and cut them into subsets of ``size``; a
    last subset smaller than half of ``size`` joins the one before it."""
    order = list(tasks)
    random.Random(seed).shuffle(order)
    chunks = [order[i : i + size] for i in range(0, len(order), size)]
    if len(chunks) > 1 and len(chunks[-1]) * 2 < size:
        chunks[-2].extend(chunks.pop())
    return chunks


def trajectory_room(
    counter: TokenCounter, context_tokens: int, completion_tokens: int, module_tokens: int
) -> int:
    """Tokens left for episodes in one optimize prompt: the context less the
    template and a module at its cap (``optimize_overhead_tokens``, which also
    keeps room for a re-ask) and the reply."""
    return context_tokens - completion_tokens - optimize_overhead_tokens(counter, module_tokens)


# -- the async shell -----------------------------------------------------------
@attrs.frozen
class OnlineResult:
    module: Module
    root: str
    steps: tuple[StepRecord, ...]
    gates: tuple[GateRecord, ...]
    nodes: dict[str, MergeNode]
    episodes: int
    prompt_tokens: dict[str, int]
    completion_tokens: dict[str, int]
    calls: dict[str, int]
    wall_seconds: float
    failures: int
    # "budget_exhausted": the token budget ran out; ``module`` is what was done
    # by then (finished subsets and merges, joined losslessly within the cap).
    status: str = "ok"

    def report(self) -> dict[str, Any]:
        return {
            "mode": "online",
            "status": self.status,
            "root": self.root,
            "episodes_played": self.episodes,
            "steps": [s.to_json() for s in self.steps],
            "merge_gates": [g.to_json() for g in self.gates],
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "llm_calls": self.calls,
            "wall_seconds": round(self.wall_seconds, 3),
            "failures": self.failures,
            "merge_tree": [
                {
                    "id": n.id,
                    "kind": n.kind,
                    "method": n.method,
                    "children": list(n.children),
                    "rules": len(n.module.rules),
                }
                for n in self.nodes.values()
            ],
        }


class _Episodes:
    """Plays (module, task) pairs once, on ``executor`` (None: ``config.workers``
    threads), and remembers the outcomes."""

    def __init__(
        self, gateway: LLMGateway, config: OnlineConfig, executor: Executor | None = None
    ) -> None:
        self.gateway = gateway
        self.config = config
        self.executor = executor
        self.episodes: dict[tuple[str, str], Trajectory] = {}
        self.played = 0

    async def play(self, module: Module, tasks: Sequence[Task]) -> tuple[Value, list[Trajectory]]:
        """The module's value on ``tasks`` and their episodes (played now or before)."""
        key = module.digest()
        todo = [t for t in tasks if (key, t.id) not in self.episodes]
        if todo:
            _, played = await evaluate(
                todo,
                module,
                self.gateway,
                label=key,
                workers=self.config.workers,
                config=self.config.agent,
                executor=self.executor,
            )
            self.played += len(played)
            for traj in played:
                self.episodes[(key, traj.id)] = traj
        trajectories = [self.episodes[(key, t.id)] for t in tasks]
        scores = {t.id: t.outcome.score or 0.0 for t in trajectories}
        successes = {t.id: t.outcome.success for t in trajectories}
        return value_of(scores, successes), trajectories


async def optimize_online(
    tasks: Sequence[Task],
    gateway: LLMGateway,
    config: OnlineConfig | None = None,
    *,
    initial: Module | None = None,
    state: RunState | None = None,
    executor: Executor | None = None,
) -> OnlineResult:
    """Improve ``initial`` (default: empty) by playing ``tasks``; see the module docstring.

    The episodes are played on ``executor`` (by default ``config.workers``
    threads here, through ``gateway``); what its workers spent on the LLM
    outside ``gateway`` (Ray) is counted under the ``agent`` role."""
    if not tasks:
        raise ValueError("no tasks to optimize on")
    config = config or OnlineConfig()
    state = state or RunState()
    state.started_at = trio.current_time()
    state.fan_in = config.fan_in
    initial = initial or Module()
    log = structlog.get_logger()
    before = gateway.statistics()
    spent_before = executor.usage if executor is not None else LLMUsage()
    episodes = _Episodes(gateway, config, executor)
    subsets = split_tasks(tasks, config.tasks_per_subset, config.seed)
    state.subsets_total = len(subsets)
    state.phase = "optimizing"
    steps: list[StepRecord] = []
    gates: list[GateRecord] = []
    tasks_of: dict[str, list[Task]] = {}
    forest = MergeForest(config.fan_in)
    limiter = trio.CapacityLimiter(config.subsets_at_once)

    async def improve(subset_id: str, subset: list[Task]) -> MergeNode:
        started = state.now()
        current = initial
        value, trajectories = await episodes.play(current, subset)
        stale = 0
        for round_ in range(config.rounds):
            items = await render_all(
                trajectories,
                gateway.counter,
                config.item_tokens,
                "task_type",
            )
            candidate = await optimize_unit(
                gateway,
                current,
                tuple(items),
                subset_id=subset_id,
                epoch=round_,
                module_tokens=config.module_tokens,
                state=state,
                playbook=config.playbook,  # each round's episodes are new
            )
            after: Value | None = None
            played: list[Trajectory] = []
            if candidate is not None:
                after, played = await episodes.play(candidate, subset)
            accepted, improved = step_verdict(value, after)
            steps.append(StepRecord(subset_id, round_ + 1, value, after, accepted, improved))
            log.info(
                "online_step",
                subset=subset_id,
                round=round_ + 1,
                before=value,
                after=after,
                decision="kept" if accepted else "rolled back",
            )
            if accepted and candidate is not None and after is not None:
                current, value, trajectories = candidate, after, played
            stale = 0 if improved else stale + 1
            if stale >= config.patience:
                break
        state.subsets_done += 1
        return MergeNode.leaf(
            subset_id,
            current,
            started_at=started,
            finished_at=state.now(),
            stats={"trajectories": len(subset), "score": value[0]},
        )

    async def gated_merge(job: MergeJob) -> str:
        children = [state.nodes[c] for c in job.children]
        node = await merge_modules(
            gateway, job, children, module_tokens=config.module_tokens, state=state
        )
        state.merges_done += 1
        union = [t for c in job.children for t in tasks_of[c]]
        tasks_of[node.id] = union
        if config.gate_merges:
            merged_value, _ = await episodes.play(node.module, union)
            child_values = {}
            for child in children:
                child_values[child.id], _ = await episodes.play(child.module, union)
            kept = gate_verdict(node.id, merged_value, child_values)
            gates.append(
                GateRecord(node.id, job.children, len(union), merged_value, child_values, kept)
            )
            log.info(
                "merge_gate", node=node.id, merged=merged_value, children=child_values, kept=kept
            )
            if kept != node.id:
                # The node stands for all its children's subsets and tasks, as a
                # merge would, but carries the better child's module.
                node = attrs.evolve(
                    node,
                    module=state.nodes[kept].module,
                    method="gate",
                    stats={**node.stats, "gate_kept": kept},
                )
        state.add_node(node)
        return node.id

    stopped = False
    try:
        await _play_forest(forest, subsets, limiter, improve, gated_merge, state, tasks_of)
    except* BudgetExhaustedError as group:
        # Spent playing episodes (the optimize and merge calls handle their own):
        # keep what is done, as the batch run does.
        log.warning("online_budget_exhausted", error=str(leaf_exceptions(group)[0]))
        stopped = state.budget_exhausted = True
    top = None if stopped else forest.root()
    if top is None:
        module, root = partial_module(state, gateway, config.module_tokens) or initial, "partial"
    else:
        module, root = state.nodes[top].module, top
    status = "budget_exhausted" if state.budget_exhausted else "ok"
    state.phase = "done"
    used = gateway.statistics().since(before)
    prompt, completion, calls = (
        dict(used.prompt_tokens),
        dict(used.completion_tokens),
        dict(used.calls),
    )
    elsewhere = (executor.usage if executor is not None else LLMUsage()) - spent_before
    if elsewhere != LLMUsage():
        prompt["agent"] = prompt.get("agent", 0) + elsewhere.prompt_tokens
        completion["agent"] = completion.get("agent", 0) + elsewhere.completion_tokens
        calls["agent"] = calls.get("agent", 0) + elsewhere.calls
    return OnlineResult(
        module=module,
        root=root,
        steps=tuple(steps),
        gates=tuple(gates),
        nodes=dict(state.nodes),
        episodes=episodes.played,
        prompt_tokens=prompt,
        completion_tokens=completion,
        calls=calls,
        wall_seconds=state.now(),
        failures=len(state.failures),
        status=status,
    )


async def _play_forest(
    forest: MergeForest,
    subsets: Sequence[list[Task]],
    limiter: trio.CapacityLimiter,
    improve: Callable[[str, list[Task]], Awaitable[MergeNode]],
    gated_merge: Callable[[MergeJob], Awaitable[str]],
    state: RunState,
    tasks_of: dict[str, list[Task]],
) -> None:
    """Improve every subset, merging as siblings finish, until one root is left."""
    async with trio.open_nursery() as nursery:
        runner = ForestRunner(forest, nursery, gated_merge)

        async def run_subset(index: int, subset: list[Task]) -> None:
            subset_id = f"s{index + 1:03d}"
            async with limiter:
                leaf = await improve(subset_id, subset)
            state.add_node(leaf)
            tasks_of[leaf.id] = subset
            runner.add_leaf(leaf.id)

        async with trio.open_nursery() as subsets_nursery:
            for i, subset in enumerate(subsets):
                subsets_nursery.start_soon(run_subset, i, subset)
        state.phase = "merging"
        runner.close()
