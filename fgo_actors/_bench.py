"""``fgo bench``: what each optimization strategy buys, measured side by side.

One bench, on a fixed seed and split:
1. **collect**: a behaviour policy plays the training tasks; those
   trajectories are the data every strategy optimizes from. The policy is the
   reference agent with the base module (``llm``), or the environment's gold
   path with some random valid actions mixed in (``oracle``, no LLM), which
   gives both solved and failed episodes to learn from;
2. **optimize**: all-at-once, batch and FGO each optimize the base module
   from the same trajectories, through the same gateway, one after another
   (so their tokens, calls and wall times are comparable);
3. **evaluate**: the base module and every optimized module play the same
   held-out tasks; each gets its success rate with a 95% Wilson interval, its
   mean score, and McNemar's exact test against the base on the same seeds.

With an out dir, everything is kept there as it is made, so running the same
bench again carries on where it stopped: the training episodes and each
arm's held-out episodes (append-only JSONL), each strategy's module and run
report, and every LLM reply (a SQLite response cache). ``bench-state.json``
records the settings the cached work was made with; a bench with other
settings is refused (:class:`BenchStateError`) rather than mixed with it.
Tokens, calls and wall time are what each phase paid over all its runs
(replies replayed from the cache are not paid twice).

The numbers are whatever they turn out to be. The report keeps everything
needed to check them: the modules, the run reports and every episode.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import math
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs
import structlog
import trio

from ._core.errors import InputError, leaf_exceptions
from ._core.io import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_jsonl,
    atomic_write_text,
    load_module,
)
from ._core.model import Failure, MergeNode, Module, RunReport, Strategy, Trajectory
from ._core.prompts import render_module
from ._core.schemas import schema_error
from ._core.stats import PairedComparison, paired
from ._llm.gateway import LLMGateway
from ._storage.diskcache import Journal, JournalError, PhaseCache, Spent, remove_files
from ._storage.store import StoreError
from .actors.run import RunFailedError, prompt_budgets, run
from .actors.state import RunConfig
from .agent.envs import Environment, Task
from .agent.eval import EvalSummary
from .agent.eval import summarise as eval_summary
from .agent.rollout import AgentConfig, collect

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


# -- the out dir: settings, cached work, and what each phase cost ---------------


def _digest(obj: object) -> str:
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _tasks_json(tasks: Sequence[Task]) -> dict[str, Any]:
    return {"ids": [t.id for t in tasks], "params": sorted({t.params for t in tasks})}


def settings_of(config: BenchConfig, gateway: LLMGateway) -> dict[str, Any]:
    """What the training and held-out episodes depend on: a cached bench
    continues only under the same settings."""
    out: dict[str, Any] = {
        "model": gateway.config.model,
        "temperature": gateway.config.temperature,
        "train": _tasks_json(config.train),
        "test": _tasks_json(config.test),
        "policy": config.policy,
        "base_module": {
            "sha256": _digest(config.base.to_json()),
            "rules": len(config.base.rules),
            "functions": len(config.base.functions),
        },
        "agent": json.loads(json.dumps(attrs.asdict(config.agent), default=str)),
    }
    if config.policy == "oracle":
        out["epsilon"] = config.epsilon
        out["oracle_seed"] = config.run.seed
    return out


def run_settings_of(config: BenchConfig, gateway: LLMGateway, strategy: Strategy) -> dict[str, Any]:
    """What one strategy's optimization depends on, besides the training episodes."""
    return {
        **attrs.evolve(config.run, strategy=strategy).to_json(),
        "max_completion_tokens": gateway.config.max_completion_tokens,
        "max_reasks": gateway.config.max_reasks,
        "structured_output": gateway.config.structured_output,
    }


_LABELS = {
    "model": "model (--model)",
    "temperature": "temperature",
    "train": "training tasks (--train, --params)",
    "test": "held-out tasks (--test, --params)",
    "policy": "training policy (--policy)",
    "base_module": "base module (--base)",
    "epsilon": "oracle's random share (--epsilon)",
    "oracle_seed": "oracle's seed (--seed)",
    "agent.max_steps": "agent turns per episode (--max-steps)",
    "context_tokens": "context tokens (--context-tokens)",
    "subset_tokens": "subset tokens (--subset-tokens)",
    "seed": "seed (--seed)",
}
_MISSING = object()


def _show(key: str, value: object) -> str:
    if value is _MISSING:
        return "not set"
    if key in ("train", "test") and isinstance(value, dict):
        ids = list(value.get("ids", []))
        span = f"{ids[0]} … {ids[-1]}" if len(ids) > 1 else (ids[0] if ids else "")
        params = [p for p in value.get("params", []) if p]
        return f"{len(ids)} tasks ({span})" + (f" with {' / '.join(params)}" if params else "")
    if key == "base_module" and isinstance(value, dict):
        return (
            f"{value.get('rules')} rules and {value.get('functions')} functions, "
            f"sha256 {str(value.get('sha256'))[:12]}"
        )
    return json.dumps(value, ensure_ascii=False)


def differences(cached: Mapping[str, Any], asked: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Each setting that differs, as ``label: cached value there, asked value now``."""
    out: list[str] = []
    for key in [*asked, *(k for k in cached if k not in asked)]:
        name = f"{prefix}{key}"
        old, new = cached.get(key, _MISSING), asked.get(key, _MISSING)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict) and name not in _LABELS:
            out += differences(old, new, prefix=f"{name}.")
            continue
        out.append(f"{_LABELS.get(name, name)}: {_show(name, old)} there, {_show(name, new)} now")
    return out


_NODE_FIELDS = frozenset(
    ("id", "kind", "module", "children", "subsets", "started_at", "finished_at", "method")
)


def _report_from_json(obj: Mapping[str, Any]) -> RunReport:
    """A run report read back from its JSON, for the figures the bench shows.
    Merge nodes come back without their modules (a report does not hold
    them), their other fields as ``stats``; the bench writes the JSON it read,
    not this, back out."""
    nodes = tuple(
        MergeNode(
            id=n["id"],
            kind=n["kind"],
            module=Module(),
            children=tuple(n["children"]),
            subsets=tuple(n["subsets"]),
            started_at=float(n["started_at"]),
            finished_at=float(n["finished_at"]),
            method=n["method"],
            stats={k: v for k, v in n.items() if k not in _NODE_FIELDS},
        )
        for n in obj["merge_tree"]
    )
    return RunReport(
        status=obj["status"],
        strategy=obj["strategy"],
        trajectories=int(obj["trajectories"]),
        subsets=int(obj["subsets"]),
        epochs=int(obj["epochs"]),
        fan_in=int(obj["fan_in"]),
        llm_calls=dict(obj["llm_calls"]),
        prompt_tokens=int(obj["prompt_tokens"]),
        completion_tokens=int(obj["completion_tokens"]),
        tokens_by_role=dict(obj["tokens_by_role"]),
        token_budget=obj.get("token_budget"),
        truncated_trajectories=int(obj["truncated_trajectories"]),
        wall_seconds=float(obj["wall_seconds"]),
        max_in_flight=int(obj["max_in_flight"]),
        merge_tree=nodes,
        root=obj.get("root"),
        failures=tuple(Failure(f["unit"], f["kind"], f["error"]) for f in obj["failures"]),
        cut_trajectories=obj.get("cut_trajectories"),
        error=obj.get("error"),
        config=dict(obj.get("config") or {}),
    )


class _Workspace:
    """The bench's out dir (or nothing, without one): the settings the cached
    work was made with, that work, the LLM response cache and the time and
    tokens each phase has cost over all runs.

    ``bench-state.json`` is written last, atomically: a strategy counts as
    optimized once the state names it, so a crash between writing its module
    and the state only means optimizing it again (from cached replies).
    """

    def __init__(self, config: BenchConfig, gateway: LLMGateway, out_dir: Path | None) -> None:
        self.config = config
        self.gateway = gateway
        self.out_dir = out_dir
        self.settings = settings_of(config, gateway)
        self.runs = 1
        self.seconds: dict[str, float] = {}
        self.strategies: dict[str, dict[str, Any]] = {}
        self.train: dict[str, Trajectory] = {}
        self.held_out: dict[str, dict[str, Trajectory]] = {}
        self.optimized: dict[str, tuple[Module, RunReport, dict[str, Any]]] = {}
        self.cache: PhaseCache | None = None
        self._live: dict[str, Spent] = {}  # without a cache: this run's spend by phase
        self._journals: dict[str, Journal] = {}
        self._phase: str | None = None  # the phase under way, timed from _mark
        self._mark = 0.0

    # -- opening ----------------------------------------------------------
    def open(self, *, fresh: bool) -> None:
        """Check the cached state against the settings and load it; or, with
        ``fresh``, remove it and start over. Raises BenchStateError."""
        if self.out_dir is None:
            return
        out = self.out_dir
        if fresh:
            remove_files(out, list(OWNED_FILES))
        state_path = out / STATE_FILE
        if state_path.exists():
            self._load_state(state_path)
        else:
            found = [name for name in OWNED_FILES if (out / name).exists()]
            if found:
                raise BenchStateError(
                    f"{out} holds bench files ({', '.join(found)}) but no {STATE_FILE} to "
                    "say what settings made them (an older fgo bench, or another tool); "
                    "pass --fresh to start over there, or choose another --out-dir"
                )
        try:
            self.cache = PhaseCache.open(out / CACHE_FILE)
        except StoreError as e:
            raise BenchStateError(f"{e}; pass --fresh to start over") from e
        try:
            self._load_episodes()
            self._load_optimized()
            self.save()
        except BaseException:
            self.close()
            raise

    def _load_state(self, path: Path) -> None:
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(state, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            raise BenchStateError(f"cannot read {path}: {e}; pass --fresh to start over") from e
        if state.get("format") != STATE_FORMAT:
            raise BenchStateError(
                f"{path} is in format {state.get('format')!r}, this fgo reads {STATE_FORMAT}; "
                "pass --fresh to start over, or choose another --out-dir"
            )
        found = differences(state.get("settings") or {}, self.settings)
        strategies = state.get("strategies") or {}
        for strategy in self.config.strategies:
            done = strategies.get(strategy)
            if done is None:
                continue
            asked = run_settings_of(self.config, self.gateway, strategy)
            found += [f"{strategy}'s {d}" for d in differences(done.get("run") or {}, asked)]
        if found:
            raise BenchStateError(
                f"{self.out_dir} holds a bench made with other settings: "
                + "; ".join(found)
                + ". Rerun with those settings to continue it, pass --fresh to start "
                "over there, or choose another --out-dir"
            )
        self.runs = int(state.get("runs", 0)) + 1
        self.seconds = {str(k): float(v) for k, v in (state.get("seconds") or {}).items()}
        self.strategies = {str(k): dict(v) for k, v in strategies.items()}

    def _read_journal(
        self, name: str, journal: Journal, tasks: Sequence[Task]
    ) -> dict[str, Trajectory]:
        asked = {t.id for t in tasks}
        out: dict[str, Trajectory] = {}
        try:
            rows = journal.read()
        except JournalError as e:
            raise BenchStateError(f"{e}; pass --fresh to start over") from e
        for lineno, row in enumerate(rows, start=1):
            try:
                traj = Trajectory.from_json(row, path=str(journal.path), line=lineno)
            except InputError as e:
                raise BenchStateError(f"{e}; pass --fresh to start over") from e
            if traj.id not in asked:
                raise BenchStateError(
                    f"{journal.path} holds {name} episode {traj.id!r}, which is not one of "
                    "the tasks asked for; pass --fresh to start over"
                )
            out.setdefault(traj.id, traj)
        return out

    def _load_episodes(self) -> None:
        assert self.out_dir is not None
        journal = self._journal("train", self.out_dir / TRAIN_FILE)
        self.train = self._read_journal("training", journal, self.config.train)
        for arm in (BASE, *self.config.strategies):
            path = self.out_dir / HELD_OUT_DIR / f"{arm}.jsonl"
            self.held_out[arm] = self._read_journal(
                f"{arm}'s held-out", self._journal(arm, path), self.config.test
            )

    def _load_optimized(self) -> None:
        """The cached strategies whose module and report are there and whole;
        a strategy whose files are not is optimized again (its held-out
        episodes, played with a module that is gone, are dropped)."""
        assert self.out_dir is not None
        log = structlog.get_logger()
        for strategy in self.config.strategies:
            done = self.strategies.get(strategy)
            if done is None:
                if self.held_out.get(strategy):
                    # Only a damaged out dir has these: nothing says what module played them.
                    log.warning("bench_dropping_episodes", arm=strategy, reason="not optimized")
                    remove_files(self.out_dir / HELD_OUT_DIR, [f"{strategy}.jsonl"])
                    self.held_out[strategy] = {}
                continue
            module_path = self.out_dir / "modules" / f"{strategy}.json"
            report_path = self.out_dir / "reports" / f"{strategy}.json"
            try:
                module = load_module(module_path)
                report_json = json.loads(report_path.read_text(encoding="utf-8"))
                if schema_error("report", report_json) is not None:
                    raise ValueError(f"{report_path} is not a run report")
                report = _report_from_json(report_json)
                if _digest(module.to_json()) != done.get("module_sha256"):
                    raise ValueError(f"{module_path} is not the module that was optimized")
            except (InputError, OSError, ValueError, KeyError, TypeError) as e:
                log.warning("bench_optimizing_again", strategy=strategy, reason=str(e)[:300])
                del self.strategies[strategy]
                remove_files(self.out_dir / HELD_OUT_DIR, [f"{strategy}.jsonl"])
                self.held_out[strategy] = {}
                continue
            self.optimized[strategy] = (module, report, report_json)

    def _journal(self, key: str, path: Path) -> Journal:
        journal = self._journals[key] = Journal(path)
        return journal

    # -- recording --------------------------------------------------------
    async def record_train(self, traj: Trajectory) -> None:
        self.train[traj.id] = traj
        if "train" in self._journals:
            await self._journals["train"].append_async(traj.to_json())
            self.checkpoint()

    async def record_held_out(self, arm: str, traj: Trajectory) -> None:
        self.held_out.setdefault(arm, {})[traj.id] = traj
        if arm in self._journals:
            await self._journals[arm].append_async(traj.to_json())
            self.checkpoint()

    def record_optimized(self, strategy: Strategy, module: Module, report: RunReport) -> None:
        self.optimized[strategy] = (module, report, report.to_json())
        if self.out_dir is None:
            return
        atomic_write_json(self.out_dir / "modules" / f"{strategy}.json", module.to_json())
        atomic_write_json(self.out_dir / "reports" / f"{strategy}.json", report.to_json())
        self.strategies[strategy] = {
            "run": run_settings_of(self.config, self.gateway, strategy),
            "module_sha256": _digest(module.to_json()),
        }
        self.save()

    def record_failed(self, strategy: Strategy, report: RunReport | None) -> None:
        """A failed optimization keeps its report, but is tried again next run."""
        if self.out_dir is not None and report is not None:
            atomic_write_json(self.out_dir / "reports" / f"{strategy}.json", report.to_json())

    def save(self) -> None:
        if self.out_dir is None:
            return
        atomic_write_json(
            self.out_dir / STATE_FILE,
            {
                "format": STATE_FORMAT,
                "settings": self.settings,
                "runs": self.runs,
                "seconds": {k: round(v, 3) for k, v in sorted(self.seconds.items())},
                "strategies": self.strategies,
            },
        )

    # -- phases: the cache's namespace, wall time and tokens ----------------
    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Work of phase ``name``: its LLM replies are cached under its name,
        its time is added to what earlier runs spent on it (saved after each
        episode and when the phase ends, also when it is cancelled)."""
        if self.cache is not None:
            self.cache.phase = name
        before = self.gateway.statistics()
        self._phase, self._mark = name, trio.current_time()
        try:
            yield
        finally:
            self._clock_in()
            self._phase = None
            if self.cache is None:
                used = self.gateway.statistics().since(before)
                spent = Spent(
                    sum(used.prompt_tokens.values()),
                    sum(used.completion_tokens.values()),
                    dict(used.calls),
                )
                self._live[name] = self._live.get(name, Spent()) + spent
            self.save()

    def _clock_in(self) -> None:
        """Add the time since the last mark to the phase under way."""
        if self._phase is not None:
            now = trio.current_time()
            self.seconds[self._phase] = self.seconds.get(self._phase, 0.0) + now - self._mark
            self._mark = now

    def checkpoint(self) -> None:
        """Save the time spent so far (after each episode: a killed run loses
        at most the time since its last episode)."""
        self._clock_in()
        self.save()

    async def spent(self) -> dict[str, Spent]:
        """Paid calls and tokens by phase: over every run with an out dir,
        else this run's."""
        if self.cache is not None:
            return await self.cache.spent()
        return dict(self._live)

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
            self.cache = None


@contextlib.contextmanager
def _cache_installed(gateway: LLMGateway, cache: PhaseCache | None) -> Iterator[None]:
    """The bench's response cache on ``gateway`` for the bench's duration."""
    if cache is None:
        yield
        return
    previous, gateway.cache = gateway.cache, cache
    try:
        yield
    finally:
        gateway.cache = previous


# -- playing and summarising ----------------------------------------------------

EnvFactory = Callable[[str], Environment]
Player = Callable[[Sequence[Task], trio.MemorySendChannel[Trajectory], EnvFactory], Awaitable[None]]


async def _play(
    tasks: Sequence[Task],
    player: Player,
    record: Callable[[Trajectory], Awaitable[None]],
    progress: BenchProgress,
    *,
    timed: bool = True,
) -> None:
    """Play ``tasks``, recording every episode and telling ``progress`` as each ends.

    The player's workers close their environments when they end normally. A
    bench that is stopped (Ctrl-C, a cancel, an error) would leave those JVMs
    and their pipes behind, so the environments made here are closed again on
    the way out, shielded (closing one twice is harmless).
    """
    if not tasks:
        return
    from .agent.envs import make_env

    made: list[Environment] = []

    def factory(name: str) -> Environment:
        env = make_env(name)
        made.append(env)
        return env

    asked = {t.id for t in tasks}
    send, receive = trio.open_memory_channel[Trajectory](0)
    last = trio.current_time()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(player, tasks, send, factory)
            with receive:
                async for traj in receive:
                    if traj.id not in asked:
                        raise RuntimeError(f"the policy played {traj.id!r}, not one of its tasks")
                    await record(traj)
                    now = trio.current_time()
                    progress.episode_done(now - last, timed=timed)
                    last = now
    except BaseException:
        with trio.CancelScope(shield=True):
            for env in made:
                try:
                    await trio.to_thread.run_sync(env.close)
                except Exception as e:  # already gone: nothing left to release
                    structlog.get_logger().debug("bench_env_close_failed", error=str(e)[:200])
        raise


def _training_player(config: BenchConfig, gateway: LLMGateway) -> Player:
    if config.policy == "oracle":
        from .agent.oracle import collect_oracle

        async def oracle(
            tasks: Sequence[Task], send: trio.MemorySendChannel[Trajectory], envs: EnvFactory
        ) -> None:
            await collect_oracle(
                tasks,
                send,
                epsilon=config.epsilon,
                seed=config.run.seed,
                workers=config.workers,
                max_steps=config.agent.max_steps,
                make_env=envs,
            )

        return oracle
    return _agent_player(config, gateway, config.base)


def _agent_player(config: BenchConfig, gateway: LLMGateway, module: Module) -> Player:
    async def agent(
        tasks: Sequence[Task], send: trio.MemorySendChannel[Trajectory], envs: EnvFactory
    ) -> None:
        await collect(
            tasks,
            module,
            gateway,
            send,
            workers=config.workers,
            config=config.agent,
            make_env=envs,
        )

    return agent


def summarise(
    label: str, trajectories: Sequence[Trajectory], spent: Spent, seconds: float
) -> EvalSummary:
    """An EvalSummary of episodes played over one or more runs, with what they cost."""
    return eval_summary(
        label,
        trajectories,
        llm_calls=sum(spent.calls.values()),
        prompt_tokens=spent.prompt_tokens,
        completion_tokens=spent.completion_tokens,
        wall_seconds=seconds,
    )


def _restore_progress(progress: BenchProgress, ws: _Workspace, config: BenchConfig) -> None:
    """Count what earlier runs finished; their mean times seed the estimate."""
    train_ids = {t.id for t in config.train}
    cached_train = len(train_ids & set(ws.train))
    arms = [BASE, *(s for s in config.strategies if s in ws.optimized)]
    cached_held_out = sum(len(ws.held_out.get(a, {})) for a in arms)
    timed = cached_held_out + (cached_train if config.policy == "llm" else 0)
    timed_seconds = sum(ws.seconds.get(f"evaluate {a}", 0.0) for a in arms)
    if config.policy == "llm":
        timed_seconds += ws.seconds.get("collect", 0.0)
    cached_opts = [s for s in config.strategies if s in ws.optimized]
    if not (cached_train or cached_held_out or cached_opts):
        return
    progress.restore(
        episodes=cached_train + cached_held_out,
        optimizations=len(cached_opts),
        episode_seconds=timed_seconds,
        timed_episodes=timed,
        optimization_seconds=sum(ws.seconds.get(f"optimize {s}", 0.0) for s in cached_opts),
        timed_optimizations=len(cached_opts),
    )


async def bench(
    config: BenchConfig,
    gateway: LLMGateway,
    progress: BenchProgress | None = None,
    *,
    out_dir: Path | None = None,
    fresh: bool = False,
) -> BenchResult:
    """Run the whole bench against ``gateway``; see the module docstring.

    With ``out_dir``, every episode, module, run report and LLM reply is kept
    there as soon as it exists, and what is there is used instead of being
    made again (BenchStateError if it was made with other settings; ``fresh``
    removes it first). The gateway's response cache is the bench's for its
    duration.
    """
    log = structlog.get_logger()
    n_arms = 1 + len(config.strategies)
    progress = progress or BenchProgress(
        episodes=len(config.train) + n_arms * len(config.test),
        optimizations=len(config.strategies),
        training_episodes=len(config.train),
    )
    # Budgets that leave no room fail here, before any episode is paid for.
    for strategy in config.strategies:
        if strategy != "all-at-once":
            prompt_budgets(gateway, attrs.evolve(config.run, strategy=strategy), config.base)
    ws = _Workspace(config, gateway, out_dir)
    ws.open(fresh=fresh)
    try:
        with _cache_installed(gateway, ws.cache):
            return await _bench(config, gateway, progress, ws, log)
    except BaseExceptionGroup as group:
        # Ctrl-C lands in whichever task was running, inside a nursery: say
        # it plainly, so that the caller sees an interrupt, not a group.
        if any(isinstance(e, KeyboardInterrupt) for e in leaf_exceptions(group)):
            raise KeyboardInterrupt from group
        raise
    finally:
        ws.close()


async def _bench(
    config: BenchConfig,
    gateway: LLMGateway,
    progress: BenchProgress,
    ws: _Workspace,
    log: Any,
) -> BenchResult:
    _restore_progress(progress, ws, config)

    progress.begin("collect")
    missing = [t for t in config.train if t.id not in ws.train]
    if missing:
        with ws.phase("collect"):
            await _play(
                missing,
                _training_player(config, gateway),
                ws.record_train,
                progress,
                timed=config.policy == "llm",
            )
    collected = sorted((ws.train[t.id] for t in config.train), key=lambda t: t.id)
    log.info(
        "bench_collected",
        episodes=len(collected),
        played=len(missing),
        solved=sum(t.outcome.success for t in collected),
        policy=config.policy,
    )

    optimized: dict[str, tuple[Module | None, RunReport | None, str | None]] = {}
    reports: dict[str, dict[str, Any]] = {}  # the cached strategies' reports, as read
    for strategy in config.strategies:
        cached = ws.optimized.get(strategy)
        if cached is not None:
            optimized[strategy] = (cached[0], cached[1], None)
            reports[strategy] = cached[2]
            log.info("bench_optimized", strategy=strategy, cached=True)
            continue
        progress.begin(f"optimize {strategy}")
        run_config = attrs.evolve(config.run, strategy=strategy)
        with ws.phase(f"optimize {strategy}"):
            try:
                result = await run(collected, gateway, run_config, initial=config.base)
                optimized[strategy] = (result.module, result.report, None)
            except RunFailedError as e:
                optimized[strategy] = (None, e.result.report, str(e))
        module, report, error = optimized[strategy]
        if module is None:
            progress.optimization_done(failed=True, episodes_dropped=len(config.test))
            ws.record_failed(strategy, report)
        else:
            assert report is not None
            progress.optimization_done()
            ws.record_optimized(strategy, module, report)
        log.info(
            "bench_optimized",
            strategy=strategy,
            status=report.status if report else None,
            tokens=(report.prompt_tokens + report.completion_tokens) if report else None,
            error=error,
        )

    playing: list[tuple[str, Module]] = [(BASE, config.base)]
    playing += [(s, m) for s, (m, _, _) in optimized.items() if m is not None]
    for name, module in playing:
        have = ws.held_out.setdefault(name, {})
        left = [t for t in config.test if t.id not in have]
        if not left:
            continue
        progress.begin(f"evaluate {name}")
        record = functools.partial(ws.record_held_out, name)
        with ws.phase(f"evaluate {name}"):
            await _play(left, _agent_player(config, gateway, module), record, progress)

    spent = await ws.spent()
    summaries = {
        name: summarise(
            name,
            [ws.held_out[name][t.id] for t in config.test],
            spent.get(f"evaluate {name}", Spent()),
            ws.seconds.get(f"evaluate {name}", 0.0),
        )
        for name, _ in playing
    }
    base_summary = summaries[BASE]
    _, _, base_tokens = module_size(config.base, gateway)
    arms = [Arm(BASE, config.base, base_summary, module_tokens=base_tokens)]
    episodes = {BASE: tuple(_held_out_episodes(ws, BASE, config))}
    for strategy in config.strategies:
        module, report, error = optimized[strategy]
        cost = spent.get(f"optimize {strategy}", Spent())
        seconds = ws.seconds.get(f"optimize {strategy}", 0.0)
        if module is None:
            arms.append(
                Arm(
                    strategy,
                    None,
                    None,
                    report,
                    error=error or "no module",
                    spent=cost,
                    optimization_seconds=seconds,
                )
            )
            continue
        summary = summaries[strategy]
        episodes[strategy] = tuple(_held_out_episodes(ws, strategy, config))
        arms.append(
            Arm(
                strategy,
                module,
                summary,
                report,
                paired(summary.outcomes, base_summary.outcomes),
                spent=cost,
                optimization_seconds=seconds,
                module_tokens=module_size(module, gateway)[2],
                report_json=reports.get(strategy),
            )
        )
    progress.begin("done")
    collect_spent = spent.get("collect", Spent())
    ws.save()
    return BenchResult(
        arms=tuple(arms),
        train=tuple(collected),
        episodes=episodes,
        collect_seconds=ws.seconds.get("collect", 0.0),
        collect_tokens=collect_spent.total_tokens,
        wall_seconds=sum(
            ws.seconds.get(phase, 0.0)
            for phase in [
                "collect",
                *(f"optimize {s}" for s in config.strategies),
                *(f"evaluate {name}" for name, _ in playing),
            ]
        ),
        runs=ws.runs,
        config={
            "train": [t.id for t in config.train],
            "test": [t.id for t in config.test],
            "params": sorted({t.params for t in [*config.train, *config.test]}),
            "strategies": list(config.strategies),
            "run": config.run.to_json(),
            "max_steps": config.agent.max_steps,
            "workers": config.workers,
            "policy": config.policy,
            "epsilon": config.epsilon if config.policy == "oracle" else None,
            "model": gateway.config.model,
            "base_rules": len(config.base.rules),
            "base_functions": len(config.base.functions),
            "base_tokens": base_tokens,
        },
    )


def _held_out_episodes(ws: _Workspace, arm: str, config: BenchConfig) -> list[Trajectory]:
    """``arm``'s held-out episodes, in task order."""
    return sorted((ws.held_out[arm][t.id] for t in config.test), key=lambda t: t.id)


def _p(p: float) -> str:
    """A p-value to three places, or to two significant digits below 0.001
    (0.000 would read as impossible)."""
    return f"{p:.3f}" if p >= 0.001 else f"{p:.2g}"


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def markdown_table(result: BenchResult) -> str:
    """The comparison as a Markdown table, with a line saying what was measured."""
    lines = [
        "| arm | held-out success [95% CI] | score | vs base (only arm / only base, p) "
        "| optimization tokens (prompt + completion) | LLM calls | optimization wall s "
        "| module (rules / functions / tokens) |",
        "|---|---|---|---|---|---|---|---|",
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
        versus = "-" if v is None else f"{v.only_a} / {v.only_b}, p = {_p(v.p_value)}"
        spent = arm.optimization_spent
        if spent is None:
            tokens = calls = wall = "-"
        else:
            tokens = f"{spent.total_tokens} ({spent.prompt_tokens} + {spent.completion_tokens})"
            calls = str(arm.optimization_calls)
            seconds = arm.optimization_wall_seconds
            wall = "-" if seconds is None else f"{seconds:.0f}"
        m = arm.module
        size = (
            "-"
            if m is None
            else f"{len(m.rules)} / {len(m.functions)} / "
            + ("?" if arm.module_tokens is None else str(arm.module_tokens))
        )
        lines.append(
            f"| {arm.name} | {success} | {score} | {versus} | {tokens} | {calls} | {wall} "
            f"| {size} |"
        )
    solved = sum(t.outcome.success for t in result.train)
    if result.config.get("policy") == "oracle":
        played = (
            "played by the oracle policy (the gold path, with up to "
            f"{100 * float(result.config.get('epsilon') or 0):.0f}% random valid actions)"
        )
    else:
        played = "played with the base module"
    runs = f" over {result.runs} runs" if result.runs > 1 else ""
    lines += [
        "",
        f"Optimized from {len(result.train)} training episodes ({solved} solved) {played}; "
        f"held-out: {len(result.config['test'])} tasks, at most "
        f"{result.config['max_steps']} agent turns each. Whole bench: "
        f"{result.wall_seconds / 60:.1f} min{runs}.",
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
        "train": out_dir / TRAIN_FILE,
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
            atomic_write_json(target, arm.report_json or arm.optimization.to_json())
            paths[f"report:{arm.name}"] = target
    plot_png(result, paths["plot"])
    return paths


def format_eta(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "estimating"
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
