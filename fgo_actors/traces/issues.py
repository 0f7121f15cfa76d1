"""What importing traces met on the way: one record per problem, with a reason.

Bad input never stops an import: a line, a span, a message or a trace is
skipped or repaired, and an :class:`Issue` says which, why and where. The
reasons are stable keys (the summary counts by them, ``--log-json`` prints
them); :data:`REASONS` says what each counts, for people.
"""

from __future__ import annotations

import attrs

# What each reason means, and what happened to the thing it is about.
REASONS: dict[str, str] = {
    # A file, line or span that could not be read (skipped; the rest is read).
    "unreadable_file": "files that could not be read",
    "malformed_json": "lines that are not JSON, skipped",
    "not_otlp": "lines that are not OTLP/JSON trace data, skipped",
    "bad_span": "spans with invalid ids, skipped",
    "bad_feedback": "feedback lines that could not be used, skipped",
    # A trace that gave no trajectory.
    "no_outcome": "traces without an outcome, skipped: an outcome is never invented",
    "bad_outcome": "traces whose outcome attribute is not usable, skipped",
    "no_messages": "traces without LLM messages, skipped",
    # The daemon's POST /v1/traces and /v1/feedback (refused, and said so).
    "late_span": "spans of a trace converted already, refused",
    "late_feedback": "feedback for a trace converted already, refused",
    "trace_too_big": "spans over a trace's span limit, refused",
    "invalid_trajectory": "converted traces the trajectory checks refused, skipped",
    # Repairs inside a trajectory that was written.
    "truncated": "texts over the length limit, cut",
    "unknown_span_kind": "spans of an unknown kind, ignored",
    "unknown_role": "messages with an unknown role, dropped",
    "bad_messages": "message attributes or events that could not be read, dropped",
    "duplicate_span": "spans read twice, the first copy kept",
    "outside_run": "LLM or tool spans outside the agent run, ignored",
}
# The reasons a trace is skipped for (the others skip less, or repair).
TRACE_SKIPS = ("no_outcome", "bad_outcome", "no_messages")


@attrs.frozen
class Issue:
    """One problem: ``reason`` (a key of REASONS), ``detail`` (what exactly),
    ``where`` (``file:line`` where known) and the trace it is about."""

    reason: str
    detail: str
    where: str | None = None
    trace_id: str | None = None

    def __str__(self) -> str:
        parts = [p for p in (self.where, f"trace {self.trace_id}" if self.trace_id else None) if p]
        prefix = ", ".join(parts)
        return f"{prefix}: {self.detail}" if prefix else self.detail

    def to_json(self) -> dict[str, str]:
        out = {"reason": self.reason, "detail": self.detail}
        if self.where is not None:
            out["where"] = self.where
        if self.trace_id is not None:
            out["trace_id"] = self.trace_id
        return out
