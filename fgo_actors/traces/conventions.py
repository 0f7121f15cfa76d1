"""The two attribute conventions, read off one span: what kind of span it is
(an LLM call, a tool call, an agent run, something else) and its messages.

- **OpenTelemetry GenAI** semantic conventions (``gen_ai.*``), in each of the
  shapes instrumentations have written them over time: the current JSON
  attributes ``gen_ai.input.messages`` / ``gen_ai.output.messages`` /
  ``gen_ai.system_instructions``; OpenLLMetry's indexed
  ``gen_ai.prompt.N.*`` / ``gen_ai.completion.N.*``; and span events
  (``gen_ai.user.message``, ``gen_ai.choice``, ..., and the older
  ``gen_ai.content.prompt`` / ``gen_ai.content.completion``). The first shape
  a span carries is read; they are not mixed within one span.
- **OpenInference** (``openinference.span.kind``, ``llm.input_messages.N.*``,
  ``tool.name``, ``input.value`` / ``output.value``).

Attribute names come from ``opentelemetry-semantic-conventions`` and
``openinference-semantic-conventions``. A few names are not defined by the
installed versions and are written out here, each with a note: the GenAI
event names (the package no longer ships the events), the attribute some
SDKs put an event's body in (``gen_ai.event.content``) and OpenLLMetry's
suffixes under ``gen_ai.prompt.N``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

import attrs
from openinference.semconv.trace import (
    MessageAttributes,
    MessageContentAttributes,
    OpenInferenceSpanKindValues,
    SpanAttributes,
    ToolCallAttributes,
)
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as gen_ai

from .._core.io import JSONTooDeepError, loads
from .._core.model import JSON, Role, Step
from .issues import Issue
from .otlp import AttrValue, Span

Convention = Literal["genai", "openinference"]
SpanKind = Literal["llm", "tool", "agent", "other"]

# GenAI operation names. The enum is marked deprecated (the conventions moved
# to their own repository) and warns when called, so only its members are read.
_OPERATIONS = gen_ai.GenAiOperationNameValues
LLM_OPERATIONS = frozenset(
    {
        _OPERATIONS.CHAT.value,
        _OPERATIONS.TEXT_COMPLETION.value,
        _OPERATIONS.GENERATE_CONTENT.value,
    }
)
KNOWN_OPERATIONS = frozenset(member.value for member in _OPERATIONS)
_KINDS_BY_OPERATION: dict[str, SpanKind] = {
    **dict.fromkeys(LLM_OPERATIONS, "llm"),
    _OPERATIONS.EXECUTE_TOOL.value: "tool",
    _OPERATIONS.INVOKE_AGENT.value: "agent",
}

_OI_KIND = OpenInferenceSpanKindValues
KNOWN_OI_KINDS = frozenset(member.value for member in _OI_KIND)
_KINDS_BY_OI_KIND: dict[str, SpanKind] = {
    _OI_KIND.LLM.value: "llm",
    _OI_KIND.TOOL.value: "tool",
    _OI_KIND.AGENT.value: "agent",
}

# The GenAI events of semantic conventions 1.28 to 1.36, which the installed
# package no longer defines; as span events, their body is either the
# attributes themselves or JSON in EVENT_CONTENT (Azure's SDKs, Semantic Kernel).
EVENT_ROLES: dict[str, Role] = {
    "gen_ai.system.message": "system",
    "gen_ai.user.message": "user",
    "gen_ai.assistant.message": "assistant",
    "gen_ai.tool.message": "tool",
}
CHOICE_EVENT = "gen_ai.choice"
EVENT_CONTENT = "gen_ai.event.content"
# Semantic conventions 1.27's events, each holding a JSON list of messages in
# the attribute the package still defines (GEN_AI_PROMPT, GEN_AI_COMPLETION).
PROMPT_EVENT = "gen_ai.content.prompt"
COMPLETION_EVENT = "gen_ai.content.completion"

# Roles as the conventions and providers spell them, as a chat step's role.
ROLES: dict[str, Role] = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "ai": "assistant",
    "model": "assistant",
    "tool": "tool",
    "function": "tool",
}
# Content part types that are text; others (images, audio, reasoning, files)
# are not carried into a trajectory.
_TEXT_PARTS = frozenset({"text", "input_text", "output_text"})


@attrs.frozen
class ToolRun:
    """A tool span: the tool's name, the call id where the span has it, its
    arguments and its result (as text)."""

    name: str
    call_id: str | None
    arguments: str | None
    result: str | None


@attrs.frozen
class SpanView:
    """One span as the conversion reads it.

    ``inputs``/``outputs`` are an LLM span's messages (the system instructions
    first among the inputs); ``tool`` is set for a tool span; ``input_text``
    and ``agent_name`` for an agent span. ``issues`` are what could not be read.
    """

    kind: SpanKind
    inputs: tuple[Step, ...] = ()
    outputs: tuple[Step, ...] = ()
    tool: ToolRun | None = None
    input_text: str | None = None
    agent_name: str | None = None
    issues: tuple[Issue, ...] = ()


def uses_openinference(span: Span) -> bool:
    """Whether ``span`` carries OpenInference's span kind."""
    return SpanAttributes.OPENINFERENCE_SPAN_KIND in span.attributes


def read_span(span: Span, convention: Convention) -> SpanView:
    """``span`` read with ``convention``'s attributes."""
    if convention == "openinference":
        return _Reader(span).openinference()
    return _Reader(span).genai()


# ---------------------------------------------------------------------------
# values
# ---------------------------------------------------------------------------


def _str(value: object) -> str | None:
    """A non-empty string, or None."""
    return value if isinstance(value, str) and value else None


def text_of(value: object) -> str | None:
    """The text in a message's content, in any of the shapes it comes in: a
    string, a list of parts (``{"type": "text", "text" or "content": ...}``)
    or an object with ``text``/``content``/``value``. Non-text parts are left
    out; anything else is written as JSON."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for part in value:
            if isinstance(part, dict) and part.get("type", "text") not in _TEXT_PARTS:
                continue
            text = text_of(part)
            if text is not None:
                texts.append(text)
        return "\n".join(texts) if texts else None
    if isinstance(value, dict):
        for key in ("text", "content", "value"):
            if key in value:
                return text_of(value[key])
    return json.dumps(value, ensure_ascii=False)


def _result_text(value: object) -> str | None:
    """A tool's result or arguments as text: a string as it is, else JSON."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return json.dumps(value, ensure_ascii=False)


def openai_tool_call(call_id: object, name: object, arguments: object) -> JSON:
    """A tool call in the OpenAI chat shape (arguments as a JSON string)."""
    call: JSON = {}
    if _str(call_id):
        call["id"] = call_id
    call["type"] = "function"
    call["function"] = {
        "name": name if isinstance(name, str) else "",
        "arguments": _result_text(arguments) if arguments is not None else "{}",
    }
    return call


def indexed(attributes: Mapping[str, Any], prefix: str) -> list[dict[str, Any]]:
    """Flattened lists, as OpenLLMetry and OpenInference write them:
    ``prefix.0.role``, ``prefix.0.content``, ``prefix.1.role`` ... become
    ``[{"role": ..., "content": ...}, {"role": ...}]``, in index order."""
    head = prefix + "."
    groups: dict[int, dict[str, Any]] = {}
    for key, value in attributes.items():
        if not key.startswith(head):
            continue
        index, dot, rest = key[len(head) :].partition(".")
        if dot and index.isdigit():
            groups.setdefault(int(index), {})[rest] = value
    return [groups[i] for i in sorted(groups)]


def _has_prefix(attributes: Mapping[str, Any], prefix: str) -> bool:
    head = prefix + "."
    return any(key.startswith(head) for key in attributes)


class _Reader:
    """Reads one span, collecting what it could not read as issues."""

    def __init__(self, span: Span) -> None:
        self.span = span
        self.attrs = span.attributes
        self.issues: list[Issue] = []

    def issue(self, reason: str, detail: str) -> None:
        self.issues.append(
            Issue(reason, f"span {self.span.name!r}: {detail}", self.span.where, self.span.trace_id)
        )

    def role(self, value: object) -> Role | None:
        role = ROLES.get(value.lower()) if isinstance(value, str) else None
        if role is None:
            self.issue("unknown_role", f"a message with role {value!r} is dropped")
        return role

    def json_value(self, value: AttrValue, name: str) -> Any:
        """A JSON string attribute, loaded (structured values pass as they are);
        None, with an issue, when it is not JSON."""
        if not isinstance(value, str):
            return value
        try:
            return loads(value)
        except (json.JSONDecodeError, JSONTooDeepError) as e:
            self.issue("bad_messages", f"{name} is not JSON ({e}); its messages are dropped")
            return None

    def view(self, kind: SpanKind, **fields: Any) -> SpanView:
        return SpanView(kind, issues=tuple(self.issues), **fields)

    # -- GenAI ---------------------------------------------------------------

    def genai_kind(self) -> SpanKind | None:
        operation = self.attrs.get(gen_ai.GEN_AI_OPERATION_NAME)
        if isinstance(operation, str):
            if operation in _KINDS_BY_OPERATION:
                return _KINDS_BY_OPERATION[operation]
            if operation in KNOWN_OPERATIONS:
                return "other"
            self.issue("unknown_span_kind", f"unknown {gen_ai.GEN_AI_OPERATION_NAME} {operation!r}")
            return None
        # No operation name: OpenLLMetry's older spans, and event-only ones.
        if (
            gen_ai.GEN_AI_INPUT_MESSAGES in self.attrs
            or gen_ai.GEN_AI_OUTPUT_MESSAGES in self.attrs
            or _has_prefix(self.attrs, gen_ai.GEN_AI_PROMPT)
            or _has_prefix(self.attrs, gen_ai.GEN_AI_COMPLETION)
            or any(e.name in EVENT_ROLES or e.name == CHOICE_EVENT for e in self.span.events)
        ):
            return "llm"
        if gen_ai.GEN_AI_TOOL_NAME in self.attrs:
            return "tool"
        return "other"

    def genai(self) -> SpanView:
        kind = self.genai_kind()
        if kind is None:
            return self.view("other")
        if kind == "llm":
            inputs, outputs = self.genai_messages()
            return self.view("llm", inputs=tuple(inputs), outputs=tuple(outputs))
        if kind == "tool":
            name = _str(self.attrs.get(gen_ai.GEN_AI_TOOL_NAME)) or self._tool_name_from_span()
            return self.view(
                "tool",
                tool=ToolRun(
                    name=name,
                    call_id=_str(self.attrs.get(gen_ai.GEN_AI_TOOL_CALL_ID)),
                    arguments=_result_text(self.attrs.get(gen_ai.GEN_AI_TOOL_CALL_ARGUMENTS)),
                    result=_result_text(self.attrs.get(gen_ai.GEN_AI_TOOL_CALL_RESULT)),
                ),
            )
        if kind == "agent":
            inputs, _ = self.genai_messages()
            task = next((s.content for s in inputs if s.role == "user" and s.content), None)
            return self.view(
                "agent", input_text=task, agent_name=_str(self.attrs.get(gen_ai.GEN_AI_AGENT_NAME))
            )
        return self.view("other")

    def _tool_name_from_span(self) -> str:
        # The conventions name a tool span "execute_tool {gen_ai.tool.name}".
        prefix = _OPERATIONS.EXECUTE_TOOL.value + " "
        name = self.span.name
        return name[len(prefix) :] if name.startswith(prefix) else name

    def genai_messages(self) -> tuple[list[Step], list[Step]]:
        """(inputs, outputs): from the JSON attributes, else the indexed
        attributes, else the span events; inputs and outputs each from the
        first shape that has any."""
        inputs = self.genai_json_inputs()
        outputs = self.genai_json_messages(gen_ai.GEN_AI_OUTPUT_MESSAGES)
        if not inputs:
            inputs = self.indexed_messages(gen_ai.GEN_AI_PROMPT)
        if not outputs:
            outputs = self.indexed_messages(gen_ai.GEN_AI_COMPLETION)
        if not inputs or not outputs:
            event_inputs, event_outputs = self.event_messages()
            inputs = inputs or event_inputs
            outputs = outputs or event_outputs
        return inputs, outputs

    def genai_json_inputs(self) -> list[Step]:
        steps: list[Step] = []
        instructions = self.attrs.get(gen_ai.GEN_AI_SYSTEM_INSTRUCTIONS)
        if instructions is not None:
            loaded = (
                self.json_value(instructions, gen_ai.GEN_AI_SYSTEM_INSTRUCTIONS)
                if isinstance(instructions, str) and instructions.lstrip()[:1] in ("[", "{")
                else instructions
            )
            text = text_of(loaded)
            if text:
                steps.append(Step(role="system", content=text))
        return steps + self.genai_json_messages(gen_ai.GEN_AI_INPUT_MESSAGES)

    def genai_json_messages(self, name: str) -> list[Step]:
        if name not in self.attrs:
            return []
        loaded = self.json_value(self.attrs[name], name)
        if loaded is None:
            return []
        if not isinstance(loaded, list):
            self.issue("bad_messages", f"{name} is not a list of messages; dropped")
            return []
        steps: list[Step] = []
        for message in loaded:
            steps += self.genai_message(message, name)
        return steps

    def genai_message(self, message: object, name: str, role: object = None) -> list[Step]:
        """One message, in the current parts shape (``{"role", "parts": [...]}``)
        or the OpenAI shape (``{"role", "content", "tool_calls"}``), as steps: a
        tool message holding several results becomes one step per result."""
        if isinstance(message, str):
            message = self.json_value(message, name)
        if not isinstance(message, dict):
            self.issue("bad_messages", f"{name}: a message that is not an object is dropped")
            return []
        step_role = self.role(role if role is not None else message.get("role"))
        if step_role is None:
            return []
        parts = message.get("parts")
        if isinstance(parts, list):
            return self.parts_message(step_role, parts, message)
        calls = message.get("tool_calls")
        tool_calls = (
            tuple(
                openai_tool_call(
                    c.get("id"),
                    (c.get("function") or {}).get("name", c.get("name")),
                    (c.get("function") or {}).get("arguments", c.get("arguments")),
                )
                for c in calls
                if isinstance(c, dict)
            )
            if isinstance(calls, list) and calls
            else None
        )
        call_id = message.get("tool_call_id") or (
            message.get("id") if step_role == "tool" else None
        )
        return [
            Step(
                role=step_role,
                content=text_of(message.get("content")),
                name=_str(message.get("name")),
                tool_calls=tool_calls,
                tool_call_id=_str(call_id),
            )
        ]

    def parts_message(self, role: Role, parts: list[Any], message: Mapping[str, Any]) -> list[Step]:
        texts: list[str] = []
        calls: list[JSON] = []
        results: list[Step] = []
        for part in parts:
            if not isinstance(part, dict):
                continue
            kind = part.get("type")
            if kind == "text" and isinstance(part.get("content"), str):
                texts.append(part["content"])
            elif kind == "tool_call":
                calls.append(
                    openai_tool_call(part.get("id"), part.get("name"), part.get("arguments"))
                )
            elif kind == "tool_call_response":
                results.append(
                    Step(
                        role="tool",
                        content=_result_text(part.get("response")),
                        tool_call_id=_str(part.get("id")),
                    )
                )
        content = "\n".join(texts) if texts else None
        if role == "tool":
            return results or [Step(role="tool", content=content, name=_str(message.get("name")))]
        steps = []
        if content is not None or calls:
            steps.append(
                Step(
                    role=role,
                    content=content,
                    name=_str(message.get("name")),
                    tool_calls=tuple(calls) or None,
                )
            )
        return steps + results

    def indexed_messages(self, prefix: str) -> list[Step]:
        """OpenLLMetry's ``gen_ai.prompt.N.role/content/tool_call_id`` and
        ``gen_ai.prompt.N.tool_calls.M.id/name/arguments`` (likewise under
        ``gen_ai.completion``)."""
        steps: list[Step] = []
        for group in indexed(self.attrs, prefix):
            role = self.role(group.get("role"))
            if role is None:
                continue
            calls = tuple(
                openai_tool_call(c.get("id"), c.get("name"), c.get("arguments"))
                for c in indexed(group, "tool_calls")
            )
            content = group.get("content")
            if isinstance(content, str) and content.startswith("[{"):
                # A multimodal message: its parts, as JSON.
                try:
                    parts = loads(content)
                except (json.JSONDecodeError, JSONTooDeepError):
                    parts = None
                if isinstance(parts, list) and all(
                    isinstance(p, dict) and "type" in p for p in parts
                ):
                    content = text_of(parts)
            steps.append(
                Step(
                    role=role,
                    content=text_of(content),
                    tool_calls=calls or None,
                    tool_call_id=_str(group.get("tool_call_id")),
                )
            )
        return steps

    def event_messages(self) -> tuple[list[Step], list[Step]]:
        inputs: list[Step] = []
        outputs: list[Step] = []
        for event in self.span.events:
            body: dict[str, Any] = dict(event.attributes)
            content = body.pop(EVENT_CONTENT, None)
            if content is not None:
                loaded = self.json_value(content, f"event {event.name} {EVENT_CONTENT}")
                if isinstance(loaded, dict):
                    body.update(loaded)
                elif loaded is not None:
                    body["content"] = loaded
            if event.name in EVENT_ROLES:
                inputs += self.genai_message(body, event.name, role=EVENT_ROLES[event.name])
            elif event.name == CHOICE_EVENT:
                message = body.get("message", body)
                if isinstance(message, str):
                    message = self.json_value(message, f"event {event.name} message")
                if isinstance(message, dict):
                    outputs += self.genai_message(message, event.name, role="assistant")
            elif event.name in (PROMPT_EVENT, COMPLETION_EVENT):
                name = (
                    gen_ai.GEN_AI_PROMPT if event.name == PROMPT_EVENT else gen_ai.GEN_AI_COMPLETION
                )
                loaded = self.json_value(body.get(name), f"event {event.name} {name}")
                if isinstance(loaded, list):
                    target = inputs if event.name == PROMPT_EVENT else outputs
                    for message in loaded:
                        target += self.genai_message(message, event.name)
        return inputs, outputs

    # -- OpenInference -------------------------------------------------------

    def openinference_kind(self) -> SpanKind | None:
        value = self.attrs.get(SpanAttributes.OPENINFERENCE_SPAN_KIND)
        if value is None:
            return "other"
        kind = value.upper() if isinstance(value, str) else None
        if kind in _KINDS_BY_OI_KIND:
            return _KINDS_BY_OI_KIND[kind]
        if kind in KNOWN_OI_KINDS:
            return "other"
        self.issue(
            "unknown_span_kind", f"unknown {SpanAttributes.OPENINFERENCE_SPAN_KIND} {value!r}"
        )
        return None

    def openinference(self) -> SpanView:
        kind = self.openinference_kind()
        if kind is None:
            return self.view("other")
        if kind == "llm":
            return self.view(
                "llm",
                inputs=tuple(self.oi_messages(SpanAttributes.LLM_INPUT_MESSAGES)),
                outputs=tuple(self.oi_messages(SpanAttributes.LLM_OUTPUT_MESSAGES)),
            )
        if kind == "tool":
            call_id = self.attrs.get(SpanAttributes.TOOL_ID) or self.attrs.get(
                ToolCallAttributes.TOOL_CALL_ID
            )
            return self.view(
                "tool",
                tool=ToolRun(
                    name=_str(self.attrs.get(SpanAttributes.TOOL_NAME)) or self.span.name,
                    call_id=_str(call_id),
                    arguments=_result_text(self.attrs.get(SpanAttributes.INPUT_VALUE)),
                    result=_result_text(self.attrs.get(SpanAttributes.OUTPUT_VALUE)),
                ),
            )
        if kind == "agent":
            return self.view(
                "agent",
                input_text=_str(self.attrs.get(SpanAttributes.INPUT_VALUE)),
                agent_name=_str(self.attrs.get(SpanAttributes.AGENT_NAME)),
            )
        return self.view("other")

    def oi_messages(self, prefix: str) -> list[Step]:
        """``llm.input_messages.N.message.*`` (or ``llm.output_messages``) as steps."""
        m = MessageAttributes
        steps: list[Step] = []
        for group in indexed(self.attrs, prefix):
            role = self.role(group.get(m.MESSAGE_ROLE))
            if role is None:
                continue
            content = group.get(m.MESSAGE_CONTENT)
            if content is None:
                parts = [
                    {
                        "type": p.get(MessageContentAttributes.MESSAGE_CONTENT_TYPE, "text"),
                        "text": p.get(MessageContentAttributes.MESSAGE_CONTENT_TEXT),
                    }
                    for p in indexed(group, m.MESSAGE_CONTENTS)
                    if p.get(MessageContentAttributes.MESSAGE_CONTENT_TEXT) is not None
                ]
                content = text_of(parts) if parts else None
            calls = [
                openai_tool_call(
                    c.get(ToolCallAttributes.TOOL_CALL_ID),
                    c.get(ToolCallAttributes.TOOL_CALL_FUNCTION_NAME),
                    c.get(ToolCallAttributes.TOOL_CALL_FUNCTION_ARGUMENTS_JSON),
                )
                for c in indexed(group, m.MESSAGE_TOOL_CALLS)
            ]
            if not calls and group.get(m.MESSAGE_FUNCTION_CALL_NAME):
                calls.append(
                    openai_tool_call(
                        None,
                        group[m.MESSAGE_FUNCTION_CALL_NAME],
                        group.get(m.MESSAGE_FUNCTION_CALL_ARGUMENTS_JSON),
                    )
                )
            steps.append(
                Step(
                    role=role,
                    content=text_of(content),
                    name=_str(group.get(m.MESSAGE_NAME)),
                    tool_calls=tuple(calls) or None,
                    tool_call_id=_str(group.get(m.MESSAGE_TOOL_CALL_ID)),
                )
            )
        return steps
