"""The local model's generation threads: chosen from a measurement on this machine.

The choice is pure (hypothesis); the measurement is the real model in a real
child process, skipped loudly where the model is not installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from fgo_actors._cli import main as cli
from fgo_actors._cli.common import EXIT_LLM
from fgo_actors._llm import local, local_threads

RATES = st.dictionaries(
    st.integers(min_value=1, max_value=64),
    st.floats(min_value=0.0, max_value=500.0, allow_nan=False),
    min_size=1,
    max_size=8,
)


@given(RATES)
def test_the_choice_is_the_fewest_threads_that_are_about_as_fast(rates: dict[int, float]) -> None:
    chosen = local_threads.choose(rates)
    best = max(rates.values())
    assert chosen in rates
    assert rates[chosen] >= best * (1 - local_threads.TOLERANCE)
    assert not any(
        n < chosen and rate >= best * (1 - local_threads.TOLERANCE) for n, rate in rates.items()
    )


def test_a_clearly_faster_count_wins_and_a_tie_goes_to_fewer() -> None:
    # The figures measured on one 2-core machine (idle, then with a busy process).
    assert local_threads.choose({1: 4.9, 2: 6.9}) == 2
    assert local_threads.choose({1: 2.0, 2: 2.9}) == 2
    assert local_threads.choose({1: 8.0, 2: 8.1}) == 1
    with pytest.raises(ValueError, match="nothing was measured"):
        local_threads.choose({})


@given(st.integers(min_value=1, max_value=512))
def test_candidates_are_one_half_and_all(cpus: int) -> None:
    c = local_threads.candidates(cpus)
    assert list(c) == sorted(set(c))
    assert c[0] == 1
    assert c[-1] == cpus
    assert max(1, cpus // 2) in c
    assert len(c) <= 3


def test_a_probe_that_cannot_load_its_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(local_threads.ProbeError, match="exited with code"):
        local_threads.measure(tmp_path / "missing.gguf", [1], timeout=120)


def test_without_a_measurement_the_server_takes_half_the_cpus_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FGO_HOME", str(tmp_path / "home"))  # no model there
    said: list[str] = []
    threads = local.threads_for(log=said.append)
    assert threads == max(1, local_threads.available_cpus() // 2)
    assert any("could not measure threads" in s for s in said)
    assert not (tmp_path / "home" / "local-threads.json").exists()


def test_tune_without_the_model_exits_with_the_llm_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FGO_HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(cli, ["local-llm", "tune"])
    assert result.exit_code == EXIT_LLM
    assert "not installed" in result.output


def test_a_record_for_another_machine_or_model_is_not_used(tmp_path: Path) -> None:
    key = local_threads.machine_key("a" * 64)
    record = {"key": key, "measured": {"1": 5.0}, "threads": 1, "measured_at": 0.0}
    (tmp_path / "local-threads.json").write_text(json.dumps(record))
    assert local_threads.recorded(tmp_path, key) == record
    assert local_threads.recorded(tmp_path, {**key, "cpus": key["cpus"] + 1}) is None
    assert local_threads.recorded(tmp_path, local_threads.machine_key("b" * 64)) is None
    (tmp_path / "local-threads.json").write_text("{not json")
    assert local_threads.recorded(tmp_path, key) is None


@pytest.mark.local_llm
def test_the_real_model_is_measured_once_and_the_record_reused(tmp_path: Path) -> None:
    if not local.llama_cpp_available() or not local.is_installed():
        pytest.skip("REAL LOCAL MODEL NOT TESTED: the model or llama-cpp-python is not installed")
    said: list[str] = []
    sha = local.DEFAULT_MODEL.sha256
    first = local_threads.tune(tmp_path, local.model_path(), sha, log=said.append)
    counts = local_threads.candidates(local_threads.available_cpus())
    assert sorted(int(n) for n in first["measured"]) == list(counts)
    assert all(rate > 0 for rate in first["measured"].values())
    assert first["threads"] == local_threads.choose(
        {int(n): r for n, r in first["measured"].items()}
    )
    assert any("using" in s for s in said)
    on_disk = json.loads((tmp_path / "local-threads.json").read_text())
    assert on_disk == first
    said.clear()
    again = local_threads.tune(tmp_path, local.model_path(), sha, log=said.append)
    assert again == first  # reused, not measured again
    assert said == []
