#!/usr/bin/env python3
"""Measure ``fgo serve``: sustained HTTP ingest, memory over a long stream, publish latency.

The daemon runs as a real ``fgo serve`` subprocess (``python -m
fgo_actors._cli serve``) on 127.0.0.1 with a store in a temporary folder; this
process runs a zero-latency FakeLLMServer on loopback for it and the HTTP
clients. A subprocess, rather than ``open_optimizer`` + ``serve_http`` in this
trio run, because memory is the point: its RSS (``VmRSS``) and peak RSS
(``VmHWM``) from ``/proc/PID/status`` count the daemon alone, not the clients,
the generated trajectories or the fake server's request log, and it is the
very command users run, signals and logging included. The price is that the
two processes share the machine's cores; their CPU seconds are printed so the
reader can see which one was the bottleneck.

Three figures:

a. Ingest rate. ``--clients`` concurrent httpx clients POST
   ``/v1/trajectories`` with JSONL bodies of ``--batch`` synthetic
   trajectories (deterministic, like the test-suite's ``make_trajectories``;
   size set by ``--steps`` and ``--words``) until ``--count`` are accepted. A
   429 is honoured: the client sleeps ``Retry-After`` and sends the same batch
   again; the 429s and the seconds spent waiting are counted. A POST whose
   connection breaks before any answer (the daemon can answer 429 before it
   reads the body, then close the connection) is sent again too (ingest is
   idempotent by id) and counted. Each accepted record has been validated,
   rendered, counted with tiktoken and written to SQLite before the 202 comes
   back. Meanwhile the daemon optimizes against the fake server in the same
   process, so subsets, forest merges, folds and publications run during the
   stream too; their numbers are printed. Once the daemon's backlog is full
   (10,000 stored trajectories not yet handed to the packer, or 8 sealed
   subsets waiting), ingest can only go as fast as the optimizer pipeline
   behind it: that is the sustained rate. Trajectories/s over the whole
   stream and per ``--block`` (a tenth of the count by default), and
   trajectories/s from the first POST to the version that counts them all.

b. Memory. The daemon's RSS and peak RSS after every ``--block`` trajectories,
   as a table, and the ratios RSS(last block) / RSS(first block) and peak(last)
   / peak(first): flat memory means about 1. The store's size on disk too.

c. Publish latency. When the stream has drained (every trajectory is in a
   published version; the time that takes after the last 202 is printed as
   well), ``--latency-samples`` single trajectories are posted one at a time,
   and each is timed from just before its POST to the ``publish`` event on
   ``/v1/events`` whose lineage counts it. With a zero-latency LLM server this
   is ``--max-wait`` (a lone trajectory waits that long before its subset is
   sealed) plus the daemon's own work: one optimize call, the forest's carry
   merges and the fold of the forest's trees into one module (about log2 of
   the subsets so far), each a zero-latency LLM round trip. ``--max-wait`` and
   ``--publish-interval`` are printed beside the figure because they set its
   floor. It is measured on a quiet daemon: during the stream the table's
   ``versions`` column shows how rarely the daemon publishes at all. A fold
   whose module equals the last version publishes nothing (an ``unchanged``
   event); such samples are counted, not timed.

The default count is 30,000 trajectories of about 470 tokens (1.3 KB of JSON)
each: about 4 minutes on 2 cores. The issue's 100,000 (``--count 100000``)
took 24 minutes there (stream 1,169 s, drain 234 s), because the daemon's
pipeline slows down as the store grows (the ingest rate per 10,000 fell from
about 2,000/s to 45/s). ``--quick`` streams 10,000: about a minute. The
figures are printed as text, then all of them as one JSON line. Run it from
the repository root::

    .venv/bin/python scripts/bench_daemon.py
    .venv/bin/python scripts/bench_daemon.py --quick
    .venv/bin/python scripts/bench_daemon.py --count 100000
    .venv/bin/python scripts/bench_daemon.py --count 50000 --batch 1000 --clients 8
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from fgo_actors.testing import FakeLLMServer, synthetic_trajectory

ROOT = Path(__file__).resolve().parent.parent
MAX_CONNECTION_RETRIES = 20


# -- synthetic trajectories -----------------------------------------------------


def make_record(
    i: int, *, steps: int, words: int, groups: int = 5, prefix: str = "t"
) -> dict[str, Any]:
    """Trajectory ``i`` as JSON (``fgo_actors.testing.synthetic_trajectory``)."""
    trajectory = synthetic_trajectory(
        i, steps=steps, words=words, groups=groups, prefix=prefix, width=7
    )
    return trajectory.to_json()


def jsonl(records: Sequence[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records).encode()


# -- the daemon's process -------------------------------------------------------


def proc_memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of process ``pid`` in KiB: resident now, and its peak."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values["VmRSS"], values["VmHWM"]


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads) so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rpartition(")")[2].split()
    # After "pid (comm)": state is field 3, utime 14, stime 15 (1-based).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@attrs.define
class Daemon:
    process: trio.Process
    url: str
    log: Path

    def memory_kib(self) -> tuple[int, int]:
        return proc_memory_kib(self.process.pid)

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.process.pid)

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"fgo serve exited with {self.process.returncode}:\n{tail}")


async def read_listening_line(stream: trio.abc.ReceiveStream) -> str:
    """The base URL from ``fgo serve``'s first line of output."""
    buffer = b""
    while b"\n" not in buffer:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        buffer += chunk
    line = buffer.decode(errors="replace").splitlines()[0] if buffer else ""
    m = re.fullmatch(r"fgo serve: listening on (http://\S+)", line)
    if m is None:
        raise RuntimeError(f"fgo serve did not report its address; it printed {line!r}")
    return m.group(1)


def daemon_command(store: Path, llm_url: str, args: argparse.Namespace) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fgo_actors._cli",
        "serve",
        "--store",
        str(store),
        "--port",
        "0",
        "--base-url",
        llm_url,
        "--model",
        "bench",
        "--max-wait",
        str(args.max_wait),
        "--publish-interval",
        str(args.publish_interval),
        "--max-concurrency",
        str(args.llm_concurrency),
        "--context-tokens",
        str(args.context_tokens),
        "--grace",
        "5",
        "--log-json",
    ]


async def stop_process(process: trio.Process) -> int:
    """SIGTERM (the daemon's clean stop), then SIGKILL after 30 s; the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(30):
            return await process.wait()
        process.kill()
    return await process.wait()


# -- metrics --------------------------------------------------------------------


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text as {'name{labels}': value}, without the ``fgo_`` prefix."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name.removeprefix("fgo_")] = float(value)
    return out


async def get_metrics(client: httpx.AsyncClient, url: str) -> dict[str, float]:
    response = await client.get(f"{url}/metrics")
    response.raise_for_status()
    return parse_metrics(response.text)


def store_counts(path: Path) -> dict[str, int]:
    """Subsets, merges and versions, read from the store (read-only)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:

        def one(sql: str) -> int:
            return int(db.execute(sql).fetchone()[0])

        return {
            "trajectories": one("SELECT COUNT(*) FROM trajectories"),
            "subsets": one("SELECT COUNT(*) FROM subsets"),
            "subsets_done": one("SELECT COUNT(*) FROM subsets WHERE state = 'done'"),
            "forest_merges": one(
                "SELECT COUNT(*) FROM nodes WHERE role = 'forest' AND kind != 'leaf'"
            ),
            "fold_merges": one("SELECT COUNT(*) FROM nodes WHERE role = 'fold'"),
            "versions": one("SELECT COUNT(*) FROM versions WHERE status = 'published'"),
            # Paid calls reach the server; a cache hit (two subsets that made
            # the same request) is logged as a call too, but sent nowhere.
            "llm_calls": one("SELECT COUNT(*) FROM llm_calls WHERE cached = 0"),
            "llm_cache_hits": one("SELECT COUNT(*) FROM llm_calls WHERE cached = 1"),
        }
    finally:
        db.close()


def disk_bytes(store: Path) -> int:
    """The store's files: the database, its WAL and shared-memory index."""
    return sum(p.stat().st_size for p in store.parent.glob(store.name + "*"))


# -- a/b. the stream ------------------------------------------------------------


@attrs.frozen
class Block:
    trajectories: int
    elapsed: float  # since the first POST
    rate: float  # trajectories/s within this block
    rss_kib: int
    hwm_kib: int
    daemon_cpu_s: float
    subsets_done: int
    versions: int
    backlog: int  # accepted, not yet in a sealed subset


@attrs.define
class StreamResult:
    accepted: int = 0
    posts: int = 0
    throttled: int = 0  # 429s
    throttled_wait_s: float = 0.0
    connection_retries: int = 0
    started: float = 0.0
    finished: float = 0.0
    blocks: list[Block] = attrs.field(factory=list)
    payload_bytes: int = 0


async def stream(
    client: httpx.AsyncClient, daemon: Daemon, args: argparse.Namespace
) -> StreamResult:
    """POST ``args.count`` trajectories with ``args.clients`` concurrent clients."""
    result = StreamResult()
    batches = iter(range(0, args.count, args.batch))
    next_block = args.block
    cpu_at_start = daemon.cpu_seconds()
    last_block_time = 0.0
    last_block_count = 0
    block_lock = trio.Lock()

    async def record_blocks() -> None:
        nonlocal next_block, last_block_time, last_block_count
        async with block_lock:
            while result.accepted >= next_block or (
                result.accepted == args.count and last_block_count < args.count
            ):
                now = time.perf_counter() - result.started
                rss, hwm = daemon.memory_kib()
                metrics = await get_metrics(client, daemon.url)
                done = result.accepted
                result.blocks.append(
                    Block(
                        trajectories=done,
                        elapsed=now,
                        rate=(done - last_block_count) / max(now - last_block_time, 1e-9),
                        rss_kib=rss,
                        hwm_kib=hwm,
                        daemon_cpu_s=daemon.cpu_seconds() - cpu_at_start,
                        subsets_done=int(metrics.get('subsets_total{outcome="done"}', 0)),
                        versions=int(metrics.get('versions_total{status="published"}', 0)),
                        backlog=int(metrics.get('queue_depth{queue="unpacked"}', 0)),
                    )
                )
                last_block_time, last_block_count = now, done
                next_block = (done // args.block + 1) * args.block
                block = result.blocks[-1]
                print(
                    f"  {done:>8}  {now:>7.1f} s  {block.rate:>10.1f}/s  "
                    f"{rss / 1024:>10.1f} MiB  {hwm / 1024:>8.1f} MiB  "
                    f"{block.backlog:>8}  {block.subsets_done:>7}  {block.versions:>8}",
                    flush=True,
                )

    async def client_task() -> None:
        for start in batches:
            n = min(args.batch, args.count - start)
            body = jsonl(
                [
                    make_record(i, steps=args.steps, words=args.words)
                    for i in range(start, start + n)
                ]
            )
            while True:
                daemon.check_alive()
                try:
                    response = await client.post(
                        f"{daemon.url}/v1/trajectories",
                        content=body,
                        headers={"content-type": "application/x-ndjson"},
                    )
                except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as e:
                    # The daemon answers 429 before reading the body, then closes the
                    # connection with the body unread: the client may see a reset
                    # instead of the 429. Ingest is idempotent by id: send it again.
                    result.connection_retries += 1
                    if result.connection_retries > MAX_CONNECTION_RETRIES:
                        raise RuntimeError("too many broken connections") from e
                    continue
                result.posts += 1
                if response.status_code == 429:
                    wait = float(response.headers.get("retry-after", "1"))
                    result.throttled += 1
                    result.throttled_wait_s += wait
                    await trio.sleep(wait)
                    continue
                if response.status_code != 202:
                    raise RuntimeError(f"POST answered {response.status_code}: {response.text}")
                reply = response.json()
                if reply["accepted"] + reply["duplicate"] != n or reply["rejected"]:
                    raise RuntimeError(f"batch at {start}: {reply}")
                break
            result.accepted += n
            result.payload_bytes += len(body)
            result.finished = time.perf_counter()
            await record_blocks()

    result.started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(args.clients):
            nursery.start_soon(client_task)
    return result


async def wait_drained(client: httpx.AsyncClient, daemon: Daemon, total: int) -> None:
    """Return once a published version counts all ``total`` trajectories."""
    while True:
        daemon.check_alive()
        response = await client.get(f"{daemon.url}/v1/module")
        if response.status_code == 200 and response.json()["lineage"]["trajectories"] >= total:
            return
        await trio.sleep(0.05)


# -- c. publish latency ---------------------------------------------------------


async def follow_events(
    client: httpx.AsyncClient,
    url: str,
    out: trio.MemorySendChannel[dict[str, Any]],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Forward the daemon's ``publish`` and ``unchanged`` SSE events to ``out``."""
    with out:
        async with client.stream("GET", f"{url}/v1/events", timeout=None) as response:
            response.raise_for_status()
            lines = response.aiter_lines()
            first = await anext(lines)  # the ": fgo events" comment: subscribed
            assert first.startswith(":"), first
            task_status.started()
            kind = ""
            async for line in lines:
                if line.startswith("event: "):
                    kind = line[len("event: ") :]
                elif line.startswith("data: ") and kind in ("publish", "unchanged"):
                    await out.send(json.loads(line[len("data: ") :]))


@attrs.define
class LatencyResult:
    seconds: list[float] = attrs.field(factory=list)  # POST start -> publish event
    post_seconds: list[float] = attrs.field(factory=list)  # the POST's round trip alone
    unchanged: int = 0


async def publish_latency(
    client: httpx.AsyncClient, daemon: Daemon, args: argparse.Namespace, already: int
) -> LatencyResult:
    result = LatencyResult()
    send, receive = trio.open_memory_channel[dict[str, Any]](64)
    async with trio.open_nursery() as nursery:
        await nursery.start(follow_events, client, daemon.url, send)
        with receive:
            for k in range(args.latency_samples):
                body = jsonl([make_record(k, steps=args.steps, words=args.words, prefix="latency")])
                await trio.sleep(args.latency_gap)  # let the last publication settle
                started = time.perf_counter()
                response = await client.post(f"{daemon.url}/v1/trajectories", content=body)
                posted = time.perf_counter()
                if response.status_code != 202 or response.json()["accepted"] != 1:
                    raise RuntimeError(f"latency POST: {response.status_code} {response.text}")
                want = already + k + 1
                with trio.fail_after(args.latency_timeout):
                    while True:
                        event = await receive.receive()
                        if event["type"] == "unchanged":
                            result.unchanged += 1
                            break
                        if event.get("trajectories", 0) >= want:
                            result.seconds.append(time.perf_counter() - started)
                            result.post_seconds.append(posted - started)
                            break
        nursery.cancel_scope.cancel()
    return result


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


# -- the whole run --------------------------------------------------------------


@attrs.define
class LLM:
    """The zero-latency fake server. It logs every request with its prompt, which
    would grow this process by gigabytes over a long stream: count and forget."""

    server: FakeLLMServer = attrs.field(factory=lambda: FakeLLMServer(latency=None))
    requests: int = 0

    def forget(self) -> int:
        self.requests += len(self.server.requests)
        self.server.requests.clear()
        return self.requests

    async def forget_every(self, seconds: float) -> None:
        while True:
            await trio.sleep(seconds)
            self.forget()


async def bench(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    store = folder / "fgo.db"
    log = folder / "serve.log"
    llm = LLM()
    bench_cpu_start = self_cpu_seconds()
    run_started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        llm_url: str = await nursery.start(llm.server.serve)
        nursery.start_soon(llm.forget_every, 1.0)
        with log.open("wb") as err:
            process = await trio.lowlevel.open_process(
                daemon_command(store, llm_url, args),
                stdout=subprocess.PIPE,
                stderr=err,
                cwd=ROOT,
            )
        assert process.stdout is not None
        try:
            with trio.fail_after(60):
                url = await read_listening_line(process.stdout)
            daemon = Daemon(process, url, log)
            rss_idle, _ = daemon.memory_kib()
            limits = httpx.Limits(max_connections=args.clients + 2)
            async with httpx.AsyncClient(
                timeout=httpx.Timeout(10, read=300), limits=limits
            ) as client:
                print(
                    f"stream: {args.count} trajectories, {args.clients} clients x "
                    f"{args.batch} per POST; daemon RSS at start {rss_idle / 1024:.1f} MiB",
                    flush=True,
                )
                print(
                    f"  {'stored':>8}  {'elapsed':>9}  {'block rate':>12}  {'daemon RSS':>14}  "
                    f"{'peak RSS':>12}  {'unpacked':>8}  {'subsets':>7}  {'versions':>8}",
                    flush=True,
                )
                daemon_cpu_start = daemon.cpu_seconds()
                streamed = await stream(client, daemon, args)
                stream_cpu = daemon.cpu_seconds() - daemon_cpu_start
                bench_cpu = self_cpu_seconds() - bench_cpu_start
                print("  draining: waiting for a version that counts every trajectory", flush=True)
                with trio.fail_after(args.drain_timeout):
                    await wait_drained(client, daemon, args.count)
                drain_s = time.perf_counter() - streamed.finished
                after_stream = await trio.to_thread.run_sync(store_counts, store)
                metrics = await get_metrics(client, daemon.url)
                rss_drained, hwm_drained = daemon.memory_kib()
                print(f"  measuring publish latency ({args.latency_samples} samples)", flush=True)
                latency = await publish_latency(client, daemon, args, args.count)
                rss_end, hwm_end = daemon.memory_kib()
                daemon_cpu_total = daemon.cpu_seconds()
        finally:
            with trio.CancelScope(shield=True):
                exit_code = await stop_process(process)
                await process.stdout.aclose()
        nursery.cancel_scope.cancel()
    final = await trio.to_thread.run_sync(store_counts, store)
    return summarize(
        args,
        streamed=streamed,
        drain_s=drain_s,
        after_stream=after_stream,
        final=final,
        metrics=metrics,
        latency=latency,
        memory={
            "rss_idle_kib": rss_idle,
            "rss_drained_kib": rss_drained,
            "hwm_drained_kib": hwm_drained,
            "rss_end_kib": rss_end,
            "hwm_end_kib": hwm_end,
        },
        cpu={
            "daemon_stream_s": stream_cpu,
            "bench_stream_s": bench_cpu,
            "daemon_total_s": daemon_cpu_total,
        },
        llm_requests=llm.forget(),
        run_s=time.perf_counter() - run_started,
        disk=disk_bytes(store),
        exit_code=exit_code,
    )


def summarize(
    args: argparse.Namespace,
    *,
    streamed: StreamResult,
    drain_s: float,
    after_stream: dict[str, int],
    final: dict[str, int],
    metrics: dict[str, float],
    latency: LatencyResult,
    memory: dict[str, int],
    cpu: dict[str, float],
    llm_requests: int,
    run_s: float,
    disk: int,
    exit_code: int,
) -> dict[str, Any]:
    wall = streamed.finished - streamed.started
    blocks = streamed.blocks
    first, last = blocks[0], blocks[-1]
    return {
        "settings": {
            "count": args.count,
            "batch": args.batch,
            "clients": args.clients,
            "block": args.block,
            "steps": args.steps,
            "words": args.words,
            "max_wait_s": args.max_wait,
            "publish_interval_s": args.publish_interval,
            "llm_concurrency": args.llm_concurrency,
            "context_tokens": args.context_tokens,
        },
        "ingest": {
            "trajectories": streamed.accepted,
            "wall_s": round(wall, 2),
            "trajectories_per_s": round(streamed.accepted / wall, 1),
            "block_rates": [round(b.rate, 1) for b in blocks],
            "block_rate_min": round(min(b.rate for b in blocks), 1),
            "block_rate_max": round(max(b.rate for b in blocks), 1),
            "mib_per_s": round(streamed.payload_bytes / wall / 2**20, 2),
            "bytes_per_trajectory": round(streamed.payload_bytes / streamed.accepted),
            "posts": streamed.posts,
            "throttled_429": streamed.throttled,
            "throttled_wait_s": round(streamed.throttled_wait_s, 1),
            "connection_retries": streamed.connection_retries,
            "drain_s": round(drain_s, 2),
            # Trajectories/s from the first POST to the version that counts them all.
            "published_per_s": round(streamed.accepted / (wall + drain_s), 1),
            "daemon_cpu_s": round(cpu["daemon_stream_s"], 1),
            "bench_cpu_s": round(cpu["bench_stream_s"], 1),
            "daemon_cpu_ms_per_trajectory": round(
                cpu["daemon_stream_s"] / streamed.accepted * 1000, 3
            ),
        },
        "pipeline_after_stream": {
            **after_stream,
            "events_dropped": int(metrics.get("events_dropped_total", 0)),
            "forest_trees": int(metrics.get("forest_trees", 0)),
        },
        "memory": {
            "rss_idle_kib": memory["rss_idle_kib"],
            "blocks": [
                {"trajectories": b.trajectories, "rss_kib": b.rss_kib, "hwm_kib": b.hwm_kib}
                for b in blocks
            ],
            "rss_first_block_kib": first.rss_kib,
            "rss_last_block_kib": last.rss_kib,
            "hwm_last_block_kib": last.hwm_kib,
            "rss_ratio_last_first": round(last.rss_kib / first.rss_kib, 3),
            "hwm_ratio_last_first": round(last.hwm_kib / first.hwm_kib, 3),
            "rss_drained_kib": memory["rss_drained_kib"],
            "peak_rss_end_kib": memory["hwm_end_kib"],
            "store_disk_bytes": disk,
        },
        "latency": {
            "samples": len(latency.seconds),
            "unchanged": latency.unchanged,
            "p50_s": round(statistics.median(latency.seconds), 4) if latency.seconds else None,
            "p95_s": round(percentile(latency.seconds, 95), 4) if latency.seconds else None,
            "max_s": round(max(latency.seconds), 4) if latency.seconds else None,
            "post_p50_s": round(statistics.median(latency.post_seconds), 4)
            if latency.post_seconds
            else None,
            "max_wait_s": args.max_wait,
            "publish_interval_s": args.publish_interval,
            "forest_trees": int(metrics.get("forest_trees", 0)),
        },
        "final": {**final, "llm_requests": llm_requests, "daemon_exit_code": exit_code},
        "daemon_cpu_total_s": round(cpu["daemon_total_s"], 1),
        "run_s": round(run_s, 1),
    }


def report(r: dict[str, Any]) -> None:
    ing, mem, lat, pipe = r["ingest"], r["memory"], r["latency"], r["pipeline_after_stream"]
    print(
        f"a. ingest: {ing['trajectories']} trajectories "
        f"({ing['bytes_per_trajectory']} bytes of JSON each) in {ing['wall_s']} s, "
        f"{ing['posts']} POSTs"
    )
    print(
        f"  during the stream: {pipe['subsets']} subsets ({pipe['subsets_done']} optimized), "
        f"{pipe['forest_merges']} forest merges, {pipe['fold_merges']} fold merges, "
        f"{pipe['versions']} versions published, {pipe['llm_calls']} LLM calls "
        f"(and {pipe['llm_cache_hits']} answered from the cache); "
        f"{ing['throttled_429']} answers 429 ({ing['throttled_wait_s']} s waited), "
        f"{ing['connection_retries']} POSTs sent again after a broken connection; "
        f"drained {ing['drain_s']} s after the last 202"
    )
    print(
        f"  CPU during the stream: daemon {ing['daemon_cpu_s']} s "
        f"({ing['daemon_cpu_ms_per_trajectory']} ms per trajectory), "
        f"this process (clients + fake LLM) {ing['bench_cpu_s']} s, wall {ing['wall_s']} s"
    )
    print(
        f"b. memory: daemon RSS idle {mem['rss_idle_kib'] / 1024:.1f} MiB, "
        f"after block 1 {mem['rss_first_block_kib'] / 1024:.1f} MiB, "
        f"after the last block {mem['rss_last_block_kib'] / 1024:.1f} MiB, "
        f"drained {mem['rss_drained_kib'] / 1024:.1f} MiB, "
        f"peak {mem['peak_rss_end_kib'] / 1024:.1f} MiB"
    )
    print(
        f"c. publish latency (max_wait {lat['max_wait_s']} s, "
        f"publish_interval {lat['publish_interval_s']} s, zero-latency LLM):"
    )
    if lat["p50_s"] is not None:
        print(
            f"  {lat['samples']} samples: p50 {lat['p50_s']:.3f} s, p95 {lat['p95_s']:.3f} s, "
            f"max {lat['max_s']:.3f} s (of which the POST {lat['post_p50_s'] * 1000:.1f} ms); "
            f"{lat['unchanged']} unchanged; {lat['forest_trees']} trees in the forest"
        )
    print("summary")
    rows = [
        ("ingest rate (trajectories/s)", f"{ing['trajectories_per_s']:.1f}"),
        (
            "ingest rate per block, min..max",
            f"{ing['block_rate_min']:.1f}..{ing['block_rate_max']:.1f}",
        ),
        ("ingest (MiB/s of JSONL)", f"{ing['mib_per_s']:.2f}"),
        ("429 answers", str(ing["throttled_429"])),
        ("stream / drain after it (s)", f"{ing['wall_s']:.1f} / {ing['drain_s']:.1f}"),
        ("first POST to all published (trajectories/s)", f"{ing['published_per_s']:.1f}"),
        (
            "subsets / forest merges / fold merges / versions",
            f"{pipe['subsets']} / {pipe['forest_merges']} / {pipe['fold_merges']} / "
            f"{pipe['versions']}",
        ),
        ("daemon RSS first block (MiB)", f"{mem['rss_first_block_kib'] / 1024:.1f}"),
        ("daemon RSS last block (MiB)", f"{mem['rss_last_block_kib'] / 1024:.1f}"),
        ("RSS ratio last/first block", f"{mem['rss_ratio_last_first']:.3f}"),
        ("peak RSS ratio last/first block", f"{mem['hwm_ratio_last_first']:.3f}"),
        ("daemon peak RSS at the end (MiB)", f"{mem['peak_rss_end_kib'] / 1024:.1f}"),
        ("store on disk (MiB)", f"{mem['store_disk_bytes'] / 2**20:.1f}"),
        ("publish latency p50 (s)", "-" if lat["p50_s"] is None else f"{lat['p50_s']:.3f}"),
        ("publish latency p95 (s)", "-" if lat["p95_s"] is None else f"{lat['p95_s']:.3f}"),
        ("max_wait / publish_interval (s)", f"{lat['max_wait_s']} / {lat['publish_interval_s']}"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    print(f"  (the whole run took {r['run_s']:.0f} s)")
    print(json.dumps(r, sort_keys=True))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--count", type=int, default=30_000, help="trajectories to stream")
    parser.add_argument("--quick", action="store_true", help="a smoke run: --count 10000")
    parser.add_argument("--batch", type=int, default=500, help="trajectories per POST")
    parser.add_argument("--clients", type=int, default=4, help="concurrent HTTP clients")
    parser.add_argument(
        "--block", type=int, help="trajectories per memory and rate sample [default: count/10]"
    )
    parser.add_argument("--steps", type=int, default=8, help="messages per trajectory")
    parser.add_argument("--words", type=int, default=40, help="words per observation (about)")
    parser.add_argument("--max-wait", type=float, default=0.2, help="daemon --max-wait")
    parser.add_argument(
        "--publish-interval", type=float, default=0.0, help="daemon --publish-interval"
    )
    parser.add_argument("--llm-concurrency", type=int, default=4, help="daemon --max-concurrency")
    parser.add_argument("--context-tokens", type=int, default=8192, help="daemon --context-tokens")
    parser.add_argument("--latency-samples", type=int, default=20)
    parser.add_argument(
        "--latency-gap", type=float, default=0.1, help="pause before each latency sample"
    )
    parser.add_argument("--latency-timeout", type=float, default=60.0)
    parser.add_argument("--drain-timeout", type=float, default=600.0)
    parser.add_argument(
        "--keep",
        type=Path,
        metavar="DIR",
        help="put the store and the daemon's log in DIR (new or empty) and keep them",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.count = 10_000
    if args.block is None:
        args.block = max(1, args.count // 10)
    if min(args.count, args.batch, args.clients, args.block) < 1:
        parser.error("--count, --batch, --clients and --block must be at least 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        if any(args.keep.iterdir()):
            raise SystemExit(f"--keep {args.keep}: the folder is not empty")
        results = trio.run(bench, args, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-daemon-") as folder:
            results = trio.run(bench, args, Path(folder))
    report(results)
    return results


if __name__ == "__main__":
    main()
