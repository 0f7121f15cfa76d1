#!/usr/bin/env python3
"""A red-team round against ``fgo serve``: kill -9, an endpoint outage, hostile bodies, the token.

Every daemon is the real command users run (``fgo serve``, the console script
beside this interpreter) as a subprocess in its own process group, on
127.0.0.1 with ``--port 0`` and a store in a temporary folder, and with the
flags that make it quick: ``--max-wait 0.3 --publish-interval 0
--context-tokens 4096 --subset-tokens 2000 --max-concurrency 4 --grace 2``
(subsets of 5 trajectories). Its LLM is a
``fgo_actors.testing.FakeLLMServer`` in this process (same trio run), with a
small latency so that calls are in flight when things go wrong; it records
every request, with the times it began and ended. Four items, each a function
(``--only NAME`` runs one):

kill9
    ``--count`` synthetic trajectories
    (``fgo_actors.testing.synthetic_trajectory``) are POSTed in JSONL batches
    of ``--batch``, paced so that the stream spans several lives of the
    daemon, while the daemon is killed with SIGKILL (its whole process group)
    ``--rounds`` times, each at a random moment (``--seed``)
    ``--kill-min``..``--kill-max`` seconds after it listens (every third kill
    then waits for the next POST and comes at most ``--post-kill-delay`` s
    into it), and started again on the same store. A batch that got no answer
    is sent again to the next life (ingest is idempotent by id). After each
    kill, every id acknowledged so far (a 202 counting it as accepted or
    duplicate) must be in the store. Then the daemon runs to the end against
    the healthy endpoint. Checked: every acknowledged id is stored and covered
    by the latest published version (read from the SQLite store after a clean
    SIGTERM: the leaves under the version's lineage node, their subsets, the
    trajectories in them; ``fgo_actors`` exports no Store, so this reads the
    store's tables with ``sqlite3``), the lineage counts them all, versions
    never go back (polled over HTTP across every life, and each version seen
    still has the module it was seen with at the end), and "paid twice":
    request bodies (their messages and response format) the fake server
    answered with 200 to a live daemon more than once, against the requests
    that were in flight at a kill (whose [arrival, reply] meets a window from
    a kill to the next start: such a reply reached no one). A reply the daemon
    received up to ``--margin`` seconds before a kill may not have reached its
    cache; only such calls may be paid again. With ``--keep``, every request
    and life is in ``kill9/calls.jsonl``, the daemons' logs beside it.

outage
    The endpoint goes away (the fake server stops listening, dropping the
    calls in flight) once the first half of ``--outage-count`` trajectories is
    acknowledged and a few calls answered, and comes back on the same port
    ``--outage`` seconds later; the second half is posted during the outage
    (ingest answers 429 once ``--max-pending-subsets`` sealed subsets wait,
    and the stream honours Retry-After until the endpoint is back). Checked:
    every POST during the outage is answered (202, or 429 once full), /healthz
    answers, the daemon carries on afterwards, no subset is marked failed,
    every acknowledged id is stored and covered at the end, and a SIGTERM
    exits 0. Figures: seconds from the endpoint's return to the first call it
    gets, the first answer, the first new version and everything covered,
    beside the longest retry backoff the daemon scheduled.

bodies
    Hostile HTTP bodies against one running daemon: a record nested 1,100
    levels deep beside good records, as JSONL and as a JSON array (and an
    array with a 100-deep record, for contrast), and alone; a 20 MiB body,
    with a Content-Length and chunked; a body that is not UTF-8; then
    ``--tricklers`` concurrent connections each trickling a one-record body
    over ``--trickle`` seconds while /healthz is timed (whether the body
    deadline, 120 s, can be configured is checked too: a settings file with
    ``body_seconds``), and /healthz latency (median, max) while a
    ``--bulk-mib`` MiB body of valid trajectories is parsed and stored. What
    was stored is checked over HTTP: sending a record again answers
    ``duplicate`` if it was stored, ``accepted`` if it was not.

token
    With ``--token-env RT_TOKEN`` (and a decoy ``$FGO_TOKEN``), every route
    ``protocols/openapi.yaml`` declares is called without a token, with wrong
    ones (another token, the decoy, the token without ``Bearer``, a prefix of
    it, ``Basic``) and with the right one. A route the API declares open
    (``security: []``: /healthz) must answer 200 to all; the others 401 (with
    ``WWW-Authenticate: Bearer``) to all but the right token, and the
    refused writes must have changed nothing.

The findings are printed as a table (PASS: a check held; FAIL: it did not;
INFO: a figure or a behaviour with nothing to compare against), then every
figure as one JSON line. The whole round takes about 70 s on 2 cores.
Run it from the repository root::

    .venv/bin/python scripts/redteam_serve.py
    .venv/bin/python scripts/redteam_serve.py --only kill9 --rounds 20 --seed 7
    .venv/bin/python scripts/redteam_serve.py --only bodies --keep /tmp/rt
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import random
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio
import yaml

from fgo_actors.testing import FakeLLMServer, RecordedRequest, synthetic_trajectory

ROOT = Path(__file__).resolve().parent.parent
FGO = Path(sys.executable).parent / "fgo"
LISTENING = re.compile(r"fgo serve: listening on (http://\S+)")
MIB = 1024 * 1024
JSONL = {"content-type": "application/x-ndjson"}
CHILDREN: list[trio.Process] = []  # every daemon started, killed at the end if still alive


# -- findings -------------------------------------------------------------------


@attrs.define
class Findings:
    rows: list[tuple[str, str, str, str, str]] = attrs.Factory(list)

    def check(self, item: str, what: str, ok: bool, expected: str, observed: object) -> bool:
        self.rows.append((item, what, expected, str(observed), "PASS" if ok else "FAIL"))
        return ok

    def info(self, item: str, what: str, observed: object) -> None:
        self.rows.append((item, what, "-", str(observed), "INFO"))

    def counts(self) -> dict[str, int]:
        return dict(Counter(row[4] for row in self.rows))

    def table(self) -> str:
        head = ("item", "check", "expected", "observed", "verdict")
        widths = [max(len(r[k]) for r in [head, *self.rows]) for k in range(5)]
        widths[2] = min(widths[2], 34)
        widths[3] = min(widths[3], 70)

        def wrap(text: str, width: int) -> list[str]:
            return [text[i : i + width] for i in range(0, len(text), width)] or [""]

        lines = []
        for row in [head, *self.rows]:
            cells = [wrap(cell, widths[k]) for k, cell in enumerate(row)]
            for n in range(max(len(c) for c in cells)):
                lines.append(
                    "  ".join(
                        (c[n] if n < len(c) else "").ljust(widths[k]) for k, c in enumerate(cells)
                    ).rstrip()
                )
            if row is head:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)


# -- trajectories ---------------------------------------------------------------


def record(i: int, prefix: str, *, steps: int = 4, words: int = 12) -> dict[str, Any]:
    """Synthetic trajectory ``i`` as JSON, its id ``prefix`` and 5 digits."""
    return synthetic_trajectory(i, steps=steps, words=words, prefix=prefix, width=5).to_json()


def jsonl(records: Iterable[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records).encode()


def deep_record(i: int, prefix: str, depth: int) -> bytes:
    """A valid trajectory whose JSON nests ``depth`` levels deep (a metadata field)."""
    base = json.dumps(record(i, prefix), separators=(",", ":"))
    inner = depth - 2  # the record's own object and the innermost {} count too
    nested = '{"d":' * inner + "{}" + "}" * inner
    return (base[:-1] + ',"deep":' + nested + "}").encode()


def json_depth(text: bytes) -> int:
    """How deep objects and arrays nest in a JSON text (no strings with brackets here)."""
    depth = deepest = 0
    for byte in text:
        if byte in b"{[":
            depth += 1
            deepest = max(deepest, depth)
        elif byte in b"}]":
            depth -= 1
    return deepest


def module_sha(module: object) -> str:
    return hashlib.sha256(json.dumps(module, sort_keys=True).encode()).hexdigest()[:16]


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text as {'name{labels}': value}, without the ``fgo_`` prefix."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name.removeprefix("fgo_")] = float(value)
    return out


def latency_summary(seconds: Sequence[float]) -> dict[str, Any]:
    if not seconds:
        return {"samples": 0, "median_ms": None, "p95_ms": None, "max_ms": None}
    ordered = sorted(seconds)
    p95 = ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]
    return {
        "samples": len(ordered),
        "median_ms": round(statistics.median(ordered) * 1000, 1),
        "p95_ms": round(p95 * 1000, 1),
        "max_ms": round(ordered[-1] * 1000, 1),
    }


def shown(summary: dict[str, Any]) -> str:
    return (
        f"{summary['samples']} samples, median {summary['median_ms']} ms, "
        f"p95 {summary['p95_ms']} ms, max {summary['max_ms']} ms"
    )


# -- the daemon's process -------------------------------------------------------


@attrs.define
class Daemon:
    process: trio.Process
    url: str
    log: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self) -> str:
        return log_tail(self.log)


def log_tail(log: Path, chars: int = 2000) -> str:
    return log.read_text(errors="replace")[-chars:]


def kill_group(process: trio.Process) -> None:
    """SIGKILL the daemon's whole process group (it was started in its own session)."""
    if process.poll() is None:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)


def kill_leftovers() -> None:
    for process in CHILDREN:
        kill_group(process)


async def read_listening_line(stream: trio.abc.ReceiveStream, log: Path) -> str:
    buffer = b""
    while b"\n" not in buffer:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        buffer += chunk
    match = LISTENING.search(buffer.decode(errors="replace"))
    if match is None:
        tail = await trio.to_thread.run_sync(log_tail, log)
        raise RuntimeError(f"fgo serve did not report its address: {buffer!r}\n{tail}")
    return match.group(1)


def serve_flags(args: argparse.Namespace) -> list[str]:
    return [
        "--max-wait",
        "0.3",
        "--publish-interval",
        "0",
        "--context-tokens",
        "4096",
        "--subset-tokens",
        "2000",
        "--max-concurrency",
        str(args.concurrency),
        "--grace",
        "2",
    ]


async def start_daemon(
    args: argparse.Namespace,
    store: Path,
    llm_url: str,
    log: Path,
    *,
    extra: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> Daemon:
    command = [
        str(FGO),
        "serve",
        "--log-json",
        "--store",
        str(store),
        "--port",
        "0",
        "--base-url",
        llm_url,
        "--model",
        "redteam",
        *serve_flags(args),
        *extra,
    ]
    with log.open("ab") as err:
        process = await trio.lowlevel.open_process(
            command,
            stdout=subprocess.PIPE,
            stderr=err,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    CHILDREN.append(process)
    assert process.stdout is not None
    try:
        with trio.fail_after(60):
            url = await read_listening_line(process.stdout, log)
    except BaseException:
        kill_group(process)
        with trio.CancelScope(shield=True):
            await process.wait()
        raise
    return Daemon(process, url, log)


async def stop_daemon(daemon: Daemon, patience: float = 30.0) -> tuple[int, float]:
    """SIGTERM (the clean stop), SIGKILL after ``patience`` s: (exit code, seconds)."""
    started = time.perf_counter()
    if daemon.alive():
        daemon.process.send_signal(signal.SIGTERM)
        with trio.move_on_after(patience):
            await daemon.process.wait()
        kill_group(daemon.process)
    code = await daemon.process.wait()
    if daemon.process.stdout is not None:
        await daemon.process.stdout.aclose()
    return code, time.perf_counter() - started


def retry_waits(log: Path) -> list[float]:
    """The backoff of each LLM call retry the daemon logged (stamina's ``wait_for``)."""
    waits = []
    for line in log.read_text(errors="replace").splitlines():
        if '"stamina.retry_scheduled"' in line:
            with suppress(ValueError, KeyError, TypeError):
                waits.append(float(json.loads(line)["wait_for"]))
    return waits


def log_events(
    log: Path, levels: Sequence[str] = ("warning", "error", "critical")
) -> dict[str, int]:
    """Counts of the daemon's JSON log events at ``levels``, by event name."""
    counts: Counter[str] = Counter()
    for line in log.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        with suppress(ValueError):
            event = json.loads(line)
            if event.get("level") in levels:
                counts[str(event.get("event"))] += 1
    return dict(counts)


# -- the LLM endpoint -----------------------------------------------------------


class Endpoint:
    """The fake LLM on one loopback port: one FakeLLMServer per period it is up."""

    def __init__(self, latency: float) -> None:
        self.latency = latency
        self.port = 0
        self.url = ""
        self.servers: list[FakeLLMServer] = []
        self._scope: trio.CancelScope | None = None

    async def start(self, nursery: trio.Nursery) -> str:
        server = FakeLLMServer(latency=self.latency or None)
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await server.serve(port=self.port, task_status=task_status)

        url: str = await nursery.start(run)
        self.port = int(url.rsplit(":", 1)[1].partition("/")[0])
        self.url = url
        self.servers.append(server)
        self._scope = scope
        return url

    def stop(self) -> None:
        """Stop listening and drop every connection (calls in flight get no answer)."""
        if self._scope is not None:
            self._scope.cancel()
            self._scope = None

    def requests(self) -> list[RecordedRequest]:
        return [r for s in self.servers for r in s.requests]

    def in_flight(self) -> int:
        return self.servers[-1].in_flight if self._scope is not None and self.servers else 0

    def answered(self) -> int:
        return sum(r.finished is not None and r.fault is None for r in self.requests())


async def until(
    predicate: Callable[[], bool | Awaitable[bool]], within: float, interval: float = 0.05
) -> float:
    """Wait until ``predicate()`` holds; the seconds it took (TooSlowError after ``within``)."""
    started = time.perf_counter()
    with trio.fail_after(within):
        while True:
            result = predicate()
            if not isinstance(result, bool):
                result = await result
            if result:
                return time.perf_counter() - started
            await trio.sleep(interval)


# -- HTTP helpers ---------------------------------------------------------------


@attrs.frozen
class Reply:
    status: int  # -1: no answer (the error's name is in ``text``)
    text: str
    seconds: float

    def json(self) -> Any:
        try:
            return json.loads(self.text)
        except ValueError:
            return None

    def brief(self, chars: int = 160) -> str:
        return f"{self.status} {self.text[:chars]}".strip()


async def post(
    client: httpx.AsyncClient,
    url: str,
    content: bytes | Iterable[bytes] | Any,
    headers: dict[str, str] | None = None,
    within: float = 60.0,
) -> Reply:
    started = time.perf_counter()
    try:
        response = await client.post(url, content=content, headers=headers, timeout=within)
    except httpx.HTTPError as e:
        return Reply(-1, f"{type(e).__name__}: {e}", time.perf_counter() - started)
    return Reply(response.status_code, response.text, time.perf_counter() - started)


async def latest_version(
    client: httpx.AsyncClient, url: str, headers: dict[str, str] | None = None
) -> dict[str, Any] | None:
    response = await client.get(f"{url}/v1/module", headers=headers)
    if response.status_code != 200:
        return None
    body: dict[str, Any] = response.json()
    return body


async def metrics(
    client: httpx.AsyncClient, url: str, headers: dict[str, str] | None = None
) -> dict[str, float]:
    response = await client.get(f"{url}/metrics", headers=headers)
    response.raise_for_status()
    return parse_metrics(response.text)


async def wait_settled(
    client: httpx.AsyncClient,
    daemon: Daemon,
    total: int,
    within: float,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The latest version once it counts ``total`` trajectories and no publication is due."""
    with trio.fail_after(within):
        while True:
            if not daemon.alive():
                raise RuntimeError(
                    f"fgo serve exited with {daemon.process.returncode}:\n{daemon.log_tail()}"
                )
            latest = await latest_version(client, daemon.url, headers)
            if latest is not None and latest["lineage"].get("trajectories", 0) >= total:
                health = (await client.get(f"{daemon.url}/healthz")).json()
                if not health["publish_pending"]:
                    return latest
            await trio.sleep(0.1)


@attrs.define
class HealthProbe:
    """Times GET /healthz, one after another, until ``stop`` is set."""

    seconds: list[float] = attrs.Factory(list)
    failures: list[str] = attrs.Factory(list)

    async def run(
        self, client: httpx.AsyncClient, url: str, stop: trio.Event, interval: float
    ) -> None:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                response = await client.get(f"{url}/healthz", timeout=30)
            except httpx.HTTPError as e:
                self.failures.append(type(e).__name__)
            else:
                if response.status_code == 200:
                    self.seconds.append(time.perf_counter() - started)
                else:
                    self.failures.append(str(response.status_code))
            with trio.move_on_after(interval):
                await stop.wait()


# -- the stream, across lives of the daemon --------------------------------------


@attrs.define
class Lives:
    """The daemon now up (None between a kill and the next start)."""

    daemon: Daemon | None = None
    changed: trio.Event = attrs.Factory(trio.Event)

    def set(self, daemon: Daemon | None) -> None:
        self.daemon = daemon
        event, self.changed = self.changed, trio.Event()
        event.set()

    async def other_than(self, old: Daemon | None) -> Daemon:
        while self.daemon is None or self.daemon is old:
            await self.changed.wait()
        return self.daemon


@attrs.define
class StreamLog:
    sent: set[str] = attrs.Factory(set)
    acked: set[str] = attrs.Factory(set)
    posts: int = 0
    cut: int = 0  # POSTs that got no answer: the daemon died under them, or was down
    resent: int = 0  # batches sent again after a cut
    duplicates_on_resend: int = 0  # their records the cut POST had stored after all
    throttled: int = 0
    statuses: Counter[int] = attrs.Factory(Counter)
    unexpected: list[str] = attrs.Factory(list)
    posting: bool = False
    done: trio.Event = attrs.Factory(trio.Event)
    acked_at: list[tuple[float, int]] = attrs.Factory(list)  # (trio time, records) of each 202
    answered_at: list[tuple[float, int]] = attrs.Factory(list)  # (trio time, status) of each POST
    next_post: trio.Event = attrs.Factory(trio.Event)  # set as the next POST starts


def make_batches(prefix: str, count: int, batch: int) -> list[list[dict[str, Any]]]:
    return [
        [record(i, prefix) for i in range(start, min(count, start + batch))]
        for start in range(0, count, batch)
    ]


async def stream(
    client: httpx.AsyncClient,
    lives: Lives,
    batches: Sequence[Sequence[dict[str, Any]]],
    pace: float,
    log: StreamLog,
) -> None:
    """POST each batch to the daemon of the moment until it is acknowledged."""
    try:
        for batch in batches:
            ids = [r["id"] for r in batch]
            body = jsonl(batch)
            log.sent.update(ids)
            daemon = await lives.other_than(None)
            resending = False
            stray = 0
            while True:
                log.posting = True
                starting, log.next_post = log.next_post, trio.Event()
                starting.set()
                try:
                    response = await client.post(
                        f"{daemon.url}/v1/trajectories", content=body, headers=JSONL
                    )
                except httpx.TransportError as e:
                    if lives.daemon is daemon and daemon.alive():
                        # Not one of our kills: a real fault. Note it, try again.
                        stray += 1
                        log.unexpected.append(f"{type(e).__name__} from a live daemon: {e}")
                        if stray > 5:
                            raise
                        await trio.sleep(0.2)
                        continue
                    log.cut += 1
                    daemon = await lives.other_than(daemon)
                    log.resent += 1
                    resending = True
                    continue
                finally:
                    log.posting = False
                log.posts += 1
                log.statuses[response.status_code] += 1
                log.answered_at.append((trio.current_time(), response.status_code))
                if response.status_code == 429:
                    log.throttled += 1
                    await trio.sleep(float(response.headers.get("retry-after", "1")))
                    continue
                if response.status_code != 202:
                    log.unexpected.append(f"POST answered {response.status_code}: {response.text}")
                    break
                reply = response.json()
                if reply["accepted"] + reply["duplicate"] == len(ids) and not reply["rejected"]:
                    log.acked.update(ids)
                    log.acked_at.append((trio.current_time(), len(ids)))
                    if resending:
                        log.duplicates_on_resend += reply["duplicate"]
                else:
                    log.unexpected.append(f"batch {ids[0]}..: {reply}")
                break
            await trio.sleep(pace)
    finally:
        log.done.set()


@attrs.define
class VersionWatch:
    """GET /v1/module every 0.1 s on whichever daemon is up."""

    seen: dict[int, str] = attrs.Factory(dict)  # version -> module sha, when first seen
    conflicts: list[str] = attrs.Factory(list)
    regressions: list[str] = attrs.Factory(list)
    last: int = 0
    polls: int = 0

    async def run(self, client: httpx.AsyncClient, lives: Lives) -> None:
        daemon: Daemon | None = None
        while True:
            daemon = lives.daemon or await lives.other_than(None)
            try:
                latest = await latest_version(client, daemon.url)
            except httpx.HTTPError:
                await trio.sleep(0.05)
                continue
            self.polls += 1
            if latest is not None:
                self.note(latest["version"], module_sha(latest["module"]), "GET /v1/module")
            await trio.sleep(0.1)

    def note(self, n: int, sha: str, where: str) -> None:
        if n < self.last:
            self.regressions.append(f"{where}: version {n} after {self.last}")
        self.last = max(self.last, n)
        if n in self.seen and self.seen[n] != sha:
            self.conflicts.append(f"version {n}: module {self.seen[n]} then {sha} ({where})")
        self.seen.setdefault(n, sha)


async def check_versions(
    client: httpx.AsyncClient, url: str, watch: VersionWatch
) -> dict[str, Any]:
    """Compare what was seen during the run with the versions the daemon has at the end."""
    listing = (await client.get(f"{url}/v1/module/versions")).json()
    versions = listing["versions"]
    numbers = [v["version"] for v in versions]
    published = [v for v in versions if v["status"] == "published"]
    counts = [v["lineage"].get("trajectories", 0) for v in published]
    lost: list[int] = []
    changed: list[str] = []
    for n, sha in sorted(watch.seen.items()):
        response = await client.get(f"{url}/v1/module/versions/{n}")
        if response.status_code != 200:
            lost.append(n)
        elif module_sha(response.json()["module"]) != sha:
            changed.append(f"version {n}: seen {sha}, now {module_sha(response.json()['module'])}")
    parents_ok = all(
        v["lineage"].get("parents") == ([published[k - 1]["version"]] if k else [])
        for k, v in enumerate(published)
    )
    return {
        "versions": len(versions),
        "latest": listing["latest"],
        "numbers_increasing": all(b > a for a, b in itertools.pairwise(numbers)),
        "numbers_contiguous": numbers == list(range(1, len(numbers) + 1)),
        "created_at_increasing": all(
            b["created_at"] >= a["created_at"] for a, b in itertools.pairwise(versions)
        ),
        "trajectories_non_decreasing": all(b >= a for a, b in itertools.pairwise(counts)),
        "trajectory_counts": counts,
        "parents_chain": parents_ok,
        "seen_during_run": len(watch.seen),
        "seen_lost": lost,
        "seen_changed": changed,
        "regressions": watch.regressions,
        "conflicts": watch.conflicts,
    }


def store_report(store: Path, acked: set[str]) -> dict[str, Any]:
    """What the store holds, after the daemon stopped: ids, subsets, and the ids the
    latest published version covers (the leaves under its lineage node)."""
    db = read_only(store)
    try:
        rows = db.execute("SELECT id, subset FROM trajectories").fetchall()
        stored = {row[0] for row in rows}
        states = dict(db.execute("SELECT state, COUNT(*) FROM subsets GROUP BY state").fetchall())
        nodes = {
            row[0]: (row[1], json.loads(row[2]), json.loads(row[3]))
            for row in db.execute("SELECT id, kind, children, subsets FROM nodes")
        }
        latest = db.execute(
            "SELECT n, lineage FROM versions WHERE status = 'published' ORDER BY n DESC LIMIT 1"
        ).fetchone()
    finally:
        db.close()
    leaf_subsets: set[str] = set()
    missing_nodes: list[str] = []
    lineage: dict[str, Any] = json.loads(latest[1]) if latest else {}
    stack = [lineage["node"]] if "node" in lineage else []
    while stack:
        node = stack.pop()
        if node not in nodes:
            missing_nodes.append(node)
            continue
        kind, children, subsets = nodes[node]
        if kind == "leaf":
            leaf_subsets.update(subsets)
        else:
            stack.extend(children)
    covered = {tid for tid, subset in rows if subset in leaf_subsets}
    return {
        "stored": len(stored),
        "acked": len(acked),
        "acked_not_stored": sorted(acked - stored)[:20],
        "acked_not_stored_count": len(acked - stored),
        "acked_not_covered": sorted(acked - covered)[:20],
        "acked_not_covered_count": len(acked - covered),
        "covered": len(covered),
        "subsets": states,
        "latest_version": latest[0] if latest else None,
        "latest_lineage_trajectories": lineage.get("trajectories"),
        "missing_nodes": missing_nodes,
    }


def read_only(store: Path) -> sqlite3.Connection:
    """The store, opened read-only: reading it checkpoints nothing, changes nothing."""
    return sqlite3.connect(f"{store.resolve().as_uri()}?mode=ro", uri=True)


def stored_ids(store: Path) -> set[str]:
    db = read_only(store)
    try:
        return {row[0] for row in db.execute("SELECT id FROM trajectories")}
    finally:
        db.close()


# -- 1. kill -9 -----------------------------------------------------------------


@attrs.define
class Kill:
    life: int
    at: float  # trio time
    after_s: float  # since the daemon listened
    llm_in_flight: int
    posting: bool
    acked: int
    acked_not_stored: int = 0


def request_key(body: dict[str, Any]) -> str:
    """A request's identity for "paid twice": its messages and response format."""
    wanted = {"messages": body.get("messages"), "response_format": body.get("response_format")}
    return hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()


def analyse_calls(
    requests: Sequence[RecordedRequest], dead: Sequence[tuple[float, float]], margin: float
) -> dict[str, Any]:
    """Which calls the fake server answered more than once, and whether a kill explains it.

    ``dead``: (kill, next start) for each kill, when no daemon ran. A request whose
    span [arrival, reply] meets such a window was in flight at a kill: its reply
    reached no one (a request can even arrive after the kill, sent by the dying
    daemon just before). Only the others were answered to a live daemon."""
    kills = [start for start, _ in dead]

    def spans(r: RecordedRequest, slack: float) -> bool:
        end = r.finished if r.finished is not None else math.inf
        return any(r.started <= until and end + slack >= kill for kill, until in dead)

    def delivered(r: RecordedRequest) -> bool:
        return r.fault is None and r.finished is not None and not spans(r, 0.0)

    by_key: dict[str, list[RecordedRequest]] = {}
    for r in requests:
        by_key.setdefault(request_key(r.body), []).append(r)
    paid_twice = 0
    extra = 0
    unexplained: list[str] = []
    cut_resent = 0
    for key, group in by_key.items():
        group.sort(key=lambda r: r.started)
        answers = [r for r in group if delivered(r)]
        if len(answers) > 1:
            paid_twice += 1
            extra += len(answers) - 1
            for r in answers[:-1]:
                if not spans(r, margin):
                    gaps = [k - (r.finished or 0.0) for k in kills if k >= (r.finished or 0.0)]
                    gap = (
                        f"{min(gaps):.2f} s before the next kill" if gaps else "after the last kill"
                    )
                    unexplained.append(
                        f"{key[:10]} ({r.schema_name}) answered at {r.finished:.2f}, {gap}, "
                        f"asked again at {answers[answers.index(r) + 1].started:.2f}"
                    )
        for k, r in enumerate(group):
            if spans(r, 0.0) and not delivered(r) and any(delivered(o) for o in group[k + 1 :]):
                cut_resent += 1
    return {
        "requests": len(requests),
        "distinct_bodies": len(by_key),
        "answered_200": sum(delivered(r) for r in requests),
        "in_flight_at_a_kill": sum(spans(r, 0.0) for r in requests),
        "answered_within_margin_before_a_kill": sum(
            spans(r, margin) and not spans(r, 0.0) for r in requests
        ),
        "cut_by_a_kill_then_asked_again": cut_resent,
        "bodies_paid_twice": paid_twice,
        "extra_payments": extra,
        "paid_twice_unexplained": len(unexplained),
        "unexplained": unexplained[:10],
    }


TRAJECTORY_HEADING = re.compile(r"^### Trajectory (\S+)$", re.MULTILINE)


def dump_calls(
    path: Path,
    requests: Sequence[RecordedRequest],
    kills: Sequence[Kill],
    spawned: Sequence[float],
    listened: Sequence[float],
) -> None:
    """Every LLM request (times, identity, the trajectories its prompt names) and the
    lives of the daemon, one JSON object a line: what a finding can be traced with."""
    with path.open("w") as f:
        for n, (began, at) in enumerate(zip(spawned, listened, strict=False), start=1):
            f.write(json.dumps({"life": n, "spawned": round(began, 3), "listening": round(at, 3)}))
            f.write("\n")
        for kill in kills:
            f.write(json.dumps({"kill": kill.life, "at": round(kill.at, 3)}) + "\n")
        for r in requests:
            prompt = r.prompt
            f.write(
                json.dumps(
                    {
                        "key": request_key(r.body)[:12],
                        "schema": r.schema_name,
                        "started": round(r.started, 3),
                        "finished": None if r.finished is None else round(r.finished, 3),
                        "trajectories": TRAJECTORY_HEADING.findall(prompt),
                        "prompt_chars": len(prompt),
                    }
                )
                + "\n"
            )


async def item_kill9(args: argparse.Namespace, folder: Path, findings: Findings) -> dict[str, Any]:
    item = "kill9"
    rng = random.Random(args.seed)
    store = folder / "fgo.db"
    endpoint = Endpoint(latency=args.latency)
    lives = Lives()
    slog = StreamLog()
    watch = VersionWatch()
    kills: list[Kill] = []
    early_exits: list[str] = []
    spawned_at: list[float] = []  # trio time each life's process was started
    listened_at: list[float] = []  # trio time each life began to listen
    batches = make_batches("k", args.count, args.batch)
    results: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        llm_url = await endpoint.start(nursery)
        async with httpx.AsyncClient(timeout=httpx.Timeout(30)) as client:
            try:
                nursery.start_soon(stream, client, lives, batches, args.pace, slog)
                nursery.start_soon(watch.run, client, lives)
                for life in range(1, args.rounds + 1):
                    spawned_at.append(trio.current_time())
                    daemon = await start_daemon(args, store, llm_url, folder / f"serve-{life}.log")
                    listened = trio.current_time()
                    listened_at.append(listened)
                    lives.set(daemon)
                    await trio.sleep(rng.uniform(args.kill_min, args.kill_max))
                    if life % 3 == 2 and not slog.done.is_set():
                        # Every third kill lands inside a POST: the moment ingest
                        # must not acknowledge what it has not stored.
                        with trio.move_on_after(5):
                            await slog.next_post.wait()
                            await trio.sleep(rng.uniform(0, args.post_kill_delay))
                    if not daemon.alive():
                        early_exits.append(f"life {life}: exit {daemon.process.returncode}")
                    kill = Kill(
                        life=life,
                        at=trio.current_time(),
                        after_s=round(trio.current_time() - listened, 2),
                        llm_in_flight=endpoint.in_flight(),
                        posting=slog.posting,
                        acked=len(slog.acked),
                    )
                    kill_group(daemon.process)
                    lives.set(None)
                    await daemon.process.wait()
                    if daemon.process.stdout is not None:
                        await daemon.process.stdout.aclose()
                    kills.append(kill)
                    acked_now = set(slog.acked)
                    stored = await trio.to_thread.run_sync(stored_ids, store)
                    kill.acked_not_stored = len(acked_now - stored)
                spawned_at.append(trio.current_time())
                final = await start_daemon(args, store, llm_url, folder / "serve-final.log")
                restarted = trio.current_time()
                listened_at.append(restarted)
                lives.set(final)
                with trio.fail_after(args.drain_timeout):
                    await slog.done.wait()
                latest = await wait_settled(client, final, len(slog.acked), args.drain_timeout)
                settled_s = trio.current_time() - restarted
                watch.note(latest["version"], module_sha(latest["module"]), "final /v1/module")
                versions = await check_versions(client, final.url, watch)
                final_metrics = await metrics(client, final.url)
                exit_code, _ = await stop_daemon(final)
            finally:
                kill_leftovers()
        nursery.cancel_scope.cancel()
    report = await trio.to_thread.run_sync(store_report, store, slog.acked)
    dead = [(k.at, spawned_at[n + 1]) for n, k in enumerate(kills)]
    calls = analyse_calls(endpoint.requests(), dead, args.margin)
    dump_calls(folder / "calls.jsonl", endpoint.requests(), kills, spawned_at, listened_at)
    results = {
        "rounds": len(kills),
        "kills": [attrs.asdict(k) for k in kills],
        "kills_with_llm_calls_in_flight": sum(k.llm_in_flight > 0 for k in kills),
        "kills_during_a_post": sum(k.posting for k in kills),
        "early_exits": early_exits,
        "sent": len(slog.sent),
        "acked": len(slog.acked),
        "posts": slog.posts,
        "posts_unanswered": slog.cut,
        "batches_resent": slog.resent,
        "duplicates_on_resend": slog.duplicates_on_resend,
        "throttled_429": slog.throttled,
        "statuses": dict(slog.statuses),
        "unexpected_replies": slog.unexpected[:10],
        "acked_not_stored_at_a_kill": sum(k.acked_not_stored for k in kills),
        "final_settle_s": round(settled_s, 2),
        "final_exit_code": exit_code,
        "store": report,
        "versions": versions,
        "llm": calls,
        "final_cached_calls": int(final_metrics.get("llm_cached_calls_total", 0)),
        "final_subsets_failed": int(final_metrics.get('subsets_total{outcome="failed"}', 0)),
        "warnings": log_events(folder / "serve-final.log"),
    }
    findings.info(
        item,
        "kills",
        f"{len(kills)} kills at {', '.join(str(k.after_s) for k in kills)} s after listening; "
        f"{results['kills_with_llm_calls_in_flight']} with LLM calls in flight, "
        f"{results['kills_during_a_post']} during a POST",
    )
    findings.check(
        item, "daemon never exited on its own", not early_exits, "none", early_exits or "none"
    )
    findings.check(
        item,
        "every 202 in the store at each kill",
        results["acked_not_stored_at_a_kill"] == 0,
        "0 missing",
        f"{results['acked_not_stored_at_a_kill']} missing over {len(kills)} kills",
    )
    findings.check(
        item,
        "every batch acknowledged",
        len(slog.acked) == len(slog.sent) and not slog.unexpected,
        f"{len(slog.sent)} acked, no odd reply",
        f"{len(slog.acked)} acked; {slog.posts} answered POSTs ({slog.throttled} of them 429), "
        f"{slog.cut} unanswered (killed under it, or daemon down) and resent; "
        f"{slog.duplicates_on_resend} records of the resent batches were stored already; "
        f"odd: {slog.unexpected[:2]}",
    )
    findings.check(
        item,
        "every acked id stored at the end",
        report["acked_not_stored_count"] == 0,
        "0 missing",
        f"{report['acked_not_stored_count']} missing {report['acked_not_stored'][:5]}; "
        f"{report['stored']} stored",
    )
    findings.check(
        item,
        "every acked id covered by the latest version",
        report["acked_not_covered_count"] == 0
        and report["latest_lineage_trajectories"] == len(slog.acked)
        and not report["missing_nodes"],
        f"{len(slog.acked)} covered, lineage {len(slog.acked)}",
        f"{report['covered']} covered (version {report['latest_version']}, lineage says "
        f"{report['latest_lineage_trajectories']}); uncovered {report['acked_not_covered'][:5]}; "
        f"subsets {report['subsets']}; settled {settled_s:.1f} s after the last restart",
    )
    findings.check(
        item,
        "versions monotonic across lives",
        not versions["regressions"]
        and not versions["conflicts"]
        and not versions["seen_lost"]
        and not versions["seen_changed"]
        and versions["numbers_increasing"]
        and versions["trajectories_non_decreasing"]
        and versions["parents_chain"],
        "never back, none lost or changed",
        f"{versions['versions']} versions (contiguous {versions['numbers_contiguous']}), "
        f"{versions['seen_during_run']} seen over {watch.polls} polls; regressions "
        f"{versions['regressions'][:2]}, lost {versions['seen_lost'][:3]}, changed "
        f"{versions['seen_changed'][:2]}, conflicts {versions['conflicts'][:2]}, parents chain "
        f"{versions['parents_chain']}, lineage counts non-decreasing "
        f"{versions['trajectories_non_decreasing']}",
    )
    findings.check(
        item,
        "paid twice only if in flight at a kill",
        calls["paid_twice_unexplained"] == 0,
        f"repeats only within {args.margin} s of a kill",
        f"{calls['bodies_paid_twice']} bodies answered 200 more than once "
        f"({calls['extra_payments']} extra); {calls['in_flight_at_a_kill']} requests in flight "
        f"at a kill, {calls['answered_within_margin_before_a_kill']} answered <= {args.margin} s "
        f"before one; {calls['paid_twice_unexplained']} unexplained {calls['unexplained'][:2]}",
    )
    findings.info(
        item,
        "LLM requests",
        f"{calls['requests']} requests, {calls['distinct_bodies']} distinct, "
        f"{calls['answered_200']} answered 200, {calls['cut_by_a_kill_then_asked_again']} cut by "
        f"a kill and asked again; final life replayed {results['final_cached_calls']} from cache",
    )
    findings.check(item, "clean stop exits 0", exit_code == 0, "0", exit_code)
    return results


# -- 2. endpoint outage -----------------------------------------------------------


async def item_outage(args: argparse.Namespace, folder: Path, findings: Findings) -> dict[str, Any]:
    item = "outage"
    store = folder / "fgo.db"
    endpoint = Endpoint(latency=args.latency)
    lives = Lives()
    slog = StreamLog()  # the first half, posted before the outage
    slog_down = StreamLog()  # the second half, posted while the endpoint is down
    batches = make_batches("o", args.outage_count, args.batch)
    half = len(batches) // 2
    async with trio.open_nursery() as nursery:
        llm_url = await endpoint.start(nursery)
        async with httpx.AsyncClient(timeout=httpx.Timeout(30)) as client:
            daemon = await start_daemon(args, store, llm_url, folder / "serve.log")
            try:
                lives.set(daemon)
                nursery.start_soon(stream, client, lives, batches[:half], args.pace, slog)
                await until(lambda: endpoint.answered() >= 4 and slog.done.is_set(), 60)
                before = await latest_version(client, daemon.url)
                in_flight_at_down = endpoint.in_flight()
                endpoint.stop()
                down_at = trio.current_time()
                probe = HealthProbe()
                stop = trio.Event()
                # The second half is posted during the outage; once the pipeline is
                # full (sealed subsets waiting), ingest answers 429 and the stream
                # waits, so it goes on after the endpoint is back.
                pace = args.outage / (len(batches) - half + 1)
                nursery.start_soon(stream, client, lives, batches[half:], pace, slog_down)
                async with trio.open_nursery() as inner:
                    inner.start_soon(probe.run, client, daemon.url, stop, 0.5)
                    await trio.sleep(args.outage)
                    stop.set()
                during = await metrics(client, daemon.url)
                outage_end = trio.current_time()
                acked_during = sum(n for at, n in slog_down.acked_at if at <= outage_end)
                answered_during = [st for at, st in slog_down.answered_at if at <= outage_end]
                unanswered_during = slog_down.cut
                at_up = await latest_version(client, daemon.url)
                n_at_up = at_up["version"] if at_up else 0
                await endpoint.start(nursery)
                up_at = trio.current_time()
                server = endpoint.servers[-1]

                async def newer() -> bool:
                    latest = await latest_version(client, daemon.url)
                    return latest is not None and latest["version"] > n_at_up

                recovery: dict[str, float | None] = {}
                for what, predicate in (
                    ("first_call", lambda: bool(server.requests)),
                    ("first_answer", lambda: any(r.finished is not None for r in server.requests)),
                    ("first_version", newer),
                ):
                    try:
                        await until(predicate, args.drain_timeout, 0.02)
                    except trio.TooSlowError:
                        recovery[what] = None
                    else:
                        recovery[what] = round(trio.current_time() - up_at, 2)
                with trio.fail_after(args.drain_timeout):
                    await slog_down.done.wait()
                slog.acked |= slog_down.acked
                slog.sent |= slog_down.sent
                slog.unexpected += slog_down.unexpected
                latest = await wait_settled(client, daemon, len(slog.acked), args.drain_timeout)
                covered_s = trio.current_time() - up_at
                end_metrics = await metrics(client, daemon.url)
                exit_code, _ = await stop_daemon(daemon)
            finally:
                kill_leftovers()
        nursery.cancel_scope.cancel()
    report = await trio.to_thread.run_sync(store_report, store, slog.acked)
    health = latency_summary(probe.seconds)
    backoffs = retry_waits(folder / "serve.log")
    results = {
        "outage_s": round(up_at - down_at, 2),
        "llm_calls_in_flight_at_down": in_flight_at_down,
        "version_at_down": before["version"] if before else None,
        "version_at_up": n_at_up,
        "acked_during_outage": acked_during,
        "posts_answered_during_outage": dict(Counter(answered_during)),
        "posts_unanswered_during_outage": unanswered_during,
        "posted_during_or_after_outage": len(slog_down.sent),
        "longest_backoff_s": max(backoffs, default=None),
        "retries_scheduled": len(backoffs),
        "healthz_during_outage": health,
        "healthz_failures_during_outage": probe.failures,
        "metrics_at_end_of_outage": {
            k: during.get(k, 0)
            for k in (
                "llm_in_flight",
                "optimizing",
                'queue_depth{queue="subsets"}',
                'subsets_total{outcome="failed"}',
            )
        },
        "first_call_after_up_s": recovery["first_call"],
        "first_answer_after_up_s": recovery["first_answer"],
        "first_version_after_up_s": recovery["first_version"],
        "all_covered_after_up_s": round(covered_s, 2),
        "final_version": latest["version"],
        "subsets_failed": int(end_metrics.get('subsets_total{outcome="failed"}', 0)),
        "acked": len(slog.acked),
        "sent": len(slog.sent),
        "unexpected_replies": slog.unexpected[:10],
        "exit_code": exit_code,
        "store": report,
        "warnings": log_events(folder / "serve.log"),
    }
    findings.info(
        item,
        "the outage",
        f"endpoint down {results['outage_s']} s with {in_flight_at_down} calls in flight, "
        f"at version {results['version_at_down']}; daemon warnings {results['warnings']}",
    )
    findings.check(
        item,
        "ingest answers during the outage",
        acked_during > 0
        and unanswered_during == 0
        and set(answered_during) <= {202, 429}
        and not slog.unexpected,
        "every POST answered (202, then 429 once full)",
        f"POSTs during the outage answered {dict(Counter(answered_during))}, "
        f"{unanswered_during} unanswered; {acked_during} trajectories acknowledged during it; "
        f"odd {slog.unexpected[:2]}",
    )
    findings.check(
        item,
        "/healthz answers during the outage",
        not probe.failures and health["samples"] > 0,
        "no failures",
        f"{shown(health)}; failures {probe.failures[:3]}",
    )
    findings.check(
        item,
        "carries on after the outage",
        None not in recovery.values(),
        "a call, an answer, a new version",
        f"first call {results['first_call_after_up_s']} s after the endpoint came back "
        f"(longest retry backoff scheduled {results['longest_backoff_s']} s), "
        f"first answer {results['first_answer_after_up_s']} s, first new version "
        f"{results['first_version_after_up_s']} s, all covered "
        f"{results['all_covered_after_up_s']} s",
    )
    findings.check(
        item,
        "no trajectory lost, all covered",
        report["acked_not_stored_count"] == 0
        and report["acked_not_covered_count"] == 0
        and len(slog.acked) == len(slog.sent)
        and report["latest_lineage_trajectories"] == len(slog.acked),
        f"{len(slog.sent)} stored and covered",
        f"{report['stored']} stored, {report['covered']} covered, lineage "
        f"{report['latest_lineage_trajectories']}, subsets {report['subsets']}",
    )
    findings.check(
        item,
        "no subset marked failed by the outage",
        results["subsets_failed"] == 0,
        "0 failed",
        f"{results['subsets_failed']} failed",
    )
    findings.check(item, "clean stop exits 0", exit_code == 0, "0", exit_code)
    return results


# -- 3. hostile bodies ------------------------------------------------------------


async def was_stored(client: httpx.AsyncClient, url: str, records: Sequence[bytes]) -> int:
    """How many of ``records`` (JSON lines) the daemon had stored: it answers those
    as duplicates. The others are stored now."""
    reply = await post(client, f"{url}/v1/trajectories", b"\n".join(records) + b"\n", JSONL)
    body = reply.json()
    if reply.status != 202 or not isinstance(body, dict):
        raise RuntimeError(f"checking what was stored: {reply.brief()}")
    return int(body["duplicate"])


def line(i: int, prefix: str) -> bytes:
    return json.dumps(record(i, prefix), separators=(",", ":")).encode()


async def deep_cases(
    client: httpx.AsyncClient, url: str, findings: Findings, depth: int
) -> dict[str, Any]:
    item = "bodies"
    out: dict[str, Any] = {}
    deep = deep_record(0, "deepl", depth)
    assert json_depth(deep) == depth, json_depth(deep)
    out["record_depth"] = json_depth(deep)
    # JSONL: good, good, good, deep, good.
    good = [line(i, "jl") for i in range(4)]
    body = b"\n".join([*good[:3], deep, good[3]]) + b"\n"
    reply = await post(client, f"{url}/v1/trajectories", body, JSONL)
    stored_good = await was_stored(client, url, good)
    stored_deep = await was_stored(client, url, [line(0, "deepl")])
    out["jsonl"] = {"reply": reply.json(), "status": reply.status, "good_stored": stored_good}
    out["jsonl"]["deep_stored"] = stored_deep
    parsed = reply.json() if isinstance(reply.json(), dict) else {}
    findings.check(
        item,
        f"JSONL: a {depth}-deep record beside 4 good",
        reply.status == 202
        and parsed.get("accepted") == 4
        and parsed.get("rejected") == 1
        and stored_good == 4
        and stored_deep == 0,
        "202, 4 stored, it refused alone",
        f"{reply.status}, {parsed.get('accepted')} accepted, {parsed.get('rejected')} rejected "
        f"{parsed.get('errors')}; good stored {stored_good}/4, deep stored {stored_deep}",
    )
    # A JSON array: good, good, deep, good; then the same with a record 100 deep.
    for label, record_depth, prefix in (("array", depth, "ja"), ("array100", 100, "jb")):
        deep_item = deep_record(0, prefix + "deep", record_depth)
        good = [line(i, prefix) for i in range(3)]
        body = b"[" + b",".join([good[0], good[1], deep_item, good[2]]) + b"]"
        reply = await post(
            client, f"{url}/v1/trajectories", body, {"content-type": "application/json"}
        )
        stored_good = await was_stored(client, url, good)
        parsed = reply.json() if isinstance(reply.json(), dict) else {}
        out[label] = {"status": reply.status, "reply": parsed, "good_stored": stored_good}
        findings.check(
            item,
            f"JSON array: a {record_depth}-deep record beside 3 good",
            reply.status == 202
            and parsed.get("accepted") == 3
            and parsed.get("rejected") == 1
            and stored_good == 3,
            "202, 3 stored, it refused alone",
            f"{reply.status}, {parsed.get('accepted')} accepted, {parsed.get('rejected')} rejected "
            f"{parsed.get('errors')}; good stored {stored_good}/3",
        )
    # Alone, as a single JSON object.
    reply = await post(
        client,
        f"{url}/v1/trajectories",
        deep_record(1, "deepo", depth),
        {"content-type": "application/json"},
    )
    parsed = reply.json() if isinstance(reply.json(), dict) else {}
    out["alone"] = {"status": reply.status, "reply": parsed}
    findings.check(
        item,
        f"a {depth}-deep record alone",
        reply.status in (202, 400, 413, 422) and parsed.get("accepted", 0) == 0,
        "refused, daemon unharmed",
        reply.brief(),
    )
    return out


async def big_cases(client: httpx.AsyncClient, url: str, findings: Findings) -> dict[str, Any]:
    item = "bodies"
    out: dict[str, Any] = {}
    # A good record, then 20 MiB of blank padding (blank lines are skipped): if the
    # size were not checked, the record would be stored.
    padding = b" " * (20 * MIB) + b"\n"
    reply = await post(client, f"{url}/v1/trajectories", line(0, "big") + b"\n" + padding, JSONL)
    stored = await was_stored(client, url, [line(0, "big")])
    out["declared"] = {"status": reply.status, "reply": reply.text[:200], "stored": stored}
    out["declared"]["seconds"] = round(reply.seconds, 2)
    findings.check(
        item,
        "20 MiB body with Content-Length",
        reply.status == 413 and stored == 0,
        "413, nothing stored",
        f"{reply.brief()} in {reply.seconds:.2f} s; its record stored: {stored}",
    )

    async def chunks() -> AsyncIterator[bytes]:
        yield line(1, "big") + b"\n"
        for _ in range(20):
            yield b" " * MIB
        yield b"\n"

    reply = await post(client, f"{url}/v1/trajectories", chunks(), JSONL)
    stored = await was_stored(client, url, [line(1, "big")])
    out["chunked"] = {"status": reply.status, "reply": reply.text[:200], "stored": stored}
    findings.check(
        item,
        "20 MiB body, chunked (no length)",
        reply.status == 413 and stored == 0,
        "413, nothing stored",
        f"{reply.brief()} in {reply.seconds:.2f} s; its record stored: {stored}",
    )
    # Not UTF-8: a good record, then a line with bytes that are no UTF-8.
    body = line(0, "utf") + b'\n{"id": "bad-\xff\xfe", "task": "x"}\n'
    reply = await post(client, f"{url}/v1/trajectories", body, JSONL)
    stored = await was_stored(client, url, [line(0, "utf")])
    out["utf8"] = {"status": reply.status, "reply": reply.text[:200], "stored": stored}
    findings.check(
        item,
        "invalid UTF-8",
        reply.status == 400 and stored == 0,
        "400, nothing stored",
        f"{reply.brief()}; its good record stored: {stored}",
    )
    return out


async def body_deadline_setting(folder: Path) -> dict[str, Any]:
    """Whether the 120 s body deadline can be set: a flag in --help, or a setting."""
    help_text = await trio.run_process(
        [str(FGO), "serve", "--help"], capture_stdout=True, check=False
    )
    flags = sorted(set(re.findall(r"--[a-z-]*body[a-z-]*", help_text.stdout.decode())))
    settings = folder / "body.toml"
    settings.write_text("body_seconds = 5\n")
    tried = await trio.run_process(
        [str(FGO), "serve", "--config", str(settings)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        cwd=folder,
    )
    message = tried.stderr.decode(errors="replace").strip().splitlines()
    return {
        "flags_with_body": flags,
        "setting_exit_code": tried.returncode,
        "setting_message": message[-1][:200] if message else "",
    }


async def trickle_cases(
    args: argparse.Namespace, client: httpx.AsyncClient, url: str, findings: Findings, folder: Path
) -> dict[str, Any]:
    item = "bodies"
    deadline = await body_deadline_setting(folder)
    configurable = any(f != "--max-body-bytes" for f in deadline["flags_with_body"]) or (
        deadline["setting_exit_code"] == 0
    )
    findings.info(
        item,
        "body deadline (120 s -> 408) configurable?",
        f"{'yes' if configurable else 'no'}: flags naming body {deadline['flags_with_body']}; "
        f"a settings file with body_seconds: exit {deadline['setting_exit_code']}, "
        f"{deadline['setting_message']!r}; the 408 itself is not exercised (it takes 120 s)",
    )
    pieces = 20
    statuses: list[Reply] = []

    async def trickle(k: int) -> None:
        body = line(k, "trickle") + b"\n"
        size = len(body)
        step = math.ceil(size / pieces)

        async def slowly() -> AsyncIterator[bytes]:
            for start in range(0, size, step):
                yield body[start : start + step]
                await trio.sleep(args.trickle / pieces)

        headers = {**JSONL, "content-length": str(size)}
        statuses.append(await post(client, f"{url}/v1/trajectories", slowly(), headers, 60))

    probe = HealthProbe()
    stop = trio.Event()
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(probe.run, client, url, stop, 0.2)
        async with trio.open_nursery() as tricklers:
            for k in range(args.tricklers):
                tricklers.start_soon(trickle, k)
        stop.set()
    took = time.perf_counter() - started
    accepted = sum(
        r.status == 202 and isinstance(r.json(), dict) and r.json().get("accepted") == 1
        for r in statuses
    )
    health = latency_summary(probe.seconds)
    findings.check(
        item,
        f"{args.tricklers} bodies trickled over {args.trickle:g} s",
        accepted == args.tricklers,
        "each 202, 1 accepted",
        f"{accepted}/{args.tricklers} accepted in {took:.1f} s; others "
        f"{[r.brief(80) for r in statuses if r.status != 202][:2]}",
    )
    findings.check(
        item,
        "/healthz while they trickle",
        not probe.failures and health["samples"] > 0,
        "answers throughout",
        f"{shown(health)}; failures {probe.failures[:3]}",
    )
    return {
        "deadline": deadline,
        "configurable": configurable,
        "tricklers": args.tricklers,
        "trickle_s": args.trickle,
        "accepted": accepted,
        "took_s": round(took, 2),
        "healthz": health,
        "healthz_failures": probe.failures,
    }


async def bulk_case(
    args: argparse.Namespace, client: httpx.AsyncClient, url: str, findings: Findings
) -> dict[str, Any]:
    item = "bodies"
    idle = HealthProbe()
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(idle.run, client, url, stop, 0.05)
        await trio.sleep(1.5)
        stop.set()
    lines: list[bytes] = []
    size = 0
    target = int(args.bulk_mib * MIB)
    while size < target:
        rec = json.dumps(record(len(lines), "bulk", steps=8, words=40), separators=(",", ":"))
        lines.append(rec.encode())
        size += len(lines[-1]) + 1
    body = b"\n".join(lines) + b"\n"
    stored_before = (await metrics(client, url)).get("trajectories_total", 0)
    probe = HealthProbe()
    stop = trio.Event()
    reply: Reply | None = None

    async def send() -> None:
        nonlocal reply
        try:
            reply = await post(client, f"{url}/v1/trajectories", body, JSONL, 600)
        finally:
            stop.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(probe.run, client, url, stop, 0.02)
        nursery.start_soon(send)
    assert reply is not None
    parsed = reply.json() if isinstance(reply.json(), dict) else {}
    stored = int((await metrics(client, url)).get("trajectories_total", 0) - stored_before)
    health_after = (await client.get(f"{url}/healthz")).json()
    findings.check(
        item,
        f"the {len(body) / MIB:.1f} MiB POST stored",
        reply.status == 202 and parsed.get("accepted") == len(lines) == stored,
        f"202, {len(lines)} accepted and stored",
        f"{reply.status}, {parsed.get('accepted')} accepted, fgo_trajectories_total +{stored}; "
        f"/healthz then: {health_after}",
    )
    health = latency_summary(probe.seconds)
    baseline = latency_summary(idle.seconds)
    limit_ms = args.healthz_limit * 1000
    findings.check(
        item,
        f"/healthz while a {len(body) / MIB:.1f} MiB POST is parsed",
        not probe.failures and health["samples"] > 0 and (health["max_ms"] or 0.0) <= limit_ms,
        f"answers, max <= {limit_ms:.0f} ms",
        f"{shown(health)} (idle: median {baseline['median_ms']} ms, max "
        f"{baseline['max_ms']} ms); POST {reply.status} in {reply.seconds:.1f} s, "
        f"{parsed.get('accepted')} of {len(lines)} accepted; failures {probe.failures[:3]}",
    )
    return {
        "body_mib": round(len(body) / MIB, 2),
        "records": len(lines),
        "post_status": reply.status,
        "post_s": round(reply.seconds, 2),
        "accepted": parsed.get("accepted"),
        "rejected": parsed.get("rejected"),
        "stored": stored,
        "healthz_after": health_after,
        "healthz": health,
        "healthz_idle": baseline,
        "healthz_failures": probe.failures,
    }


async def item_bodies(args: argparse.Namespace, folder: Path, findings: Findings) -> dict[str, Any]:
    item = "bodies"
    store = folder / "fgo.db"
    endpoint = Endpoint(latency=args.latency)
    results: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        llm_url = await endpoint.start(nursery)
        limits = httpx.Limits(max_connections=args.tricklers + 8)
        async with httpx.AsyncClient(timeout=httpx.Timeout(60), limits=limits) as client:
            daemon = await start_daemon(args, store, llm_url, folder / "serve.log")
            try:
                results["deep"] = await deep_cases(client, daemon.url, findings, 1100)
                results["big"] = await big_cases(client, daemon.url, findings)
                results["trickle"] = await trickle_cases(args, client, daemon.url, findings, folder)
                results["bulk"] = await bulk_case(args, client, daemon.url, findings)
                alive = daemon.alive()
                exit_code, stop_s = await stop_daemon(daemon)
            finally:
                kill_leftovers()
        nursery.cancel_scope.cancel()
    results["alive_after_all"] = alive
    results["exit_code"] = exit_code
    results["stop_s"] = round(stop_s, 2)
    results["warnings"] = log_events(folder / "serve.log")
    findings.check(
        item,
        "daemon survives, stops cleanly",
        alive and exit_code == 0,
        "alive, exit 0",
        f"alive {alive}, exit {exit_code} after SIGTERM in {stop_s:.1f} s; "
        f"warnings {results['warnings']}",
    )
    return results


# -- 4. the token -----------------------------------------------------------------


def openapi_routes(path: Path) -> list[tuple[str, str, bool]]:
    """(method, path, open) for each operation: open when it declares ``security: []``."""
    spec = yaml.safe_load(path.read_text())
    routes = []
    for route, operations in spec["paths"].items():
        for method, operation in operations.items():
            if method in ("get", "post", "put", "delete", "patch"):
                routes.append((method.upper(), route, operation.get("security") == []))
    return routes


async def call(
    client: httpx.AsyncClient, method: str, url: str, headers: dict[str, str], body: bytes
) -> tuple[int, str, str]:
    """(status, WWW-Authenticate, body) of one request; an event stream is closed
    after its first line (which is the body then)."""
    if url.endswith("/v1/events"):
        async with client.stream(method, url, headers=headers, timeout=10) as response:
            first = ""
            if response.status_code == 200:
                async for text in response.aiter_lines():
                    first = text
                    break
            else:
                first = (await response.aread()).decode(errors="replace")
            return response.status_code, response.headers.get("www-authenticate", ""), first
    response = await client.request(
        method, url, headers=headers, content=body if method == "POST" else None, timeout=30
    )
    return response.status_code, response.headers.get("www-authenticate", ""), response.text


async def item_token(args: argparse.Namespace, folder: Path, findings: Findings) -> dict[str, Any]:
    item = "token"
    token = "rt-" + hashlib.sha256(str(args.seed).encode()).hexdigest()[:24]
    decoy = "decoy-fgo-token"
    store = folder / "fgo.db"
    endpoint = Endpoint(latency=args.latency)
    routes = openapi_routes(ROOT / "protocols" / "openapi.yaml")
    right = {"Authorization": f"Bearer {token}"}
    credentials: list[tuple[str, dict[str, str]]] = [
        ("none", {}),
        ("wrong", {"Authorization": "Bearer not-the-token"}),
        ("decoy $FGO_TOKEN", {"Authorization": f"Bearer {decoy}"}),
        ("no scheme", {"Authorization": token}),
        ("prefix", {"Authorization": f"Bearer {token[:-1]}"}),
        ("basic", {"Authorization": f"Basic {token}"}),
        ("right", right),
    ]
    matrix: dict[str, dict[str, int]] = {}
    challenges: dict[str, bool] = {}
    answers: dict[str, str] = {}  # "route credential": the answer (right token; open routes)
    body = jsonl([record(i, "tok") for i in range(2)])
    async with trio.open_nursery() as nursery:
        llm_url = await endpoint.start(nursery)
        async with httpx.AsyncClient(timeout=httpx.Timeout(30)) as client:
            daemon = await start_daemon(
                args,
                store,
                llm_url,
                folder / "serve.log",
                extra=["--token-env", "RT_TOKEN"],
                env={"RT_TOKEN": token, "FGO_TOKEN": decoy},
            )
            try:
                seed = await post(
                    client,
                    f"{daemon.url}/v1/trajectories",
                    jsonl([record(i, "seed") for i in range(3)]),
                    {**JSONL, **right},
                )
                if seed.status != 202:
                    raise RuntimeError(f"seeding with the right token: {seed.brief()}")
                await wait_settled(client, daemon, 3, args.drain_timeout, right)
                for method, route, is_open in routes:
                    name = f"{method} {route}"
                    matrix[name] = {}
                    url = daemon.url + route.replace("{n}", "1")
                    for label, headers in credentials:
                        status, challenge, text = await call(client, method, url, headers, body)
                        matrix[name][label] = status
                        if status == 401:
                            challenges[f"{name} {label}"] = challenge == "Bearer"
                        if label == "right" or (label == "none" and is_open):
                            answers[f"{name} {label}"] = text[:100]
                unknown, _, _ = await call(client, "GET", f"{daemon.url}/v1/nope", {}, b"")
                versions = (
                    await client.get(f"{daemon.url}/v1/module/versions", headers=right)
                ).json()["versions"]
                again = await post(
                    client, f"{daemon.url}/v1/trajectories", body, {**JSONL, **right}
                )
                exit_code, _ = await stop_daemon(daemon)
            finally:
                kill_leftovers()
        nursery.cancel_scope.cancel()
    rollbacks = [v for v in versions if v["lineage"].get("rollback_of") is not None]
    again_body = again.json() if isinstance(again.json(), dict) else {}
    for method, route, is_open in routes:
        name = f"{method} {route}"
        row = matrix[name]
        refused = {k: v for k, v in row.items() if k != "right"}
        shown_row = ", ".join(f"{k} {v}" for k, v in row.items())
        if is_open:
            findings.check(
                item,
                f"{name} (open by design)",
                all(v == 200 for v in row.values()),
                "200 with any token or none",
                shown_row,
            )
        else:
            findings.check(
                item,
                name,
                all(v == 401 for v in refused.values()) and row["right"] not in (401, 403),
                "401 without the right token",
                shown_row,
            )
    findings.check(
        item,
        "401s carry WWW-Authenticate: Bearer",
        bool(challenges) and all(challenges.values()),
        "all",
        f"{sum(challenges.values())}/{len(challenges)}",
    )
    # The matrix POSTed the same two records with every credential, the right one
    # last: it must find them new (the refused POSTs stored nothing), and only the
    # right rollback may have made a version.
    posted = answers.get("POST /v1/trajectories right", "")
    try:
        right_post = json.loads(posted)
    except ValueError:
        right_post = {}
    findings.check(
        item,
        "refused writes changed nothing",
        isinstance(right_post, dict)
        and right_post.get("accepted") == 2
        and again_body.get("duplicate") == 2
        and len(rollbacks) == 1,
        "right POST accepts 2, 1 rollback",
        f"the right POST after 6 refused: {posted}; sent again: duplicate "
        f"{again_body.get('duplicate')}; rollback versions {[v['version'] for v in rollbacks]}",
    )
    findings.info(item, "undeclared path, no token", f"GET /v1/nope -> {unknown}")
    findings.info(item, "what /healthz tells without a token", answers.get("GET /healthz none", ""))
    findings.check(item, "clean stop exits 0", exit_code == 0, "0", exit_code)
    return {
        "routes": [f"{m} {r}{' (open)' if o else ''}" for m, r, o in routes],
        "matrix": matrix,
        "challenges_ok": sum(challenges.values()),
        "challenges": len(challenges),
        "rollback_versions": len(rollbacks),
        "right_answers": answers,
        "resent_reply": again_body,
        "undeclared_path_status": unknown,
        "exit_code": exit_code,
    }


# -- the round --------------------------------------------------------------------


Item = Callable[[argparse.Namespace, Path, Findings], Awaitable[dict[str, Any]]]
ITEMS: dict[str, Item] = {
    "kill9": item_kill9,
    "outage": item_outage,
    "bodies": item_bodies,
    "token": item_token,
}


async def red_team(args: argparse.Namespace, folder: Path) -> tuple[Findings, dict[str, Any]]:
    findings = Findings()
    figures: dict[str, Any] = {}
    started = time.perf_counter()
    for name in args.only or list(ITEMS):
        where = folder / name
        where.mkdir()
        began = time.perf_counter()
        print(f"{name}: running ...", flush=True)
        try:
            with trio.fail_after(args.item_timeout):
                figures[name] = await ITEMS[name](args, where, findings)
        except Exception as e:  # report it as a finding, then go on with the next item
            figures[name] = {"error": f"{type(e).__name__}: {e}"}
            findings.check(name, "the item ran to its end", False, "no error", figures[name])
        finally:
            kill_leftovers()
        figures[name]["seconds"] = round(time.perf_counter() - began, 1)
        print(f"{name}: done in {figures[name]['seconds']} s", flush=True)
    figures["wall_s"] = round(time.perf_counter() - started, 1)
    figures["verdicts"] = findings.counts()
    figures["settings"] = {
        k: v for k, v in vars(args).items() if k != "keep" and not isinstance(v, Path)
    }
    return findings, figures


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--only", action="append", choices=list(ITEMS), help="run this item (repeatable)"
    )
    parser.add_argument("--rounds", type=int, default=10, help="kill9: SIGKILLs")
    parser.add_argument("--seed", type=int, default=1, help="kill9: when the kills come")
    parser.add_argument("--count", type=int, default=400, help="kill9: trajectories")
    parser.add_argument("--batch", type=int, default=20, help="trajectories per POST")
    parser.add_argument("--pace", type=float, default=0.3, help="seconds between two POSTs")
    parser.add_argument("--kill-min", type=float, default=0.2, help="kill9: earliest kill (s)")
    parser.add_argument("--kill-max", type=float, default=2.0, help="kill9: latest kill (s)")
    parser.add_argument(
        "--post-kill-delay",
        type=float,
        default=0.03,
        help="kill9: every third kill comes this long at most after a POST starts",
    )
    parser.add_argument(
        "--margin",
        type=float,
        default=0.5,
        help="kill9: a reply this close before a kill may be paid again",
    )
    parser.add_argument("--latency", type=float, default=0.2, help="fake LLM seconds per reply")
    parser.add_argument("--concurrency", type=int, default=4, help="daemon --max-concurrency")
    parser.add_argument("--outage", type=float, default=10.0, help="outage: seconds down")
    parser.add_argument("--outage-count", type=int, default=200, help="outage: trajectories")
    parser.add_argument("--trickle", type=float, default=10.0, help="bodies: seconds per trickle")
    parser.add_argument("--tricklers", type=int, default=20, help="bodies: concurrent tricklers")
    parser.add_argument("--bulk-mib", type=float, default=15.0, help="bodies: big POST size")
    parser.add_argument(
        "--healthz-limit", type=float, default=1.0, help="bodies: most seconds /healthz may take"
    )
    parser.add_argument("--drain-timeout", type=float, default=180.0, help="seconds to settle")
    parser.add_argument(
        "--item-timeout", type=float, default=300.0, help="seconds an item may take in all"
    )
    parser.add_argument(
        "--keep", type=Path, metavar="DIR", help="keep stores and logs in DIR (new or empty)"
    )
    args = parser.parse_args(argv)
    if args.kill_min > args.kill_max or min(args.rounds, args.count, args.batch) < 1:
        parser.error("need --kill-min <= --kill-max and positive --rounds, --count, --batch")
    if args.bulk_mib >= 16:
        parser.error("--bulk-mib must stay under the daemon's 16 MiB body limit")
    return args


def interrupted(signum: int, frame: object) -> None:
    """SIGTERM as Ctrl-C, so that the daemons started are killed on the way out."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, interrupted)
    if not FGO.exists():
        raise SystemExit(f"{FGO} does not exist: run this with the virtualenv's python")
    try:
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            if any(args.keep.iterdir()):
                raise SystemExit(f"--keep {args.keep}: the folder is not empty")
            findings, figures = trio.run(red_team, args, args.keep)
        else:
            with tempfile.TemporaryDirectory(prefix="redteam-serve-") as folder:
                findings, figures = trio.run(red_team, args, Path(folder))
    finally:
        kill_leftovers()
    print()
    print(findings.table())
    print(f"(the whole round took {figures['wall_s']:.0f} s; verdicts {figures['verdicts']})")
    print(json.dumps(figures, sort_keys=True, default=str))
    return figures


if __name__ == "__main__":
    main()
