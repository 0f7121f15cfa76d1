"""The daemon's store: one SQLite file in WAL mode.

It holds what a restarted daemon needs to carry on where it stopped:
trajectories (as received, rendered and measured), subsets, the nodes of the
merge forest, published and rejected module versions, the LLM call log, the
response cache and the offsets of tailed files.

Every method is synchronous and does one transaction. :class:`AsyncStore`
runs them one at a time in a worker thread, so a trio program never blocks on
the disk and SQLite sees a single writer. WAL with ``synchronous=NORMAL``
survives a killed process (what is committed is in the WAL file); it may lose
the last transactions on a power cut, which ``durable=True`` (``FULL``)
prevents at some cost in speed.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import attrs
import trio

from .._core.model import MergeNode, Module, RenderedTrajectory

P = ParamSpec("P")
T = TypeVar("T")

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS trajectories (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    body TEXT NOT NULL,
    rendered TEXT NOT NULL,
    tokens INTEGER NOT NULL,
    success INTEGER NOT NULL,
    grp TEXT NOT NULL,
    truncated INTEGER NOT NULL,
    received_at REAL NOT NULL,
    subset TEXT
);
CREATE INDEX IF NOT EXISTS trajectories_unassigned ON trajectories (subset) WHERE subset IS NULL;
CREATE INDEX IF NOT EXISTS trajectories_subset ON trajectories (subset, seq);
CREATE TABLE IF NOT EXISTS subsets (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL CHECK (state IN ('pending', 'done', 'failed')),
    created_at REAL NOT NULL,
    error TEXT
);
CREATE TABLE IF NOT EXISTS nodes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('forest', 'fold')),
    rank INTEGER NOT NULL,
    method TEXT NOT NULL,
    module TEXT NOT NULL,
    children TEXT NOT NULL,
    subsets TEXT NOT NULL,
    stats TEXT NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL NOT NULL,
    parent TEXT
);
CREATE TABLE IF NOT EXISTS versions (
    n INTEGER PRIMARY KEY,
    status TEXT NOT NULL CHECK (status IN ('published', 'rejected')),
    module TEXT NOT NULL,
    lineage TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS llm_cache (
    key TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    response TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS llm_calls (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    role TEXT NOT NULL,
    cached INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS offsets (
    path TEXT PRIMARY KEY,
    offset INTEGER NOT NULL,
    line INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS waiting_spans (
    trace_id TEXT NOT NULL,
    span_id TEXT NOT NULL,
    received_at REAL NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (trace_id, span_id)
);
CREATE TABLE IF NOT EXISTS waiting_feedback (
    trace_id TEXT PRIMARY KEY,
    received_at REAL NOT NULL,
    body TEXT NOT NULL
);
"""


class StoreError(Exception):
    """The store file cannot be used (not SQLite, a newer schema, unwritable)."""


class StoreFullError(StoreError):
    """The disk under the store is full: nothing more can be written (what is
    stored is intact; SQLite rolled the transaction back)."""


@attrs.frozen
class Version:
    """A module version: ``n`` counts from 1; ``lineage`` says where it came from."""

    n: int
    status: str
    module: Module
    lineage: dict[str, Any]
    created_at: float

    def to_json(self, *, with_module: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "version": self.n,
            "status": self.status,
            "created_at": self.created_at,
            "lineage": self.lineage,
        }
        if with_module:
            out["module"] = self.module.to_json()
        return out


@attrs.frozen
class StoreCounts:
    trajectories: int
    unassigned: int
    subsets_pending: int
    subsets_done: int
    subsets_failed: int
    versions_published: int
    versions_rejected: int


def _dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class Store:
    """Synchronous access to the store file. Not thread-safe by itself: use one
    thread (``AsyncStore`` does)."""

    def __init__(
        self, path: str | Path, *, durable: bool = False, allow_empty: bool = True
    ) -> None:
        """Open (or create) the store at ``path``. Without ``allow_empty``, a
        file that exists but holds 0 bytes is refused: a store cut to nothing
        by accident would otherwise open as a new one, its history gone."""
        self.path = Path(path)
        if not allow_empty and self.path.is_file() and self.path.stat().st_size == 0:
            raise StoreError(
                f"{self.path}: the store file is empty (0 bytes), so its history is gone; "
                "restore it from a backup, or pass --init to start a new store in it"
            )
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(_SCHEMA)
            with self._tx():
                row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
                if row is None:
                    self._db.execute(
                        "INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),)
                    )
                elif int(row[0]) > SCHEMA_VERSION:
                    raise StoreError(
                        f"{self.path}: store schema {row[0]} is newer than this fgo "
                        f"({SCHEMA_VERSION}); upgrade fgo-actors"
                    )
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path}: cannot use as a store: {e}") from e

    def close(self) -> None:
        self._db.close()

    def _tx(self) -> sqlite3.Connection:
        # ``with connection`` commits or rolls back; BEGIN makes it one transaction.
        self._db.execute("BEGIN IMMEDIATE")
        return self._db

    # -- trajectories -----------------------------------------------------
    def add_trajectories(
        self, items: Sequence[tuple[RenderedTrajectory, dict[str, Any]]], now: float
    ) -> list[bool]:
        """Insert rendered trajectories with their JSON bodies; for each, whether
        it was new (False: a duplicate id, ignored)."""
        added: list[bool] = []
        with self._tx():
            for rendered, body in items:
                cursor = self._db.execute(
                    "INSERT OR IGNORE INTO trajectories "
                    "(id, body, rendered, tokens, success, grp, truncated, received_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        rendered.id,
                        _dumps(body),
                        rendered.text,
                        rendered.tokens,
                        int(rendered.success),
                        rendered.group,
                        int(rendered.truncated),
                        now,
                    ),
                )
                added.append(cursor.rowcount == 1)
        return added

    def known_ids(self, ids: Iterable[str]) -> set[str]:
        ids = list(ids)
        found: set[str] = set()
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(f"SELECT id FROM trajectories WHERE id IN ({marks})", chunk)
            found.update(r[0] for r in rows)
        return found

    def unassigned(self, after: int = 0, limit: int = 1000) -> list[tuple[int, str, int]]:
        """(sequence number, id, tokens) of up to ``limit`` trajectories in no
        subset yet, with sequence numbers above ``after``, in arrival order."""
        rows = self._db.execute(
            "SELECT seq, id, tokens FROM trajectories WHERE subset IS NULL AND seq > ? "
            "ORDER BY seq LIMIT ?",
            (after, limit),
        )
        return [(int(r[0]), r[1], int(r[2])) for r in rows]

    # -- subsets ----------------------------------------------------------
    def next_subset_number(self) -> int:
        row = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM subsets").fetchone()
        return int(row[0]) + 1

    def create_subset(self, subset_id: str, trajectory_ids: Sequence[str], now: float) -> None:
        with self._tx():
            self._db.execute(
                "INSERT INTO subsets (id, state, created_at) VALUES (?, 'pending', ?)",
                (subset_id, now),
            )
            marks = ",".join("?" * len(trajectory_ids))
            cursor = self._db.execute(
                f"UPDATE trajectories SET subset = ? WHERE subset IS NULL AND id IN ({marks})",
                (subset_id, *trajectory_ids),
            )
            if cursor.rowcount != len(trajectory_ids):
                raise StoreError(
                    f"subset {subset_id}: {len(trajectory_ids) - cursor.rowcount} of its "
                    "trajectories are unknown or already in a subset"
                )

    def pending_subsets(self) -> list[str]:
        """Subsets still to optimize: those sealed and not yet done, and those
        that failed (tried again at each start: their trajectories are kept)."""
        rows = self._db.execute(
            "SELECT id FROM subsets WHERE state IN ('pending', 'failed') ORDER BY seq"
        )
        return [r[0] for r in rows]

    def subset_items(self, subset_id: str) -> tuple[RenderedTrajectory, ...]:
        rows = self._db.execute(
            "SELECT id, rendered, tokens, success, grp, truncated FROM trajectories "
            "WHERE subset = ? ORDER BY seq",
            (subset_id,),
        )
        return tuple(
            RenderedTrajectory(
                id=r[0],
                text=r[1],
                tokens=int(r[2]),
                success=bool(r[3]),
                group=r[4],
                truncated=bool(r[5]),
            )
            for r in rows
        )

    def fail_subset(self, subset_id: str, error: str) -> None:
        with self._tx():
            self._db.execute(
                "UPDATE subsets SET state = 'failed', error = ? WHERE id = ?", (error, subset_id)
            )

    # -- forest nodes -----------------------------------------------------
    def add_node(self, node: MergeNode, *, rank: int, role: str = "forest") -> None:
        """Record a finished node. A leaf marks its subset done; a forest merge
        marks its children as merged into it. One transaction."""
        with self._tx():
            self._db.execute(
                "INSERT INTO nodes (id, kind, role, rank, method, module, children, subsets, "
                "stats, started_at, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    node.id,
                    node.kind,
                    role,
                    rank,
                    node.method,
                    _dumps(node.module.to_json()),
                    _dumps(list(node.children)),
                    _dumps(list(node.subsets)),
                    _dumps(node.stats),
                    node.started_at,
                    node.finished_at,
                ),
            )
            if node.kind == "leaf":
                for subset in node.subsets:
                    self._db.execute("UPDATE subsets SET state = 'done' WHERE id = ?", (subset,))
            if role == "forest" and node.children:
                marks = ",".join("?" * len(node.children))
                self._db.execute(
                    f"UPDATE nodes SET parent = ? WHERE id IN ({marks})",
                    (node.id, *node.children),
                )

    def node(self, node_id: str) -> MergeNode | None:
        row = self._db.execute(
            "SELECT id, kind, method, module, children, subsets, stats, started_at, finished_at "
            "FROM nodes WHERE id = ?",
            (node_id,),
        ).fetchone()
        if row is None:
            return None
        return MergeNode(
            id=row[0],
            kind=row[1],
            method=row[2],
            module=Module.from_json(json.loads(row[3]), validate=False),  # written by us
            children=tuple(json.loads(row[4])),
            subsets=tuple(json.loads(row[5])),
            stats=json.loads(row[6]),
            started_at=float(row[7]),
            finished_at=float(row[8]),
        )

    def node_stats(self, node_ids: Sequence[str]) -> list[dict[str, Any]]:
        """The ``stats`` of each node (without reading their modules)."""
        out = []
        for node_id in node_ids:
            row = self._db.execute("SELECT stats FROM nodes WHERE id = ?", (node_id,)).fetchone()
            out.append(dict(json.loads(row[0])) if row else {})
        return out

    def forest_trees(self) -> list[tuple[str, int]]:
        """(node id, rank) of the forest's trees: nodes not yet merged, oldest first."""
        rows = self._db.execute(
            "SELECT id, rank FROM nodes WHERE role = 'forest' AND parent IS NULL ORDER BY seq"
        )
        return [(r[0], int(r[1])) for r in rows]

    def max_node_number(self, prefix: str) -> int:
        """The highest N among node ids ``{prefix}N``: where numbering goes on."""
        rows = self._db.execute(
            "SELECT id FROM nodes WHERE id LIKE ? ESCAPE '\\'",
            (prefix.replace("_", "\\_").replace("%", "\\%") + "%",),
        )
        best = 0
        for (node_id,) in rows:
            tail = node_id[len(prefix) :]
            if tail.isdigit():
                best = max(best, int(tail))
        return best

    # -- versions ---------------------------------------------------------
    def add_version(
        self, status: str, module: Module, lineage: dict[str, Any], now: float
    ) -> Version:
        with self._tx():
            row = self._db.execute("SELECT COALESCE(MAX(n), 0) FROM versions").fetchone()
            n = int(row[0]) + 1
            self._db.execute(
                "INSERT INTO versions (n, status, module, lineage, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (n, status, _dumps(module.to_json()), _dumps(lineage), now),
            )
        return Version(n=n, status=status, module=module, lineage=lineage, created_at=now)

    def version(self, n: int) -> Version | None:
        row = self._db.execute(
            "SELECT n, status, module, lineage, created_at FROM versions WHERE n = ?", (n,)
        ).fetchone()
        return None if row is None else _version(row)

    def latest_version(self) -> Version | None:
        """The newest published version."""
        row = self._db.execute(
            "SELECT n, status, module, lineage, created_at FROM versions "
            "WHERE status = 'published' ORDER BY n DESC LIMIT 1"
        ).fetchone()
        return None if row is None else _version(row)

    def versions(self) -> list[Version]:
        rows = self._db.execute(
            "SELECT n, status, module, lineage, created_at FROM versions ORDER BY n"
        )
        return [_version(r) for r in rows]

    # -- LLM response cache and call log ----------------------------------
    def cached_response(self, key: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT response FROM llm_cache WHERE key = ?", (key,)).fetchone()
        return None if row is None else dict(json.loads(row[0]))

    def log_call(
        self,
        role: str,
        *,
        cached: bool,
        prompt_tokens: int,
        completion_tokens: int,
        key: str | None = None,
        response: dict[str, Any] | None = None,
        now: float | None = None,
    ) -> None:
        """Log one call; with ``key`` and ``response``, also cache the response."""
        at = time.time() if now is None else now
        with self._tx():
            self._db.execute(
                "INSERT INTO llm_calls (role, cached, prompt_tokens, completion_tokens, at) "
                "VALUES (?, ?, ?, ?, ?)",
                (role, int(cached), prompt_tokens, completion_tokens, at),
            )
            if key is not None and response is not None:
                self._db.execute(
                    "INSERT OR REPLACE INTO llm_cache (key, role, response, created_at) "
                    "VALUES (?, ?, ?, ?)",
                    (key, role, _dumps(response), at),
                )

    def tokens_spent(self) -> dict[str, dict[str, int]]:
        """Prompt and completion tokens paid for (cache hits excluded), by role, ever."""
        rows = self._db.execute(
            "SELECT role, SUM(prompt_tokens), SUM(completion_tokens), COUNT(*) "
            "FROM llm_calls WHERE cached = 0 GROUP BY role"
        )
        return {
            r[0]: {"prompt": int(r[1]), "completion": int(r[2]), "calls": int(r[3])} for r in rows
        }

    # -- tailed files -----------------------------------------------------
    def offset(self, path: str) -> tuple[int, int]:
        """(byte offset, lines) of ``path`` read so far."""
        row = self._db.execute(
            "SELECT offset, line FROM offsets WHERE path = ?", (path,)
        ).fetchone()
        return (0, 0) if row is None else (int(row[0]), int(row[1]))

    def set_offset(self, path: str, offset: int, line: int) -> None:
        with self._tx():
            self._db.execute(
                "INSERT OR REPLACE INTO offsets (path, offset, line) VALUES (?, ?, ?)",
                (path, offset, line),
            )

    # -- traces waiting for their outcome (POST /v1/traces) ---------------
    def add_waiting(
        self,
        spans: Sequence[tuple[str, str, dict[str, Any]]],
        feedback: Sequence[tuple[str, dict[str, Any]]],
        now: float,
    ) -> None:
        """Keep spans ((trace id, span id, body)) and feedback ((trace id,
        body)) of traces not yet converted; a span or feedback already kept
        keeps its first copy."""
        with self._tx():
            self._db.executemany(
                "INSERT OR IGNORE INTO waiting_spans VALUES (?, ?, ?, ?)",
                [(t, s, now, _dumps(b)) for t, s, b in spans],
            )
            self._db.executemany(
                "INSERT OR IGNORE INTO waiting_feedback VALUES (?, ?, ?)",
                [(t, now, _dumps(b)) for t, b in feedback],
            )

    def waiting(
        self,
    ) -> tuple[list[tuple[float, dict[str, Any]]], list[tuple[float, dict[str, Any]]]]:
        """The kept spans and feedback, each as (received at, body), oldest first."""
        spans = self._db.execute(
            "SELECT received_at, body FROM waiting_spans ORDER BY received_at, rowid"
        ).fetchall()
        feedback = self._db.execute(
            "SELECT received_at, body FROM waiting_feedback ORDER BY received_at, rowid"
        ).fetchall()
        return (
            [(float(r[0]), json.loads(r[1])) for r in spans],
            [(float(r[0]), json.loads(r[1])) for r in feedback],
        )

    def drop_waiting(self, trace_ids: Sequence[str]) -> None:
        """Forget the kept spans and feedback of ``trace_ids`` (converted,
        or skipped with a recorded reason)."""
        with self._tx():
            for start in range(0, len(trace_ids), 500):
                chunk = list(trace_ids[start : start + 500])
                marks = ",".join("?" * len(chunk))
                self._db.execute(f"DELETE FROM waiting_spans WHERE trace_id IN ({marks})", chunk)
                self._db.execute(f"DELETE FROM waiting_feedback WHERE trace_id IN ({marks})", chunk)

    # -- counts -----------------------------------------------------------
    def counts(self) -> StoreCounts:
        def one(sql: str) -> int:
            return int(self._db.execute(sql).fetchone()[0])

        states = dict(
            self._db.execute("SELECT state, COUNT(*) FROM subsets GROUP BY state").fetchall()
        )
        statuses = dict(
            self._db.execute("SELECT status, COUNT(*) FROM versions GROUP BY status").fetchall()
        )
        return StoreCounts(
            trajectories=one("SELECT COUNT(*) FROM trajectories"),
            unassigned=one("SELECT COUNT(*) FROM trajectories WHERE subset IS NULL"),
            subsets_pending=int(states.get("pending", 0)),
            subsets_done=int(states.get("done", 0)),
            subsets_failed=int(states.get("failed", 0)),
            versions_published=int(statuses.get("published", 0)),
            versions_rejected=int(statuses.get("rejected", 0)),
        )


def _version(row: Sequence[Any]) -> Version:
    return Version(
        n=int(row[0]),
        status=str(row[1]),
        module=Module.from_json(json.loads(row[2]), validate=False),  # written by us
        lineage=dict(json.loads(row[3])),
        created_at=float(row[4]),
    )


class AsyncStore:
    """Runs the :class:`Store`'s methods one at a time in a worker thread."""

    def __init__(self, store: Store) -> None:
        self.sync = store
        self._one = trio.CapacityLimiter(1)

    async def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn`` in the store's thread. A damaged file (SQLite's errors, a
        stored JSON value cut short) raises StoreError naming the store."""
        path = self.sync.path

        def bound() -> T:
            try:
                return fn(*args, **kwargs)
            except sqlite3.OperationalError as e:
                if "full" in str(e):  # SQLITE_FULL: "database or disk is full"
                    raise StoreFullError(f"{path}: no space left for the store ({e})") from e
                raise StoreError(f"{path}: the store cannot be used: {e}") from e
            except (sqlite3.DatabaseError, json.JSONDecodeError) as e:
                raise StoreError(f"{path}: the store is damaged: {e}") from e

        return await trio.to_thread.run_sync(bound, limiter=self._one)

    # One typed method per :class:`Store` method that async code uses, each
    # running it through :meth:`call` (tests check that they match Store's).

    # -- trajectories -----------------------------------------------------
    async def add_trajectories(
        self, items: Sequence[tuple[RenderedTrajectory, dict[str, Any]]], now: float
    ) -> list[bool]:
        """Insert trajectories with their bodies; for each, whether it was new."""
        return await self.call(self.sync.add_trajectories, items, now)

    async def known_ids(self, ids: Iterable[str]) -> set[str]:
        return await self.call(self.sync.known_ids, ids)

    async def unassigned(self, after: int = 0, limit: int = 1000) -> list[tuple[int, str, int]]:
        """(seq, id, tokens) of up to ``limit`` trajectories in no subset, past ``after``."""
        return await self.call(self.sync.unassigned, after, limit)

    # -- subsets ----------------------------------------------------------
    async def next_subset_number(self) -> int:
        return await self.call(self.sync.next_subset_number)

    async def create_subset(
        self, subset_id: str, trajectory_ids: Sequence[str], now: float
    ) -> None:
        return await self.call(self.sync.create_subset, subset_id, trajectory_ids, now)

    async def pending_subsets(self) -> list[str]:
        """Subsets still to optimize (pending or failed), oldest first."""
        return await self.call(self.sync.pending_subsets)

    async def subset_items(self, subset_id: str) -> tuple[RenderedTrajectory, ...]:
        return await self.call(self.sync.subset_items, subset_id)

    async def fail_subset(self, subset_id: str, error: str) -> None:
        return await self.call(self.sync.fail_subset, subset_id, error)

    # -- forest nodes -----------------------------------------------------
    async def add_node(self, node: MergeNode, *, rank: int, role: str = "forest") -> None:
        """Record a finished node, marking its subsets done or its children merged."""
        return await self.call(self.sync.add_node, node, rank=rank, role=role)

    async def node(self, node_id: str) -> MergeNode | None:
        return await self.call(self.sync.node, node_id)

    async def node_stats(self, node_ids: Sequence[str]) -> list[dict[str, Any]]:
        """The ``stats`` of each node (without reading their modules)."""
        return await self.call(self.sync.node_stats, node_ids)

    async def forest_trees(self) -> list[tuple[str, int]]:
        """(node id, rank) of the forest's trees not yet merged, oldest first."""
        return await self.call(self.sync.forest_trees)

    async def max_node_number(self, prefix: str) -> int:
        """The highest N among node ids ``{prefix}N``."""
        return await self.call(self.sync.max_node_number, prefix)

    # -- versions ---------------------------------------------------------
    async def add_version(
        self, status: str, module: Module, lineage: dict[str, Any], now: float
    ) -> Version:
        return await self.call(self.sync.add_version, status, module, lineage, now)

    async def version(self, n: int) -> Version | None:
        return await self.call(self.sync.version, n)

    async def latest_version(self) -> Version | None:
        """The newest published version."""
        return await self.call(self.sync.latest_version)

    async def versions(self) -> list[Version]:
        return await self.call(self.sync.versions)

    # -- LLM response cache and call log ----------------------------------
    async def cached_response(self, key: str) -> dict[str, Any] | None:
        return await self.call(self.sync.cached_response, key)

    async def log_call(
        self,
        role: str,
        *,
        cached: bool,
        prompt_tokens: int,
        completion_tokens: int,
        key: str | None = None,
        response: dict[str, Any] | None = None,
        now: float | None = None,
    ) -> None:
        """Log one call; with ``key`` and ``response``, also cache the response."""
        return await self.call(
            self.sync.log_call,
            role,
            cached=cached,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            key=key,
            response=response,
            now=now,
        )

    async def tokens_spent(self) -> dict[str, dict[str, int]]:
        """Tokens paid for (cache hits excluded), by role, ever."""
        return await self.call(self.sync.tokens_spent)

    # -- tailed files -----------------------------------------------------
    async def offset(self, path: str) -> tuple[int, int]:
        """(byte offset, lines) of ``path`` read so far."""
        return await self.call(self.sync.offset, path)

    async def set_offset(self, path: str, offset: int, line: int) -> None:
        return await self.call(self.sync.set_offset, path, offset, line)

    # -- counts -----------------------------------------------------------
    async def add_waiting(
        self,
        spans: Sequence[tuple[str, str, dict[str, Any]]],
        feedback: Sequence[tuple[str, dict[str, Any]]],
        now: float,
    ) -> None:
        return await self.call(self.sync.add_waiting, spans, feedback, now)

    async def waiting(
        self,
    ) -> tuple[list[tuple[float, dict[str, Any]]], list[tuple[float, dict[str, Any]]]]:
        return await self.call(self.sync.waiting)

    async def drop_waiting(self, trace_ids: Sequence[str]) -> None:
        return await self.call(self.sync.drop_waiting, trace_ids)

    async def counts(self) -> StoreCounts:
        return await self.call(self.sync.counts)


class StoreCache:
    """The store as the gateway's :class:`~fgo_actors._llm.gateway.ResponseCache`."""

    def __init__(self, store: AsyncStore) -> None:
        self.store = store

    async def get(self, key: str, role: str) -> dict[str, Any] | None:
        """The cached response, if any; a hit is logged as a cached call."""
        response = await self.store.cached_response(key)
        if response is not None:
            await self.store.log_call(role, cached=True, prompt_tokens=0, completion_tokens=0)
        return response

    async def put(self, key: str, role: str, response: dict[str, Any]) -> None:
        usage = response.get("usage")
        usage = usage if isinstance(usage, dict) else {}
        await self.store.log_call(
            role,
            cached=False,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            key=key,
            response=response,
        )
