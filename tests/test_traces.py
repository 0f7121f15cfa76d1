"""OTLP/JSON traces to trajectories (``fgo_actors.traces``).

Every fixture is emitted by the real OpenTelemetry SDK (a TracerProvider
with an in-memory exporter) and encoded with the OTLP exporter's own
``encode_spans``, then written as spec OTLP/JSON (hex ids) or as protobuf's
``MessageToDict`` writes it (base64 ids). Nothing here is hand-written JSON
of spans, except where a test is about a broken line.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from typing import Any

from google.protobuf import json_format
from hypothesis import given, settings
from hypothesis import strategies as st
from openinference.semconv.trace import (
    MessageAttributes,
    OpenInferenceSpanKindValues,
    SpanAttributes,
    ToolCallAttributes,
)
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.trace.v1.trace_pb2 import TracesData
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as gen_ai
from opentelemetry.semconv.attributes.service_attributes import SERVICE_NAME
from opentelemetry.trace import SpanKind
from opentelemetry.util.types import AttributeValue

from fgo_actors import Trajectory
from fgo_actors.traces import (
    Converted,
    Feedback,
    OutcomeRule,
    Span,
    TraceSet,
    convert_trace,
    read_feedback,
    read_otlp_text,
    summarize,
    to_otlp_json,
)
from fgo_actors.traces.conventions import CHOICE_EVENT, EVENT_CONTENT, indexed

from .helpers import errors_of, validator

OP = gen_ai.GenAiOperationNameValues
OI = SpanAttributes
MSG = MessageAttributes
CALL = ToolCallAttributes
KIND = OpenInferenceSpanKindValues
SUCCESS = "app.run.success"
SCORE = "app.run.score"
RULE = OutcomeRule(success_attr=SUCCESS, score_attr=SCORE)
TRAJECTORY_V = validator("trajectory")
Attrs = dict[str, AttributeValue]


# ---------------------------------------------------------------------------
# emitting traces with the real SDK
# ---------------------------------------------------------------------------


class Recorder:
    """A TracerProvider with an in-memory exporter and a clock of its own, so
    every span's start and end time is distinct and in order (a real run's
    are too; the SDK's own clock can give two spans the same nanosecond)."""

    def __init__(self, service: str = "weather-agent") -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service}))
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("fgo-tests", "1.0")
        self.now = 1_700_000_000_000_000_000

    def tick(self) -> int:
        self.now += 1_000_000
        return self.now

    @contextlib.contextmanager
    def span(
        self, name: str, attributes: Attrs | None = None, kind: SpanKind = SpanKind.INTERNAL
    ) -> Iterator[Any]:
        with self.tracer.start_as_current_span(
            name, kind=kind, attributes=attributes, start_time=self.tick(), end_on_exit=False
        ) as span:
            yield span
            span.end(end_time=self.tick())

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())


def parts(text: str) -> list[dict[str, Any]]:
    return [{"type": "text", "content": text}]


WEATHER_SYSTEM = "You are a weather assistant."
WEATHER_TASK = "What's the weather in Paris?"


def genai_run(
    rec: Recorder, *, success: AttributeValue | None = True, tomorrow: bool = True
) -> None:
    """An agent run as the GenAI conventions describe it (current JSON
    attributes): an HTTP request span holding an invoke_agent span, two or
    three chat spans re-sending the conversation, and a tool span."""
    system = json.dumps(parts(WEATHER_SYSTEM))
    user = {"role": "user", "parts": parts(WEATHER_TASK)}
    call = {
        "type": "tool_call",
        "id": "call_1",
        "name": "get_weather",
        "arguments": {"city": "Paris"},
    }
    assistant_call = {"role": "assistant", "parts": [call], "finish_reason": "tool_calls"}
    tool = {
        "role": "tool",
        "parts": [{"type": "tool_call_response", "id": "call_1", "response": "rainy, 14°C"}],
    }
    answer = {
        "role": "assistant",
        "parts": parts("It is rainy in Paris, 14°C."),
        "finish_reason": "stop",
    }
    agent: Attrs = {
        gen_ai.GEN_AI_OPERATION_NAME: OP.INVOKE_AGENT.value,
        gen_ai.GEN_AI_AGENT_NAME: "weather",
    }
    if success is not None:
        agent[SUCCESS] = success
    with (
        rec.span("POST /ask", {"http.request.method": "POST"}, SpanKind.SERVER),
        rec.span("invoke_agent weather", agent),
    ):
        chat: Attrs = {
            gen_ai.GEN_AI_OPERATION_NAME: OP.CHAT.value,
            gen_ai.GEN_AI_REQUEST_MODEL: "gpt-test",
            gen_ai.GEN_AI_SYSTEM_INSTRUCTIONS: system,
        }
        with rec.span(
            "chat gpt-test",
            {
                **chat,
                gen_ai.GEN_AI_INPUT_MESSAGES: json.dumps([user]),
                gen_ai.GEN_AI_OUTPUT_MESSAGES: json.dumps([assistant_call]),
            },
            SpanKind.CLIENT,
        ):
            pass
        with rec.span(
            "execute_tool get_weather",
            {
                gen_ai.GEN_AI_OPERATION_NAME: OP.EXECUTE_TOOL.value,
                gen_ai.GEN_AI_TOOL_NAME: "get_weather",
                gen_ai.GEN_AI_TOOL_CALL_ID: "call_1",
                gen_ai.GEN_AI_TOOL_CALL_ARGUMENTS: json.dumps({"city": "Paris"}),
                gen_ai.GEN_AI_TOOL_CALL_RESULT: "rainy, 14°C",
            },
        ):
            pass
        history = [user, assistant_call, tool]
        with rec.span(
            "chat gpt-test",
            {
                **chat,
                gen_ai.GEN_AI_INPUT_MESSAGES: json.dumps(history),
                gen_ai.GEN_AI_OUTPUT_MESSAGES: json.dumps([answer]),
            },
            SpanKind.CLIENT,
        ):
            pass
        if tomorrow:
            follow_up = {"role": "user", "parts": parts("And tomorrow?")}
            sunny = {"role": "assistant", "parts": parts("Sunny."), "finish_reason": "stop"}
            with rec.span(
                "chat gpt-test",
                {
                    **chat,
                    gen_ai.GEN_AI_INPUT_MESSAGES: json.dumps([*history, answer, follow_up]),
                    gen_ai.GEN_AI_OUTPUT_MESSAGES: json.dumps([sunny]),
                },
                SpanKind.CLIENT,
            ):
                pass


GENAI_STEPS = [
    {"role": "system", "content": WEATHER_SYSTEM},
    {"role": "user", "content": WEATHER_TASK},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "content": "rainy, 14°C", "name": "get_weather", "tool_call_id": "call_1"},
    {"role": "assistant", "content": "It is rainy in Paris, 14°C."},
    {"role": "user", "content": "And tomorrow?"},
    {"role": "assistant", "content": "Sunny."},
]

BOOKING_TASK = "Book a table for two at 7pm."


def oi_message(
    prefix: str, i: int, role: str, content: str | None = None, more: Attrs | None = None
) -> Attrs:
    out: Attrs = {f"{prefix}.{i}.{MSG.MESSAGE_ROLE}": role}
    if content is not None:
        out[f"{prefix}.{i}.{MSG.MESSAGE_CONTENT}"] = content
    for key, value in (more or {}).items():
        out[f"{prefix}.{i}.{key}"] = value
    return out


def openinference_run(rec: Recorder, *, success: AttributeValue | None = "true") -> None:
    """An agent run with OpenInference attributes: AGENT, a CHAIN, two LLM
    spans (flattened messages, a tool call) and a TOOL span without a call id."""
    inp, out = OI.LLM_INPUT_MESSAGES, OI.LLM_OUTPUT_MESSAGES
    tool_call = f"{MSG.MESSAGE_TOOL_CALLS}.0"
    call: Attrs = {
        f"{tool_call}.{CALL.TOOL_CALL_ID}": "c1",
        f"{tool_call}.{CALL.TOOL_CALL_FUNCTION_NAME}": "book_table",
        f"{tool_call}.{CALL.TOOL_CALL_FUNCTION_ARGUMENTS_JSON}": '{"people": 2, "time": "19:00"}',
    }
    agent: Attrs = {
        OI.OPENINFERENCE_SPAN_KIND: KIND.AGENT.value,
        OI.INPUT_VALUE: BOOKING_TASK,
        OI.AGENT_NAME: "concierge",
        SCORE: 1,
    }
    if success is not None:
        agent[SUCCESS] = success
    first_input = {
        **oi_message(inp, 0, "system", "You book restaurants."),
        **oi_message(inp, 1, "user", BOOKING_TASK),
    }
    with (
        rec.span("concierge", agent),
        rec.span("plan", {OI.OPENINFERENCE_SPAN_KIND: KIND.CHAIN.value}),
    ):
        with rec.span(
            "ChatCompletion",
            {
                OI.OPENINFERENCE_SPAN_KIND: KIND.LLM.value,
                **first_input,
                **oi_message(out, 0, "assistant", more=call),
            },
        ):
            pass
        with rec.span(
            "book_table",
            {
                OI.OPENINFERENCE_SPAN_KIND: KIND.TOOL.value,
                OI.TOOL_NAME: "book_table",
                OI.INPUT_VALUE: '{"people": 2, "time": "19:00"}',
                OI.OUTPUT_VALUE: "confirmed #42",
            },
        ):
            pass
        with rec.span(
            "ChatCompletion",
            {
                OI.OPENINFERENCE_SPAN_KIND: KIND.LLM.value,
                **first_input,
                **oi_message(inp, 2, "assistant", more=call),
                **oi_message(inp, 3, "tool", "confirmed #42", {MSG.MESSAGE_TOOL_CALL_ID: "c1"}),
                **oi_message(out, 0, "assistant", "Your table is booked (#42)."),
            },
        ):
            pass


OI_STEPS = [
    {"role": "system", "content": "You book restaurants."},
    {"role": "user", "content": BOOKING_TASK},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "book_table", "arguments": '{"people": 2, "time": "19:00"}'},
            }
        ],
    },
    {"role": "tool", "content": "confirmed #42", "name": "book_table", "tool_call_id": "c1"},
    {"role": "assistant", "content": "Your table is booked (#42)."},
]


# ---------------------------------------------------------------------------
# writing them out
# ---------------------------------------------------------------------------


def otlp_line(spans: Sequence[ReadableSpan], *, hex_ids: bool = True) -> str:
    """One OTLP/JSON line of ``spans``, as the collector's file exporter
    writes it (hex ids), or with protobuf's base64 ids."""
    request = encode_spans(spans)
    doc = to_otlp_json(request) if hex_ids else json_format.MessageToDict(request)
    return json.dumps(doc)


def otlp_text(batches: Sequence[Sequence[ReadableSpan]], *, hex_ids: bool = True) -> str:
    return "".join(otlp_line(b, hex_ids=hex_ids) + "\n" for b in batches if b)


def trace_hex(span: ReadableSpan) -> str:
    assert span.context is not None
    return format(span.context.trace_id, "032x")


def read_all(texts: dict[str, str]) -> tuple[TraceSet, list[Any]]:
    traces = TraceSet()
    problems: list[Any] = []
    for name, text in texts.items():
        read = read_otlp_text(text, name)
        traces.add(read.spans)
        problems += read.problems
    return traces, problems


def convert_all(traces: TraceSet, rule: OutcomeRule = RULE, **kw: Any) -> dict[str, Converted]:
    return {t: convert_trace(t, traces.spans(t), rule, **kw) for t in traces.trace_ids()}


def only(converted: dict[str, Converted]) -> Trajectory:
    assert len(converted) == 1, converted
    (c,) = converted.values()
    assert c.trajectory is not None, c.skipped
    return c.trajectory


def steps_json(traj: Trajectory) -> list[dict[str, Any]]:
    return [s.to_json() for s in traj.steps]


# ---------------------------------------------------------------------------
# the wire format
# ---------------------------------------------------------------------------


def test_hex_ids_are_the_sdk_ids() -> None:
    rec = Recorder()
    genai_run(rec)
    spans = rec.spans()
    doc = json.loads(otlp_line(spans))
    written = doc["resourceSpans"][0]["scopeSpans"][0]["spans"]
    sdk = {format(s.context.span_id, "016x"): s for s in spans if s.context}
    assert {w["spanId"] for w in written} == set(sdk)
    for w in written:
        s = sdk[w["spanId"]]
        assert w["traceId"] == trace_hex(s)
        parent = format(s.parent.span_id, "016x") if s.parent else None
        assert w.get("parentSpanId") == parent
        assert isinstance(w["startTimeUnixNano"], str), "int64 is a string in OTLP/JSON"
        assert isinstance(w["kind"], int), "enums are integers in OTLP/JSON"

    read = read_otlp_text(json.dumps(doc), "t.jsonl")
    assert read.problems == ()
    assert {(s.trace_id, s.span_id, s.parent_id) for s in read.spans} == {
        (
            trace_hex(s),
            format(s.context.span_id, "016x"),
            format(s.parent.span_id, "016x") if s.parent else None,
        )
        for s in spans
        if s.context
    }


def test_base64_ids_read_the_same_as_hex() -> None:
    rec = Recorder()
    genai_run(rec)
    spans = rec.spans()
    hex_read = read_otlp_text(otlp_line(spans), "a")
    b64_text = otlp_line(spans, hex_ids=False)
    assert trace_hex(spans[0]) not in b64_text, "MessageToDict writes base64"
    b64_read = read_otlp_text(b64_text, "a")
    assert b64_read.problems == ()
    assert b64_read.spans == hex_read.spans


def test_json_format_alone_misreads_hex_ids() -> None:
    """Why the ids are rewritten: protobuf reads bytes as base64, and a hex
    trace id is valid base64, so it parses silently as 24 wrong bytes."""
    rec = Recorder()
    genai_run(rec)
    spans = rec.spans()
    data = json_format.Parse(otlp_line(spans), TracesData())
    raw = data.resource_spans[0].scope_spans[0].spans[0].trace_id
    assert len(raw) == 24
    assert raw.hex() != trace_hex(spans[0])


@given(trace_id=st.binary(min_size=16, max_size=16), span_id=st.binary(min_size=8, max_size=8))
def test_any_ids_round_trip_in_hex_and_base64(trace_id: bytes, span_id: bytes) -> None:
    data = TracesData()
    span = data.resource_spans.add().scope_spans.add().spans.add()
    span.trace_id, span.span_id, span.name = trace_id, span_id, "s"
    for text in (json.dumps(to_otlp_json(data)), json_format.MessageToJson(data)):
        read = read_otlp_text(text, "f")
        if not any(trace_id) or not any(span_id):
            assert [p.reason for p in read.problems] == ["bad_span"]
            continue
        assert read.problems == ()
        assert [(s.trace_id, s.span_id) for s in read.spans] == [(trace_id.hex(), span_id.hex())]


def test_a_malformed_line_in_the_middle_skips_only_that_line() -> None:
    rec = Recorder()
    genai_run(rec)
    spans = rec.spans()
    lines = [otlp_line([s]) for s in spans]
    lines.insert(2, '{"resourceSpans": [{"scopeSpans": ')
    lines.insert(4, '{"hello": "world"}')
    read = read_otlp_text("\n".join(lines) + "\n", "traces.jsonl")
    assert len(read.spans) == len(spans)
    assert [(p.reason, p.where) for p in read.problems] == [
        ("malformed_json", "traces.jsonl:3"),
        ("not_otlp", "traces.jsonl:5"),
    ]
    assert read.documents == len(spans)
    traces = TraceSet()
    traces.add(read.spans)
    assert steps_json(only(convert_all(traces))) == GENAI_STEPS


def test_a_single_pretty_printed_document() -> None:
    rec = Recorder()
    genai_run(rec)
    doc = to_otlp_json(encode_spans(rec.spans()))
    read = read_otlp_text(json.dumps(doc, indent=2), "one.json")
    assert read.problems == ()
    assert read.documents == 1
    assert {s.where for s in read.spans} == {"one.json:1"}
    broken = json.dumps(doc, indent=2)[:-40]
    read = read_otlp_text(broken, "one.json")
    assert read.spans == ()
    assert [p.reason for p in read.problems] == ["malformed_json"], "one problem, not one a line"


def test_a_span_with_bad_ids_is_skipped_and_named() -> None:
    rec = Recorder()
    genai_run(rec)
    doc = to_otlp_json(encode_spans(rec.spans()))
    doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["spanId"] = "00" * 8
    read = read_otlp_text(json.dumps(doc), "f.jsonl")
    assert [(p.reason, p.where) for p in read.problems] == [("bad_span", "f.jsonl:1")]
    assert len(read.spans) == len(rec.spans()) - 1


# ---------------------------------------------------------------------------
# the conventions
# ---------------------------------------------------------------------------


def test_a_genai_run_becomes_its_conversation() -> None:
    rec = Recorder()
    genai_run(rec)
    traces, problems = read_all({"run.jsonl": otlp_text([rec.spans()])})
    assert problems == []
    converted = convert_all(traces)
    traj = only(converted)
    assert traj.id == trace_hex(rec.spans()[0])
    assert traj.task == WEATHER_TASK
    assert steps_json(traj) == GENAI_STEPS
    assert traj.outcome.success is True
    assert traj.metadata == {
        "format": "otlp-json",
        "service_name": "weather-agent",
        "agent_name": "weather",
        "run_span": "invoke_agent weather",
        "source_files": ["run.jsonl"],
    }
    assert next(iter(converted.values())).repairs == ()
    record = traj.to_json()
    assert errors_of(TRAJECTORY_V, record) == []
    assert Trajectory.from_json(json.loads(json.dumps(record))) == traj


def test_an_openinference_run_becomes_its_conversation() -> None:
    rec = Recorder(service="concierge")
    openinference_run(rec)
    traces, _ = read_all({"oi.jsonl": otlp_text([rec.spans()])})
    traj = only(convert_all(traces))
    assert traj.task == BOOKING_TASK
    # The tool span has no call id: it answers the open call to its tool.
    assert steps_json(traj) == OI_STEPS
    assert (traj.outcome.success, traj.outcome.score) == (True, 1.0)
    assert traj.metadata is not None
    assert traj.metadata["format"] == "openinference"
    assert traj.metadata["agent_name"] == "concierge"
    assert errors_of(TRAJECTORY_V, traj.to_json()) == []


def test_the_format_chooses_the_convention() -> None:
    rec = Recorder()
    openinference_run(rec)
    traces, _ = read_all({"oi.jsonl": otlp_text([rec.spans()])})
    (c,) = convert_all(traces, fmt="otlp-json").values()
    assert c.trajectory is None
    assert c.skipped is not None
    assert c.skipped.reason == "no_messages"
    assert only(convert_all(traces, fmt="openinference")).steps


def test_openllmetry_indexed_attributes() -> None:
    rec = Recorder()
    prompt, completion = gen_ai.GEN_AI_PROMPT, gen_ai.GEN_AI_COMPLETION
    with rec.span("run", {SUCCESS: False}):
        with rec.span(
            "openai.chat",
            {
                f"{prompt}.0.role": "system",
                f"{prompt}.0.content": "Be brief.",
                f"{prompt}.1.role": "user",
                f"{prompt}.1.content": "Add 2 and 3.",
                f"{completion}.0.role": "assistant",
                f"{completion}.0.finish_reason": "tool_calls",
                f"{completion}.0.tool_calls.0.id": "t1",
                f"{completion}.0.tool_calls.0.name": "add",
                f"{completion}.0.tool_calls.0.arguments": '{"a": 2, "b": 3}',
            },
        ):
            pass
        with rec.span(
            "openai.chat",
            {
                f"{prompt}.0.role": "system",
                f"{prompt}.0.content": "Be brief.",
                f"{prompt}.1.role": "user",
                f"{prompt}.1.content": "Add 2 and 3.",
                f"{prompt}.2.role": "assistant",
                f"{prompt}.2.tool_calls.0.id": "t1",
                f"{prompt}.2.tool_calls.0.name": "add",
                f"{prompt}.2.tool_calls.0.arguments": '{"a": 2, "b": 3}',
                f"{prompt}.3.role": "tool",
                f"{prompt}.3.tool_call_id": "t1",
                f"{prompt}.3.content": "5",
                f"{completion}.0.role": "assistant",
                f"{completion}.0.content": "5",
            },
        ):
            pass
    traces, _ = read_all({"f": otlp_text([rec.spans()])})
    traj = only(convert_all(traces))
    assert steps_json(traj) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Add 2 and 3."},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "t1",
                    "type": "function",
                    "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'},
                }
            ],
        },
        # No tool span: the tool result is the one new message of the second input.
        {"role": "tool", "content": "5", "tool_call_id": "t1"},
        {"role": "assistant", "content": "5"},
    ]
    assert traj.outcome.success is False
    assert traj.metadata is not None
    assert "run_span" not in traj.metadata, "no agent span: the whole trace is the run"


def test_span_events_in_both_body_shapes() -> None:
    """The 1.28-1.36 events, as span events: the body in gen_ai.event.content
    (Azure's SDKs) or as the attributes themselves."""
    rec = Recorder()
    with rec.span("chat", {gen_ai.GEN_AI_OPERATION_NAME: OP.CHAT.value, SUCCESS: 1}) as span:
        span.add_event("gen_ai.system.message", {"content": "Stay on topic."})
        span.add_event(
            "gen_ai.user.message",
            {EVENT_CONTENT: json.dumps({"role": "user", "content": "Hello?"})},
        )
        span.add_event(
            CHOICE_EVENT,
            {
                EVENT_CONTENT: json.dumps(
                    {"index": 0, "finish_reason": "stop", "message": {"content": "Hi."}}
                )
            },
        )
    traces, _ = read_all({"f": otlp_text([rec.spans()])})
    assert steps_json(only(convert_all(traces))) == [
        {"role": "system", "content": "Stay on topic."},
        {"role": "user", "content": "Hello?"},
        {"role": "assistant", "content": "Hi."},
    ]


def test_the_older_content_events() -> None:
    rec = Recorder()
    with rec.span("chat", {gen_ai.GEN_AI_OPERATION_NAME: OP.CHAT.value, SUCCESS: "0"}) as span:
        span.add_event(
            "gen_ai.content.prompt",
            {gen_ai.GEN_AI_PROMPT: json.dumps([{"role": "user", "content": "2+2?"}])},
        )
        span.add_event(
            "gen_ai.content.completion",
            {gen_ai.GEN_AI_COMPLETION: json.dumps([{"role": "assistant", "content": "4"}])},
        )
    traces, _ = read_all({"f": otlp_text([rec.spans()])})
    traj = only(convert_all(traces))
    assert steps_json(traj) == [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    assert traj.outcome.success is False


def test_indexed_groups_flattened_lists() -> None:
    attrs = {"p.1.role": "b", "p.0.role": "a", "p.0.x.0.y": 1, "p.10.role": "c", "px.0.role": "no"}
    assert indexed(attrs, "p") == [{"role": "a", "x.0.y": 1}, {"role": "b"}, {"role": "c"}]


def test_a_call_inside_a_call_of_its_kind_is_read_once() -> None:
    """A wrapper library's LLM span around the client's: one call, read once."""
    rec = Recorder()
    messages: Attrs = {
        gen_ai.GEN_AI_OPERATION_NAME: OP.CHAT.value,
        gen_ai.GEN_AI_INPUT_MESSAGES: json.dumps([{"role": "user", "parts": parts("Hi")}]),
        gen_ai.GEN_AI_OUTPUT_MESSAGES: json.dumps([{"role": "assistant", "parts": parts("Yo")}]),
    }
    with rec.span("wrapper", {**messages, SUCCESS: True}), rec.span("client", messages):
        pass
    traces, _ = read_all({"f": otlp_text([rec.spans()])})
    assert steps_json(only(convert_all(traces))) == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo"},
    ]


def test_spans_outside_the_agent_run_are_ignored_and_counted() -> None:
    rec = Recorder()
    with rec.span("job"):
        genai_run(rec, tomorrow=False)
        with rec.span(
            "chat grader",
            {
                gen_ai.GEN_AI_OPERATION_NAME: OP.CHAT.value,
                gen_ai.GEN_AI_INPUT_MESSAGES: json.dumps(
                    [{"role": "user", "parts": parts("Grade")}]
                ),
            },
        ):
            pass
    traces, _ = read_all({"f": otlp_text([rec.spans()])})
    converted = convert_all(traces)
    traj = only(converted)
    assert steps_json(traj) == GENAI_STEPS[:5]
    (c,) = converted.values()
    assert [(i.reason, i.trace_id) for i in c.repairs] == [("outside_run", traj.id)]


# ---------------------------------------------------------------------------
# joining, deduplicating
# ---------------------------------------------------------------------------


def _two_runs() -> tuple[list[ReadableSpan], dict[str, Trajectory]]:
    rec = Recorder()
    genai_run(rec)
    openinference_run(rec)
    spans = rec.spans()
    traces, _ = read_all({"all.jsonl": otlp_text([spans])})
    whole = {t: c.trajectory for t, c in convert_all(traces).items() if c.trajectory}
    assert len(whole) == 2
    return spans, whole


SPANS, WHOLE = _two_runs()


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_traces_split_across_any_files_read_the_same(data: st.DataObject) -> None:
    """Any split of the spans over any number of files, lines and orders
    gives the same trajectories as one file."""
    files = data.draw(st.integers(1, 5))
    where = data.draw(
        st.lists(
            st.tuples(st.integers(0, files - 1), st.integers(0, 2)),
            min_size=len(SPANS),
            max_size=len(SPANS),
        )
    )
    order = data.draw(st.permutations(range(len(SPANS))))
    batches: dict[tuple[int, int], list[ReadableSpan]] = {}
    for i in order:
        batches.setdefault(where[i], []).append(SPANS[i])
    texts = {
        f"part{f}.jsonl": otlp_text(
            [batches.get((f, line), []) for line in range(3)], hex_ids=data.draw(st.booleans())
        )
        for f in range(files)
    }
    traces, problems = read_all(texts)
    assert problems == []
    converted = convert_all(traces)
    assert {t: c.trajectory for t, c in converted.items()} == WHOLE
    for t, c in converted.items():
        assert c.trajectory is not None
        assert c.trajectory.metadata is not None
        used = {f"part{f}.jsonl" for i, (f, _) in enumerate(where) if trace_hex(SPANS[i]) == t}
        assert c.trajectory.metadata["source_files"] == sorted(used)


def test_a_span_read_twice_is_kept_once_and_counted() -> None:
    rec = Recorder()
    genai_run(rec)
    spans = rec.spans()
    traces, _ = read_all({"a": otlp_text([spans]), "b": otlp_text([spans[:2]])})
    assert steps_json(only(convert_all(traces))) == GENAI_STEPS
    assert [(i.reason, i.where) for i in traces.duplicates] == [("duplicate_span", "b:1")] * 2


TURN = st.sampled_from(["continue", "ok", "look", "go north", "What now?"])


@settings(max_examples=50, deadline=None)
@given(turns=st.lists(st.tuples(TURN, TURN, st.booleans()), min_size=1, max_size=6))
def test_a_conversation_resent_in_every_call_is_read_once(
    turns: list[tuple[str, str, bool]],
) -> None:
    """Each call re-sends the whole conversation so far (repeated words
    included); the steps are that conversation exactly, each message once."""
    rec = Recorder()
    history: list[dict[str, Any]] = []
    expected: list[dict[str, Any]] = []
    with rec.span(
        "invoke_agent", {gen_ai.GEN_AI_OPERATION_NAME: OP.INVOKE_AGENT.value, SUCCESS: True}
    ):
        for n, (user, reply, use_tool) in enumerate(turns):
            history.append({"role": "user", "parts": parts(user)})
            expected.append({"role": "user", "content": user})
            out: dict[str, Any] = {"role": "assistant", "parts": parts(reply)}
            if use_tool:
                out["parts"] = [
                    *out["parts"],
                    {"type": "tool_call", "id": f"c{n}", "name": "act", "arguments": {"do": user}},
                ]
            with rec.span(
                "chat",
                {
                    gen_ai.GEN_AI_OPERATION_NAME: OP.CHAT.value,
                    gen_ai.GEN_AI_INPUT_MESSAGES: json.dumps(history),
                    gen_ai.GEN_AI_OUTPUT_MESSAGES: json.dumps([out]),
                },
            ):
                pass
            history.append(out)
            step: dict[str, Any] = {"role": "assistant", "content": reply}
            if use_tool:
                step["tool_calls"] = [
                    {
                        "id": f"c{n}",
                        "type": "function",
                        "function": {"name": "act", "arguments": json.dumps({"do": user})},
                    }
                ]
            expected.append(step)
            if use_tool:
                with rec.span(
                    "execute_tool act",
                    {
                        gen_ai.GEN_AI_OPERATION_NAME: OP.EXECUTE_TOOL.value,
                        gen_ai.GEN_AI_TOOL_NAME: "act",
                        gen_ai.GEN_AI_TOOL_CALL_RESULT: "done",
                    },
                ):
                    pass
                history.append(
                    {
                        "role": "tool",
                        "parts": [
                            {"type": "tool_call_response", "id": f"c{n}", "response": "done"}
                        ],
                    }
                )
                expected.append(
                    {"role": "tool", "content": "done", "name": "act", "tool_call_id": f"c{n}"}
                )
    traces, _ = read_all({"f": otlp_text([rec.spans()])})
    assert steps_json(only(convert_all(traces))) == expected


# ---------------------------------------------------------------------------
# bad input: skipped or repaired, and counted
# ---------------------------------------------------------------------------


def test_an_unknown_span_kind_is_ignored_and_counted() -> None:
    rec = Recorder()
    with rec.span("job"):
        genai_run(rec)
        with rec.span("mystery", {gen_ai.GEN_AI_OPERATION_NAME: "summon_spirit"}):
            pass
    oi = Recorder()
    with oi.span("job"):
        openinference_run(oi)
        with oi.span("weird", {OI.OPENINFERENCE_SPAN_KIND: "PONDER"}):
            pass
    traces, _ = read_all({"a": otlp_text([rec.spans()]), "b": otlp_text([oi.spans()])})
    converted = convert_all(traces)
    assert [steps_json(c.trajectory) for c in converted.values() if c.trajectory] == [
        GENAI_STEPS,
        OI_STEPS,
    ]
    summary = summarize(list(converted.values()))
    assert summary.counts == {"unknown_span_kind": 2}
    details = [i.detail for i in summary.examples["unknown_span_kind"]]
    assert "'summon_spirit'" in details[0]
    assert "'PONDER'" in details[1]


def test_a_trace_without_messages_is_skipped_with_a_hint() -> None:
    rec = Recorder()
    agent: Attrs = {gen_ai.GEN_AI_OPERATION_NAME: OP.INVOKE_AGENT.value, SUCCESS: True}
    # Content capture off: the chat span has no messages.
    with (
        rec.span("invoke_agent", agent),
        rec.span("chat", {gen_ai.GEN_AI_OPERATION_NAME: OP.CHAT.value}),
    ):
        pass
    with rec.tracer.start_as_current_span("GET /health", context=None):
        pass
    traces, _ = read_all({"f": otlp_text([rec.spans()])})
    converted = list(convert_all(traces).values())
    assert [c.trajectory for c in converted] == [None, None]
    skipped = [c.skipped for c in converted]
    assert all(s is not None and s.reason == "no_messages" for s in skipped)
    assert skipped[0] is not None
    assert "CAPTURE_MESSAGE_CONTENT" in skipped[0].detail
    assert skipped[1] is not None
    assert "no LLM span" in skipped[1].detail


def test_no_outcome_skips_the_trace_and_a_bad_one_too() -> None:
    rec = Recorder()
    genai_run(rec, success=None)
    genai_run(rec, success="maybe")
    genai_run(rec, success=True)
    traces, _ = read_all({"f": otlp_text([rec.spans()])})
    converted = list(convert_all(traces, OutcomeRule(success_attr=SUCCESS)).values())
    assert [c.skipped.reason if c.skipped else "ok" for c in converted] == [
        "no_outcome",
        "bad_outcome",
        "ok",
    ]
    assert converted[1].skipped is not None
    assert "'maybe'" in converted[1].skipped.detail
    summary = summarize(converted)
    assert (summary.traces, summary.written, summary.skipped) == (3, 1, 2)


def test_success_from_the_resource_and_from_a_score_threshold() -> None:
    rec = Recorder()
    rec.provider = TracerProvider(resource=Resource.create({SERVICE_NAME: "x", "eval.ok": "true"}))
    rec.provider.add_span_processor(SimpleSpanProcessor(rec.exporter))
    rec.tracer = rec.provider.get_tracer("t")
    genai_run(rec, success=None)
    traces, _ = read_all({"f": otlp_text([rec.spans()])})
    assert only(convert_all(traces, OutcomeRule(success_attr="eval.ok"))).outcome.success is True

    oi = Recorder()
    openinference_run(oi, success=None)  # its agent span has SCORE = 1
    traces, _ = read_all({"f": otlp_text([oi.spans()])})
    (c,) = convert_all(traces, OutcomeRule(score_attr=SCORE)).values()
    assert c.skipped is not None
    assert c.skipped.reason == "no_outcome"
    assert "threshold" in c.skipped.detail
    rule = OutcomeRule(score_attr=SCORE, success_threshold=0.5)
    assert only(convert_all(traces, rule)).outcome.to_json() == {"success": True, "score": 1.0}
    rule = OutcomeRule(score_attr=SCORE, success_threshold=1.5)
    assert only(convert_all(traces, rule)).outcome.success is False


def test_feedback_keyed_by_trace_id() -> None:
    rec = Recorder()
    genai_run(rec, success=None)
    openinference_run(rec, success="true")
    spans = rec.spans()
    genai_id = trace_hex(spans[0])
    oi_id = trace_hex(spans[-1])
    lines = [
        {"trace_id": genai_id.upper(), "success": False, "score": 0.2, "feedback": "wrong city"},
        {"trace_id": oi_id, "feedback": "polite"},
        {"trace_id": genai_id, "success": True},
        {"trace_id": "ab" * 16, "success": "perhaps"},
        ["not", "an", "object"],
        {"trace_id": "cd" * 16},
        {"trace_id": "ef" * 16, "success": True},
    ]
    text = "".join(json.dumps(line) + "\n" for line in lines) + '{"trace_id": \n\n'
    feedback, problems = read_feedback(text, "fb.jsonl")
    assert [(p.reason, p.where) for p in problems] == [
        ("bad_feedback", "fb.jsonl:3"),
        ("bad_feedback", "fb.jsonl:4"),
        ("bad_feedback", "fb.jsonl:5"),
        ("bad_feedback", "fb.jsonl:6"),
        ("bad_feedback", "fb.jsonl:8"),
    ]
    assert feedback[genai_id] == Feedback(genai_id, False, 0.2, "wrong city", "fb.jsonl:1")
    traces, _ = read_all({"f": otlp_text([spans])})
    rule = OutcomeRule(success_attr=SUCCESS, feedback=feedback)
    converted = convert_all(traces, rule)
    genai_traj = converted[genai_id].trajectory
    assert genai_traj is not None
    assert genai_traj.outcome.to_json() == {
        "success": False,
        "score": 0.2,
        "feedback": "wrong city",
    }
    # The feedback file gives only text for the second run; the attribute its success.
    oi_traj = converted[oi_id].trajectory
    assert oi_traj is not None
    assert oi_traj.outcome.to_json() == {"success": True, "feedback": "polite"}
    summary = summarize(list(converted.values()), problems, feedback=feedback)
    assert summary.unmatched_feedback == 1


def test_an_enormous_attribute_is_cut_and_counted() -> None:
    rec = Recorder()
    huge = "word " * 200_000
    with (
        rec.span(
            "invoke_agent", {gen_ai.GEN_AI_OPERATION_NAME: OP.INVOKE_AGENT.value, SUCCESS: True}
        ),
        rec.span(
            "chat",
            {
                gen_ai.GEN_AI_OPERATION_NAME: OP.CHAT.value,
                gen_ai.GEN_AI_INPUT_MESSAGES: json.dumps([{"role": "user", "parts": parts(huge)}]),
                gen_ai.GEN_AI_OUTPUT_MESSAGES: json.dumps(
                    [
                        {
                            "role": "assistant",
                            "parts": [
                                {
                                    "type": "tool_call",
                                    "id": "x",
                                    "name": "f",
                                    "arguments": {"blob": huge},
                                }
                            ],
                        }
                    ]
                ),
            },
        ),
    ):
        pass
    traces, _ = read_all({"f": otlp_text([rec.spans()])})
    converted = convert_all(traces, max_chars=1000)
    traj = only(converted)
    user, assistant = traj.steps
    assert user.content is not None
    assert user.content.startswith("word word")
    assert len(user.content) < 1100
    assert "999,000 more characters cut" in user.content
    assert traj.task == user.content
    assert assistant.tool_calls is not None
    assert len(assistant.tool_calls[0]["function"]["arguments"]) < 1100
    (c,) = converted.values()
    assert [i.reason for i in c.repairs] == ["truncated"] * 3  # content, arguments, task
    assert errors_of(TRAJECTORY_V, traj.to_json()) == []


def test_messages_that_cannot_be_read_are_dropped_and_counted() -> None:
    rec = Recorder()
    with rec.span(
        "chat",
        {
            gen_ai.GEN_AI_OPERATION_NAME: OP.CHAT.value,
            SUCCESS: True,
            gen_ai.GEN_AI_INPUT_MESSAGES: json.dumps(
                [
                    {"role": "narrator", "parts": parts("Once upon a time")},
                    {"role": "user", "parts": parts("Hi")},
                ]
            ),
            gen_ai.GEN_AI_OUTPUT_MESSAGES: '[{"role": "assistant", "parts": [',
        },
    ):
        pass
    traces, _ = read_all({"f": otlp_text([rec.spans()])})
    converted = convert_all(traces)
    assert steps_json(only(converted)) == [{"role": "user", "content": "Hi"}]
    (c,) = converted.values()
    assert sorted(i.reason for i in c.repairs) == ["bad_messages", "unknown_role"]
    assert all(i.where == "f:1" for i in c.repairs)


def test_the_summary_counts_every_reason_with_examples() -> None:
    rec = Recorder()
    for _ in range(5):
        genai_run(rec, success=None)
    genai_run(rec)
    traces, _ = read_all({"f": otlp_text([rec.spans()])})
    converted = list(convert_all(traces).values())
    read = read_otlp_text("not json\n", "bad.jsonl")
    summary = summarize(converted, read.problems)
    assert (summary.traces, summary.written, summary.skipped) == (6, 1, 5)
    assert summary.counts == {"malformed_json": 1, "no_outcome": 5}, "in the order of REASONS"
    assert len(summary.examples["no_outcome"]) == 3
    assert summary.examples["malformed_json"][0].where == "bad.jsonl:1"
    assert summary.bad
    assert json.loads(json.dumps(summary.to_json()))["counts"] == dict(summary.counts)


def test_span_records_carry_where_they_were_read() -> None:
    rec = Recorder()
    genai_run(rec)
    read = read_otlp_text("\n" + otlp_text([rec.spans()[:1], rec.spans()[1:]]), "x.jsonl")
    assert sorted({s.where for s in read.spans}) == ["x.jsonl:2", "x.jsonl:3"]
    assert isinstance(read.spans[0], Span)
