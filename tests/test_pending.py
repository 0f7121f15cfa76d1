"""The book of traces waiting for their outcome (``traces.pending``): pure,
so its promises are checked over any interleaving of arrivals and time."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fgo_actors.traces import Feedback, OutcomeRule, Span
from fgo_actors.traces.pending import Waiting

SUCCESS = "app.ok"
RULE = OutcomeRule(success_attr=SUCCESS)


def span(trace: int, n: int, *, root: bool = False, ok: bool | None = None) -> Span:
    attributes: dict[str, Any] = {} if ok is None else {SUCCESS: ok}
    return Span(
        trace_id=f"{trace:032x}",
        span_id=f"{n + 1:016x}",
        parent_id=None if root else f"{999:016x}",
        name=f"s{n}",
        start_ns=n,
        end_ns=n + 1,
        attributes=attributes,
    )


# One step: spans of a trace (some root, some carrying the outcome), feedback
# for a trace, or time passing.
steps = st.lists(
    st.one_of(
        st.tuples(
            st.just("spans"),
            st.integers(0, 5),
            st.lists(st.tuples(st.integers(0, 6), st.booleans(), st.booleans()), max_size=4),
        ),
        st.tuples(st.just("feedback"), st.integers(0, 5), st.booleans()),
        st.tuples(st.just("wait"), st.floats(0, 30)),
    ),
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(steps=steps, max_traces=st.integers(1, 4))
def test_every_trace_leaves_once_with_all_its_spans_and_the_caps_hold(
    steps: list[Any], max_traces: int
) -> None:
    book = Waiting(
        RULE, wait_s=60, settle_s=5, max_traces=max_traces, max_spans_per_trace=3, max_spans=6
    )
    now = 0.0
    kept: Counter[str] = Counter()
    left: Counter[str] = Counter()

    def collect() -> None:
        for due in book.due(now):
            assert len({s.span_id for s in due.spans}) == len(due.spans)
            left[due.trace_id] += len(due.spans)
            if due.why == "ready":
                # Ready means an outcome can be read and the spans settled.
                assert any(SUCCESS in s.attributes for s in due.spans) or due.feedback
            assert len(due.spans) <= 3
        assert len(book) <= max_traces
        assert book.spans <= 6 or len(book) == 1
        assert book.spans == sum(len(e.spans) for e in book._entries.values())

    for step in steps:
        if step[0] == "spans":
            _, trace, parts = step
            added = book.add_spans(
                [span(trace, n, root=root, ok=True if ok else None) for n, root, ok in parts],
                now,
            )
            kept.update(s.trace_id for s in added.kept)
            assert len(added.kept) + len(added.duplicates) + len(added.over_limit) == len(parts)
        elif step[0] == "feedback":
            _, trace, ok = step
            book.add_feedback(Feedback(f"{trace:032x}", success=ok), now)
        else:
            now += step[1]
        collect()
        check = book.next_check(now)
        assert (check is None) == (len(book) == 0)
        assert check is None or check >= now
    now += 61
    collect()
    assert len(book) == 0
    # Every span kept left exactly once, with its trace.
    assert left == kept


def test_a_trace_is_ready_once_its_root_and_outcome_are_in() -> None:
    book = Waiting(RULE, wait_s=60, settle_s=5)
    book.add_spans([span(1, 1, ok=True)], 0.0)
    assert book.due(1.0) == []  # the outcome is in, the root is not
    book.add_spans([span(1, 2, root=True)], 2.0)
    (due,) = book.due(2.0)
    assert (due.why, len(due.spans)) == ("ready", 2)


def test_feedback_decides_and_the_first_counts() -> None:
    book = Waiting(RULE, wait_s=60, settle_s=5)
    trace = f"{7:032x}"
    assert book.add_feedback(Feedback(trace, success=False), 0.0)
    assert not book.add_feedback(Feedback(trace, success=True), 1.0)
    assert book.due(1.0) == []  # feedback alone, no spans yet
    book.add_spans([span(7, 1, root=True)], 2.0)
    (due,) = book.due(2.0)
    assert due.feedback is not None
    assert due.feedback.success is False


def test_past_the_count_the_oldest_is_evicted() -> None:
    book = Waiting(RULE, wait_s=60, settle_s=5, max_traces=2)
    for trace in range(3):
        book.add_spans([span(trace, 1)], float(trace))
    (due,) = book.due(3.0)
    assert (due.trace_id, due.why) == (f"{0:032x}", "evicted")


def test_past_the_spans_the_oldest_is_evicted() -> None:
    book = Waiting(RULE, wait_s=60, settle_s=5, max_spans=3)
    book.add_spans([span(0, 1), span(0, 2)], 0.0)
    book.add_spans([span(1, 1), span(1, 2)], 1.0)
    (due,) = book.due(2.0)
    assert (due.trace_id, due.why, book.spans) == (f"{0:032x}", "evicted", 2)


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="wait_s"):
        Waiting(RULE, wait_s=0)
