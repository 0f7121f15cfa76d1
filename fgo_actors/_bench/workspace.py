"""The bench's folder: what the cached work was made with (refusing to mix
settings), and the cached episodes, modules, reports and LLM replies a rerun
carries on from.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import structlog
import trio

from .._core.errors import InputError
from .._core.io import (
    atomic_write_json,
    load_module,
)
from .._core.model import Failure, MergeNode, Module, RunReport, Strategy, Trajectory
from .._core.schemas import schema_error
from .._llm.gateway import LLMGateway
from .._storage.diskcache import Journal, JournalError, PhaseCache, Spent, remove_files
from .._storage.store import StoreError
from ..agent.envs import Task
from ..agent.executor import Executor, LLMUsage
from .records import (
    BASE,
    CACHE_FILE,
    HELD_OUT_DIR,
    OWNED_FILES,
    STATE_FILE,
    STATE_FORMAT,
    TRAIN_FILE,
    BenchConfig,
    BenchStateError,
)


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
        # What the executor's workers paid outside the gateway (Ray), by phase,
        # over every run: their calls go neither through the cache nor its log.
        self.worker_spent: dict[str, Spent] = {}
        self._executor: Executor | None = None  # the phase's, whose usage is clocked
        self._usage_mark = LLMUsage()
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
        try:
            self.worker_spent = {
                str(k): Spent(
                    int(v["prompt_tokens"]), int(v["completion_tokens"]), dict(v["calls"])
                )
                for k, v in (state.get("worker_spent") or {}).items()
            }
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise BenchStateError(
                f"{path}: cannot read worker_spent: {e}; pass --fresh to start over"
            ) from e

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
        await self._append("train", traj)

    async def record_held_out(self, arm: str, traj: Trajectory) -> None:
        self.held_out.setdefault(arm, {})[traj.id] = traj
        await self._append(arm, traj)

    async def _append(self, key: str, traj: Trajectory) -> None:
        """Journal the episode. One that could not be played (an executor's
        failed episode: a task that raised, a worker lost for good) counts as
        a failure in this run's results but is not journaled: the next run
        plays it again."""
        if key not in self._journals:
            return
        error = (traj.metadata or {}).get("error")
        if error:
            structlog.get_logger().warning(
                "bench_episode_not_kept", task=traj.id, error=str(error)[:300]
            )
        else:
            await self._journals[key].append_async(traj.to_json())
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
        state: dict[str, Any] = {
            "format": STATE_FORMAT,
            "settings": self.settings,
            "runs": self.runs,
            "seconds": {k: round(v, 3) for k, v in sorted(self.seconds.items())},
            "strategies": self.strategies,
        }
        if self.worker_spent:
            state["worker_spent"] = {
                k: {
                    "prompt_tokens": v.prompt_tokens,
                    "completion_tokens": v.completion_tokens,
                    "calls": v.calls,
                }
                for k, v in sorted(self.worker_spent.items())
            }
        atomic_write_json(self.out_dir / STATE_FILE, state)

    # -- phases: the cache's namespace, wall time and tokens ----------------
    @contextlib.contextmanager
    def phase(self, name: str, executor: Executor | None = None) -> Iterator[None]:
        """Work of phase ``name``: its LLM replies are cached under its name,
        its time (and what ``executor``'s workers paid outside the gateway) is
        added to what earlier runs spent on it (saved after each episode and
        when the phase ends, also when it is cancelled)."""
        if self.cache is not None:
            self.cache.phase = name
        before = self.gateway.statistics()
        self._phase, self._mark = name, trio.current_time()
        if executor is not None:
            self._executor, self._usage_mark = executor, executor.usage
        try:
            yield
        finally:
            self._clock_in()
            self._phase = None
            self._executor = None
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
        if self._phase is not None and self._executor is not None:
            usage = self._executor.usage
            used, self._usage_mark = usage - self._usage_mark, usage
            if used != LLMUsage():
                spent = Spent(used.prompt_tokens, used.completion_tokens, {"agent": used.calls})
                self.worker_spent[self._phase] = self.worker_spent.get(self._phase, Spent()) + spent

    def checkpoint(self) -> None:
        """Save the time spent so far (after each episode: a killed run loses
        at most the time since its last episode)."""
        self._clock_in()
        self.save()

    async def spent(self) -> dict[str, Spent]:
        """Paid calls and tokens by phase: over every run with an out dir,
        else this run's; the executor's workers' included."""
        spent = await self.cache.spent() if self.cache is not None else dict(self._live)
        for phase, used in self.worker_spent.items():
            spent[phase] = spent.get(phase, Spent()) + used
        return spent

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
