"""The streaming optimizer (``open_optimizer``), its store and its pure parts."""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from fgo_actors import GatewayConfig, LLMGateway, MergeForest, RunConfig
from fgo_actors._core.forest import expected_merges
from fgo_actors._core.partition import StreamPacker
from fgo_actors._daemon.ingest import parse_body
from fgo_actors._daemon.optimizer import open_optimizer
from fgo_actors._storage.store import Store, StoreError
from fgo_actors.testing import Fault, RecordedRequest, schema_name_of

from .helpers import StartLLM, daemon_config, make_trajectories

# ---------------------------------------------------------------- pure parts


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 50), max_size=60),
    budget=st.integers(50, 200),
    gaps=st.lists(st.floats(0, 3), min_size=60, max_size=60),
    max_wait=st.floats(0.5, 5),
)
def test_stream_packer_is_next_fit_with_a_deadline(
    sizes: list[int], budget: int, gaps: list[float], max_wait: float
) -> None:
    packer = StreamPacker(budget, max_wait)
    sealed: list[tuple[str, ...]] = []
    size_of = {f"i{i}": s for i, s in enumerate(sizes)}
    now = 0.0
    for i, size in enumerate(sizes):
        now += gaps[i]
        due = packer.due(now)
        if due:
            sealed.append(due)
        assert packer.deadline() is None or packer.deadline() > now  # type: ignore[operator]
        added = packer.add(f"i{i}", size, now)
        for subset in added:
            if f"i{i}" not in subset:
                # Next fit: a subset is sealed for room only when this item
                # does not fit in it (a packer sealing every item alone fails).
                assert sum(size_of[x] for x in subset) + size > budget
            else:
                assert sum(size_of[x] for x in subset) == budget  # sealed because full
        sealed += added
    tail = packer.flush()
    if tail:
        sealed.append(tail)
    # Every item once, in arrival order; no subset over budget, none empty.
    assert [x for s in sealed for x in s] == [f"i{i}" for i in range(len(sizes))]
    assert all(s and sum(size_of[x] for x in s) <= budget for s in sealed)
    assert packer.flush() is None
    assert packer.pending_tokens == 0


def test_stream_packer_seals_when_full_and_on_time() -> None:
    packer = StreamPacker(10, 5.0)
    assert packer.add("a", 4, 0.0) == []
    assert packer.add("b", 6, 1.0) == [("a", "b")]  # exactly full
    assert packer.add("c", 7, 2.0) == []
    assert packer.add("d", 7, 3.0) == [("c",)]  # d does not fit beside c
    assert packer.deadline() == 8.0
    assert packer.due(7.9) is None
    assert packer.due(8.0) == ("d",)
    with pytest.raises(ValueError, match=r"1\.\.10"):
        packer.add("e", 11, 9.0)


@settings(max_examples=150, deadline=None)
@given(leaves=st.integers(1, 40), fan_in=st.integers(2, 4), crash_after=st.integers(0, 80))
def test_forest_restored_from_its_trees_finishes_like_one_never_stopped(
    leaves: int, fan_in: int, crash_after: int
) -> None:
    """A crash loses the merges in flight; their children are still unmerged
    nodes in the store. Restoring from every unmerged node (with its rank, in
    creation order) and carrying on puts every leaf under one root, with as
    many merges as a forest that never stopped."""
    forest = MergeForest(fan_in)
    children: dict[str, tuple[str, ...]] = {}
    rank: dict[str, int] = {}
    created: list[str] = []  # node creation order, as the store keeps it
    merged: set[str] = set()
    pending: list[Any] = []

    def finish(job: Any) -> list[Any]:
        children[job.id] = job.children
        rank[job.id] = job.rank
        created.append(job.id)
        merged.update(job.children)
        return forest.complete(job)

    events = added = 0
    while added < leaves or pending:
        if events == crash_after:
            trees = [(n, rank[n]) for n in created if n not in merged]
            forest, pending = MergeForest.restore(trees, fan_in=fan_in, first_id=len(children) + 1)
        events += 1
        if pending:
            pending += finish(pending.pop(0))
        else:
            leaf = f"l{added}"
            rank[leaf] = 0
            created.append(leaf)
            pending += forest.add_leaf(leaf)
            added += 1
    pending += forest.close()
    while pending:
        pending += finish(pending.pop(0))
    root = forest.root()

    def under(node: str) -> set[str]:
        return {node} if node.startswith("l") else set().union(*map(under, children[node]))

    assert root is not None
    assert under(root) == {f"l{i}" for i in range(leaves)}
    assert len(children) == expected_merges(leaves, fan_in)


def test_parse_body_json_jsonl_array_and_limits() -> None:
    assert parse_body('{"a": 1}\n\n{"b": 2}\n') == ([(1, {"a": 1}), (3, {"b": 2})], [])
    assert parse_body('[{"a": 1}, {"b": 2}]')[0] == [(1, {"a": 1}), (2, {"b": 2})]
    assert parse_body('{\n  "a": 1\n}')[0] == [(1, {"a": 1})]
    assert parse_body('\n{\n  "a": 1\n}\n')[0] == [(2, {"a": 1})]
    big = '{\n  "a": "' + "x" * 100 + '"\n}'
    assert [r.line for r in parse_body(big, max_record_bytes=50)[1]] == [1]
    records, bad = parse_body('{"a": 1}\nnot json\n{"x": "' + "y" * 100 + '"}', max_record_bytes=50)
    assert records == [(1, {"a": 1})]
    assert [r.line for r in bad] == [2, 3]
    assert bad[0].reason.startswith("not JSON")
    assert "over the 50-byte limit" in bad[1].reason


# ---------------------------------------------------------------- the daemon


def _optimize_ids(requests: list[RecordedRequest]) -> list[frozenset[str]]:
    """The trajectory ids in each optimize prompt (one per subset)."""
    import re

    return [
        frozenset(re.findall(r"^### Trajectory (\S+)$", r.body["messages"][1]["content"], re.M))
        for r in requests
        if r.schema_name == "fgo_optimize"
    ]


async def test_stream_in_and_a_version_with_every_trajectory_comes_out(
    start_llm: StartLLM, tmp_path: Path
) -> None:
    server, url = await start_llm()
    data = make_trajectories(30)
    async with open_optimizer(daemon_config(tmp_path / "fgo.db", url)) as opt:
        assert opt.latest_module() is None
        for trajectory in data[:10]:
            assert (await opt.submit(trajectory)).accepted == 1
        result = await opt.submit_many([t.to_json() for t in data])
        assert (result.accepted, result.duplicate) == (20, 10)
        await opt.wait_idle()
        version = opt.latest_version()
        assert version is not None
        assert version.status == "published"
        assert version.lineage["trajectories"] == 30
        assert len(version.module.rules) > 0
        stats = opt.statistics()
        assert (stats.queued, stats.subsets_pending) == (0, 0)
        # A forest that never closes keeps one tree per set bit of its leaf
        # count; the version is the fold of all of them.
        assert stats.trees == bin(stats.subsets_done).count("1")
        assert len(version.lineage["trees"]) == stats.trees
        # Each trajectory went into exactly one optimize prompt.
        seen = Counter(i for ids in _optimize_ids(server.requests) for i in ids)
        assert seen == Counter({t.id: 1 for t in data})
        # Ingest is idempotent: the same batch again changes nothing.
        again = await opt.submit_many([t.to_json() for t in data])
        assert (again.accepted, again.duplicate) == (0, 30)


async def test_bad_records_are_reported_by_line_and_the_rest_accepted(
    start_llm: StartLLM, tmp_path: Path
) -> None:
    _server, url = await start_llm()
    good = [t.to_json() for t in make_trajectories(2)]
    body = "\n".join(
        [
            json.dumps(good[0]),
            '{"id": "x", "task": "t"}',
            "{not json",
            json.dumps(good[1]),
        ]
    )
    async with open_optimizer(daemon_config(tmp_path / "fgo.db", url)) as opt:
        result = await opt.submit_text(body)
    assert (result.accepted, result.duplicate) == (2, 0)
    assert [r.line for r in result.rejected] == [2, 3]
    assert "steps" in result.rejected[0].reason
    assert "not JSON" in result.rejected[1].reason


async def test_versions_iterator_sees_each_publication(start_llm: StartLLM, tmp_path: Path) -> None:
    _server, url = await start_llm()
    data = make_trajectories(12)
    async with open_optimizer(daemon_config(tmp_path / "fgo.db", url)) as opt:
        got: list[int] = []

        async def follow() -> None:
            async with opt.versions() as versions:
                async for version in versions:
                    got.append(version.n)
                    if len(got) == 2:
                        return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow)
            await trio.testing.wait_all_tasks_blocked()
            await opt.submit_many(data[:6])
            await opt.wait_idle()
            await opt.submit_many(data[6:])
            await opt.wait_idle()
        assert got == [1, 2]
        assert (await opt.version(2)).lineage["parents"] == [1]  # type: ignore[union-attr]


async def test_rollback_publishes_the_old_module_again_and_survives_a_restart(
    start_llm: StartLLM, tmp_path: Path
) -> None:
    _server, url = await start_llm()
    data = make_trajectories(12)
    config = daemon_config(tmp_path / "fgo.db", url)
    async with open_optimizer(config) as opt:
        await opt.submit_many(data[:6])
        await opt.wait_idle()
        await opt.submit_many(data[6:])
        await opt.wait_idle()
        first = await opt.version(1)
        second = opt.latest_version()
        assert first is not None
        assert second is not None
        assert first.module != second.module
        back = await opt.rollback(1)
        assert (back.n, back.module, back.lineage["rollback_of"]) == (3, first.module, 1)
        assert opt.latest_module() == first.module
        with pytest.raises(KeyError):
            await opt.rollback(99)
    async with open_optimizer(config) as opt:
        await opt.wait_idle()
        assert opt.latest_version().n == 3  # type: ignore[union-attr]
        assert opt.latest_module() == first.module


async def test_restart_resumes_without_losing_or_redoing_work(
    start_llm: StartLLM, tmp_path: Path
) -> None:
    """Stop with a backlog (no grace), restart: every trajectory reaches a
    version, and no subset finished before the stop is optimized again."""
    server, url = await start_llm(latency=0.05)
    data = make_trajectories(40)
    config = daemon_config(tmp_path / "fgo.db", url, max_wait=0.2)
    async with open_optimizer(config, grace=0) as opt:
        await opt.submit_many(data)
        while opt.statistics().subsets_done < 3:  # noqa: ASYNC110
            await trio.sleep(0.05)
    first_run = len(server.requests)
    # The subsets the first run finished, as the store recorded them.
    with sqlite3.connect(config.store) as db:
        rows = db.execute(
            "SELECT s.id, t.id FROM subsets s JOIN trajectories t ON t.subset = s.id "
            "WHERE s.state = 'done'"
        ).fetchall()
    db.close()
    finished: dict[str, set[str]] = {}
    for subset, trajectory in rows:
        finished.setdefault(subset, set()).add(trajectory)
    finished_first = [frozenset(ids) for ids in finished.values()]
    async with open_optimizer(config) as opt:
        await opt.wait_idle()
        version = opt.latest_version()
        assert version is not None
        assert version.lineage["trajectories"] == 40
    later = _optimize_ids(server.requests[first_run:])
    store = Store(config.store)
    try:
        counts = store.counts()
        assert (counts.trajectories, counts.unassigned, counts.subsets_pending) == (40, 0, 0)
    finally:
        store.close()
    # A subset the first run finished is not optimized again (replays come from
    # the cache and do not reach the server), and the rerun did optimize others.
    assert len(finished_first) >= 3
    assert later
    assert not set(later) & set(finished_first)


async def test_response_cache_replays_a_finished_call(start_llm: StartLLM, tmp_path: Path) -> None:
    server, url = await start_llm()
    from fgo_actors._storage.store import AsyncStore, StoreCache

    store = Store(tmp_path / "c.db")
    cache = StoreCache(AsyncStore(store))
    messages = [{"role": "user", "content": "hello"}]
    try:
        for _ in range(2):
            async with LLMGateway(GatewayConfig(base_url=url, model="m"), cache=cache) as gw:
                await gw.chat("optimize", messages, max_tokens=16)
                await gw.chat("optimize", messages, max_tokens=16)
                stats = gw.statistics()
        assert len(server.requests) == 1
        assert stats.cached == {"optimize": 2}
        assert stats.calls == {}
        assert store.tokens_spent()["optimize"]["calls"] == 1
        # The call log has the paid call and the three replays (one, then two).
        logged = store._db.execute("SELECT cached, COUNT(*) FROM llm_calls GROUP BY cached")
        assert dict(logged.fetchall()) == {0: 1, 1: 3}
    finally:
        store.close()


async def test_the_same_request_on_its_way_twice_is_sent_once(
    start_llm: StartLLM, tmp_path: Path
) -> None:
    """Two tasks asking the same merge at once (a fold beside the forest's own
    merge) share one call and get the same reply; a different request is not held."""
    server, url = await start_llm(latency=0.5)
    from fgo_actors._storage.store import AsyncStore, StoreCache

    store = Store(tmp_path / "c.db")
    replies: list[str] = []
    try:
        cache = StoreCache(AsyncStore(store))
        async with (
            LLMGateway(GatewayConfig(base_url=url, model="m"), cache=cache) as gw,
            trio.open_nursery() as nursery,
        ):

            async def ask(text: str) -> None:
                messages = [{"role": "user", "content": text}]
                replies.append(await gw.chat("merge", messages, max_tokens=16))

            for text in ("same", "same", "other"):
                nursery.start_soon(ask, text)
        assert len(server.requests) == 2
        assert gw.statistics().cached == {"merge": 1}
    finally:
        store.close()


async def test_library_backpressure_blocks_submit_when_the_pipeline_is_full(
    start_llm: StartLLM, tmp_path: Path
) -> None:
    """With the LLM stalled, subsets pile up; once the pipeline is saturated,
    the next submit waits instead of growing a buffer, and resumes when asked
    to stop waiting. Whatever was stored stays stored."""
    _server, url = await start_llm(latency=1000)  # the LLM never answers in time
    data = make_trajectories(100)
    config = daemon_config(
        tmp_path / "fgo.db",
        url,
        run=RunConfig(context_tokens=4096, subset_tokens=2000, optimizers=1),
        max_pending_subsets=1,
        max_wait=0.01,
    )
    async with open_optimizer(config, grace=0) as opt:
        first = await opt.submit_many(data[:50])
        assert first.accepted == 50
        with trio.fail_after(10):
            while not opt.saturated:  # noqa: ASYNC110
                await trio.sleep(0.01)
        with trio.move_on_after(1) as scope:
            await opt.submit_many(data[50:])
        assert scope.cancelled_caught  # it waited
        assert opt.statistics().trajectories == 50
        # An HTTP body is never held: submit_text stores at once even now.
        text = "\n".join(json.dumps(t.to_json()) for t in data[50:])
        assert (await opt.submit_text(text)).accepted == 50


async def test_provenance_stays_bounded_however_long_the_stream(
    start_llm: StartLLM, tmp_path: Path
) -> None:
    """Unbounded, this run's rules name up to 2 subsets and 6 trajectories."""
    _server, url = await start_llm()
    async with open_optimizer(daemon_config(tmp_path / "fgo.db", url, provenance_cap=1)) as opt:
        await opt.submit_many(make_trajectories(40))
        await opt.wait_idle()
        version = opt.latest_version()
    assert version is not None
    assert version.lineage["trajectories"] == 40
    assert max(len(r.subsets) for r in version.module.rules) == 1
    assert max(len(r.trajectories) for r in version.module.rules) == 1


TRUNCATED = '{"analysis": "x", "actions": [{"op": "add_rule", "text": "R'


def _truncate_optimizes(first: int | None) -> Any:
    """A fault_for that answers the first ``first`` optimize requests (all when
    None) with a reply cut off mid-JSON, as a bad day's endpoint would."""
    seen = 0

    def fault_for(body: dict[str, Any]) -> Fault | None:
        nonlocal seen
        if schema_name_of(body) != "fgo_optimize":
            return None
        seen += 1
        return Fault(content=TRUNCATED) if first is None or seen <= first else None

    return fault_for


async def test_a_subset_whose_replies_stay_invalid_is_retried_until_it_succeeds(
    start_llm: StartLLM, tmp_path: Path
) -> None:
    # Two subsets; the first six optimize replies are cut off, so at least one
    # subset uses up its three attempts. Its retry (after a pause) succeeds.
    server, url = await start_llm(fault_for=_truncate_optimizes(6))
    config = daemon_config(tmp_path / "fgo.db", url, max_wait=0.2, retry_pause=0.05)
    async with open_optimizer(config) as opt:
        await opt.submit_many(make_trajectories(12))
        await opt.wait_idle()
        version = opt.latest_version()
        stats = opt.statistics()
    assert version is not None
    assert version.lineage["trajectories"] == 12
    assert stats.subsets_failed == 0
    optimizes = [r for r in server.requests if r.schema_name == "fgo_optimize"]
    assert len(optimizes) > 6  # the refused replies were not replayed from the cache
    store = Store(config.store)
    try:
        assert store.counts().subsets_failed == 0
    finally:
        store.close()


async def test_a_failed_subset_is_tried_again_at_the_next_start(
    start_llm: StartLLM, tmp_path: Path
) -> None:
    server, url = await start_llm(fault_for=_truncate_optimizes(None))
    config = daemon_config(tmp_path / "fgo.db", url, max_wait=0.2, subset_retries=0)
    data = make_trajectories(12)
    async with open_optimizer(config) as opt:
        await opt.submit_many(data)
        await opt.wait_idle()
        assert opt.statistics().subsets_failed >= 1
        assert opt.latest_version() is None
    first_run = len(server.requests)
    # The same requests, now against a healthy endpoint: each reaches it
    # (nothing refused was kept as an answer), and every trajectory is in.
    server.fault_for = None
    async with open_optimizer(config) as opt:
        await opt.wait_idle()
        version = opt.latest_version()
    assert version is not None
    assert version.lineage["trajectories"] == 12
    assert len([r for r in server.requests[first_run:] if r.schema_name == "fgo_optimize"]) >= 1
    store = Store(config.store)
    try:
        counts = store.counts()
        assert (counts.subsets_failed, counts.subsets_pending) == (0, 0)
    finally:
        store.close()


def test_parse_body_refuses_a_deep_record_alone() -> None:
    deep = '{"a": ' * 1100 + "1" + "}" * 1100  # past the parser's recursion limit
    medium: object = 1
    for _ in range(70):  # parseable, but deeper than records may be
        medium = [medium]
    medium = {"x": medium}
    records, bad = parse_body(f'{{"a": 1}}\n{deep}\n{json.dumps(medium)}\n{{"b": 2}}\n')
    assert records == [(1, {"a": 1}), (4, {"b": 2})]
    assert [(r.line, r.reason) for r in bad] == [
        (2, "refused JSON: nested more than 64 levels deep"),
        (3, "refused JSON: nested more than 64 levels deep"),
    ]
    # In an array, the deep element is refused and the others kept.
    records, bad = parse_body(json.dumps([{"a": 1}, medium, {"b": 2}]))
    assert records == [(1, {"a": 1}), (3, {"b": 2})]
    assert [r.line for r in bad] == [2]
    # An element too deep for the parser is refused alone too, by its index
    # (a red-team round found the good ones beside it lost).
    records, bad = parse_body("[" + ", ".join(['{"a": 1}', deep, '{"b": 2}', '{"c": nope}']) + "]")
    assert records == [(1, {"a": 1}), (3, {"b": 2})]
    assert [(r.line, r.reason.split(":")[0]) for r in bad] == [(2, "refused JSON"), (4, "not JSON")]
    records, bad = parse_body("[" + deep + "]")
    assert records == []
    assert [(r.line, r.reason) for r in bad] == [
        (1, "refused JSON: nested more than 64 levels deep")
    ]
    # A deep array that is not well-bracketed is refused whole, with a reason.
    records, bad = parse_body("[" + deep + ", ")
    assert records == []
    assert "not well-formed" in bad[0].reason


async def test_publish_pending_says_whether_the_latest_version_is_final(
    start_llm: StartLLM, tmp_path: Path
) -> None:
    _server, url = await start_llm(latency=0.05)
    config = daemon_config(tmp_path / "fgo.db", url, max_wait=0.1)
    seen: list[bool] = []
    async with open_optimizer(config) as opt:
        assert not opt.publish_pending
        async with trio.open_nursery() as nursery:

            async def sample() -> None:
                while True:
                    seen.append(opt.statistics().publish_pending)
                    await trio.sleep(0.005)

            nursery.start_soon(sample)
            await opt.submit_many(make_trajectories(12))
            await opt.wait_idle()
            nursery.cancel_scope.cancel()
        assert opt.latest_version() is not None
        assert not opt.publish_pending  # everything optimized is in the latest version
    assert True in seen  # a version was due at some point before it came out


async def test_a_damaged_store_names_itself(tmp_path: Path) -> None:
    from fgo_actors._storage.store import AsyncStore

    path = tmp_path / "fgo.db"
    store = Store(path)
    try:
        store.log_call(
            "optimize",
            cached=False,
            prompt_tokens=1,
            completion_tokens=1,
            key="k",
            response={"ok": 1},
        )
        store._db.execute("UPDATE llm_cache SET response = '{\"ok\": 1' WHERE key = 'k'")
        with pytest.raises(StoreError, match=r"fgo\.db: the store is damaged"):
            await AsyncStore(store).call(store.cached_response, "k")
    finally:
        store.close()


async def test_the_daemon_refuses_an_empty_store(start_llm: StartLLM, tmp_path: Path) -> None:
    _server, url = await start_llm()
    (tmp_path / "fgo.db").write_bytes(b"")
    with pytest.raises(StoreError, match="--init"):
        async with open_optimizer(daemon_config(tmp_path / "fgo.db", url)):
            pass
    async with open_optimizer(daemon_config(tmp_path / "fgo.db", url, init=True)) as opt:
        assert opt.statistics().trajectories == 0


def test_an_array_record_is_measured_as_its_jsonl_line_would_be() -> None:
    record = {"id": "t", "text": "é" * 300_000}  # 600 KB of UTF-8, 1.8 MB as \\u escapes
    line = json.dumps(record, ensure_ascii=False)
    limit = 1024 * 1024
    as_line, refused_line = parse_body(line, max_record_bytes=limit)
    as_array, refused_array = parse_body(f"[{line}]", max_record_bytes=limit)
    assert (len(as_line), refused_line) == (1, [])
    assert (len(as_array), refused_array) == (1, [])
    too_big = parse_body(f"[{line}]", max_record_bytes=500_000)[1]
    assert [r.line for r in too_big] == [1]


@pytest.mark.parametrize(("grace", "finished"), [(30.0, True), (0.0, False)])
async def test_grace_lets_a_call_in_flight_finish_or_leaves_it_for_next_time(
    start_llm: StartLLM, tmp_path: Path, grace: float, finished: bool
) -> None:
    """Closing with a call in flight: with ``grace`` the call is answered and
    its subset done before the optimizer closes; without, the call is given up
    and its subset stays pending in the store, for the next start."""
    server, url = await start_llm(latency=1.5)
    config = daemon_config(tmp_path / "fgo.db", url, max_wait=0.05)
    async with open_optimizer(config, grace=grace) as opt:
        await opt.submit_many(make_trajectories(3))
        with trio.fail_after(20):
            while not server.requests:  # noqa: ASYNC110
                await trio.sleep(0.02)
    (request,) = server.requests
    store = Store(config.store)
    try:
        counts = store.counts()
    finally:
        store.close()
    assert (counts.subsets_done, counts.subsets_pending) == ((1, 0) if finished else (0, 1))
    if finished:
        assert request.finished is not None
