"""Run configuration and the shared, observable state of one run."""

from __future__ import annotations

from typing import Literal

import attrs
import structlog
import trio

from .._core.forest import expected_merges
from .._core.model import Failure, MergeNode, Module, RenderedTrajectory, Strategy


@attrs.frozen
class RunConfig:
    """Knobs of one optimization run. Token numbers are in tiktoken cl100k tokens."""

    strategy: Strategy = "fgo"
    context_tokens: int = 8192
    subset_tokens: int | None = None  # default: context_tokens // 2
    module_tokens: int | None = None  # default: subset_tokens // 4
    fan_in: int = 2
    epochs: int = 1
    seed: int = 0
    group_key: str = "task_type"
    eager_merge: bool = True
    optimizers: int | None = None  # default: the gateway's max_concurrency
    playbook: bool = True  # mine the plays that earned score into a module function

    def __attrs_post_init__(self) -> None:
        if self.strategy not in ("fgo", "all-at-once", "batch"):
            raise ValueError(f"unknown strategy {self.strategy!r}")
        if self.context_tokens < 512:
            raise ValueError("context_tokens must be at least 512")
        if self.fan_in < 2:
            raise ValueError("fan_in must be at least 2")
        if self.epochs < 1:
            raise ValueError("epochs must be at least 1")
        if self.subset_tokens is not None and not 0 < self.subset_tokens <= self.context_tokens:
            raise ValueError("subset_tokens must be positive and at most context_tokens")

    @property
    def subset_budget(self) -> int:
        return self.subset_tokens if self.subset_tokens is not None else self.context_tokens // 2

    @property
    def module_budget(self) -> int:
        return self.module_tokens if self.module_tokens is not None else self.subset_budget // 4

    def to_json(self) -> dict[str, object]:
        return {
            "strategy": self.strategy,
            "context_tokens": self.context_tokens,
            "subset_tokens": self.subset_budget,
            "module_tokens": self.module_budget,
            "fan_in": self.fan_in,
            "epochs": self.epochs,
            "seed": self.seed,
            "group_key": self.group_key,
            "eager_merge": self.eager_merge,
            "playbook": self.playbook,
        }


Phase = Literal["starting", "partitioning", "optimizing", "merging", "done"]


@attrs.frozen
class RunStatistics:
    """Snapshot for progress displays and tests."""

    phase: Phase
    subsets_total: int | None
    subsets_done: int
    merges_done: int
    merges_expected: int | None
    failures: int
    elapsed: float


@attrs.define
class RunState:
    """Mutable run state shared by the actors of one run (all on one trio thread)."""

    # Set by run() when the run starts (trio time); a RunState can be made anywhere.
    started_at: float = 0.0
    phase: Phase = "starting"
    subsets_total: int | None = None
    # Set by the partitioner: names the subsets made (see ``partition_digest``).
    partition_digest: str | None = None
    subsets_done: int = 0
    merges_done: int = 0
    merges_expected: int | None = None
    fan_in: int = 2
    subsets_skipped: int = 0
    truncated: int = 0
    cut: int | None = None
    nodes: dict[str, MergeNode] = attrs.field(factory=dict)
    failures: list[Failure] = attrs.field(factory=list)
    budget_exhausted: bool = False
    successful_units: int = 0
    # The baselines' module so far (FGO's work so far is in ``nodes``): what a
    # run that the endpoint stops still hands back.
    current: Module | None = None
    # Each optimized subset's rendered trajectories (with their recorded turns):
    # a merge replays a child's functions on the turns of subsets they were
    # not written from.
    subset_items: dict[str, tuple[RenderedTrajectory, ...]] = attrs.field(factory=dict)

    def now(self) -> float:
        return trio.current_time() - self.started_at

    def add_node(self, node: MergeNode) -> None:
        self.nodes[node.id] = node

    def fail(self, unit: str, kind: str, error: BaseException | str) -> None:
        message = str(error)
        self.failures.append(Failure(unit=unit, kind=kind, error=message))
        structlog.get_logger().warning("unit_failed", unit=unit, kind=kind, error=message[:500])

    def _merges_expected(self) -> int | None:
        if self.merges_expected is not None:
            return self.merges_expected
        if self.subsets_total is None:
            return None
        return expected_merges(self.subsets_total - self.subsets_skipped, self.fan_in)

    def statistics(self) -> RunStatistics:
        return RunStatistics(
            phase=self.phase,
            subsets_total=self.subsets_total,
            subsets_done=self.subsets_done,
            merges_done=self.merges_done,
            merges_expected=self._merges_expected(),
            failures=len(self.failures),
            elapsed=self.now(),
        )
