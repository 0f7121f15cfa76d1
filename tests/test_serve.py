"""``fgo serve`` as a real subprocess: kill -9 and restart, SIGTERM, stdin,
a watched folder, settings, and the HTTP behaviour users depend on."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

from fgo_actors._llm.gateway import request_key

from .helpers import ROOT, StartLLM, make_trajectories, run_fgo

LISTENING = re.compile(r"fgo serve: listening on (http://\S+)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _jsonl(trajectories: list[Any]) -> str:
    return "".join(json.dumps(t.to_json()) + "\n" for t in trajectories)


@asynccontextmanager
async def _serve(
    *args: str, env: dict[str, str] | None = None, stdin: int | None = None
) -> AsyncIterator[tuple[trio.Process, str]]:
    """Start ``fgo serve ARGS``; yield the process and its base URL."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "fgo_actors._cli", "serve", "--log-json", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=stdin,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    assert process.stdout is not None
    try:
        buffer = b""
        with trio.fail_after(30):
            while b"\n" not in buffer:
                chunk = await process.stdout.receive_some(4096)
                assert chunk, "fgo serve exited before it was listening"
                buffer += chunk
        match = LISTENING.search(buffer.decode())
        assert match, buffer
        yield process, match.group(1)
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def _latest(client: httpx.AsyncClient, url: str) -> dict[str, Any] | None:
    response = await client.get(f"{url}/v1/module")
    if response.status_code == 404:
        return None
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


async def _wait_for_version_with(
    client: httpx.AsyncClient, url: str, trajectories: int
) -> dict[str, Any]:
    """The first published version that covers ``trajectories`` (within 60 s)."""
    with trio.fail_after(60):
        while True:
            latest = await _latest(client, url)
            if latest is not None and latest["lineage"]["trajectories"] >= trajectories:
                return latest
            await trio.sleep(0.1)


def _base_args(store: Path, llm: str, port: int) -> list[str]:
    return [
        "--store",
        str(store),
        "--port",
        str(port),
        "--base-url",
        llm,
        "--max-wait",
        "0.3",
        "--publish-interval",
        "0",
        "--context-tokens",
        "4096",
        "--subset-tokens",
        "2000",
        "--max-concurrency",
        "2",
    ]


async def test_kill_9_mid_run_then_restart_loses_nothing_and_redoes_no_paid_call(
    start_llm: StartLLM, tmp_path: Path
) -> None:
    server, llm = await start_llm(latency=0.15)
    store = tmp_path / "fgo.db"
    data = make_trajectories(60)
    args = _base_args(store, llm, _free_port())
    async with httpx.AsyncClient(timeout=30) as client:
        async with _serve(*args) as (process, url):
            for start in range(0, 60, 20):
                reply = await client.post(
                    f"{url}/v1/trajectories", content=_jsonl(data[start : start + 20])
                )
                assert reply.status_code == 202
                assert reply.json()["accepted"] == 20
            # Kill in the middle: some subsets optimized, not all.
            with trio.fail_after(30):
                while sum(r.finished is not None for r in server.requests) < 3:  # noqa: ASYNC110
                    await trio.sleep(0.02)
            process.send_signal(signal.SIGKILL)
            await process.wait()
        # What the killed daemon had committed.
        with sqlite3.connect(store) as db:
            stored = db.execute("SELECT COUNT(*) FROM trajectories").fetchone()[0]
            paid = {row[0] for row in db.execute("SELECT key FROM llm_cache")}
            done = db.execute("SELECT COUNT(*) FROM subsets WHERE state = 'done'").fetchone()[0]
            pending = db.execute("SELECT COUNT(*) FROM subsets WHERE state = 'pending'")
            not_done = pending.fetchone()[0]
            unpacked = db.execute("SELECT COUNT(*) FROM trajectories WHERE subset IS NULL")
            unassigned = unpacked.fetchone()[0]
        db.close()
        assert stored == 60  # every 202 was durable
        assert paid
        assert done >= 1
        # The kill left work over (so the restart below has something to resume).
        assert not_done + unassigned >= 1
        before = len(server.requests)
        async with _serve(*args) as (process, url):
            latest = await _wait_for_version_with(client, url, 60)
            metrics = (await client.get(f"{url}/metrics")).text
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(30):
                assert await process.wait() == 0
    assert "fgo_trajectories_total 60" in metrics
    assert latest["lineage"]["trajectories"] == 60
    resent = [request_key(r.body) for r in server.requests[before:]]
    assert resent, "the restart did the work left over"
    assert not set(resent) & paid, "a call paid for before the kill was sent again"


async def test_sigterm_stops_intake_and_exits_0(start_llm: StartLLM, tmp_path: Path) -> None:
    _server, llm = await start_llm()
    async with (
        httpx.AsyncClient(timeout=30) as client,
        _serve(*_base_args(tmp_path / "fgo.db", llm, _free_port())) as (process, url),
    ):
        reply = await client.post(f"{url}/v1/trajectories", content=_jsonl(make_trajectories(5)))
        assert reply.status_code == 202
        await _wait_for_version_with(client, url, 5)
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await process.wait() == 0
        with pytest.raises(httpx.ConnectError):
            await client.get(f"{url}/healthz")


def test_stdin_once_ingests_everything_and_exits_0(server_url: str, tmp_path: Path) -> None:
    store = tmp_path / "fgo.db"
    lines = _jsonl(make_trajectories(8)) + "not json\n" + '{"id": "x"}\n'
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fgo_actors._cli",
            "serve",
            "--log-json",
            "--stdin",
            "--once",
            *_base_args(store, server_url, 0),
        ],
        input=lines,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    rejected = [e["source"] for e in events if e["event"] == "record_rejected"]
    assert rejected == ["<stdin>:9", "<stdin>:10"]
    with sqlite3.connect(store) as db:
        trajectories = db.execute("SELECT lineage FROM versions ORDER BY n DESC").fetchone()
    db.close()
    assert json.loads(trajectories[0])["trajectories"] == 8


async def test_watched_folder_is_tailed_and_resumes_at_its_offset(
    start_llm: StartLLM, tmp_path: Path
) -> None:
    _server, llm = await start_llm()
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    log = inbox / "agent.jsonl"
    data = make_trajectories(9)
    # Two complete lines and half of a third: only complete lines are read.
    first = _jsonl(data[:3])
    log.write_text(first[: len(first) - 20])
    args = [*_base_args(tmp_path / "fgo.db", llm, _free_port()), "--watch", str(inbox)]
    async with httpx.AsyncClient(timeout=30) as client:
        async with _serve(*args) as (process, url):
            await _wait_for_version_with(client, url, 2)
            with log.open("a") as f:
                f.write(first[len(first) - 20 :] + _jsonl(data[3:6]))
            await _wait_for_version_with(client, url, 6)
            process.send_signal(signal.SIGTERM)
            await process.wait()
        with log.open("a") as f:
            f.write(_jsonl(data[6:]) + "{broken\n")
        async with _serve(*args) as (process, url):
            latest = await _wait_for_version_with(client, url, 9)
            metrics = (await client.get(f"{url}/metrics")).text
    assert latest["lineage"]["trajectories"] == 9
    assert "fgo_trajectories_total 9" in metrics


def test_non_loopback_bind_needs_a_token(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "FGO_TOKEN"}
    result = run_fgo(
        "serve",
        "--store",
        str(tmp_path / "fgo.db"),
        "--host",
        "0.0.0.0",
        "--base-url",
        "http://127.0.0.1:9/v1",
        env=env,
        timeout=60,
    )
    assert result.returncode == 2
    assert "needs a bearer token" in result.stderr
    assert not (tmp_path / "fgo.db").exists()


def test_settings_file_errors_name_the_file_and_key(tmp_path: Path) -> None:
    settings = tmp_path / "fgo.toml"
    settings.write_text('store = "x.db"\nmax_wiat = 3\n')
    result = run_fgo("serve", "--config", str(settings), timeout=60)
    assert result.returncode == 2
    assert "fgo.toml: unknown setting 'max_wiat'" in result.stderr
    settings.write_text('port = "eighty"\n')
    result = run_fgo("serve", "--config", str(settings), timeout=60)
    assert result.returncode == 2
    assert "setting 'port' must be int" in result.stderr


async def test_token_env_names_the_variable_that_holds_the_token(
    start_llm: StartLLM, tmp_path: Path
) -> None:
    _server, llm = await start_llm()
    args = [
        *_base_args(tmp_path / "fgo.db", llm, _free_port()),
        *("--token-env", "MY_DAEMON_TOKEN", "--durable"),
    ]
    env = {"MY_DAEMON_TOKEN": "t0ken", "FGO_TOKEN": "not-this-one"}
    async with httpx.AsyncClient(timeout=30) as client, _serve(*args, env=env) as (_p, url):
        wrong = {"Authorization": "Bearer not-this-one"}
        assert (await client.get(f"{url}/v1/module", headers=wrong)).status_code == 401
        right = {"Authorization": "Bearer t0ken"}
        assert (await client.get(f"{url}/v1/module", headers=right)).status_code == 404


def test_durable_and_init_flags_reach_the_daemon(tmp_path: Path) -> None:
    from fgo_actors import GatewayConfig
    from fgo_actors._daemon.serve import ServeSettings, daemon_config

    gateway = GatewayConfig(base_url="http://127.0.0.1:9/v1", model="m")
    for given, expected in (({}, (False, False)), ({"durable": True, "init": True}, (True, True))):
        settings = ServeSettings.load(None, {"store": tmp_path / "fgo.db", **given})
        config = daemon_config(settings, gateway, 4096)
        assert (config.durable, config.init) == expected


async def test_token_guards_everything_but_healthz(start_llm: StartLLM, tmp_path: Path) -> None:
    _server, llm = await start_llm()
    args = _base_args(tmp_path / "fgo.db", llm, _free_port())
    async with (
        httpx.AsyncClient(timeout=30) as client,
        _serve(*args, env={"FGO_TOKEN": "s3cret"}) as (_process, url),
    ):
        body = _jsonl(make_trajectories(2))
        assert (await client.get(f"{url}/healthz")).status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            reply = await client.post(f"{url}/v1/trajectories", content=body, headers=headers)
            assert reply.status_code == 401
            assert (await client.get(f"{url}/metrics", headers=headers)).status_code == 401
        good = {"Authorization": "Bearer s3cret"}
        reply = await client.post(f"{url}/v1/trajectories", content=body, headers=good)
        assert reply.status_code == 202
        assert reply.json()["accepted"] == 2


async def test_web_pages_cannot_post_roll_back_or_rebind(
    start_llm: StartLLM, tmp_path: Path
) -> None:
    """What a page in the user's browser could try against the default
    loopback daemon: a cross-origin write, a form-typed body, a rebound DNS
    name. Each is refused; a client such as curl or httpx is not."""
    _server, llm = await start_llm()
    args = _base_args(tmp_path / "fgo.db", llm, _free_port())
    async with httpx.AsyncClient(timeout=30) as client, _serve(*args) as (_process, url):
        body = _jsonl(make_trajectories(2))
        evil = {"Origin": "http://attacker.example"}
        reply = await client.post(
            f"{url}/v1/trajectories",
            content=body,
            headers={**evil, "Content-Type": "text/plain"},
        )
        assert reply.status_code == 403
        assert "cross-origin" in reply.json()["error"]
        assert (await client.post(f"{url}/v1/module/rollback/1", headers=evil)).status_code == 403
        reply = await client.post(
            f"{url}/v1/trajectories", content=body, headers={"Content-Type": "text/plain"}
        )
        assert reply.status_code == 415
        rebound = {"Host": "attacker.example:8765"}
        for path in ("/healthz", "/v1/module", "/metrics"):
            reply = await client.get(f"{url}{path}", headers=rebound)
            assert reply.status_code == 421, path
        local = await client.get(f"{url}/healthz", headers={"Host": "localhost"})
        assert local.status_code == 200
        # The daemon's own origin, JSONL, and curl's default type all go through.
        own = {"Origin": url, "Content-Type": "application/x-ndjson"}
        reply = await client.post(f"{url}/v1/trajectories", content=body, headers=own)
        assert reply.status_code == 202
        curl = {"Content-Type": "application/x-www-form-urlencoded"}
        reply = await client.post(
            f"{url}/v1/trajectories", content=_jsonl(make_trajectories(3)), headers=curl
        )
        assert reply.status_code == 202
        assert reply.json()["accepted"] == 1


def test_the_daemon_defaults_are_written_once() -> None:
    """DaemonConfig, ServeSettings and the help of fgo serve read one table."""
    from click.testing import CliRunner

    from fgo_actors import DaemonConfig
    from fgo_actors._cli.main import main
    from fgo_actors._daemon import defaults
    from fgo_actors._daemon.serve import ServeSettings

    settings = attrs.fields_dict(ServeSettings)
    config = attrs.fields_dict(DaemonConfig)
    for name in (
        "max_wait",
        "publish_interval",
        "max_pending_subsets",
        "max_queued",
        "retry_pause",
    ):
        assert settings[name].default == config[name].default == getattr(defaults, name.upper())
    help_text = " ".join(CliRunner().invoke(main, ["serve", "--help"]).output.split())
    for shown in (
        f"[default: {defaults.MAX_WAIT:g}]",
        f"[default: {defaults.PUBLISH_INTERVAL:g}]",
        f"[default: {defaults.MAX_PENDING_SUBSETS}]",
        f"[default: {defaults.GRACE:g}]",
        f"[default: {defaults.MAX_BODY_BYTES}]",
        f"[default: {defaults.PORT};",
    ):
        assert shown in help_text
