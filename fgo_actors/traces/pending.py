"""Traces waiting for the rest of their spans or for their outcome, bounded in
time and count: what the daemon's ``POST /v1/traces`` holds between requests.

A collector exports a trace's spans as they end, in any number of batches,
and the outcome may come later still: on a span (an attribute the user
names) or in a ``POST /v1/feedback`` keyed by trace id. :class:`Waiting` is
the pure, synchronous book of what has arrived; the caller passes the time
in and persists what it needs to. A trace leaves it, as a :class:`Due`, when

- it is **ready**: its outcome can be read (from its spans or its feedback)
  and its spans look complete: the root span (the one without a parent, which
  ends last and so is exported last) has arrived, or no span has arrived for
  ``settle_s``;
- it has **expired**: ``wait_s`` have passed since it was first seen, outcome
  or not (the caller converts it anyway: without an outcome it is skipped
  with its reason, never given one);
- it is **evicted**: more than ``max_traces`` are waiting, or they hold more
  than ``max_spans`` spans together, and it is the oldest.

Feedback for a trace not seen yet waits the same way, so the two may arrive
in either order.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import attrs

from .convert import Feedback, OutcomeRule, resolve_outcome
from .issues import Issue
from .otlp import Span

DEFAULT_WAIT_S = 600.0
DEFAULT_SETTLE_S = 5.0
DEFAULT_MAX_TRACES = 10_000
DEFAULT_MAX_SPANS_PER_TRACE = 10_000
# All traces together: a few hundred MB of spans at most.
DEFAULT_MAX_SPANS = 200_000

Why = Literal["ready", "expired", "evicted"]


@attrs.frozen
class Due:
    """A trace that leaves the book: its spans (in arrival order), its
    feedback if any came, and why it leaves now."""

    trace_id: str
    spans: tuple[Span, ...]
    feedback: Feedback | None
    why: Why


@attrs.define
class _Entry:
    first_seen: float
    last_span: float | None = None
    spans: dict[str, Span] = attrs.field(factory=dict)
    feedback: Feedback | None = None
    has_root: bool = False
    # Whether its outcome was looked for, settled, since the last span or
    # feedback: it is looked for again only after a change, not on every
    # request for every waiting trace.
    judged: bool = False


@attrs.frozen
class Added:
    """What :meth:`Waiting.add_spans` did with a batch: the spans kept, those
    already held (the same span id in the same trace, kept once), and those
    refused because their trace holds ``max_spans_per_trace`` already."""

    kept: tuple[Span, ...] = ()
    duplicates: tuple[Span, ...] = ()
    over_limit: tuple[Span, ...] = ()


class Waiting:
    """The traces not yet converted, keyed by trace id, oldest first."""

    def __init__(
        self,
        rule: OutcomeRule,
        *,
        wait_s: float = DEFAULT_WAIT_S,
        settle_s: float = DEFAULT_SETTLE_S,
        max_traces: int = DEFAULT_MAX_TRACES,
        max_spans_per_trace: int = DEFAULT_MAX_SPANS_PER_TRACE,
        max_spans: int = DEFAULT_MAX_SPANS,
    ) -> None:
        if wait_s <= 0 or settle_s < 0 or min(max_traces, max_spans_per_trace, max_spans) < 1:
            raise ValueError(
                "wait_s must be > 0, settle_s >= 0, and max_traces, max_spans_per_trace "
                "and max_spans >= 1"
            )
        # Feedback is given per trace (add_feedback), not through the rule.
        self.rule = attrs.evolve(rule, feedback={})
        self.wait_s = wait_s
        self.settle_s = settle_s
        self.max_traces = max_traces
        self.max_spans_per_trace = max_spans_per_trace
        self.max_spans = max_spans
        self._entries: dict[str, _Entry] = {}
        self._spans = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, trace_id: object) -> bool:
        return trace_id in self._entries

    @property
    def spans(self) -> int:
        """How many spans are held, over all traces."""
        return self._spans

    def _entry(self, trace_id: str, now: float) -> _Entry:
        entry = self._entries.get(trace_id)
        if entry is None:
            entry = self._entries[trace_id] = _Entry(first_seen=now)
        return entry

    def add_spans(self, spans: Iterable[Span], now: float) -> Added:
        """Hold ``spans`` (of any traces) as arrived at ``now``."""
        kept: list[Span] = []
        duplicates: list[Span] = []
        over: list[Span] = []
        for span in spans:
            entry = self._entry(span.trace_id, now)
            if span.span_id in entry.spans:
                duplicates.append(span)
                continue
            if len(entry.spans) >= self.max_spans_per_trace:
                over.append(span)
                continue
            entry.spans[span.span_id] = span
            entry.judged = False
            self._spans += 1
            entry.last_span = now
            entry.has_root = entry.has_root or span.parent_id is None
            kept.append(span)
        return Added(tuple(kept), tuple(duplicates), tuple(over))

    def add_feedback(self, feedback: Feedback, now: float) -> bool:
        """Hold ``feedback`` for its trace; False (and nothing changes) when
        that trace has feedback already: the first one counts."""
        entry = self._entry(feedback.trace_id, now)
        if entry.feedback is not None:
            return False
        entry.feedback = feedback
        entry.judged = False
        return True

    def feedback_of(self, trace_id: str) -> Feedback | None:
        entry = self._entries.get(trace_id)
        return entry.feedback if entry else None

    def _has_outcome(self, trace_id: str, entry: _Entry) -> bool:
        rule = self.rule
        if entry.feedback is not None:
            rule = attrs.evolve(rule, feedback={trace_id: entry.feedback})
        found = resolve_outcome(trace_id, tuple(entry.spans.values()), None, rule)
        # An attribute that is there but unusable is an outcome of a kind: the
        # trace is converted, and skipped for it, rather than kept waiting.
        return not (isinstance(found, Issue) and found.reason == "no_outcome")

    def _ready(self, trace_id: str, entry: _Entry, now: float) -> bool:
        if not entry.spans:
            return False
        settled = entry.has_root or (
            entry.last_span is not None and now - entry.last_span >= self.settle_s
        )
        if not settled or entry.judged:
            return False
        entry.judged = True
        return self._has_outcome(trace_id, entry)

    def due(self, now: float) -> list[Due]:
        """Remove and return every trace that is ready, expired or evicted at
        ``now``, oldest first."""
        out: list[Due] = []
        for trace_id, entry in list(self._entries.items()):
            if now - entry.first_seen >= self.wait_s:
                out.append(self._pop(trace_id, "expired"))
            elif self._ready(trace_id, entry, now):
                out.append(self._pop(trace_id, "ready"))
        while len(self._entries) > self.max_traces or (
            self._spans > self.max_spans and len(self._entries) > 1
        ):
            out.append(self._pop(next(iter(self._entries)), "evicted"))
        return out

    def _pop(self, trace_id: str, why: Why) -> Due:
        entry = self._entries.pop(trace_id)
        self._spans -= len(entry.spans)
        return Due(trace_id, tuple(entry.spans.values()), entry.feedback, why)

    def next_check(self, now: float) -> float | None:
        """The earliest time at which a trace may become due without anything
        arriving (its settle time or its expiry), or None when none waits."""
        times: list[float] = []
        for entry in self._entries.values():
            times.append(entry.first_seen + self.wait_s)
            if entry.last_span is not None and not entry.has_root:
                times.append(entry.last_span + self.settle_s)
        return max(now, min(times)) if times else None
