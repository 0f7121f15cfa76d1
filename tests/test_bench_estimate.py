"""``scripts/bench_estimate.py``: a finished bench's time at other model speeds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_estimate.py"

BENCH = {
    "wall_seconds": 1000.0,
    "arms": [
        {"name": "base", "optimization": None, "evaluation": {"wall_seconds": 100.0}},
        {
            "name": "fgo",
            "optimization": {"prompt_tokens": 2600, "completion_tokens": 80},
            "evaluation": {"wall_seconds": 200.0},
        },
        {"name": "broken", "optimization": None, "evaluation": None},
    ],
}


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60
    )


def test_tokens_are_priced_at_the_target_rates_and_play_is_scaled(tmp_path: Path) -> None:
    (tmp_path / "bench.json").write_text(json.dumps(BENCH), encoding="utf-8")
    done = run(str(tmp_path), "--machine-prompt-rate", "52")
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.splitlines()[-1])
    # 2600 prompt tokens at 26/s and 80 generated at 8/s: 100 + 10 s.
    assert got["optimize_s"] == {"fgo": pytest.approx(110.0)}
    # 300 s of play on a machine twice as fast as the target.
    assert got["held_out_measured_s"] == pytest.approx(300.0)
    assert got["held_out_s"] == pytest.approx(600.0)
    assert got["total_s"] == pytest.approx(710.0)
    assert "total                 11.8 min" in done.stdout


def test_a_missing_bench_or_a_zero_rate_is_a_clear_error(tmp_path: Path) -> None:
    done = run(str(tmp_path), "--machine-prompt-rate", "52")
    assert done.returncode == 2
    assert "bench.json" in done.stderr
    (tmp_path / "bench.json").write_text(json.dumps(BENCH), encoding="utf-8")
    done = run(str(tmp_path), "--machine-prompt-rate", "0")
    assert (done.returncode, done.stderr.strip()) == (2, "error: every rate must be above 0")
