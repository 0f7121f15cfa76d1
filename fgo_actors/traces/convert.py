"""Spans to trajectories: each trace (trace id) becomes one trajectory.

The pieces, all pure (no files, no loops over files, no CLI), so the batch
command and a future ``POST /v1/traces`` in the daemon share them:

- :class:`TraceSet` joins spans by trace id as they arrive, from any number
  of files or requests, keeping the first copy of a span seen twice;
- :func:`convert_trace` turns one trace's spans into a :class:`Converted`:
  the trajectory, or the reason it was skipped, and what was repaired;
- :class:`OutcomeRule` says where outcomes come from (span or resource
  attributes, a feedback file keyed by trace id). An outcome is never
  invented: a trace without one is skipped and counted.

How a trace becomes steps (see the README's "Connecting your agent: traces
in" for the table):

1. The run: if the trace has one outermost agent span (GenAI ``invoke_agent``
   or OpenInference ``AGENT``), the run is that span and its descendants;
   otherwise the whole trace.
2. The run's LLM and tool spans are taken in start-time order (ties broken
   by end time, then span id, so the order never depends on which file a
   span came from). An LLM or tool span inside another of its kind (a
   wrapper and the client it calls, both instrumented) is the same call: the
   outer one is read.
3. An LLM span's input messages are emitted only where they are new: every
   call re-sends the conversation so far, so a message is emitted only when
   this input holds more copies of it than have been emitted already
   (matched on role and text, tool results on their call id). Then its
   output messages are emitted, as assistant steps.
4. A tool span becomes a ``tool`` step (its result, the tool's name, and the
   call id: the span's own, else the oldest unanswered call of that tool).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import attrs

from .._core.io import JSONTooDeepError, loads
from .._core.model import JSON, Outcome, Step, Trajectory
from .conventions import Convention, SpanView, read_span, uses_openinference
from .issues import REASONS, TRACE_SKIPS, Issue
from .otlp import AttrValue, Span

Format = Literal["auto", "otlp-json", "openinference"]
FORMATS: tuple[Format, ...] = ("auto", "otlp-json", "openinference")
# A step's text (content, tool arguments) or the task longer than this is cut.
DEFAULT_MAX_CHARS = 20_000
# How many examples of each reason a summary keeps.
EXAMPLES_PER_REASON = 3
_CONVENTION_FORMAT: dict[Convention, Format] = {
    "genai": "otlp-json",
    "openinference": "openinference",
}


# ---------------------------------------------------------------------------
# joining spans into traces
# ---------------------------------------------------------------------------


class TraceSet:
    """Spans grouped by trace id, in the order traces were first seen.

    Spans may arrive in any order and in any number of batches (files, lines,
    requests); a span id seen again in the same trace keeps its first copy
    and is counted as a duplicate.
    """

    def __init__(self) -> None:
        self._traces: dict[str, dict[str, Span]] = {}
        self.duplicates: list[Issue] = []

    def add(self, spans: Iterable[Span]) -> set[str]:
        """Add ``spans``; the trace ids they touched."""
        touched: set[str] = set()
        for span in spans:
            trace = self._traces.setdefault(span.trace_id, {})
            if span.span_id in trace:
                first = trace[span.span_id]
                self.duplicates.append(
                    Issue(
                        "duplicate_span",
                        f"span {span.name!r} ({span.span_id}) was already read at {first.where}",
                        span.where,
                        span.trace_id,
                    )
                )
                continue
            trace[span.span_id] = span
            touched.add(span.trace_id)
        return touched

    def trace_ids(self) -> list[str]:
        return list(self._traces)

    def spans(self, trace_id: str) -> tuple[Span, ...]:
        return tuple(self._traces.get(trace_id, {}).values())

    def pop(self, trace_id: str) -> tuple[Span, ...]:
        """Remove a trace and give its spans (for a caller that converts
        traces as they complete, and must not hold them all)."""
        return tuple(self._traces.pop(trace_id, {}).values())

    def __len__(self) -> int:
        return len(self._traces)


# ---------------------------------------------------------------------------
# outcomes
# ---------------------------------------------------------------------------


def parse_success(value: object) -> bool | None:
    """A success flag: a bool, 1/0, or "true"/"false"/"1"/"0" (any case);
    None for anything else."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        return {"true": True, "1": True, "false": False, "0": False}.get(value.strip().lower())
    return None


def parse_score(value: object) -> float | None:
    """A finite number, or a string holding one; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


@attrs.frozen
class Feedback:
    """One line of a feedback file: a trace's success, score and feedback text
    (each optional), and where it was read."""

    trace_id: str
    success: bool | None = None
    score: float | None = None
    feedback: str | None = None
    where: str | None = None


def read_feedback(text: str, file: str) -> tuple[dict[str, Feedback], list[Issue]]:
    """Feedback records from a JSON Lines text (one
    ``{"trace_id", "success", "score", "feedback"}`` object a line), keyed by
    trace id (lowercase hex). A line that is not a usable record is skipped
    with an issue; a trace id given twice keeps its first line."""
    out: dict[str, Feedback] = {}
    issues: list[Issue] = []

    def bad(line: int, detail: str) -> None:
        issues.append(Issue("bad_feedback", detail, f"{file}:{line}"))

    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = loads(raw)
        except json.JSONDecodeError as e:
            bad(line, f"malformed JSON: {e.msg} at column {e.colno}")
            continue
        except JSONTooDeepError as e:
            bad(line, f"refused JSON: {e}")
            continue
        if not isinstance(obj, dict):
            bad(line, "expected a JSON object")
            continue
        trace_id = obj.get("trace_id")
        if not isinstance(trace_id, str) or not trace_id.strip():
            bad(line, "'trace_id' must be a non-empty string")
            continue
        trace_id = trace_id.strip().lower()
        success = parse_success(obj["success"]) if obj.get("success") is not None else None
        if obj.get("success") is not None and success is None:
            bad(line, f"'success' must be true/false (or 1/0), got {obj['success']!r}")
            continue
        score = parse_score(obj["score"]) if obj.get("score") is not None else None
        if obj.get("score") is not None and score is None:
            bad(line, f"'score' must be a finite number, got {obj['score']!r}")
            continue
        note = obj.get("feedback")
        if note is not None and not isinstance(note, str):
            bad(line, "'feedback' must be a string")
            continue
        if success is None and score is None and note is None:
            bad(line, "it gives none of 'success', 'score', 'feedback'")
            continue
        if trace_id in out:
            bad(line, f"trace {trace_id} already has feedback at {out[trace_id].where}")
            continue
        out[trace_id] = Feedback(trace_id, success, score, note, f"{file}:{line}")
    return out, issues


@attrs.frozen
class OutcomeRule:
    """Where a trace's outcome comes from.

    ``success_attr``/``score_attr`` name a span or resource attribute (the run
    span's first, then the other spans, latest-ending first, then the
    resource's). ``feedback`` (by trace id) wins over the attributes field by
    field. ``success_threshold`` makes a score alone decide success (score >=
    threshold); without it a trace with a score but no success is skipped.
    """

    success_attr: str | None = None
    score_attr: str | None = None
    success_threshold: float | None = None
    feedback: Mapping[str, Feedback] = attrs.field(factory=dict)

    def given(self) -> bool:
        """Whether any source of outcomes was given at all."""
        return bool(self.success_attr or self.score_attr or self.feedback)

    def describe(self) -> str:
        sources = []
        if self.success_attr:
            sources.append(f"attribute {self.success_attr!r}")
        if self.score_attr:
            sources.append(f"attribute {self.score_attr!r}")
        if self.feedback:
            sources.append("the feedback file")
        return " or ".join(sources) or "no source"


def _lookup(name: str, spans: Sequence[Span], root: Span | None) -> tuple[AttrValue, str] | None:
    """The first value of attribute ``name``, and where it was found."""
    ordered = sorted(spans, key=lambda s: (-s.end_ns, s.span_id))
    if root is not None:
        ordered = [root, *(s for s in ordered if s is not root)]
    for span in ordered:
        if name in span.attributes:
            return span.attributes[name], f"span {span.name!r}"
    for span in ordered:
        if name in span.resource:
            return span.resource[name], "the resource"
    return None


def resolve_outcome(
    trace_id: str, spans: Sequence[Span], root: Span | None, rule: OutcomeRule
) -> Outcome | Issue:
    """The trace's outcome, or the Issue why there is none."""
    where = spans[0].where if spans else None
    feedback = rule.feedback.get(trace_id)
    success = feedback.success if feedback else None
    score = feedback.score if feedback else None
    if success is None and rule.success_attr:
        found = _lookup(rule.success_attr, spans, root)
        if found is not None:
            success = parse_success(found[0])
            if success is None:
                return Issue(
                    "bad_outcome",
                    f"{rule.success_attr} on {found[1]} is {found[0]!r}, not true/false (or 1/0)",
                    where,
                    trace_id,
                )
    if score is None and rule.score_attr:
        found = _lookup(rule.score_attr, spans, root)
        if found is not None:
            score = parse_score(found[0])
            if score is None:
                return Issue(
                    "bad_outcome",
                    f"{rule.score_attr} on {found[1]} is {found[0]!r}, not a number",
                    where,
                    trace_id,
                )
    if success is None and score is not None and rule.success_threshold is not None:
        success = score >= rule.success_threshold
    if success is None:
        detail = f"no success found in {rule.describe()}"
        if score is not None:
            detail += f" (a score, {score:g}, was found; a success threshold would decide)"
        return Issue("no_outcome", detail, where, trace_id)
    return Outcome(success=success, score=score, feedback=feedback.feedback if feedback else None)


# ---------------------------------------------------------------------------
# one trace
# ---------------------------------------------------------------------------


@attrs.frozen
class Converted:
    """One trace's result: its trajectory, or the Issue it was skipped for;
    and the repairs made on the way (or met before it was skipped)."""

    trace_id: str
    trajectory: Trajectory | None
    skipped: Issue | None = None
    repairs: tuple[Issue, ...] = ()


def _key(step: Step) -> tuple[Any, ...]:
    """What makes two messages of a conversation the same message: a tool
    result its call id (else its text); others their role, text and the
    names of the tools they call."""
    text = (step.content or "").strip()
    if step.role == "tool":
        return ("tool", step.tool_call_id) if step.tool_call_id else ("tool", text)
    names = tuple(
        (c.get("function") or {}).get("name", "")
        for c in (step.tool_calls or ())
        if isinstance(c, dict)
    )
    return (step.role, text, names)


class _Conversation:
    """The steps emitted so far, and the tool calls not yet answered."""

    def __init__(self) -> None:
        self.steps: list[Step] = []
        self.emitted: Counter[tuple[Any, ...]] = Counter()
        self.pending: list[tuple[str, str]] = []  # (call id, tool name)

    def emit(self, step: Step) -> None:
        self.steps.append(step)
        self.emitted[_key(step)] += 1
        for call in step.tool_calls or ():
            call_id = call.get("id")
            if isinstance(call_id, str):
                self.pending.append((call_id, (call.get("function") or {}).get("name", "")))
        if step.role == "tool" and step.tool_call_id:
            self.pending = [p for p in self.pending if p[0] != step.tool_call_id]

    def llm_call(self, view: SpanView) -> None:
        seen: Counter[tuple[Any, ...]] = Counter()
        for step in view.inputs:
            key = _key(step)
            seen[key] += 1
            if seen[key] > self.emitted[key]:
                self.emit(step)
        for step in view.outputs:
            self.emit(step)

    def tool_call(self, view: SpanView) -> None:
        tool = view.tool
        assert tool is not None
        call_id = tool.call_id
        if call_id is None:
            call_id = next((cid for cid, name in self.pending if name == tool.name), None)
        self.emit(Step(role="tool", content=tool.result, name=tool.name, tool_call_id=call_id))


class _Cutter:
    """Cuts texts longer than ``limit`` characters (keeping their head and a
    note of how much went), recording each cut as a ``truncated`` issue."""

    def __init__(self, limit: int, trace_id: str, where: str | None) -> None:
        self.limit = limit
        self.trace_id = trace_id
        self.where = where
        self.issues: list[Issue] = []

    def text(self, text: str | None, what: str) -> str | None:
        if text is None or len(text) <= self.limit:
            return text
        detail = f"{what}: {len(text):,} characters cut to {self.limit:,}"
        self.issues.append(Issue("truncated", detail, self.where, self.trace_id))
        return (
            text[: self.limit] + f"\n[... {len(text) - self.limit:,} more characters cut on import]"
        )

    def call(self, call: JSON, what: str) -> JSON:
        function = call.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
            return call
        arguments = self.text(function["arguments"], what)
        if arguments is function["arguments"]:
            return call
        return {**call, "function": {**function, "arguments": arguments}}

    def step(self, step: Step, index: int) -> Step:
        content = self.text(step.content, f"step {index} ({step.role}) content")
        calls = step.tool_calls
        if calls:
            calls = tuple(self.call(c, f"step {index} tool call arguments") for c in calls)
        if content is step.content and calls == step.tool_calls:
            return step
        return attrs.evolve(step, content=content, tool_calls=calls)


def _ancestors(span: Span, by_id: Mapping[str, Span]) -> Iterable[Span]:
    """The span's ancestors present in the trace, nearest first (a parent
    missing from the input ends the chain; a cycle in bad data is cut)."""
    seen = {span.span_id}
    parent = by_id.get(span.parent_id) if span.parent_id else None
    while parent is not None and parent.span_id not in seen:
        yield parent
        seen.add(parent.span_id)
        parent = by_id.get(parent.parent_id) if parent.parent_id else None


def pick_convention(spans: Iterable[Span], fmt: Format) -> Convention:
    """The convention a trace is read with: the one ``fmt`` names, or with
    ``auto``, OpenInference if any span carries its span kind, else GenAI.
    A trace is read with one convention throughout, so a call that both
    conventions describe is not read twice."""
    if fmt == "openinference":
        return "openinference"
    if fmt == "otlp-json":
        return "genai"
    return "openinference" if any(uses_openinference(s) for s in spans) else "genai"


def convert_trace(
    trace_id: str,
    spans: Sequence[Span],
    rule: OutcomeRule,
    *,
    fmt: Format = "auto",
    max_chars: int = DEFAULT_MAX_CHARS,
) -> Converted:
    """One trace's spans as a trajectory (id = the trace id), or the reason
    it is skipped; see the module's docstring for how."""
    ordered = sorted(spans, key=lambda s: (s.start_ns, s.end_ns, s.span_id))
    convention = pick_convention(ordered, fmt)
    by_id = {s.span_id: s for s in ordered}
    views = {s.span_id: read_span(s, convention) for s in ordered}
    repairs: list[Issue] = [i for s in ordered for i in views[s.span_id].issues]
    first_where = ordered[0].where if ordered else None

    def skip(issue: Issue) -> Converted:
        return Converted(trace_id, None, issue, tuple(repairs))

    # 1. the run: the one outermost agent span, if there is one
    agents = [s for s in ordered if views[s.span_id].kind == "agent"]
    outermost = [
        s for s in agents if not any(views[a.span_id].kind == "agent" for a in _ancestors(s, by_id))
    ]
    root = outermost[0] if len(outermost) == 1 else None

    # 2. the run's LLM and tool spans, outermost of their kind
    calls: list[Span] = []
    for span in ordered:
        kind = views[span.span_id].kind
        if kind not in ("llm", "tool"):
            continue
        ancestors = list(_ancestors(span, by_id))
        if root is not None and span is not root and root not in ancestors:
            repairs.append(
                Issue(
                    "outside_run",
                    f"{kind} span {span.name!r} is outside the agent run {root.name!r}",
                    span.where,
                    trace_id,
                )
            )
            continue
        if any(views[a.span_id].kind == kind for a in ancestors):
            continue
        calls.append(span)

    # 3 and 4. the steps
    conversation = _Conversation()
    llm_spans = 0
    for span in calls:
        view = views[span.span_id]
        if view.kind == "llm":
            llm_spans += 1
            conversation.llm_call(view)
        else:
            conversation.tool_call(view)
    if not any(s.role != "tool" for s in conversation.steps):
        detail = (
            f"{llm_spans} LLM span(s) but no message content in them (is the instrumentation "
            "capturing content? e.g. OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=span_only "
            "for opentelemetry-instrumentation-openai-v2 with opentelemetry-util-genai 1.x, "
            "=true with older ones; TRACELOOP_TRACE_CONTENT=true for OpenLLMetry)"
            if llm_spans
            else f"no LLM span ({convention} convention) among its {len(ordered)} span(s)"
        )
        return skip(Issue("no_messages", detail, first_where, trace_id))

    outcome = resolve_outcome(trace_id, ordered, root, rule)
    if isinstance(outcome, Issue):
        return skip(outcome)

    steps = conversation.steps
    root_view = views[root.span_id] if root is not None else None
    task = next((s.content for s in steps if s.role == "user" and s.content), None)
    if task is None and root_view is not None:
        task = root_view.input_text
    cutter = _Cutter(max_chars, trace_id, first_where)
    steps = [cutter.step(step, i) for i, step in enumerate(steps)]
    task = cutter.text(task or "", "task") or ""
    repairs += cutter.issues
    metadata: JSON = {"format": _CONVENTION_FORMAT[convention]}
    service = next(
        (s.resource.get("service.name") for s in ordered if s.resource.get("service.name")), None
    )
    if isinstance(service, str):
        metadata["service_name"] = service
    if root_view is not None and root_view.agent_name:
        metadata["agent_name"] = root_view.agent_name
    if root is not None:
        metadata["run_span"] = root.name
    metadata["source_files"] = sorted({s.file for s in ordered if s.file})
    trajectory = Trajectory(
        id=trace_id, task=task, steps=tuple(steps), outcome=outcome, metadata=metadata
    )
    return Converted(trace_id, trajectory, None, tuple(repairs))


# ---------------------------------------------------------------------------
# many traces, and what happened to them
# ---------------------------------------------------------------------------


@attrs.frozen
class Summary:
    """What an import did: traces read, trajectories written, and every
    issue counted by reason with the first few kept as examples."""

    traces: int
    written: int
    counts: Mapping[str, int]
    examples: Mapping[str, tuple[Issue, ...]]
    unmatched_feedback: int = 0

    @property
    def skipped(self) -> int:
        """Traces that gave no trajectory."""
        return sum(self.counts.get(r, 0) for r in TRACE_SKIPS)

    @property
    def bad(self) -> bool:
        """Whether anything at all was skipped or repaired."""
        return any(self.counts.values())

    def to_json(self) -> JSON:
        return {
            "traces": self.traces,
            "written": self.written,
            "skipped": self.skipped,
            "unmatched_feedback": self.unmatched_feedback,
            "counts": dict(self.counts),
            "examples": {r: [i.to_json() for i in ex] for r, ex in self.examples.items()},
        }


def summarize(
    converted: Sequence[Converted],
    problems: Iterable[Issue] = (),
    *,
    feedback: Mapping[str, Feedback] | None = None,
) -> Summary:
    """Count ``converted`` (its skips and repairs) and ``problems`` met while
    reading (lines, spans, feedback) by reason, in the order of REASONS."""
    issues = list(problems)
    for c in converted:
        issues += c.repairs
        if c.skipped is not None:
            issues.append(c.skipped)
    counts: Counter[str] = Counter(i.reason for i in issues)
    examples: dict[str, list[Issue]] = {}
    for issue in issues:
        kept = examples.setdefault(issue.reason, [])
        if len(kept) < EXAMPLES_PER_REASON:
            kept.append(issue)
    order = {r: n for n, r in enumerate(REASONS)}
    reasons = sorted(counts, key=lambda r: order.get(r, len(order)))
    seen = {c.trace_id for c in converted}
    return Summary(
        traces=len(converted),
        written=sum(1 for c in converted if c.trajectory is not None),
        counts={r: counts[r] for r in reasons},
        examples={r: tuple(examples[r]) for r in reasons},
        unmatched_feedback=sum(1 for t in (feedback or {}) if t not in seen),
    )
