"""``fgo import-traces`` as a real subprocess, on traces the real SDK emitted,
and its output fed to ``fgo optimize`` against the scripted loopback LLM."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fgo_actors import load_module, load_trajectories
from fgo_actors._cli import traces as cli_traces
from fgo_actors.traces import DEFAULT_MAX_CHARS, FORMATS

from .helpers import ROOT, errors_of, run_fgo, validator
from .test_traces import (
    BOOKING_TASK,
    GENAI_STEPS,
    OI_STEPS,
    SCORE,
    SUCCESS,
    WEATHER_TASK,
    Recorder,
    genai_run,
    openinference_run,
    otlp_line,
    otlp_text,
    trace_hex,
)

TRAJECTORY_V = validator("trajectory")


def explain(proc: Any) -> str:
    return f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"


def fgo_import(*args: str | Path) -> Any:
    return run_fgo("import-traces", *map(str, args), timeout=120)


def two_runs_in_two_files(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """A GenAI run and an OpenInference run, their spans spread over two
    files (one trace in both), with a broken line in the middle of the first."""
    rec = Recorder()
    genai_run(rec)
    openinference_run(rec)
    spans = rec.spans()
    ids = {"genai": trace_hex(spans[0]), "oi": trace_hex(spans[-1])}
    genai = [s for s in spans if trace_hex(s) == ids["genai"]]
    oi = [s for s in spans if trace_hex(s) == ids["oi"]]
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text(
        otlp_line(genai[:3]) + "\n" + '{"resourceSpans": [\n' + otlp_line(oi) + "\n",
        encoding="utf-8",
    )
    # The rest of the GenAI run, in base64 ids, as protobuf's own JSON writes them.
    second.write_text(otlp_text([genai[3:]], hex_ids=False), encoding="utf-8")
    return first, second, ids


def test_the_choices_are_the_libraries() -> None:
    """The CLI repeats two constants so that ``fgo --help`` needs no otel packages."""
    assert cli_traces.FORMAT_CHOICES == FORMATS
    assert cli_traces.DEFAULT_MAX_CONTENT_CHARS == DEFAULT_MAX_CHARS


def test_import_writes_trajectories_that_load(tmp_path: Path) -> None:
    first, second, ids = two_runs_in_two_files(tmp_path)
    out = tmp_path / "out" / "trajectories.jsonl"
    proc = fgo_import(first, second, "--success-attr", SUCCESS, "--score-attr", SCORE, "--out", out)
    assert proc.returncode == 0, explain(proc)
    assert proc.stdout == f"trajectories: {out} (2)\n"
    assert f"2 traces read: 2 trajectories written to {out}" in proc.stderr
    assert "malformed_json: 1 (lines that are not JSON, skipped)" in proc.stderr
    assert f"{first}:2:" in proc.stderr, "the broken line is named"
    assert sorted(p.name for p in out.parent.iterdir()) == ["trajectories.jsonl"], "no temp file"

    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [errors_of(TRAJECTORY_V, r) for r in records] == [[], []]
    loaded = {t.id: t for t in load_trajectories(out)}
    assert set(loaded) == set(ids.values())
    genai, oi = loaded[ids["genai"]], loaded[ids["oi"]]
    assert [s.to_json() for s in genai.steps] == GENAI_STEPS
    assert [s.to_json() for s in oi.steps] == OI_STEPS
    assert (genai.task, oi.task) == (WEATHER_TASK, BOOKING_TASK)
    assert oi.outcome.to_json() == {"success": True, "score": 1.0}
    assert genai.metadata is not None
    assert genai.metadata["source_files"] == [str(first), str(second)], "joined across files"
    assert genai.metadata["service_name"] == "weather-agent"
    assert oi.metadata is not None
    assert oi.metadata["source_files"] == [str(first)]


def test_log_json_gives_the_summary_as_one_event(tmp_path: Path) -> None:
    first, second, ids = two_runs_in_two_files(tmp_path)
    out = tmp_path / "t.jsonl"
    proc = fgo_import(
        first,
        second,
        "--success-attr",
        "nowhere",
        "--feedback",
        _feedback(tmp_path, [{"trace_id": ids["oi"], "success": True}]),
        "--out",
        out,
        "--log-json",
    )
    assert proc.returncode == 0, explain(proc)
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.strip()]
    assert [e["event"] for e in events] == ["traces_imported"]
    (event,) = events
    assert (event["traces"], event["written"], event["skipped"]) == (2, 1, 1)
    assert event["counts"] == {"malformed_json": 1, "no_outcome": 1}
    (example,) = event["examples"]["no_outcome"]
    assert example["trace_id"] == ids["genai"]
    assert example["where"] == f"{second}:1", "where the trace's first span was read"
    assert [t.id for t in load_trajectories(out)] == [ids["oi"]]


def _feedback(tmp_path: Path, rows: list[Any], extra: str = "") -> Path:
    path = tmp_path / "feedback.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + extra, encoding="utf-8")
    return path


def test_feedback_by_trace_id(tmp_path: Path) -> None:
    first, second, ids = two_runs_in_two_files(tmp_path)
    feedback = _feedback(
        tmp_path,
        [
            {"trace_id": ids["genai"], "success": False, "score": 0.25, "feedback": "wrong city"},
            {"trace_id": ids["oi"], "success": True},
            {"trace_id": "0" * 31 + "1", "success": True},
        ],
        extra="not json\n",
    )
    out = tmp_path / "t.jsonl"
    proc = fgo_import(first, second, "--feedback", feedback, "--out", out)
    assert proc.returncode == 0, explain(proc)
    assert "bad_feedback: 1 (feedback lines that could not be used, skipped)" in proc.stderr
    assert f"{feedback}:4:" in proc.stderr
    assert "feedback records that matched no trace: 1" in proc.stderr
    loaded = {t.id: t for t in load_trajectories(out)}
    assert loaded[ids["genai"]].outcome.to_json() == {
        "success": False,
        "score": 0.25,
        "feedback": "wrong city",
    }


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ([], "no outcome source: pass --success-attr"),
        (["--score-attr", SCORE], "--score-attr alone does not say which runs succeeded"),
        (["--success-threshold", "0.5"], "--success-threshold needs scores"),
    ],
)
def test_no_way_to_an_outcome_is_bad_usage(tmp_path: Path, flags: list[str], message: str) -> None:
    first, _, _ = two_runs_in_two_files(tmp_path)
    out = tmp_path / "t.jsonl"
    proc = fgo_import(first, *flags, "--out", out)
    assert proc.returncode == 2, explain(proc)
    assert message in proc.stderr
    assert not out.exists()


def test_nothing_to_write_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    first, second, _ = two_runs_in_two_files(tmp_path)
    out = tmp_path / "t.jsonl"
    proc = fgo_import(first, second, "--success-attr", "nowhere", "--out", out)
    assert proc.returncode == 2, explain(proc)
    assert "no_outcome: 2 (traces without an outcome, skipped: " in proc.stderr
    assert "nothing written: every trace was skipped" in proc.stderr
    assert not out.exists()

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    proc = fgo_import(empty, "--success-attr", SUCCESS, "--out", out)
    assert proc.returncode == 2, explain(proc)
    assert "the input holds no traces" in proc.stderr


def test_output_that_is_an_input_is_refused(tmp_path: Path) -> None:
    first, _, _ = two_runs_in_two_files(tmp_path)
    before = first.read_bytes()
    proc = fgo_import(first, "--success-attr", SUCCESS, "--out", first)
    assert proc.returncode == 2, explain(proc)
    assert "is also an input file" in proc.stderr
    assert first.read_bytes() == before


def test_without_the_otel_extra_it_says_what_to_install(tmp_path: Path) -> None:
    first, _, _ = two_runs_in_two_files(tmp_path)
    # The otel packages made unimportable, as in an install without the extra.
    hide = "import sys; sys.modules['opentelemetry.proto'] = None; "
    run = "from fgo_actors._cli import main; main()"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            hide + run,
            "import-traces",
            str(first),
            "--success-attr",
            SUCCESS,
            "--out",
            str(tmp_path / "t.jsonl"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2, explain(proc)
    assert "pip install 'fgo-actors[otel]'" in proc.stderr
    assert "opentelemetry.proto" in proc.stderr
    # The rest of the command line does not need the extra.
    proc = subprocess.run(
        [sys.executable, "-c", hide + run, "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, explain(proc)
    assert "import-traces" in proc.stdout


def test_imported_traces_feed_fgo_optimize(server_url: str, tmp_path: Path) -> None:
    """The whole way: SDK spans -> OTLP/JSON -> fgo import-traces -> fgo optimize."""
    rec = Recorder()
    for n in range(6):
        genai_run(rec, success=n % 2 == 0, tomorrow=n % 3 == 0)
        openinference_run(rec, success="true" if n % 3 else "false")
    traces_file = tmp_path / "traces.jsonl"
    traces_file.write_text(otlp_text([rec.spans()]), encoding="utf-8")
    imported = tmp_path / "trajectories.jsonl"
    proc = fgo_import(traces_file, "--success-attr", SUCCESS, "--out", imported)
    assert proc.returncode == 0, explain(proc)
    trajectories = load_trajectories(imported)
    assert len(trajectories) == 12
    assert sum(t.outcome.success for t in trajectories) == 3 + 4

    module_path = tmp_path / "module.json"
    proc = run_fgo(
        "optimize", str(imported), "--out", str(module_path), "--base-url", server_url, timeout=120
    )
    assert proc.returncode == 0, explain(proc)
    module = load_module(module_path)
    assert module.rules, "the scripted optimizer adds a rule per call"
    cited = {t for rule in module.rules for t in rule.trajectories}
    assert cited
    assert cited <= {t.id for t in trajectories}, "rules cite the imported traces' ids"
