"""Never pay twice: ``fgo optimize`` keeps every answered call in a response
cache, so a run killed or stopped by its endpoint is carried on by the same
command, and an endpoint failure still writes what was finished."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from fgo_actors.testing import Fault, RecordedRequest, schema_name_of

from .helpers import StartLLM
from .test_cli import CLI, EXAMPLES, ROOT, base_env, read_json

ARGS = ["--context-tokens", "3000", "--max-concurrency", "4", "--retries", "0"]


def _key(r: RecordedRequest) -> str:
    return json.dumps(r.body, sort_keys=True)


def _answered(requests: list[RecordedRequest]) -> list[str]:
    """The requests the server answered with a reply (no fault, not cut off by a kill)."""
    return [_key(r) for r in requests if r.finished is not None and r.fault is None]


async def _fgo(out: Path, url: str, *extra: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [*CLI, "optimize", str(EXAMPLES), "--out", str(out), "--base-url", url, *ARGS, *extra],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        cwd=ROOT,
        env=base_env(),
    )


class _Jitter:
    """Optimize replies after a random delay (so subsets finish in a different
    order each run), merges after ``merge_latency`` seconds; once ``frozen``,
    every new request waits a minute (it is in flight when the test kills
    the client)."""

    def __init__(self, merge_latency: float) -> None:
        self.rng = random.Random()
        self.merge_latency = merge_latency
        self.frozen = False

    def __call__(self, body: dict[str, Any]) -> float:
        if self.frozen:
            return 60.0
        if schema_name_of(body) == "fgo_merge":
            return self.merge_latency
        return self.rng.uniform(0.0, 0.3)


async def test_a_run_killed_mid_merge_pays_nothing_twice_when_rerun(
    start_llm: StartLLM, tmp_path: Path
) -> None:
    jitter = _Jitter(0.3)
    server, url = await start_llm(latency=jitter)
    out = tmp_path / "module.json"
    cmd = [*CLI, "optimize", str(EXAMPLES), "--out", str(out), "--base-url", url, *ARGS]
    proc = await trio.lowlevel.open_process(
        cmd, cwd=ROOT, env=base_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )

    def held(n: int) -> bool:
        """The first n requests are answered, and a merge is among those after them."""
        return all(r.finished is not None for r in server.requests[:n]) and any(
            r.schema_name == "fgo_merge" for r in server.requests[n:]
        )

    try:
        with trio.fail_after(60):
            # Once a merge is answered, hold every new request; when all the
            # earlier ones are answered (and have had time to be cached), and
            # a merge is among those held, kill the run outright.
            while not any(  # noqa: ASYNC110
                r.schema_name == "fgo_merge" and r.finished is not None for r in server.requests
            ):
                await trio.sleep(0.01)
            jitter.frozen = True
            held_from = len(server.requests)
            while not held(held_from):  # noqa: ASYNC110
                await trio.sleep(0.01)
            await trio.sleep(0.5)
        proc.send_signal(signal.SIGKILL)
    finally:
        await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    first = _answered(server.requests[:held_from])
    assert len(first) == held_from
    before = len(server.requests)

    jitter.frozen, jitter.merge_latency = False, 0.0
    done = await _fgo(out, url)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    again = [_key(r) for r in server.requests[before:]]
    assert again, "some work was left after the kill"
    assert not set(again) & set(first), "a call answered before the kill was paid again"
    report = read_json(out.with_name("module.report.json"))
    assert report["status"] == "ok"
    assert report["llm_calls"]["replayed"] == len(set(first))
    # Once more: every call is answered from the cache, in the recorded
    # merge order, and the module comes out the same.
    paid = len(server.requests)
    module = read_json(out)
    assert (await _fgo(out, url)).returncode == 0
    assert len(server.requests) == paid
    assert read_json(out) == module


async def test_an_endpoint_failure_writes_the_finished_work_and_a_rerun_carries_on(
    start_llm: StartLLM, tmp_path: Path
) -> None:
    answered = 0

    def outage(body: dict[str, Any]) -> Fault | None:
        nonlocal answered
        if answered >= 3:
            return Fault(status=503)
        answered += 1
        return None

    server, url = await start_llm(fault_for=outage)
    out = tmp_path / "module.json"
    failed = await _fgo(out, url, "--max-concurrency", "1")
    assert failed.returncode == 3, (failed.returncode, failed.stderr.decode()[-3000:])
    stderr = failed.stderr.decode()
    assert "run the same command again to carry on" in stderr
    report = read_json(out.with_name("module.report.json"))
    assert report["status"] == "partial"
    partial = read_json(out)
    assert partial["rules"], "the finished subsets' rules are in the partial module"
    first = _answered(server.requests)
    assert len(first) == 3

    server.fault_for = None
    before = len(server.requests)
    done = await _fgo(out, url, "--max-concurrency", "1")
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert not {_key(r) for r in server.requests[before:]} & set(first)
    report = read_json(out.with_name("module.report.json"))
    assert (report["status"], report["llm_calls"]["replayed"]) == ("ok", 3)


async def test_no_cache_keeps_nothing(start_llm: StartLLM, tmp_path: Path) -> None:
    server, url = await start_llm()
    out = tmp_path / "module.json"
    for _ in range(2):
        assert (await _fgo(out, url, "--no-cache")).returncode == 0
    assert not (tmp_path / ".fgo-cache").exists()
    optimizes = [r for r in server.requests if r.schema_name == "fgo_optimize"]
    assert len(optimizes) == 2 * read_json(out.with_name("module.report.json"))["subsets"]


async def test_a_cache_that_is_not_a_store_is_refused(start_llm: StartLLM, tmp_path: Path) -> None:
    _server, url = await start_llm()
    cache = tmp_path / "c"
    cache.mkdir()
    (cache / "responses.sqlite").write_text("not a database\n" * 100)
    proc = await _fgo(tmp_path / "m.json", url, "--cache", str(cache))
    assert proc.returncode == 2
    assert "responses.sqlite" in proc.stderr.decode()
    assert (cache / "responses.sqlite").read_text().startswith("not a database")


async def test_ctrl_c_exits_130_and_says_how_to_carry_on(
    start_llm: StartLLM, tmp_path: Path
) -> None:
    server, url = await start_llm(latency=30.0)
    out = tmp_path / "module.json"
    # SIGINT restored to Python's default first: a test run started in the
    # background by a shell inherits it ignored, and so would the command.
    restore = (
        "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "sys.argv[0] = 'fgo'; runpy.run_module('fgo_actors._cli', run_name='__main__')"
    )
    cmd = [sys.executable, "-c", restore, "optimize", str(EXAMPLES), "--out", str(out)]
    cmd += ["--base-url", url, *ARGS]
    # Its log goes to a file: a pipe nobody reads would fill and stop it.
    log = tmp_path / "stderr.txt"
    with log.open("wb") as err:
        proc = await trio.lowlevel.open_process(
            cmd, cwd=ROOT, env=base_env(), stdout=subprocess.DEVNULL, stderr=err
        )
    try:
        with trio.fail_after(30):
            while not server.requests:  # noqa: ASYNC110
                await trio.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        with trio.fail_after(30):
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    stderr = log.read_bytes()
    assert proc.returncode == 130, stderr.decode()[-3000:]
    text = stderr.decode()
    assert "interrupted" in text
    assert "run the same command again to carry on" in text
    assert "Traceback" not in text
    assert not out.exists()
