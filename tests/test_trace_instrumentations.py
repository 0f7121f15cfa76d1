"""``fgo import-traces``' conversion on spans that real instrumentation
libraries wrote, not hand-built ones.

Each case instruments the real ``openai`` client with one library, in a
TracerProvider of its own with an in-memory exporter, and drives it against
the scripted loopback server (``FakeLLMServer``) inside an agent-run span the
test makes with the SDK. The finished spans are written as OTLP/JSON (the
OTLP exporter's ``encode_spans``, then spec hex ids), read back and converted
as ``fgo import-traces`` does, and the trajectory is compared, step by step,
with the messages the server received and the replies it sent.

The libraries, pinned in the ``dev`` extra:

- ``opentelemetry-instrumentation-openai-v2`` (the official one, GenAI
  conventions), with ``opentelemetry-util-genai`` 1.1b0;
- ``openinference-instrumentation-openai`` (OpenInference);
- ``opentelemetry-instrumentation-openai`` (OpenLLMetry / Traceloop).

The scripted server answers with text only, never with ``tool_calls``, so a
tool call is checked the way an agent re-sends one: in the history of a
later request (the assistant's call and the tool's result as inputs).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol

import attrs
import pytest
import trio
import wrapt
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageFunctionToolCallParam, ChatCompletionMessageParam
from openinference.instrumentation.config import (
    OPENINFERENCE_HIDE_INPUT_MESSAGES,
    OPENINFERENCE_HIDE_INPUT_TEXT,
    OPENINFERENCE_HIDE_INPUTS,
    OPENINFERENCE_HIDE_OUTPUT_MESSAGES,
    OPENINFERENCE_HIDE_OUTPUT_TEXT,
    OPENINFERENCE_HIDE_OUTPUTS,
)
from openinference.instrumentation.openai import OpenAIInstrumentor as OpenInferenceInstrumentor
from openinference.semconv.trace import OpenInferenceSpanKindValues, SpanAttributes
from opentelemetry.instrumentation.openai import OpenAIInstrumentor as OpenLLMetryInstrumentor
from opentelemetry.instrumentation.openai.utils import TRACELOOP_TRACE_CONTENT
from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor as OfficialInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as gen_ai
from opentelemetry.semconv.attributes.service_attributes import SERVICE_NAME
from opentelemetry.trace import Span, Tracer
from opentelemetry.util.genai.environment_variables import (
    OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT,
)
from opentelemetry.util.genai.types import ContentCapturingMode
from opentelemetry.util.types import AttributeValue

from fgo_actors import Outcome, Trajectory
from fgo_actors.testing import FakeLLMServer
from fgo_actors.traces import (
    Converted,
    Format,
    OutcomeRule,
    TraceSet,
    convert_trace,
    read_otlp_text,
)

from .helpers import StartLLM, errors_of, validator
from .test_traces import otlp_line, trace_hex

SUCCESS = "app.run.success"
RULE = OutcomeRule(success_attr=SUCCESS)
SERVICE = "tutor-service"
AGENT = "tutor"
MODEL = "tutor-model"
INVOKE_AGENT = gen_ai.GenAiOperationNameValues.INVOKE_AGENT.value
TRAJECTORY_V = validator("trajectory")

# ---------------------------------------------------------------------------
# the conversations, and the scripted model's side of them
# ---------------------------------------------------------------------------

TUTOR_SYSTEM = "You are a geography tutor. Answer in one sentence."
FRANCE = "What is the capital of France?"
ITALY = "And of Italy?"
CALC_SYSTEM = "You are a calculator. Use the add tool, then give the sum."
CALC_TASK = "What is 2 + 3?"
CALC_CALL: ChatCompletionMessageFunctionToolCallParam = {
    "id": "call_add_1",
    "type": "function",
    "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'},
}
# The scripted model gets the sum wrong, so the calculator's run fails.
CALC_REPLY = "2 + 3 = 6."
REPLIES = {
    FRANCE: "The capital of France is Paris.",
    ITALY: "The capital of Italy is Rome.",
}


def policy(body: dict[str, Any]) -> str:
    """The scripted model: an answer to the last user question, or the sum
    after a tool result."""
    last = body["messages"][-1]
    if last["role"] == "tool":
        return CALC_REPLY
    return REPLIES[last["content"]]


def two_turns(client: OpenAI) -> bool:
    """A tutor asked two questions, the second turn re-sending the first.
    Success: the second answer names Rome."""
    messages: list[ChatCompletionMessageParam] = [{"role": "system", "content": TUTOR_SYSTEM}]
    answer = ""
    for question in (FRANCE, ITALY):
        messages.append({"role": "user", "content": question})
        reply = client.chat.completions.create(model=MODEL, messages=messages)
        answer = reply.choices[0].message.content or ""
        messages.append({"role": "assistant", "content": answer})
    return "Rome" in answer


def tool_history(client: OpenAI) -> bool:
    """A calculator whose request re-sends an add call and its result.
    Success: the model gives the right sum (it does not)."""
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": CALC_SYSTEM},
        {"role": "user", "content": CALC_TASK},
        {"role": "assistant", "content": None, "tool_calls": [CALC_CALL]},
        {"role": "tool", "tool_call_id": "call_add_1", "content": "5"},
    ]
    reply = client.chat.completions.create(model=MODEL, messages=messages)
    return reply.choices[0].message.content == "2 + 3 = 5."


TWO_TURNS_STEPS = [
    {"role": "system", "content": TUTOR_SYSTEM},
    {"role": "user", "content": FRANCE},
    {"role": "assistant", "content": REPLIES[FRANCE]},
    {"role": "user", "content": ITALY},
    {"role": "assistant", "content": REPLIES[ITALY]},
]
TOOL_HISTORY_STEPS = [
    {"role": "system", "content": CALC_SYSTEM},
    {"role": "user", "content": CALC_TASK},
    {"role": "assistant", "content": None, "tool_calls": [CALC_CALL]},
    {"role": "tool", "content": "5", "tool_call_id": "call_add_1"},
    {"role": "assistant", "content": CALC_REPLY},
]


# ---------------------------------------------------------------------------
# the instrumentations
# ---------------------------------------------------------------------------


class Instrumentor(Protocol):
    """What the tests use of an OpenTelemetry ``BaseInstrumentor``."""

    def instrument(self, **kwargs: Any) -> Any: ...

    def uninstrument(self, **kwargs: Any) -> Any: ...


@attrs.frozen
class Instrumentation:
    """One library: how to make its instrumentor, the environment that turns
    its message content capture on (as the library documents it), the
    tracer scope its spans carry, and the convention the trace is read with."""

    name: str
    instrumentor: Callable[[], Instrumentor]
    env: Mapping[str, str]
    scope: str
    fmt: Format

    @property
    def run_span(self) -> str:
        """The agent-run span's name: ``invoke_agent {name}`` in GenAI."""
        return AGENT if self.fmt == "openinference" else f"{INVOKE_AGENT} {AGENT}"

    def agent_span(self, tracer: Tracer, task: str) -> AbstractContextManager[Span]:
        """The agent-run span, in the convention of the library's spans."""
        attributes: dict[str, AttributeValue]
        if self.fmt == "openinference":
            attributes = {
                SpanAttributes.OPENINFERENCE_SPAN_KIND: OpenInferenceSpanKindValues.AGENT.value,
                SpanAttributes.AGENT_NAME: AGENT,
                SpanAttributes.INPUT_VALUE: task,
            }
        else:
            attributes = {
                gen_ai.GEN_AI_OPERATION_NAME: INVOKE_AGENT,
                gen_ai.GEN_AI_AGENT_NAME: AGENT,
            }
        return tracer.start_as_current_span(self.run_span, attributes=attributes)


OFFICIAL = Instrumentation(
    "openai-v2",
    OfficialInstrumentor,
    # With opentelemetry-util-genai 1.x, content goes on the spans only with
    # span_only (or span_and_event); the legacy "true" captures none (below).
    {OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT: ContentCapturingMode.SPAN_ONLY.name},
    "opentelemetry.util.genai.handler",
    "otlp-json",
)
OPENINFERENCE = Instrumentation(
    "openinference",
    OpenInferenceInstrumentor,
    {},  # content is captured unless OPENINFERENCE_HIDE_* says otherwise
    "openinference.instrumentation.openai",
    "openinference",
)
OPENLLMETRY = Instrumentation(
    "openllmetry",
    OpenLLMetryInstrumentor,
    {TRACELOOP_TRACE_CONTENT: "true"},
    "opentelemetry.instrumentation.openai.v1",
    "otlp-json",
)
# OpenLLMetry's v1 wrappers, imported as it instruments, declare a pydantic
# model with a class-based config, which pydantic 2 warns about.
OPENLLMETRY_WARNS = pytest.mark.filterwarnings(
    "ignore:Support for class-based `config` is deprecated"
    ":pydantic.warnings.PydanticDeprecatedSince20"
)
INSTRUMENTATIONS = [
    pytest.param(OFFICIAL, id=OFFICIAL.name),
    pytest.param(OPENINFERENCE, id=OPENINFERENCE.name),
    pytest.param(OPENLLMETRY, id=OPENLLMETRY.name, marks=OPENLLMETRY_WARNS),
]
CONTENT_SWITCHES = (
    OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT,
    TRACELOOP_TRACE_CONTENT,
    OPENINFERENCE_HIDE_INPUTS,
    OPENINFERENCE_HIDE_OUTPUTS,
    OPENINFERENCE_HIDE_INPUT_MESSAGES,
    OPENINFERENCE_HIDE_OUTPUT_MESSAGES,
    OPENINFERENCE_HIDE_INPUT_TEXT,
    OPENINFERENCE_HIDE_OUTPUT_TEXT,
)


@attrs.frozen
class Run:
    """What one instrumented run left: its finished spans, the scripted
    server (with the requests it received), and the methods of the openai
    client (``module.Class.method``) that ``uninstrument()`` left wrapped."""

    spans: tuple[ReadableSpan, ...]
    server: FakeLLMServer
    leaked: tuple[str, ...]


def unwrap_openai() -> tuple[str, ...]:
    """Remove every wrapt wrapper still on a class of the openai package, and
    name them: an instrumentor that leaves one would put its spans (to its
    provider, already shut down) around the next case's calls."""
    leaked: list[str] = []
    for name, module in list(sys.modules.items()):
        if name != "openai" and not name.startswith("openai."):
            continue
        for cls in list(vars(module).values()):
            if not isinstance(cls, type) or cls.__module__ != name:
                continue
            for attr, value in list(vars(cls).items()):
                if isinstance(value, wrapt.BaseObjectProxy):
                    leaked.append(f"{name}.{cls.__qualname__}.{attr}")
                    while isinstance(value, wrapt.BaseObjectProxy):
                        value = value.__wrapped__
                    setattr(cls, attr, value)
    return tuple(sorted(leaked))


@pytest.fixture(autouse=True)
def _no_content_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each case sets only its own library's switches."""
    for name in CONTENT_SWITCHES:
        monkeypatch.delenv(name, raising=False)


def _play(
    tracer: Tracer,
    case: Instrumentation,
    url: str,
    task: str,
    conversation: Callable[[OpenAI], bool],
) -> None:
    """The agent: one run span around the conversation, its success on it."""
    with (
        case.agent_span(tracer, task) as span,
        OpenAI(base_url=url, api_key="x", max_retries=0) as client,
    ):
        span.set_attribute(SUCCESS, conversation(client))


async def instrumented_run(
    start_llm: StartLLM,
    monkeypatch: pytest.MonkeyPatch,
    case: Instrumentation,
    task: str,
    conversation: Callable[[OpenAI], bool],
    env: Mapping[str, str] | None = None,
) -> Run:
    """``conversation`` played by the real client, instrumented with ``case``
    (then uninstrumented, so no case leaks into the next)."""
    server, url = await start_llm(policy=policy)
    for name, value in (case.env if env is None else env).items():
        monkeypatch.setenv(name, value)
    assert unwrap_openai() == ()
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: SERVICE}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentor = case.instrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        tracer = provider.get_tracer("tutor-agent", "1.0")
        await trio.to_thread.run_sync(
            functools.partial(_play, tracer, case, url, task, conversation)
        )
    finally:
        instrumentor.uninstrument()
        leaked = unwrap_openai()
        provider.shutdown()
    return Run(tuple(exporter.get_finished_spans()), server, leaked)


def convert(spans: tuple[ReadableSpan, ...]) -> Converted:
    """The spans as one OTLP/JSON line, read and converted as
    ``fgo import-traces`` does (the default ``auto`` format)."""
    read = read_otlp_text(otlp_line(spans) + "\n", "traces.jsonl")
    assert read.problems == ()
    traces = TraceSet()
    traces.add(read.spans)
    assert traces.duplicates == []
    (trace_id,) = traces.trace_ids()
    return convert_trace(trace_id, traces.spans(trace_id), RULE)


def trajectory_of(run: Run, case: Instrumentation, llm_calls: int) -> Trajectory:
    """The run's one trajectory, after checking the spans are the library's:
    ``llm_calls`` LLM spans from its tracer, children of the run span."""
    (root,) = [s for s in run.spans if s.name == case.run_span]
    calls = [s for s in run.spans if s is not root]
    assert len(calls) == llm_calls
    for span in calls:
        assert span.instrumentation_scope is not None
        assert span.instrumentation_scope.name == case.scope
        assert span.parent is not None
        assert root.context is not None
        assert span.parent.span_id == root.context.span_id
    converted = convert(run.spans)
    assert converted.skipped is None, converted.skipped
    assert converted.repairs == ()
    traj = converted.trajectory
    assert traj is not None
    assert traj.id == trace_hex(root)
    assert traj.metadata == {
        "format": case.fmt,
        "service_name": SERVICE,
        "agent_name": AGENT,
        "run_span": case.run_span,
        "source_files": ["traces.jsonl"],
    }
    assert errors_of(TRAJECTORY_V, traj.to_json()) == []
    return traj


def as_sent(run: Run) -> list[dict[str, Any]]:
    """The conversation as the server saw it: the last request's messages,
    then the reply it sent (a step's JSON shape: content always present)."""
    last = run.server.requests[-1].body
    sent = [{"content": None, **m} for m in last["messages"]]
    return [*sent, {"role": "assistant", "content": policy(last)}]


# ---------------------------------------------------------------------------
# the tests
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", INSTRUMENTATIONS)
async def test_a_two_turn_conversation(
    case: Instrumentation, start_llm: StartLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = await instrumented_run(start_llm, monkeypatch, case, FRANCE, two_turns)
    assert len(run.server.requests) == 2
    traj = trajectory_of(run, case, llm_calls=2)
    steps = [s.to_json() for s in traj.steps]
    assert steps == TWO_TURNS_STEPS
    assert steps == as_sent(run)
    assert traj.task == FRANCE
    assert traj.outcome == Outcome(success=True)


@pytest.mark.parametrize("case", INSTRUMENTATIONS)
async def test_a_tool_call_in_the_history(
    case: Instrumentation, start_llm: StartLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = await instrumented_run(start_llm, monkeypatch, case, CALC_TASK, tool_history)
    traj = trajectory_of(run, case, llm_calls=1)
    steps = [s.to_json() for s in traj.steps]
    assert steps == TOOL_HISTORY_STEPS
    assert steps == as_sent(run)
    assert traj.task == CALC_TASK
    assert traj.outcome == Outcome(success=False)


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(OFFICIAL, id=OFFICIAL.name),
        pytest.param(OPENINFERENCE, id=OPENINFERENCE.name),
        pytest.param(
            OPENLLMETRY,
            id=OPENLLMETRY.name,
            marks=[
                OPENLLMETRY_WARNS,
                pytest.mark.xfail(
                    reason="opentelemetry-instrumentation-openai 0.62.4's uninstrument() calls "
                    "unwrap('openai.resources.chat.completions', 'Completions.create'), a "
                    "dotted attribute that opentelemetry-instrumentation 0.66b2's unwrap does "
                    "not resolve, so every wrapper stays on the client",
                    strict=True,
                ),
            ],
        ),
    ],
)
async def test_uninstrument_leaves_the_client_unwrapped(
    case: Instrumentation, start_llm: StartLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = await instrumented_run(start_llm, monkeypatch, case, FRANCE, two_turns)
    assert run.leaked == ()


async def test_the_official_legacy_switch_captures_no_content(
    start_llm: StartLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """openai-v2's README still offers ``true`` ("legacy") for content on
    events. opentelemetry-util-genai 1.x knows no such mode: it logs a warning
    and falls back to NO_CONTENT, so the spans carry no messages, and the
    trace is skipped with a reason that says what to look at."""
    env = {OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT: "true"}
    run = await instrumented_run(start_llm, monkeypatch, OFFICIAL, FRANCE, two_turns, env)
    chats = [s for s in run.spans if s.name != OFFICIAL.run_span]
    assert len(chats) == 2
    for span in chats:
        assert span.attributes is not None
        assert gen_ai.GEN_AI_INPUT_MESSAGES not in span.attributes
        assert gen_ai.GEN_AI_OUTPUT_MESSAGES not in span.attributes
        assert not span.events
    converted = convert(run.spans)
    assert converted.trajectory is None
    assert converted.skipped is not None
    assert converted.skipped.reason == "no_messages"
    assert converted.skipped.detail.startswith("2 LLM span(s) but no message content")
