"""``examples/traced_agent.py``, the whole round trip for real, against the
scripted loopback LLM: the agent writes its traces through the OpenTelemetry
SDK, ``fgo import-traces`` turns them into trajectories, ``fgo optimize``
makes a module of them, and the agent run again with ``--module`` sends that
module's ``system_prompt()`` after its own opening."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import trio
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as gen_ai

from fgo_actors import Module, load_module, load_trajectories
from fgo_actors.testing import RecordedRequest, schema_name_of, scripted_reply

from .helpers import EXAMPLES_DIR, StartLLM, run_fgo

EXAMPLE = EXAMPLES_DIR / "traced_agent.py"


def _load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("traced_agent", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


agent = _load_example()
QUESTIONS = [task.question for task in agent.TASKS]
# What the scripted model computes for each task, and the wrong numbers it
# answers for two of them without the calculator, while the agent has no module.
EXPRESSIONS = ["24 * 17", "84 * 6.5", "13 * 29", "1000 - 23 * 35"]
GUESSES = {1: "540", 3: "200"}


def scripted_model(body: dict[str, Any]) -> str:
    """The agent's model: it uses the calculator, except that it guesses two
    answers while its system prompt is the agent's opening alone. fgo's own
    optimize and merge calls get the scripted optimizer."""
    if schema_name_of(body) is not None:
        return scripted_reply(body)
    system, *_, last = body["messages"]
    if last["role"] == "tool":
        return f"answer: {last['content']}"
    i = QUESTIONS.index(last["content"])
    if i in GUESSES and system["content"] == agent.OPENING:
        return f"answer: {GUESSES[i]}"
    return f"I will compute it.\ncalculate: {EXPRESSIONS[i]}"


def agent_calls(requests: list[RecordedRequest]) -> list[RecordedRequest]:
    return [r for r in requests if r.schema_name is None]


def explain(proc: subprocess.CompletedProcess[str]) -> str:
    return f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"


def run_agent(url: str, traces: Path, *more: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--base-url", url, "--traces", str(traces), *more],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, explain(proc)
    return proc


def attribute(span: dict[str, Any], key: str) -> Any:
    """A span attribute's value in OTLP/JSON (``{"key", "value": {"boolValue": ...}}``)."""
    (value,) = [a["value"] for a in span.get("attributes", []) if a["key"] == key]
    (inner,) = value.values()
    return inner


def runs_in(traces: Path) -> dict[str, bool]:
    """Each trace's success attribute, read from the OTLP/JSON file by hand,
    after checking its shape: one invoke_agent span holding every other span."""
    spans: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for line in traces.read_text(encoding="utf-8").splitlines():
        for resource_spans in json.loads(line)["resourceSpans"]:
            for scope_spans in resource_spans["scopeSpans"]:
                for span in scope_spans["spans"]:
                    spans[span["traceId"]].append(span)
    outcomes = {}
    for trace_id, trace in spans.items():
        (run,) = [s for s in trace if "parentSpanId" not in s]
        assert attribute(run, gen_ai.GEN_AI_OPERATION_NAME) == "invoke_agent"
        assert run["name"] == "invoke_agent arithmetic"
        inner = [s for s in trace if s is not run]
        assert {s["parentSpanId"] for s in inner} == {run["spanId"]}
        operations = sorted(attribute(s, gen_ai.GEN_AI_OPERATION_NAME) for s in inner)
        calls = operations.count("execute_tool")
        assert operations == ["chat"] * (calls + 1) + ["execute_tool"] * calls
        outcomes[trace_id] = attribute(run, agent.SUCCESS_ATTR)
    return outcomes


async def test_traces_in_a_module_out_and_the_agent_loads_it(
    start_llm: StartLLM, tmp_path: Path
) -> None:
    assert len(EXPRESSIONS) == len(QUESTIONS)
    server, url = await start_llm(policy=scripted_model)

    # 1. The agent, without a module: two tasks guessed wrong.
    traces = tmp_path / "traces.jsonl"
    proc = await trio.to_thread.run_sync(run_agent, url, traces)
    assert proc.stdout.splitlines()[-1] == f"2/4 tasks solved; traces in {traces}"
    first = agent_calls(server.requests)
    assert len(first) == 2 * 2 + 2 * 1, "two calls with the calculator, one without"
    assert {r.body["messages"][0]["content"] for r in first} == {agent.OPENING}
    outcomes = runs_in(traces)
    assert sorted(outcomes.values()) == [False, False, True, True]

    # 2. fgo import-traces: one trajectory per run, its outcome the span's.
    trajectories = tmp_path / "trajectories.jsonl"
    proc = await trio.to_thread.run_sync(
        run_fgo,
        "import-traces",
        str(traces),
        "--success-attr",
        agent.SUCCESS_ATTR,
        "--out",
        str(trajectories),
    )
    assert proc.returncode == 0, explain(proc)
    assert proc.stdout == f"trajectories: {trajectories} (4)\n"
    loaded = {t.id: t for t in load_trajectories(trajectories)}
    assert {i: t.outcome.success for i, t in loaded.items()} == outcomes
    assert sorted(t.task for t in loaded.values()) == sorted(QUESTIONS)
    (crates,) = [t for t in loaded.values() if t.task == QUESTIONS[0]]
    reply = "I will compute it.\ncalculate: 24 * 17"
    call = {
        "id": "call_0",
        "type": "function",
        "function": {"name": "calculator", "arguments": '{"expression": "24 * 17"}'},
    }
    assert [s.to_json() for s in crates.steps] == [
        {"role": "system", "content": agent.OPENING},
        {"role": "user", "content": QUESTIONS[0]},
        {"role": "assistant", "content": reply, "tool_calls": [call]},
        {"role": "tool", "content": "408", "name": "calculator", "tool_call_id": "call_0"},
        {"role": "assistant", "content": "answer: 408"},
    ]

    # 3. fgo optimize: a module whose rules cite the imported runs.
    module_path = tmp_path / "module.json"
    proc = await trio.to_thread.run_sync(
        run_fgo, "optimize", str(trajectories), "--out", str(module_path), "--base-url", url
    )
    assert proc.returncode == 0, explain(proc)
    module = load_module(module_path)
    assert module.rules, "the scripted optimizer adds a rule"
    assert {t for rule in module.rules for t in rule.trajectories} <= set(loaded)

    # 4. The agent with --module: Module.system_prompt() after its opening, in every call.
    before = len(server.requests)
    after_traces = tmp_path / "traces-after.jsonl"
    proc = await trio.to_thread.run_sync(run_agent, url, after_traces, "--module", str(module_path))
    assert proc.stdout.splitlines()[-1] == f"4/4 tasks solved; traces in {after_traces}"
    second = agent_calls(server.requests[before:])
    assert len(second) == 4 * 2, "the calculator for every task"
    learned = module.system_prompt()
    assert {r.body["messages"][0]["content"] for r in second} == {agent.OPENING + "\n\n" + learned}
    assert all(rule.text in learned for rule in module.rules)
    assert sorted(runs_in(after_traces).values()) == [True] * 4


async def test_the_same_through_fgo_serve_with_the_sdks_otlp_exporter(
    start_llm: StartLLM, tmp_path: Path
) -> None:
    """The agent's SDK exports straight to ``fgo serve`` (OTLP/HTTP,
    protobuf); the daemon turns each trace into a trajectory, publishes a
    module, and the agent loads it from ``GET /v1/module``."""
    from .test_serve import _base_args, _free_port, _serve, _wait_for_version_with

    server, llm = await start_llm(policy=scripted_model)
    args = [
        *_base_args(tmp_path / "fgo.db", llm, _free_port()),
        "--success-attr",
        agent.SUCCESS_ATTR,
    ]
    async with _serve(*args) as (_process, url), httpx.AsyncClient() as client:
        endpoint = f"{url}/v1/traces"
        proc = await trio.to_thread.run_sync(
            run_agent, llm, tmp_path / "unused.jsonl", "--otlp-endpoint", endpoint
        )
        assert proc.stdout.splitlines()[-1] == f"2/4 tasks solved; traces in {endpoint}"
        assert not (tmp_path / "unused.jsonl").exists()
        version = await _wait_for_version_with(client, url, 4)
        metrics = (await client.get(f"{url}/metrics")).text
        assert "fgo_traces_converted_total 4" in metrics
        module = Module.from_json(version["module"])
        assert module.rules, "the scripted optimizer adds a rule"

        before = len(server.requests)
        proc = await trio.to_thread.run_sync(
            run_agent,
            llm,
            tmp_path / "after.jsonl",
            "--module",
            f"{url}/v1/module",
        )
        assert proc.stdout.splitlines()[-1].startswith("4/4 tasks solved")
        second = agent_calls(server.requests[before:])
        expected = agent.OPENING + "\n\n" + module.system_prompt()
        assert {r.body["messages"][0]["content"] for r in second} == {expected}
