"""``AsyncStore``: its typed methods mirror ``Store``'s and run them in its thread."""

from __future__ import annotations

import inspect
import re
import sqlite3
from pathlib import Path

import pytest

import fgo_actors
from fgo_actors._core.model import MergeNode, Module, RenderedTrajectory, Rule
from fgo_actors._storage.store import AsyncStore, Store, StoreCounts, StoreError


def _wrappers() -> list[str]:
    """AsyncStore's public methods other than ``call``: one per Store method."""
    return sorted(
        name
        for name, value in vars(AsyncStore).items()
        if not name.startswith("_") and callable(value) and name != "call"
    )


def _shape(fn: object) -> tuple[list[tuple[str, str, str, str]], str]:
    """Parameters (name, kind, default, annotation) without ``self``, and the
    return annotation, all as strings (the module uses postponed annotations)."""
    sig = inspect.signature(fn)  # type: ignore[arg-type]
    params = [
        (p.name, p.kind.name, repr(p.default), str(p.annotation))
        for p in list(sig.parameters.values())[1:]
    ]
    return params, str(sig.return_annotation)


def test_there_are_wrappers() -> None:
    assert {"known_ids", "add_trajectories", "offset", "log_call"} <= set(_wrappers())


@pytest.mark.parametrize("name", _wrappers())
def test_each_wrapper_mirrors_a_store_method(name: str) -> None:
    wrapper = getattr(AsyncStore, name)
    assert inspect.iscoroutinefunction(wrapper), f"AsyncStore.{name} is not async"
    original = getattr(Store, name, None)
    assert original is not None, f"AsyncStore.{name} names no Store method"
    assert not inspect.iscoroutinefunction(original)
    assert _shape(wrapper) == _shape(original)


def test_no_call_site_bypasses_the_typed_methods() -> None:
    """``store.call(store.sync.known_ids, ...)`` is written ``store.known_ids(...)``."""
    wrapped = set(_wrappers())
    package = Path(fgo_actors.__file__).parent
    pattern = re.compile(r"([\w.]+)\.call\(\s*([\w.]*?)\bsync\.(\w+)")
    found = [
        f"{path.relative_to(package)}: {m.group(0)}"
        for path in sorted(package.rglob("*.py"))
        for m in pattern.finditer(path.read_text(encoding="utf-8"))
        if m.group(3) in wrapped and m.group(1, 2) != ("self", "self.")  # the wrappers
    ]
    assert found == []


def _rendered(i: int) -> RenderedTrajectory:
    return RenderedTrajectory(
        id=f"t{i}", text=f"trajectory {i}", tokens=10 + i, success=i % 2 == 0, group="g"
    )


async def test_a_round_trip_through_the_file(tmp_path: Path) -> None:
    path = tmp_path / "fgo.db"
    store = AsyncStore(Store(path))
    items = [(_rendered(i), {"id": f"t{i}", "n": i}) for i in range(3)]
    try:
        assert await store.add_trajectories(items, 1.0) == [True, True, True]
        assert await store.add_trajectories(items[:1], 2.0) == [False]
        assert await store.known_ids(["t0", "t2", "nope"]) == {"t0", "t2"}
        assert await store.unassigned() == [(1, "t0", 10), (2, "t1", 11), (3, "t2", 12)]
        assert await store.unassigned(1, 1) == [(2, "t1", 11)]

        assert await store.next_subset_number() == 1
        await store.create_subset("s000001", ["t0", "t1"], 3.0)
        assert await store.pending_subsets() == ["s000001"]
        assert await store.subset_items("s000001") == (_rendered(0), _rendered(1))
        await store.fail_subset("s000001", "boom")
        assert await store.pending_subsets() == ["s000001"]  # failed: tried again

        module = Module(instructions="be brief", rules=(Rule(id="r1", text="check"),))
        leaf = MergeNode(
            id="l1",
            kind="leaf",
            module=module,
            children=(),
            subsets=("s000001",),
            started_at=4.0,
            finished_at=5.0,
            stats={"subsets": 1},
        )
        await store.add_node(leaf, rank=0)
        assert await store.pending_subsets() == []  # the leaf marked it done
        assert await store.node("l1") == leaf
        assert await store.node("nope") is None
        assert await store.node_stats(["l1", "nope"]) == [{"subsets": 1}, {}]
        assert await store.forest_trees() == [("l1", 0)]
        assert await store.max_node_number("l") == 1

        v1 = await store.add_version("published", module, {"node": "l1"}, 6.0)
        v2 = await store.add_version("rejected", Module(), {}, 7.0)
        assert (v1.n, v2.n) == (1, 2)
        assert await store.version(1) == v1
        assert await store.version(3) is None
        assert await store.latest_version() == v1
        assert await store.versions() == [v1, v2]

        await store.log_call(
            "optimize",
            cached=False,
            prompt_tokens=3,
            completion_tokens=4,
            key="k",
            response={"ok": 1},
        )
        await store.log_call("optimize", cached=True, prompt_tokens=0, completion_tokens=0)
        assert await store.cached_response("k") == {"ok": 1}
        assert await store.tokens_spent() == {
            "optimize": {"prompt": 3, "completion": 4, "calls": 1}
        }
        # A later response under the same key replaces the first.
        await store.log_call(
            "optimize", cached=False, prompt_tokens=1, completion_tokens=1, key="k", response={}
        )
        assert await store.cached_response("k") == {}

        assert await store.offset("a.jsonl") == (0, 0)
        await store.set_offset("a.jsonl", 120, 3)
        assert await store.offset("a.jsonl") == (120, 3)
    finally:
        store.sync.close()

    # All of it is in the file: a new store on it sees the same.
    again = AsyncStore(Store(path))
    try:
        assert await again.counts() == StoreCounts(
            trajectories=3,
            unassigned=1,
            subsets_pending=0,
            subsets_done=1,
            subsets_failed=0,
            versions_published=1,
            versions_rejected=1,
        )
        assert await again.versions() == [v1, v2]
        assert await again.offset("a.jsonl") == (120, 3)
        assert await again.node("l1") == leaf
    finally:
        again.sync.close()


async def test_a_damaged_file_raises_store_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "fgo.db"
    store = Store(path)
    store.add_trajectories([(_rendered(i), {"n": i}) for i in range(50)], 1.0)
    (root,) = store._db.execute(
        "SELECT rootpage FROM sqlite_master WHERE name = 'trajectories'"
    ).fetchone()
    (page_size,) = store._db.execute("PRAGMA page_size").fetchone()
    store.close()  # checkpoints the WAL into the file
    # Garbage over the trajectories table's root page: the file still opens
    # (its schema and meta pages are intact), reading the table fails.
    with path.open("r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(b"\xde\xad\xbe\xef" * (page_size // 4))
    damaged = AsyncStore(Store(path))
    try:
        with pytest.raises(StoreError, match=r"fgo\.db: the store is damaged") as info:
            await damaged.unassigned()
        assert str(path) in str(info.value)
        assert isinstance(info.value.__cause__, sqlite3.DatabaseError)
    finally:
        damaged.sync.close()


async def test_a_damaged_value_raises_store_error_through_a_typed_method(
    tmp_path: Path,
) -> None:
    path = tmp_path / "fgo.db"
    store = AsyncStore(Store(path))
    try:
        await store.add_version("published", Module(), {"node": "l1"}, 1.0)
        store.sync._db.execute("UPDATE versions SET lineage = '{\"node\": ' WHERE n = 1")
        with pytest.raises(StoreError, match=r"fgo\.db: the store is damaged"):
            await store.latest_version()
    finally:
        store.sync.close()
