"""``scripts/bench_daemon.py`` end to end on a tiny stream: a smoke test of the
benchmark (its figures parse and make sense), not a timing test."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_daemon.py"


def _load(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_daemon", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # attrs looks a class's module up in sys.modules.
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_bench_daemon_prints_positive_figures_for_a_small_stream(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = _load(monkeypatch)
    max_wait = 0.2
    results = bench.main(
        [
            "--count=300",
            "--batch=50",
            "--clients=2",
            "--block=100",
            "--latency-samples=3",
            "--latency-gap=0",
            f"--max-wait={max_wait}",
        ]
    )
    out = capsys.readouterr().out

    # The block table: one row per 100 trajectories, each with a positive rate and RSS.
    rows = re.findall(r"^ +(\d+) +[\d.]+ s +([\d.]+)/s +([\d.]+) MiB", out, re.M)
    assert [int(n) for n, _, _ in rows] == [100, 200, 300]
    assert all(float(rate) > 0 and float(rss) > 0 for _, rate, rss in rows)

    summary = out.split("\nsummary\n", 1)[1]
    figures = dict(re.findall(r"^  (\S.*?)  +(\S.*)$", summary, re.M))
    assert float(figures["ingest rate (trajectories/s)"]) > 0
    assert float(figures["first POST to all published (trajectories/s)"]) > 0
    assert float(figures["daemon RSS first block (MiB)"]) > 0
    assert float(figures["daemon peak RSS at the end (MiB)"]) > 0
    assert float(figures["RSS ratio last/first block"]) > 0
    subsets, merges, folds, versions = map(
        int, figures["subsets / forest merges / fold merges / versions"].split(" / ")
    )
    assert subsets > 0
    assert versions > 0
    # The forest merges at most subsets - 1 times; with the folds, the merges
    # join every subset into the last version's one root.
    assert merges <= subsets - 1
    assert merges + folds >= subsets - 1
    p50 = float(figures["publish latency p50 (s)"])
    p95 = float(figures["publish latency p95 (s)"])
    # A lone trajectory waits max_wait before its subset is sealed.
    assert max_wait <= p50 <= p95

    # The last line is every figure as JSON, the same as main() returns.
    last = json.loads(out.strip().splitlines()[-1])
    assert last == results
    assert last["ingest"]["trajectories"] == 300
    # A 429 answers one POST, which the client then sends again.
    assert last["ingest"]["throttled_429"] <= last["ingest"]["posts"]
    assert last["latency"]["samples"] + last["latency"]["unchanged"] == 3
    # The 300 streamed and the 3 timed ones are all stored; the daemon stopped cleanly.
    assert last["final"]["trajectories"] == 303
    assert last["final"]["daemon_exit_code"] == 0
    # Every paid call reached the server once; a cache hit reached it never.
    assert last["final"]["llm_requests"] == last["final"]["llm_calls"]
    assert isinstance(last["final"]["llm_cache_hits"], int)
