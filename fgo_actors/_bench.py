"""``fgo bench``: what each optimization strategy buys, measured side by side.

One bench, on a fixed seed and split:
1. **collect**: the reference agent plays the training tasks with the base
   module; those trajectories are the data every strategy optimizes from;
2. **optimize**: all-at-once, batch and FGO each optimize the base module
   from the same trajectories, through the same gateway, one after another
   (so their tokens, calls and wall times are comparable);
3. **evaluate**: the base module and every optimized module play the same
   held-out tasks; each gets its success rate with a 95% Wilson interval, its
   mean score, and McNemar's exact test against the base on the same seeds.

The numbers are whatever they turn out to be. The report keeps everything
needed to check them: the modules, the run reports and every episode.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import structlog
import trio

from ._agent import AgentConfig, collect
from ._eval import EvalSummary, evaluate
from ._gateway import LLMGateway
from ._io import atomic_write_bytes, atomic_write_json, atomic_write_jsonl, atomic_write_text
from ._model import Module, RunReport, Strategy, Trajectory
from ._pipeline import RunFailedError, _item_budget, run
from ._state import RunConfig
from ._stats import PairedComparison, paired
from .envs import Task

STRATEGIES: tuple[Strategy, ...] = ("all-at-once", "batch", "fgo")
BASE = "base"


@attrs.frozen
class BenchConfig:
    """What to bench. ``run`` is the template every strategy's RunConfig is made from."""

    train: Sequence[Task]
    test: Sequence[Task]
    base: Module = attrs.field(factory=Module)
    strategies: tuple[Strategy, ...] = STRATEGIES
    run: RunConfig = attrs.field(factory=RunConfig)
    agent: AgentConfig = attrs.field(factory=AgentConfig)
    workers: int = 1

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


def llm_calls(report: RunReport) -> int:
    """Optimize and merge calls made (re-asks included; ``retries`` and
    ``reasks`` in the report are counts, not roles)."""
    calls = report.llm_calls if isinstance(report.llm_calls, dict) else {}
    return int(calls.get("optimize", 0)) + int(calls.get("merge", 0))


@attrs.frozen
class Arm:
    """One row of the comparison: the base module, or one strategy's result."""

    name: str
    module: Module | None  # None when the optimization failed
    evaluation: EvalSummary | None
    optimization: RunReport | None = None  # None for the base
    versus_base: PairedComparison | None = None
    error: str | None = None

    @property
    def optimization_tokens(self) -> int:
        r = self.optimization
        return 0 if r is None else r.prompt_tokens + r.completion_tokens

    def to_json(self) -> dict[str, Any]:
        r = self.optimization
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
            if r is None
            else {
                "status": r.status,
                "prompt_tokens": r.prompt_tokens,
                "completion_tokens": r.completion_tokens,
                "llm_calls": llm_calls(r),
                "llm_calls_by_role": r.llm_calls,
                "wall_seconds": round(r.wall_seconds, 3),
                "subsets": r.subsets,
                "cut_trajectories": r.cut_trajectories,
                "truncated_trajectories": r.truncated_trajectories,
                "failures": len(r.failures),
            },
            "module_rules": None if self.module is None else len(self.module.rules),
            "module_functions": None if self.module is None else len(self.module.functions),
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

    def to_json(self) -> dict[str, Any]:
        solved = sum(t.outcome.success for t in self.train)
        return {
            "config": self.config,
            "training_episodes": len(self.train),
            "training_solved": solved,
            "collect_seconds": round(self.collect_seconds, 3),
            "collect_tokens": self.collect_tokens,
            "wall_seconds": round(self.wall_seconds, 3),
            "arms": [a.to_json() for a in self.arms],
        }


class BenchProgress:
    """Counts the bench's work and estimates the time left (see ``remaining_seconds``).

    ``on_change`` is called after every change with the progress itself; the
    CLI draws it on a terminal or logs it as JSON.
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

    def episode_done(self, seconds: float) -> None:
        self.episodes_done += 1
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
) -> float | None:
    """Seconds left, from the mean time of the episodes and optimizations so far.

    Before any optimization has finished, one is guessed to cost as much as
    playing half of the training episodes it learns from (an optimize call
    reads them all and writes a few hundred tokens); after that, the measured
    mean is used. The time already spent on the optimization under way is
    taken off. None until the first episode has finished.
    """
    if episodes_done <= 0:
        return None
    per_episode = episode_seconds / episodes_done
    if optimizations_done > 0:
        per_optimization = optimization_seconds / optimizations_done
    else:
        per_optimization = per_episode * max(1.0, training_episodes / 2)
    left = max(0, episodes_total - episodes_done) * per_episode
    pending = max(0, optimizations_total - optimizations_done)
    left += pending * per_optimization
    if pending:
        left -= min(current_optimization_seconds, per_optimization)
    return max(0.0, left)


async def _play(
    tasks: Sequence[Task],
    module: Module,
    gateway: LLMGateway,
    config: BenchConfig,
    progress: BenchProgress,
    label: str,
) -> tuple[EvalSummary, list[Trajectory]]:
    """Evaluate ``module`` on ``tasks``, telling ``progress`` about every episode."""
    last = [trio.current_time()]

    def seen(_: Trajectory) -> None:
        now = trio.current_time()
        progress.episode_done(now - last[0])
        last[0] = now

    return await evaluate(
        tasks,
        module,
        gateway,
        label=label,
        workers=config.workers,
        config=config.agent,
        on_episode=seen,
    )


async def bench(
    config: BenchConfig,
    gateway: LLMGateway,
    progress: BenchProgress | None = None,
    *,
    out_dir: Path | None = None,
) -> BenchResult:
    """Run the whole bench against ``gateway``; see the module docstring.

    With ``out_dir``, the training episodes and each optimized module are
    written there as soon as they exist, so a bench stopped late keeps them.
    """
    log = structlog.get_logger()
    n_arms = 1 + len(config.strategies)
    progress = progress or BenchProgress(
        episodes=len(config.train) + n_arms * len(config.test),
        optimizations=len(config.strategies),
        training_episodes=len(config.train),
    )
    started = trio.current_time()
    # Budgets that leave no room fail here, before any episode is paid for.
    for strategy in config.strategies:
        if strategy != "all-at-once":
            _item_budget(gateway, attrs.evolve(config.run, strategy=strategy), config.base)

    progress.begin("collect")
    before = gateway.statistics()
    collected: list[Trajectory] = []
    send, receive = trio.open_memory_channel[Trajectory](0)
    last = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: collect(
                config.train,
                config.base,
                gateway,
                send,
                workers=config.workers,
                config=config.agent,
            )
        )
        async with receive:
            async for traj in receive:
                collected.append(traj)
                now = trio.current_time()
                progress.episode_done(now - last)
                last = now
    collected.sort(key=lambda t: t.id)
    if out_dir is not None:
        atomic_write_jsonl(out_dir / "train.jsonl", [t.to_json() for t in collected])
    used = gateway.statistics().since(before)
    collect_tokens = sum(used.prompt_tokens.values()) + sum(used.completion_tokens.values())
    collect_seconds = trio.current_time() - started
    log.info(
        "bench_collected",
        episodes=len(collected),
        solved=sum(t.outcome.success for t in collected),
        seconds=round(collect_seconds, 1),
    )

    optimized: dict[str, tuple[Module | None, RunReport | None, str | None]] = {}
    for strategy in config.strategies:
        progress.begin(f"optimize {strategy}")
        run_config = attrs.evolve(config.run, strategy=strategy)
        try:
            result = await run(collected, gateway, run_config, initial=config.base)
            optimized[strategy] = (result.module, result.report, None)
        except RunFailedError as e:
            optimized[strategy] = (None, e.result.report, str(e))
        module, report, error = optimized[strategy]
        if module is None:
            progress.optimization_done(failed=True, episodes_dropped=len(config.test))
        else:
            progress.optimization_done()
            if out_dir is not None:
                atomic_write_json(out_dir / "modules" / f"{strategy}.json", module.to_json())
        if out_dir is not None and report is not None:
            atomic_write_json(out_dir / "reports" / f"{strategy}.json", report.to_json())
        log.info(
            "bench_optimized",
            strategy=strategy,
            status=report.status if report else None,
            tokens=(report.prompt_tokens + report.completion_tokens) if report else None,
            error=error,
        )

    progress.begin(f"evaluate {BASE}")
    base_summary, base_episodes = await _play(
        config.test, config.base, gateway, config, progress, BASE
    )
    arms = [Arm(BASE, config.base, base_summary)]
    episodes = {BASE: tuple(base_episodes)}
    for strategy in config.strategies:
        module, report, error = optimized[strategy]
        if module is None:
            arms.append(Arm(strategy, None, None, report, None, error or "no module"))
            continue
        progress.begin(f"evaluate {strategy}")
        summary, played = await _play(config.test, module, gateway, config, progress, strategy)
        episodes[strategy] = tuple(played)
        versus = paired(summary.outcomes, base_summary.outcomes)
        arms.append(Arm(strategy, module, summary, report, versus))
    progress.begin("done")
    return BenchResult(
        arms=tuple(arms),
        train=tuple(collected),
        episodes=episodes,
        collect_seconds=collect_seconds,
        collect_tokens=collect_tokens,
        wall_seconds=trio.current_time() - started,
        config={
            "train": [t.id for t in config.train],
            "test": [t.id for t in config.test],
            "params": sorted({t.params for t in [*config.train, *config.test]}),
            "strategies": list(config.strategies),
            "run": config.run.to_json(),
            "max_steps": config.agent.max_steps,
            "workers": config.workers,
            "base_rules": len(config.base.rules),
            "base_functions": len(config.base.functions),
        },
    )


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def markdown_table(result: BenchResult) -> str:
    """The comparison as a Markdown table, with a line saying what was measured."""
    lines = [
        "| arm | held-out success [95% CI] | score | vs base (only arm / only base, p) "
        "| optimization tokens (prompt + completion) | LLM calls | optimization wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in result.arms:
        e = arm.evaluation
        if e is None:
            success = score = "failed"
        else:
            lo, hi = e.success_ci
            success = (
                f"{e.successes}/{e.episodes} = {_pct(e.success_rate)} [{_pct(lo)}, {_pct(hi)}]"
            )
            score = f"{e.score_mean:.3f}"
        v = arm.versus_base
        versus = "-" if v is None else f"{v.only_a} / {v.only_b}, p = {v.p_value:.3f}"
        r = arm.optimization
        if r is None:
            tokens = calls = wall = "-"
        else:
            total = r.prompt_tokens + r.completion_tokens
            tokens = f"{total} ({r.prompt_tokens} + {r.completion_tokens})"
            calls = str(llm_calls(r))
            wall = f"{r.wall_seconds:.0f}"
        lines.append(
            f"| {arm.name} | {success} | {score} | {versus} | {tokens} | {calls} | {wall} |"
        )
    solved = sum(t.outcome.success for t in result.train)
    lines += [
        "",
        f"Optimized from {len(result.train)} training episodes ({solved} solved) played with "
        f"the base module; held-out: {len(result.config['test'])} tasks, at most "
        f"{result.config['max_steps']} agent turns each. Whole bench: "
        f"{result.wall_seconds / 60:.1f} min.",
    ]
    errors = [f"- {a.name}: {a.error}" for a in result.arms if a.error]
    if errors:
        lines += ["", "Failed arms:", *errors]
    return "\n".join(lines) + "\n"


def plot_png(result: BenchResult, path: Path) -> None:
    """Success rate (with its 95% interval) against optimization tokens, one point per arm.

    Rendered in memory, then written atomically.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    try:
        for arm in result.arms:
            e = arm.evaluation
            if e is None:
                continue
            x = arm.optimization_tokens
            lo, hi = e.success_ci
            ax.errorbar(
                [x],
                [e.success_rate],
                yerr=[[e.success_rate - lo], [hi - e.success_rate]],
                fmt="o",
                capsize=4,
                label=f"{arm.name} ({e.successes}/{e.episodes})",
            )
            ax.annotate(arm.name, (x, e.success_rate), textcoords="offset points", xytext=(6, 4))
        ax.set_xlabel("optimization tokens (prompt + completion)")
        ax.set_ylabel("held-out success rate (95% CI)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"fgo bench: {len(result.config['test'])} held-out tasks")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small")
        fig.tight_layout()
        image = io.BytesIO()
        fig.savefig(image, format="png")
    finally:
        plt.close(fig)
    atomic_write_bytes(path, image.getvalue())


def write_outputs(result: BenchResult, out_dir: Path) -> dict[str, Path]:
    """Write bench.json, bench.md, bench.png, the modules, the optimization run
    reports and every episode; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "bench.json",
        "markdown": out_dir / "bench.md",
        "plot": out_dir / "bench.png",
        "train": out_dir / "train.jsonl",
        "episodes": out_dir / "episodes.jsonl",
    }
    atomic_write_json(paths["json"], result.to_json())
    atomic_write_text(paths["markdown"], markdown_table(result))
    atomic_write_jsonl(paths["train"], [t.to_json() for t in result.train])
    atomic_write_jsonl(
        paths["episodes"],
        [
            {**t.to_json(), "id": f"{name}/{t.id}"}
            for name, played in result.episodes.items()
            for t in played
        ],
    )
    for arm in result.arms:
        if arm.module is not None:
            target = out_dir / "modules" / f"{arm.name}.json"
            atomic_write_json(target, arm.module.to_json())
            paths[f"module:{arm.name}"] = target
        if arm.optimization is not None:  # the run report: merge tree, failures, tokens
            target = out_dir / "reports" / f"{arm.name}.json"
            atomic_write_json(target, arm.optimization.to_json())
            paths[f"report:{arm.name}"] = target
    plot_png(result, paths["plot"])
    return paths


def format_eta(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "estimating"
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
