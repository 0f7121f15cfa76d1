"""An agent traced with OpenTelemetry, optimized by fgo from its own traces.

The agent solves a few arithmetic word problems with one tool, a calculator,
against any OpenAI-compatible chat endpoint. It is instrumented with the
OpenTelemetry SDK in the GenAI semantic conventions: one ``invoke_agent``
span per task, holding a ``chat`` span per LLM call (with the messages) and
an ``execute_tool`` span per calculation. The run span records whether the
answer was right in ``app.task.success``. The spans are written as OTLP/JSON
lines, as the collector's file exporter writes them. ``--module`` puts
``Module.system_prompt()`` of a module fgo made after the agent's own opening.

The round trip (needs ``pip install 'fgo-actors[otel]' opentelemetry-sdk
opentelemetry-exporter-otlp-proto-common``)::

    fgo local-llm start                  # or pass --base-url to both commands
    python examples/traced_agent.py --traces traces.jsonl
    fgo import-traces traces.jsonl --success-attr app.task.success --out trajectories.jsonl
    fgo optimize trajectories.jsonl --out module.json
    python examples/traced_agent.py --module module.json --traces traces-after.jsonl

The same through the daemon, with the SDK's OTLP/HTTP exporter (needs
``opentelemetry-exporter-otlp-proto-http`` too)::

    fgo serve --success-attr app.task.success &
    python examples/traced_agent.py --otlp-endpoint http://127.0.0.1:8765/v1/traces
    # once a version is published (curl http://127.0.0.1:8765/v1/module/versions):
    python examples/traced_agent.py --module http://127.0.0.1:8765/v1/module

Without ``--base-url`` (or ``$FGO_BASE_URL``) the agent uses the local model
server that ``fgo local-llm start`` runs. Each run writes its traces file
anew. The messages are recorded in full, as GenAI instrumentations do when
asked to capture content: keep such traces where prompts may be kept.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import math
import operator
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, cast

import attrs
import httpx
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as gen_ai
from opentelemetry.semconv.attributes import server_attributes, service_attributes

import fgo_actors
from fgo_actors.traces import to_otlp_json

AGENT_NAME = "arithmetic"
TOOL_NAME = "calculator"
SUCCESS_ATTR = "app.task.success"
OPENING = (
    "You solve arithmetic word problems with a calculator. To compute, reply with "
    "one line `calculate: <expression>` (numbers, + - * / and parentheses); the "
    "result comes back to you. When you know the result, reply with one line "
    "`answer: <number>`."
)
MAX_TURNS = 4
DEFAULT_PORTS = {"http": 80, "https": 443}

OPERATION = gen_ai.GenAiOperationNameValues
tracer = trace.get_tracer("traced_agent")


@attrs.frozen
class Task:
    question: str
    answer: float


TASKS = (
    Task("A crate holds 24 bottles. How many bottles are in 17 crates?", 408),
    Task("A train runs at 84 km/h for 6.5 hours. How many kilometres does it cover?", 546),
    Task("Tickets cost 13 euros each. What do 29 tickets cost, in euros?", 377),
    Task("A book has 1000 pages. After 23 days at 35 pages a day, how many are left?", 195),
)


# ---------------------------------------------------------------------------
# the tool
# ---------------------------------------------------------------------------

_OPERATORS: dict[type[ast.AST], Callable[..., float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return float(cast(float, node.value))
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.operand))
    raise ValueError(f"not arithmetic: {ast.unparse(node)}")


def calculate(expression: str) -> str:
    """The calculator: the value of an arithmetic expression, or what is wrong with it."""
    try:
        value = _evaluate(ast.parse(expression.replace(",", ""), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError) as e:
        return f"error: {e}"
    return str(int(value)) if value.is_integer() else str(round(value, 6))


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def is_right(answer: str, task: Task) -> bool:
    """Whether the last number in the answer is the task's."""
    numbers = _NUMBER.findall(answer.replace(",", ""))
    return bool(numbers) and math.isclose(float(numbers[-1]), task.answer, abs_tol=1e-6)


# ---------------------------------------------------------------------------
# writing spans as OTLP/JSON lines
# ---------------------------------------------------------------------------


class OTLPJSONFileExporter(SpanExporter):
    """Each batch of spans as one line of OTLP/JSON (hex ids), encoded with the
    OTLP exporter's own ``encode_spans``: what the collector's file exporter writes."""

    def __init__(self, path: Path) -> None:
        self._file: IO[str] = path.open("w", encoding="utf-8")

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self._file.write(json.dumps(to_otlp_json(encode_spans(spans))) + "\n")
        self._file.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self._file.close()


# ---------------------------------------------------------------------------
# the agent
# ---------------------------------------------------------------------------

Message = dict[str, Any]
_CALL = re.compile(r"^\W*calculate:\s*(.+?)[\s`]*$", re.IGNORECASE | re.MULTILINE)
_ANSWER = re.compile(r"^\W*answer:\s*", re.IGNORECASE)


def text_parts(text: str) -> list[Message]:
    return [{"type": "text", "content": text}]


def genai_message(message: Message) -> Message:
    """An OpenAI chat message in the GenAI conventions' shape: a role and typed parts."""
    if message["role"] == "tool":
        response = {"type": "tool_call_response", "id": message["tool_call_id"]}
        return {"role": "tool", "parts": [{**response, "response": message["content"]}]}
    parts = text_parts(message["content"]) if message.get("content") else []
    for call in message.get("tool_calls", ()):
        function = call["function"]
        part = {"type": "tool_call", "id": call["id"], "name": function["name"]}
        parts.append({**part, "arguments": json.loads(function["arguments"])})
    return {"role": message["role"], "parts": parts}


def chat(client: httpx.Client, model: str, messages: list[Message], turn: int) -> Message:
    """One LLM call in a ``chat`` span. The reply comes back as the assistant
    message the agent keeps: a ``calculate:`` line becomes a calculator call."""
    system, history = messages[0], messages[1:]
    scheme = client.base_url.scheme
    with tracer.start_as_current_span(
        f"{OPERATION.CHAT.value} {model}",
        kind=trace.SpanKind.CLIENT,
        attributes={
            gen_ai.GEN_AI_OPERATION_NAME: OPERATION.CHAT.value,
            gen_ai.GEN_AI_PROVIDER_NAME: gen_ai.GenAiProviderNameValues.OPENAI.value,
            gen_ai.GEN_AI_REQUEST_MODEL: model,
            server_attributes.SERVER_ADDRESS: client.base_url.host,
            server_attributes.SERVER_PORT: client.base_url.port or DEFAULT_PORTS[scheme],
            gen_ai.GEN_AI_SYSTEM_INSTRUCTIONS: json.dumps(text_parts(system["content"])),
            gen_ai.GEN_AI_INPUT_MESSAGES: json.dumps([genai_message(m) for m in history]),
        },
    ) as span:
        response = client.post(
            "chat/completions",
            json={"model": model, "messages": messages, "temperature": 0, "max_tokens": 200},
        )
        response.raise_for_status()
        body = response.json()
        choice = body["choices"][0]
        content = choice["message"].get("content") or ""
        message: Message = {"role": "assistant", "content": content}
        if call := _CALL.search(content):
            arguments = json.dumps({"expression": call.group(1)})
            function = {"name": TOOL_NAME, "arguments": arguments}
            call_id = f"call_{turn}"
            message["tool_calls"] = [{"id": call_id, "type": "function", "function": function}]
        output = {**genai_message(message), "finish_reason": choice.get("finish_reason", "stop")}
        usage = body.get("usage") or {}
        span.set_attributes(
            {
                gen_ai.GEN_AI_OUTPUT_MESSAGES: json.dumps([output]),
                gen_ai.GEN_AI_RESPONSE_ID: body.get("id", ""),
                gen_ai.GEN_AI_RESPONSE_MODEL: body.get("model", model),
                gen_ai.GEN_AI_RESPONSE_FINISH_REASONS: [output["finish_reason"]],
                gen_ai.GEN_AI_USAGE_INPUT_TOKENS: usage.get("prompt_tokens", 0),
                gen_ai.GEN_AI_USAGE_OUTPUT_TOKENS: usage.get("completion_tokens", 0),
            }
        )
        return message


def execute_tool(call: Message) -> Message:
    """Run one calculator call in an ``execute_tool`` span; its result as a tool message."""
    name, arguments = call["function"]["name"], call["function"]["arguments"]
    with tracer.start_as_current_span(
        f"{OPERATION.EXECUTE_TOOL.value} {name}",
        attributes={
            gen_ai.GEN_AI_OPERATION_NAME: OPERATION.EXECUTE_TOOL.value,
            gen_ai.GEN_AI_TOOL_NAME: name,
            gen_ai.GEN_AI_TOOL_TYPE: "function",
            gen_ai.GEN_AI_TOOL_CALL_ID: call["id"],
            gen_ai.GEN_AI_TOOL_CALL_ARGUMENTS: arguments,
        },
    ) as span:
        result = calculate(json.loads(arguments)["expression"])
        span.set_attribute(gen_ai.GEN_AI_TOOL_CALL_RESULT, result)
    return {"role": "tool", "tool_call_id": call["id"], "content": result}


def solve(client: httpx.Client, model: str, system: str, task: Task) -> tuple[str, bool]:
    """One task in an ``invoke_agent`` span: (the answer, whether it is right)."""
    with tracer.start_as_current_span(
        f"{OPERATION.INVOKE_AGENT.value} {AGENT_NAME}",
        attributes={
            gen_ai.GEN_AI_OPERATION_NAME: OPERATION.INVOKE_AGENT.value,
            gen_ai.GEN_AI_AGENT_NAME: AGENT_NAME,
        },
    ) as run:
        messages: list[Message] = [
            {"role": "system", "content": system},
            {"role": "user", "content": task.question},
        ]
        answer = ""
        for turn in range(MAX_TURNS):
            reply = chat(client, model, messages, turn)
            messages.append(reply)
            if "tool_calls" not in reply:
                answer = _ANSWER.sub("", reply["content"].strip())
                break
            messages.extend(execute_tool(call) for call in reply["tool_calls"])
        right = is_right(answer, task)
        run.set_attribute(SUCCESS_ATTR, right)
    return answer, right


def system_prompt(module: fgo_actors.Module | None) -> str:
    """The agent's opening, then what the module adds (its instructions and rules)."""
    learned = module.system_prompt() if module is not None else ""
    return "\n\n".join(part for part in (OPENING, learned) if part)


# ---------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------


def local_model() -> tuple[str, str] | None:
    """The URL and model name of the server ``fgo local-llm start`` runs, if any."""
    status = subprocess.run(
        [sys.executable, "-m", "fgo_actors._cli", "local-llm", "status", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    server = json.loads(status.stdout).get("server") if status.returncode == 0 else None
    return (server["url"], server["alias"]) if server else None


@attrs.frozen
class Options:
    base_url: str
    model: str
    module: fgo_actors.Module | None
    traces: Path
    otlp_endpoint: str | None = None


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--base-url",
        default=os.environ.get("FGO_BASE_URL"),
        help="OpenAI-compatible base URL, up to /v1 [env FGO_BASE_URL; default: the local "
        "model server of `fgo local-llm start`]",
    )
    parser.add_argument(
        "--model",
        default=os.environ.get("FGO_MODEL"),
        help="model name sent [env FGO_MODEL; default: the local model's, else default]",
    )
    parser.add_argument(
        "--module",
        help="a module fgo made: a file (module.json), or the URL of fgo serve's "
        "GET /v1/module (the latest published version)",
    )
    parser.add_argument(
        "--otlp-endpoint",
        help="send the spans with the SDK's OTLP/HTTP exporter to this traces URL "
        "(fgo serve's http://127.0.0.1:8765/v1/traces) instead of to --traces",
    )
    parser.add_argument(
        "--traces",
        type=Path,
        default=Path("traces.jsonl"),
        help="where the spans go, as OTLP/JSON lines [default: traces.jsonl]",
    )
    args = parser.parse_args(argv)
    base_url, model = args.base_url, args.model
    if not base_url:
        found = local_model()
        if found is None:
            parser.error("no endpoint: pass --base-url, or start one with `fgo local-llm start`")
        base_url, model = found[0], model or found[1]
    try:
        module = load_module(args.module) if args.module else None
    except (fgo_actors.InputError, httpx.HTTPError) as e:
        parser.error(f"--module {args.module}: {e}")
    return Options(base_url, model or "default", module, args.traces, args.otlp_endpoint)


def load_module(where: str) -> fgo_actors.Module:
    """The module in a file, or the one fgo serve publishes at a URL."""
    if not where.startswith(("http://", "https://")):
        return fgo_actors.load_module(where)
    token = os.environ.get("FGO_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = httpx.get(where, headers=headers, timeout=30)
    response.raise_for_status()
    return fgo_actors.Module.from_json(response.json()["module"])


@contextlib.contextmanager
def tracing(path: Path, endpoint: str | None = None) -> Iterator[None]:
    """The SDK set up to write this run's spans to ``path``, or to send them
    to the OTLP/HTTP ``endpoint``; flushed at the end."""
    resource = Resource.create({service_attributes.SERVICE_NAME: "calculator-agent"})
    provider = TracerProvider(resource=resource)
    exporter: SpanExporter
    if endpoint is not None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        token = os.environ.get("FGO_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else None
        exporter = OTLPSpanExporter(endpoint=endpoint, headers=headers)
    else:
        exporter = OTLPJSONFileExporter(path)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    try:
        yield
    finally:
        provider.shutdown()


def run(options: Options) -> Iterator[tuple[Task, str, bool]]:
    system = system_prompt(options.module)
    timeout = httpx.Timeout(10, read=300)
    with httpx.Client(base_url=options.base_url.rstrip("/") + "/", timeout=timeout) as client:
        for task in TASKS:
            yield task, *solve(client, options.model, system, task)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    solved = 0
    with tracing(options.traces, options.otlp_endpoint):
        try:
            for task, answer, right in run(options):
                solved += right
                print(f"{'right' if right else 'wrong'}: {task.question} -> {answer!r}")
        except httpx.HTTPError as e:
            print(f"error: the LLM at {options.base_url}: {e}", file=sys.stderr)
            return 1
    where = options.otlp_endpoint or options.traces
    print(f"{solved}/{len(TASKS)} tasks solved; traces in {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
