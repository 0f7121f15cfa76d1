"""Shared fixtures: a real OpenAI-compatible server on loopback, a real local
Ray, quiet structlog."""

from __future__ import annotations

import logging
import re
import select
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
import trio

from fgo_actors.testing import FakeLLMServer

from .helpers import ROOT, StartLLM


@pytest.fixture(autouse=True)
def _quiet_structlog() -> Iterator[None]:
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.KeyValueRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(),
        cache_logger_on_first_use=False,
    )
    yield
    structlog.reset_defaults()


@pytest.fixture
def start_llm(nursery: trio.Nursery) -> StartLLM:
    """``server, base_url = await start_llm(latency=..., faults=[...])``."""

    async def start(**kwargs: Any) -> tuple[FakeLLMServer, str]:
        server = FakeLLMServer(**kwargs)
        url = await nursery.start(server.serve)
        return server, url

    return start


@pytest.fixture(scope="session")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The scripted OpenAI-compatible server, as a subprocess, for the whole session."""
    log = tmp_path_factory.mktemp("server") / "stderr.txt"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fgo_actors.testing", "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=err,
            cwd=ROOT,
        )
    assert proc.stdout is not None
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        assert ready, f"the server printed nothing in 20 s; stderr: {log.read_text()}"
        line = proc.stdout.readline().decode()
        m = re.fullmatch(
            r"scripted OpenAI-compatible server at (http://127\.0\.0\.1:\d+/v1) "
            r"\(Ctrl-C to stop\)\n",
            line,
        )
        assert m, f"unexpected first line {line!r}; stderr: {log.read_text()}"
        yield m.group(1)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()


@pytest.fixture(scope="session")
def local_ray() -> Iterator[Any]:
    """A real local Ray with 2 CPUs, started once for the session (skipped
    without Ray)."""
    ray = pytest.importorskip("ray")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=256 * 1024**2,
    )
    try:
        yield ray
    finally:
        ray.shutdown()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Make a skipped real-model test impossible to miss."""
    for report in terminalreporter.stats.get("skipped", []):
        text = str(getattr(report, "longrepr", ""))
        if "REAL LOCAL MODEL NOT TESTED" in text:
            terminalreporter.write_sep("!", "REAL LOCAL MODEL NOT TESTED", red=True, bold=True)
            terminalreporter.write_line(text, red=True)
            terminalreporter.write_sep("!", "", red=True, bold=True)
