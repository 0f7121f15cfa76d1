"""What importing traces met on the way: one record per problem, with a reason.

Bad input never stops an import: a line, a span, a message or a trace is
skipped or repaired, and an :class:`Issue` says which, why and where. The
reasons are stable keys (the summary counts by them, ``--log-json`` prints
them); :data:`REASONS` words each one for people.
"""

from __future__ import annotations

import attrs

# What each reason means, and what happened to the thing it is about.
REASONS: dict[str, str] = {
    # A line or file that could not be read (skipped; the rest is read).
    "unreadable_file": "file could not be read",
    "malformed_json": "line is not JSON (skipped)",
    "not_otlp": "line is not OTLP/JSON trace data (skipped)",
    "bad_span": "span with invalid ids (skipped)",
    "bad_feedback": "feedback line not usable (skipped)",
    # A trace that gave no trajectory.
    "no_outcome": "trace has no outcome (skipped: an outcome is never invented)",
    "bad_outcome": "trace's outcome attribute is not usable (skipped)",
    "no_messages": "trace has no LLM messages (skipped)",
    # Repairs inside a trajectory that was written.
    "truncated": "text over the length limit (cut)",
    "unknown_span_kind": "span of an unknown kind (ignored)",
    "unknown_role": "message with an unknown role (dropped)",
    "bad_messages": "message attribute or event not readable (dropped)",
    "duplicate_span": "span seen twice (the first kept)",
    "outside_run": "LLM or tool span outside the agent run (ignored)",
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
