"""Shared fixtures: a real OpenAI-compatible server on loopback, quiet structlog."""

from __future__ import annotations

import json
import logging
import re
import select
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio

from fgo_actors import DaemonConfig, GatewayConfig, RunConfig, Trajectory
from fgo_actors.testing import FakeLLMServer, synthetic_trajectory

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "trajectories.jsonl"
EXAMPLES_DIR = ROOT / "examples"
# The small twc games the environment tests play: one room, two items, no doors.
TWC = "numLocations=1,numItemsToPutAway=2,includeDoors=0"


def expert_tidy() -> dict[str, Any]:
    """The expert module's ``tidy`` function (JSON), for scripted optimizers to learn."""
    module = json.loads((EXAMPLES_DIR / "twc_expert.json").read_text(encoding="utf-8"))
    tidy: dict[str, Any] = module["functions"][0]
    return tidy


def run_fgo(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run the ``fgo`` command line as a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "fgo_actors._cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


StartLLM = Callable[..., Awaitable[tuple[FakeLLMServer, str]]]


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


def daemon_config(store: Path, url: str, **kw: Any) -> DaemonConfig:
    """A streaming optimizer for tests: store at ``store``, the LLM at ``url``,
    a 4k context, short waits; ``kw`` overrides any field."""
    options: dict[str, Any] = {
        "store": store,
        "gateway": GatewayConfig(base_url=url, model="m", max_concurrency=4),
        # A 400-token module cap leaves about 900 tokens of each subset for
        # trajectories: six of make_trajectories' fit in one subset.
        "run": RunConfig(context_tokens=4096, subset_tokens=2000, module_tokens=400),
        "max_wait": 0.5,
        "publish_interval": 0.0,
        "retry_pause": 0.2,
        **kw,
    }
    return DaemonConfig(**options)


def make_trajectories(
    n: int, *, steps: int = 4, words: int = 12, groups: int = 3, prefix: str = "t"
) -> list[Trajectory]:
    """Deterministic synthetic trajectories with varied sizes, groups and outcomes."""
    return [
        synthetic_trajectory(i, steps=steps, words=words, groups=groups, prefix=prefix)
        for i in range(n)
    ]


def examples() -> list[dict[str, Any]]:
    return [json.loads(line) for line in EXAMPLES.read_text().splitlines() if line.strip()]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Make a skipped real-model test impossible to miss."""
    for report in terminalreporter.stats.get("skipped", []):
        text = str(getattr(report, "longrepr", ""))
        if "REAL LOCAL MODEL NOT TESTED" in text:
            terminalreporter.write_sep("!", "REAL LOCAL MODEL NOT TESTED", red=True, bold=True)
            terminalreporter.write_line(text, red=True)
            terminalreporter.write_sep("!", "", red=True, bold=True)
