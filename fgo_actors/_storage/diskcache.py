"""Disk caches that let a long job stop anywhere and carry on where it stopped.

- :class:`Journal`: an append-only JSONL file, one record a line, each line
  written with one ``write`` and fsynced. A line cut short by a crash (no
  newline at the end of the file) is dropped when the journal is read, so a
  reader only ever sees whole records.
- :class:`PhaseCache`: the gateway's response cache in a SQLite file (the
  daemon's :class:`~fgo_actors._storage.store.Store`, WAL mode, one transaction per
  call), with replies kept apart per phase of the job and every paid call
  logged, so the job can say what each phase cost over all its runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import attrs
import trio

from .._core.io import _fsync_dir
from .store import AsyncStore, Store, StoreCache


class JournalError(ValueError):
    """A journal line that is whole but not a JSON object: the file was damaged
    or edited, not cut short by a crash."""


class Journal:
    """An append-only JSONL file of JSON objects. Not safe for two writers."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> list[dict[str, Any]]:
        """Every whole record, in the order written. A torn last line (a crash
        mid-write) is cut off the file, so the next append starts a clean line."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        end = raw.rfind(b"\n") + 1
        if end < len(raw):
            with self.path.open("r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        rows: list[dict[str, Any]] = []
        for lineno, line in enumerate(raw[:end].splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise JournalError(f"{self.path}, line {lineno}: not JSON ({e})") from e
            if not isinstance(row, dict):
                raise JournalError(f"{self.path}, line {lineno}: not a JSON object")
            rows.append(row)
        return rows

    def append(self, row: dict[str, Any]) -> None:
        """Add one record, durably (blocking: run it in a thread from async code)."""
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        created = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            _fsync_dir(self.path.parent)

    async def append_async(self, row: dict[str, Any]) -> None:
        """``append`` in a worker thread; a cancelled caller still gets a whole line."""
        await trio.to_thread.run_sync(self.append, row)


@attrs.frozen
class Spent:
    """What one phase paid for, over every run: tokens as the server reported
    them, and calls by role. Replies replayed from the cache cost nothing."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: dict[str, int] = attrs.field(factory=dict)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Spent) -> Spent:
        calls = dict(self.calls)
        for role, n in other.calls.items():
            calls[role] = calls.get(role, 0) + n
        return Spent(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            calls,
        )


class PhaseCache(StoreCache):
    """The gateway's :class:`~fgo_actors._llm.gateway.ResponseCache` in a SQLite
    file, one namespace per phase.

    Set ``phase`` before each phase. A request made in one phase is not
    answered from another's replies (two strategies asking the same prompt
    each pay for it, as they would without a cache), and each paid call is
    logged under ``phase/role``.
    """

    def __init__(self, store: AsyncStore) -> None:
        super().__init__(store)
        self.phase = ""

    @classmethod
    def open(cls, path: Path) -> PhaseCache:
        """Open (or create) the cache file; StoreError if it is not usable."""
        path.parent.mkdir(parents=True, exist_ok=True)
        return cls(AsyncStore(Store(path)))

    def close(self) -> None:
        self.store.sync.close()

    def _scoped(self, key: str) -> str:
        return hashlib.sha256(f"{self.phase}\n{key}".encode()).hexdigest()

    async def get(self, key: str, role: str) -> dict[str, Any] | None:
        return await super().get(self._scoped(key), f"{self.phase}/{role}")

    async def put(self, key: str, role: str, response: dict[str, Any]) -> None:
        await super().put(self._scoped(key), f"{self.phase}/{role}", response)

    async def spent(self) -> dict[str, Spent]:
        """Paid calls and tokens by phase, over every run that used this file."""
        by_role = await self.store.tokens_spent()
        out: dict[str, Spent] = {}
        for tagged, used in by_role.items():
            phase, _, role = tagged.rpartition("/")
            here = Spent(used["prompt"], used["completion"], {role: used["calls"]})
            out[phase] = out.get(phase, Spent()) + here
        return out


def remove_files(folder: Path, names: list[str]) -> None:
    """Delete these files or folders of ``folder`` (missing ones are fine)."""
    import shutil

    for name in names:
        target = folder / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
