"""OTLP traces in the daemon: ``POST /v1/traces`` and ``POST /v1/feedback``.

An agent's OpenTelemetry collector (or its SDK's OTLP/HTTP exporter) sends
spans here as they end; each trace becomes one trajectory, converted as
``fgo import-traces`` converts a file (:mod:`fgo_actors.traces`), and goes
into the optimizer as ``POST /v1/trajectories`` would send it: the trace id
is the trajectory id, so a trace sent twice is stored once.

A trace is converted when it is ready (see :mod:`fgo_actors.traces.pending`):
its outcome is known, from a span attribute named by ``--success-attr`` /
``--score-attr`` or from a ``POST /v1/feedback`` for its trace id, and its
root span has arrived. Until then its spans wait, bounded in time
(``--trace-wait``) and in count; they are kept in the store, so a restarted
daemon still has them. A trace that expires without an outcome is skipped
with its reason, counted and logged, never given an outcome.

Needs the ``otel`` extra; without it the two endpoints answer 501.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import structlog
import trio

from .._core.io import JSONTooDeepError, loads

if TYPE_CHECKING:
    from ..traces import Feedback, Issue, Span
    from .optimizer import StreamingOptimizer

# Why a trace gives no trajectory (the /metrics labels): the conversion's
# reasons (fgo_actors.traces.issues.TRACE_SKIPS) and the trajectory checks'.
TRACE_SKIP_REASONS = ("no_outcome", "bad_outcome", "no_messages", "invalid_trajectory")
# What a span that came in a request is said to come from, in issues.
REQUEST = "POST /v1/traces"
FEEDBACK_REQUEST = "POST /v1/feedback"


def otel_missing() -> str | None:
    """Why OTLP ingest cannot run here (the ``otel`` extra is missing), or None."""
    try:
        import google.protobuf  # noqa: F401
        import opentelemetry.proto  # noqa: F401
    except ImportError as e:
        return (
            f"OTLP ingest needs the otel extra ({e.name} is not installed): "
            "pip install 'fgo-actors[otel]'"
        )
    return None


@attrs.frozen
class TraceSettings:
    """How the daemon turns traces into trajectories (``fgo serve`` flags of
    the same names; see ``fgo import-traces`` for the first four)."""

    success_attr: str | None = None
    score_attr: str | None = None
    success_threshold: float | None = None
    trace_format: str = "auto"
    trace_wait: float = 600.0  # seconds a trace may wait for its outcome
    trace_settle: float = 5.0  # quiet seconds that complete a trace with no root span
    max_waiting_traces: int = 10_000
    max_spans_per_trace: int = 10_000
    max_waiting_spans: int = 200_000  # all waiting traces together


@attrs.frozen
class Receipt:
    """What one request did: how many spans (or feedback records) were
    accepted, how many were already held, and each one refused, with why."""

    accepted: int
    duplicates: int
    rejected: tuple[Issue, ...]

    def otlp_json(self) -> dict[str, Any]:
        """The OTLP/HTTP ``ExportTraceServiceResponse`` for it: empty when all
        was accepted, else ``partialSuccess`` (which clients do not retry)."""
        if not self.rejected:
            return {}
        reasons = Counter(i.reason for i in self.rejected)
        summary = "; ".join(f"{reason}: {n}" for reason, n in sorted(reasons.items()))
        return {
            "partialSuccess": {
                "rejectedSpans": str(len(self.rejected)),
                "errorMessage": f"{summary} (first: {self.rejected[0]})",
            }
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "rejected": [i.to_json() for i in self.rejected],
        }


class OTLPBodyError(ValueError):
    """A request body that is not an OTLP trace export at all (400)."""


def parse_traces_body(raw: bytes, content_type: str) -> tuple[list[Span], list[Issue]]:
    """The spans in an OTLP/HTTP body (protobuf or JSON), and an issue for
    each span that had to be skipped. OTLPBodyError when the body cannot be
    read at all."""
    from google.protobuf.message import DecodeError
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    from ..traces import parse_otlp_json, spans_of
    from ..traces.otlp import OTLPFormatError

    if content_type == "application/x-protobuf":
        try:
            request = ExportTraceServiceRequest.FromString(raw)
        except DecodeError as e:
            raise OTLPBodyError(f"the body is not an OTLP protobuf trace export: {e}") from e
        return spans_of(request, file=REQUEST)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise OTLPBodyError(f"the body is not UTF-8: {e}") from e
    try:
        doc = loads(text)
    except json.JSONDecodeError as e:
        raise OTLPBodyError(f"the body is not JSON: {e.msg} at line {e.lineno}") from e
    except JSONTooDeepError as e:
        raise OTLPBodyError(f"refused JSON: {e}") from e
    try:
        return spans_of(parse_otlp_json(doc), file=REQUEST)
    except OTLPFormatError as e:
        raise OTLPBodyError(f"the body is not OTLP/JSON trace data: {e}") from e


def parse_feedback_body(text: str) -> tuple[dict[str, Feedback], list[Issue]]:
    """Feedback records from a body: one JSON object, an array of them, or
    JSON Lines (``{"trace_id", "success", "score", "feedback"}`` each)."""
    from ..traces import read_feedback

    try:
        doc = loads(text)
    except (json.JSONDecodeError, JSONTooDeepError):
        doc = None  # JSON Lines, or bad: read_feedback says which line
    if isinstance(doc, dict):
        text = json.dumps(doc)
    elif isinstance(doc, list):
        text = "\n".join(json.dumps(item) for item in doc)
    return read_feedback(text, FEEDBACK_REQUEST)


class TraceIngest:
    """The traces waiting in a daemon, and the task that converts them."""

    def __init__(
        self,
        optimizer: StreamingOptimizer,
        settings: TraceSettings = TraceSettings(),
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        from ..traces import OutcomeRule
        from ..traces.pending import Waiting

        self.optimizer = optimizer
        self.settings = settings
        self.rule = OutcomeRule(
            success_attr=settings.success_attr,
            score_attr=settings.score_attr,
            success_threshold=settings.success_threshold,
        )
        self.waiting = Waiting(
            self.rule,
            wait_s=settings.trace_wait,
            settle_s=settings.trace_settle,
            max_traces=settings.max_waiting_traces,
            max_spans_per_trace=settings.max_spans_per_trace,
            max_spans=settings.max_waiting_spans,
        )
        self.clock = clock
        # spans, traces converted, and each skip and repair, by reason
        self.counts: Counter[str] = Counter()
        self._wake = trio.Event()
        self._lock = trio.Lock()  # one request (or the converter) at a time

    # -- requests ---------------------------------------------------------
    async def receive_spans(self, spans: Sequence[Span], problems: Sequence[Issue]) -> Receipt:
        """Keep ``spans`` until their traces are ready; refuse those of a
        trace already stored as a trajectory (it was converted: a late span
        cannot change it) and those over a trace's span limit."""
        from ..traces import Issue
        from ..traces.otlp import span_to_json

        rejected: list[Issue] = list(problems)
        async with self._lock:
            stored = await self.optimizer.store.known_ids({s.trace_id for s in spans})
            fresh = [s for s in spans if s.trace_id not in stored]
            for span in spans:
                if span.trace_id in stored:
                    rejected.append(
                        Issue(
                            "late_span",
                            f"span {span.name!r}: its trace was converted already",
                            REQUEST,
                            span.trace_id,
                        )
                    )
            now = self.clock()
            # Kept on disk before it is answered: a span accepted is never lost.
            await self.optimizer.store.add_waiting(
                [(s.trace_id, s.span_id, span_to_json(s)) for s in fresh], [], now
            )
            added = self.waiting.add_spans(fresh, now)
            for span in added.over_limit:
                rejected.append(
                    Issue(
                        "trace_too_big",
                        f"span {span.name!r}: the trace holds "
                        f"{self.settings.max_spans_per_trace} spans already",
                        REQUEST,
                        span.trace_id,
                    )
                )
        self.counts["spans_received"] += len(spans)
        self.counts["spans_rejected"] += len(rejected)
        self._wake.set()
        return Receipt(len(added.kept), len(added.duplicates), tuple(rejected))

    async def receive_feedback(
        self, records: dict[str, Feedback], problems: Sequence[Issue]
    ) -> Receipt:
        """Give waiting traces (or traces still to come) their outcome."""
        from ..traces import Issue

        rejected: list[Issue] = list(problems)
        accepted: list[Feedback] = []
        duplicates = 0
        async with self._lock:
            stored = await self.optimizer.store.known_ids(records)
            for trace_id, feedback in records.items():
                if trace_id in stored:
                    rejected.append(
                        Issue(
                            "late_feedback",
                            "the trace was converted already, with the outcome it had then",
                            feedback.where,
                            trace_id,
                        )
                    )
                elif self.waiting.feedback_of(trace_id) is not None:
                    duplicates += 1
                else:
                    accepted.append(feedback)
            now = self.clock()
            await self.optimizer.store.add_waiting(
                [], [(f.trace_id, _feedback_json(f)) for f in accepted], now
            )
            for feedback in accepted:
                self.waiting.add_feedback(feedback, now)
        self.counts["feedback_received"] += len(records)
        self._wake.set()
        return Receipt(len(accepted), duplicates, tuple(rejected))

    # -- the converter ----------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load what was waiting at the last stop, then convert traces as they
        become due, for ever."""
        await self._resume()
        task_status.started()
        while True:
            self._wake = trio.Event()
            await self.convert_due()
            next_check = self.waiting.next_check(self.clock())
            delay = None if next_check is None else max(0.05, next_check - self.clock())
            with trio.move_on_after(delay if delay is not None else float("inf")):
                await self._wake.wait()

    async def _resume(self) -> None:
        from ..traces import Feedback
        from ..traces.otlp import span_from_json

        spans, feedback = await self.optimizer.store.waiting()
        for received, body in spans:
            self.waiting.add_spans([span_from_json(body)], received)
        for received, body in feedback:
            self.waiting.add_feedback(Feedback(**body), received)
        if spans or feedback:
            structlog.get_logger().info(
                "traces_resumed", traces=len(self.waiting), spans=len(spans)
            )

    async def convert_due(self) -> int:
        """Convert every trace due now; how many became trajectories."""
        from ..traces import convert_trace

        async with self._lock:
            due = self.waiting.due(self.clock())
            if not due:
                return 0
            log = structlog.get_logger()

            def convert_all() -> list[Any]:
                out = []
                for d in due:
                    rule = self.rule
                    if d.feedback is not None:
                        rule = attrs.evolve(rule, feedback={d.trace_id: d.feedback})
                    out.append(
                        convert_trace(
                            d.trace_id,
                            d.spans,
                            rule,
                            fmt=self.settings.trace_format,  # type: ignore[arg-type]
                        )
                    )
                return out

            converted = await trio.to_thread.run_sync(convert_all)
            trajectories = []
            for d, c in zip(due, converted, strict=True):
                for repair in c.repairs:
                    self.counts[f"repaired:{repair.reason}"] += 1
                if c.trajectory is None:
                    assert c.skipped is not None
                    self.counts[f"skipped:{c.skipped.reason}"] += 1
                    log.warning(
                        "trace_skipped",
                        trace_id=d.trace_id,
                        reason=c.skipped.reason,
                        detail=c.skipped.detail,
                        why=d.why,
                        spans=len(d.spans),
                    )
                else:
                    trajectories.append(c.trajectory)
                    if d.why != "ready":
                        log.info("trace_converted_on_expiry", trace_id=d.trace_id, why=d.why)
        # Stored before it is forgotten: a crash in between converts it again,
        # and the store keeps the first copy (the trace id is the id).
        if trajectories:
            result = await self.optimizer.submit_many(trajectories)
            self.counts["traces_converted"] += result.accepted
            for bad in result.rejected:
                self.counts["skipped:invalid_trajectory"] += 1
                log.warning("trace_skipped", reason="invalid_trajectory", detail=bad.reason)
        await self.optimizer.store.drop_waiting([d.trace_id for d in due])
        return len(trajectories)

    def statistics(self) -> dict[str, int]:
        """Counters (spans, feedback, traces converted, skips and repairs by
        reason) and what waits now."""
        return {
            **dict(sorted(self.counts.items())),
            "traces_waiting": len(self.waiting),
            "spans_waiting": self.waiting.spans,
        }


def _feedback_json(feedback: Feedback) -> dict[str, Any]:
    return {
        "trace_id": feedback.trace_id,
        "success": feedback.success,
        "score": feedback.score,
        "feedback": feedback.feedback,
        "where": feedback.where,
    }
