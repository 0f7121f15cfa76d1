"""The synchronous SQLite store (``_storage/store.py``): opening, refusing files
it cannot use, and its durability settings."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from fgo_actors._storage.store import Store, StoreError


def test_store_rejects_a_file_that_is_not_sqlite(tmp_path: Path) -> None:
    bogus = tmp_path / "notes.db"
    bogus.write_text("these are my notes, not a database\n" * 50)
    with pytest.raises(StoreError, match=r"notes\.db: cannot use as a store"):
        Store(bogus)
    assert bogus.read_text().startswith("these are my notes")


def test_store_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    Store(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema'")
    db.close()
    with pytest.raises(StoreError, match="newer than this fgo"):
        Store(path)


def test_an_empty_store_file_is_refused_unless_asked_for(tmp_path: Path) -> None:
    path = tmp_path / "fgo.db"
    path.write_bytes(b"")
    with pytest.raises(StoreError, match=r"fgo\.db: the store file is empty .* --init"):
        Store(path, allow_empty=False)
    assert path.read_bytes() == b""  # untouched
    Store(path, allow_empty=True).close()  # --init: a new store in it
    Store(path, allow_empty=False).close()  # now it holds a store


@pytest.mark.parametrize(("durable", "level"), [(False, 1), (True, 2)])
def test_durable_stores_sync_every_commit(tmp_path: Path, durable: bool, level: int) -> None:
    """--durable is synchronous=FULL (2): a commit survives a power cut, not
    only a crash; the default is NORMAL (1) with WAL."""
    store = Store(tmp_path / "fgo.db", durable=durable)
    try:
        assert store._db.execute("PRAGMA synchronous").fetchone()[0] == level
        assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        store.close()
