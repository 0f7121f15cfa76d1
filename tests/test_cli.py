"""End to end: ``fgo optimize`` as a real subprocess against a real loopback server."""

from __future__ import annotations

import json
import os
import pty
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from fgo_actors import Module

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "trajectories.jsonl"
PROTOCOLS = ROOT / "protocols"
CLI = [sys.executable, "-m", "fgo_actors._cli"]
TIMEOUT = 60

JSONDict = dict[str, Any]


def _validator(name: str) -> jsonschema.Draft202012Validator:
    with (PROTOCOLS / f"{name}.schema.json").open(encoding="utf-8") as f:
        schema = json.load(f)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


MODULE_V = _validator("module")
REPORT_V = _validator("report")


def schema_errors(v: jsonschema.Draft202012Validator, instance: object) -> list[str]:
    return [f"{list(e.absolute_path)}: {e.message}" for e in v.iter_errors(instance)]


def base_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, **extra}
    for key in ("FGO_BASE_URL", "FGO_MODEL", "FGO_API_KEY"):
        if key not in extra:
            env.pop(key, None)
    env.pop("COLUMNS", None)
    return env


def fgo(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "optimize", *map(str, args)],
        capture_output=True,
        text=True,
        env=env if env is not None else base_env(),
        timeout=TIMEOUT,
        cwd=ROOT,
        check=False,
    )


def read_json(path: Path) -> JSONDict:
    obj: JSONDict = json.loads(path.read_text(encoding="utf-8"))
    return obj


def explain(proc: subprocess.CompletedProcess[str]) -> str:
    return f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"


def closed_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


def check_merge_tree(report: JSONDict, fan_in: int) -> None:
    tree = report["merge_tree"]
    nodes = {n["id"]: n for n in tree}
    assert len(nodes) == len(tree), "node ids are unique"
    leaves = [n for n in tree if n["kind"] == "leaf"]
    merges = [n for n in tree if n["kind"] == "merge"]
    assert len(leaves) == report["subsets"]
    if fan_in == 2:
        assert len(merges) == len(leaves) - 1
    root = nodes[report["root"]]
    leaf_ids = {n["id"] for n in leaves}
    assert set(root["subsets"]) == leaf_ids
    assert len(root["subsets"]) == len(leaf_ids)
    parents: dict[str, str] = {}
    for n in leaves:
        assert n["children"] == []
        assert n["subsets"] == [n["id"]]
    for n in merges:
        assert 2 <= len(n["children"]) <= fan_in
        covered: list[str] = []
        for child in n["children"]:
            assert child in nodes
            assert child not in parents, f"{child} merged twice"
            parents[child] = n["id"]
            covered += nodes[child]["subsets"]
            assert nodes[child]["finished_at"] <= n["started_at"] + 1e-6
        assert sorted(covered) == sorted(n["subsets"])
    # Every node but the root is merged exactly once.
    assert set(parents) == set(nodes) - {root["id"]}


# ---------------------------------------------------------------------------
# successful runs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("strategy", "extra"),
    [
        ("fgo", ["--context-tokens", "3000", "--fan-in", "2"]),
        ("fgo", ["--context-tokens", "3000", "--fan-in", "3"]),
        ("all-at-once", []),
        ("batch", ["--context-tokens", "3000"]),
    ],
)
def test_strategies_write_valid_module_and_report(
    server_url: str, tmp_path: Path, strategy: str, extra: list[str]
) -> None:
    out = tmp_path / "module.json"
    report_path = tmp_path / "report.json"
    proc = fgo(
        EXAMPLES,
        "--out",
        out,
        "--report",
        report_path,
        "--strategy",
        strategy,
        "--base-url",
        server_url,
        *extra,
    )
    assert proc.returncode == 0, explain(proc)
    module = read_json(out)
    report = read_json(report_path)
    assert schema_errors(MODULE_V, module) == []
    assert schema_errors(REPORT_V, report) == []
    assert report["status"] == "ok"
    assert report["error"] is None
    assert report["strategy"] == strategy
    assert report["trajectories"] == 24
    assert report["llm_calls"]["optimize"] >= report["subsets"] >= 1
    assert report["prompt_tokens"] > 0
    assert report["completion_tokens"] > 0
    assert "status: ok" in proc.stdout
    assert f"module: {out}" in proc.stdout
    # The scripted server adds (or revises) one rule per optimize call.
    assert len(module["rules"]) >= 1
    traj_ids = {json.loads(line)["id"] for line in EXAMPLES.read_text().splitlines() if line}
    for rule in module["rules"]:
        assert set(rule["provenance"]["trajectories"]) <= traj_ids
    if strategy == "fgo":
        fan_in = int(extra[extra.index("--fan-in") + 1])
        assert report["fan_in"] == fan_in
        assert report["subsets"] > fan_in  # a real tree, not one merge
        check_merge_tree(report, fan_in)
        leaf_ids = {n["id"] for n in report["merge_tree"] if n["kind"] == "leaf"}
        covered = {s for r in module["rules"] for s in r["provenance"]["subsets"]}
        assert covered == leaf_ids, "every optimized subset contributes to the root module"
        # A root rule is a leaf's own, kept by id, or a merged one with its lineage.
        assert all(r["from"] or r["id"].split(".")[0] in leaf_ids for r in module["rules"]), (
            "merged rules carry lineage"
        )
    else:
        assert report["merge_tree"] == []
        assert report["llm_calls"]["merge"] == 0
    if strategy == "all-at-once":
        assert report["subsets"] == 1
        assert report["llm_calls"]["optimize"] == 1
        assert report["cut_trajectories"] == 0
    if strategy == "batch":
        covered = {s for r in module["rules"] for s in r["provenance"]["subsets"]}
        assert len(covered) == report["subsets"] > 1, "every minibatch left a trace"


def test_default_report_path_and_json_logs(server_url: str, tmp_path: Path) -> None:
    out = tmp_path / "nested" / "result.module.json"
    proc = fgo(EXAMPLES, "--out", out, "--base-url", server_url, "--log-json")
    assert proc.returncode == 0, explain(proc)
    report_path = tmp_path / "nested" / "result.module.report.json"
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(
        [out.name, report_path.name, ".fgo-cache"]
    ), "module, report, the response cache and no temporary files"
    assert (out.parent / ".fgo-cache" / "responses.sqlite").is_file()
    report = read_json(report_path)
    assert schema_errors(REPORT_V, report) == []
    assert f"report: {report_path}" in proc.stdout

    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines, "some log lines"
    events = [json.loads(line) for line in lines]  # every stderr line is JSON
    names = [e["event"] for e in events]
    assert names[0] == "run_started"
    assert "run_finished" in names
    assert all("level" in e and "timestamp" in e for e in events)
    finished = next(e for e in events if e["event"] == "run_finished")
    assert finished["status"] == "ok"
    calls = [e for e in events if e["event"] == "llm_call"]
    assert len(calls) == report["llm_calls"]["optimize"] + report["llm_calls"]["merge"]
    assert sum(e["prompt_tokens"] for e in calls) == report["prompt_tokens"]


def test_log_json_on_a_terminal(server_url: str, tmp_path: Path) -> None:
    """On a TTY the default is a live display; --log-json makes stderr JSON lines anyway."""
    out = tmp_path / "m.json"
    controller, terminal = pty.openpty()
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(controller, 65536)
            except OSError:  # EIO once the child side is closed
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        proc = subprocess.run(
            [
                *CLI,
                "optimize",
                str(EXAMPLES),
                "--out",
                str(out),
                "--base-url",
                server_url,
                "--log-json",
            ],
            stdout=subprocess.PIPE,
            stderr=terminal,
            text=True,
            env=base_env(),
            timeout=TIMEOUT,
            cwd=ROOT,
            check=False,
        )
    finally:
        os.close(terminal)
        reader.join(timeout=10)
        os.close(controller)
    stderr = b"".join(chunks).decode()
    assert proc.returncode == 0, f"{proc.stdout}\n{stderr}"
    lines = [line.strip("\r") for line in stderr.split("\n") if line.strip()]
    assert lines
    events = [json.loads(line) for line in lines]
    assert {"run_started", "run_finished"} <= {e["event"] for e in events}


# ---------------------------------------------------------------------------
# bad input: exit 2
# ---------------------------------------------------------------------------


def flat(text: str) -> str:
    """stderr without the console's line wrapping."""
    return text.replace("\n", "")


def bad_jsonl(path: Path) -> Path:
    lines = EXAMPLES.read_text(encoding="utf-8").splitlines()[:3]
    broken = json.loads(lines[2])
    del broken["outcome"]["success"]
    path.write_text(f"{lines[0]}\n\n{lines[1]}\n{json.dumps(broken)}\n", encoding="utf-8")
    return path  # the bad trajectory is on physical line 4


def test_bad_jsonl_exits_2_without_output(server_url: str, tmp_path: Path) -> None:
    data = bad_jsonl(tmp_path / "bad.jsonl")
    out = tmp_path / "out" / "m.json"
    proc = fgo(data, "--out", out, "--base-url", server_url)
    assert proc.returncode == 2, explain(proc)
    err = flat(proc.stderr)
    assert f"{data}:4" in err
    assert "outcome.success" in err
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    assert not out.with_name("m.report.json").exists()
    assert not out.parent.exists()


def test_a_line_nested_2000_deep_exits_2_naming_the_line(tmp_path: Path) -> None:
    data = tmp_path / "deep.jsonl"
    good = EXAMPLES.read_text(encoding="utf-8").splitlines()[0]
    deep = '{"id": "x", "nested": ' + "[" * 2000 + "]" * 2000 + "}"
    data.write_text(f"{good}\n{deep}\n", encoding="utf-8")
    proc = fgo(data, "--out", tmp_path / "m.json", "--base-url", "http://127.0.0.1:9/v1")
    assert proc.returncode == 2, explain(proc)
    assert f"{data}:2: refused JSON: nested more than 64 levels deep" in flat(proc.stderr)
    assert "Traceback" not in proc.stderr


def test_bad_jsonl_message_is_one_readable_line(tmp_path: Path) -> None:
    """The location must survive the console: not broken across lines in a log."""
    deep = tmp_path / ("a-rather-long-folder-name-" * 3) / "trajectories-under-test"
    deep.mkdir(parents=True)
    data = bad_jsonl(deep / "bad.jsonl")
    proc = fgo(data, "--out", tmp_path / "m.json", "--base-url", "http://127.0.0.1:9/v1")
    assert proc.returncode == 2, explain(proc)
    expected = f"{data}:4: field 'outcome.success': is required but missing"
    assert any(expected in line for line in proc.stderr.splitlines()), proc.stderr


def test_missing_trajectory_file_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    proc = fgo(missing, "--out", tmp_path / "m.json", "--base-url", "http://127.0.0.1:9/v1")
    assert proc.returncode == 2, explain(proc)
    assert str(missing) in flat(proc.stderr)
    assert not (tmp_path / "m.json").exists()


def test_bad_initial_module_exits_2(server_url: str, tmp_path: Path) -> None:
    rule = {"id": "r1", "text": "x", "provenance": {"subsets": [], "trajectories": []}, "from": []}
    initial = tmp_path / "init.json"
    initial.write_text(
        json.dumps({"instructions": "", "rules": [rule, rule], "functions": []}), encoding="utf-8"
    )
    out = tmp_path / "m.json"
    proc = fgo(EXAMPLES, "--out", out, "--initial-module", initial, "--base-url", server_url)
    assert proc.returncode == 2, explain(proc)
    err = flat(proc.stderr)
    assert str(initial) in err
    assert "rules[1].id" in err
    assert not out.exists()


def test_no_base_url_exits_2(tmp_path: Path) -> None:
    """No endpoint and no local model installed (an empty FGO_HOME): bad input."""
    out = tmp_path / "m.json"
    env = base_env(FGO_HOME=str(tmp_path / "empty-home"))
    assert "FGO_BASE_URL" not in env
    proc = fgo(EXAMPLES, "--out", out, env=env)
    assert proc.returncode == 2, explain(proc)
    assert "--base-url" in proc.stderr
    assert "FGO_BASE_URL" in proc.stderr
    assert not out.exists()
    assert not (tmp_path / "m.report.json").exists()


def test_base_url_from_environment(server_url: str, tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    proc = fgo(EXAMPLES, "--out", out, env=base_env(FGO_BASE_URL=server_url))
    assert proc.returncode == 0, explain(proc)
    assert read_json(tmp_path / "m.report.json")["status"] == "ok"


@pytest.mark.parametrize(
    "args",
    [
        ["--subset-tokens", "9000", "--context-tokens", "8192"],
        ["--fan-in", "1"],
        ["--epochs", "0"],
        ["--token-budget", "0"],
        ["--strategy", "greedy"],
    ],
)
def test_bad_options_exit_2(server_url: str, tmp_path: Path, args: list[str]) -> None:
    out = tmp_path / "m.json"
    proc = fgo(EXAMPLES, "--out", out, "--base-url", server_url, *args)
    assert proc.returncode == 2, explain(proc)
    assert "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("strategy", ["fgo", "batch", "all-at-once"])
def test_context_too_small_exits_2(server_url: str, tmp_path: Path, strategy: str) -> None:
    """A budget that leaves no room for trajectories is bad input, not a crash."""
    out = tmp_path / "m.json"
    proc = fgo(
        EXAMPLES,
        "--out",
        out,
        "--base-url",
        server_url,
        "--strategy",
        strategy,
        "--context-tokens",
        "1024",
        "--max-completion-tokens",
        "800",
    )
    assert proc.returncode == 2, explain(proc)
    assert "Traceback" not in proc.stderr
    assert "tokens" in flat(proc.stderr)
    # The library names its settings; the CLI words them as its flags.
    (message,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "--context-tokens" in message
    assert "context_tokens" not in message
    assert not out.exists()


# ---------------------------------------------------------------------------
# LLM failures: exit 3
# ---------------------------------------------------------------------------

# By default a call is retried 5 times with exponential backoff (about 30 s
# against a closed port); the test passes --retries 1.
FAST_RETRY_CLI = [sys.executable, "-m", "fgo_actors._cli"]


def test_unreachable_endpoint_exits_3(tmp_path: Path) -> None:
    port = closed_port()
    out = tmp_path / "m.json"
    report_path = tmp_path / "r.json"
    started = time.monotonic()
    proc = subprocess.run(
        [
            *FAST_RETRY_CLI,
            "optimize",
            str(EXAMPLES),
            "--out",
            str(out),
            "--report",
            str(report_path),
            "--base-url",
            f"http://127.0.0.1:{port}/v1",
            "--retries",
            "1",
        ],
        capture_output=True,
        text=True,
        env=base_env(),
        timeout=TIMEOUT,
        cwd=ROOT,
        check=False,
    )
    assert time.monotonic() - started < 30
    assert proc.returncode == 3, explain(proc)
    assert "Traceback" not in proc.stderr
    assert f"127.0.0.1:{port}" in flat(proc.stderr)
    assert not out.exists(), "no module is written on an LLM failure"
    report = read_json(report_path)
    assert schema_errors(REPORT_V, report) == []
    assert report["status"] == "failed"
    assert f"127.0.0.1:{port}" in report["error"]
    assert report["llm_calls"]["optimize"] == 0
    assert report["llm_calls"]["retries"] >= 1


# ---------------------------------------------------------------------------
# token budget: exit 4
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [3000, 6000])
def test_token_budget_exhausted_exits_4(server_url: str, tmp_path: Path, budget: int) -> None:
    out = tmp_path / "m.json"
    proc = fgo(EXAMPLES, "--out", out, "--base-url", server_url, "--token-budget", str(budget))
    assert proc.returncode == 4, explain(proc)
    assert "budget" in proc.stderr
    module = read_json(out)
    report = read_json(tmp_path / "m.report.json")
    assert schema_errors(MODULE_V, module) == []
    assert schema_errors(REPORT_V, report) == []
    assert report["status"] == "budget_exhausted"
    assert report["token_budget"] == budget
    assert report["prompt_tokens"] + report["completion_tokens"] <= budget
    assert any(f["kind"] == "budget" for f in report["failures"])
    assert len(module["rules"]) == report["llm_calls"]["optimize"]
    if budget == 3000:  # not even one optimize call fits
        assert report["llm_calls"]["optimize"] == 0
        assert module == {"instructions": "", "rules": [], "functions": []}


def test_unwritable_outputs_are_found_before_the_run(server_url: str, tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    proc = fgo(EXAMPLES, "--out", afile / "m.json", "--base-url", server_url)
    assert proc.returncode == 2, explain(proc)
    assert "cannot write" in flat(proc.stderr)
    same = tmp_path / "same.json"
    proc = fgo(EXAMPLES, "--out", same, "--report", same, "--base-url", server_url)
    assert proc.returncode == 2, explain(proc)
    assert "same file" in flat(proc.stderr)
    assert not same.exists()


def test_out_through_a_symlink_writes_the_file_it_points_to(
    server_url: str, tmp_path: Path
) -> None:
    real = tmp_path / "real" / "module.json"
    real.parent.mkdir()
    real.write_text("{}\n")
    link = tmp_path / "module.json"
    link.symlink_to(real)
    proc = fgo(EXAMPLES, "--out", link, "--base-url", server_url, "--no-cache")
    assert proc.returncode == 0, explain(proc)
    assert link.is_symlink()
    assert schema_errors(MODULE_V, read_json(real)) == []


def test_out_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "module.json"
    os.mkfifo(fifo)
    proc = fgo(EXAMPLES, "--out", fifo, "--base-url", "http://127.0.0.1:9/v1")
    assert proc.returncode == 2, explain(proc)
    assert "not a regular file" in flat(proc.stderr)
    assert stat.S_ISFIFO(fifo.stat().st_mode)  # left as it was


def test_render_prints_the_module_in_each_form(tmp_path: Path) -> None:
    path = ROOT / "examples" / "twc_expert.json"
    module = Module.from_json(json.loads(path.read_text()))
    # CliRunner, not a subprocess: render starts no server and holds no state.
    from click.testing import CliRunner

    from fgo_actors._cli.main import main

    runner = CliRunner()
    prompt = runner.invoke(main, ["render", str(path)])
    assert prompt.exit_code == 0, prompt.output
    assert prompt.output == module.system_prompt() + "\n"
    tools = runner.invoke(main, ["render", str(path), "--as", "openai-tools"])
    assert json.loads(tools.output) == module.openai_tools()
    page = runner.invoke(main, ["render", str(path), "--as", "markdown"])
    assert page.output.startswith("# twc_expert.json\n")
    assert all(f"**{r.id}**" in page.output for r in module.rules)
    bad = tmp_path / "bad.json"
    bad.write_text('{"rules": 3}')
    refused = runner.invoke(main, ["render", str(bad)])
    assert refused.exit_code == 2, refused.output
    assert "bad.json" in refused.output
    assert refused.exception is None or isinstance(refused.exception, SystemExit)


def test_library_errors_name_only_the_flags_a_command_has() -> None:
    from fgo_actors._cli.common import in_flags

    error = "subset_tokens (9) plus max_completion_tokens (2) exceed context_tokens (8)"
    assert in_flags(error) == (
        "--subset-tokens (9) plus --max-completion-tokens (2) exceed --context-tokens (8)"
    )
    # fgo bench has no --max-completion-tokens: the setting keeps its name.
    assert in_flags(error, ("context_tokens", "subset_tokens")) == (
        "--subset-tokens (9) plus max_completion_tokens (2) exceed --context-tokens (8)"
    )
