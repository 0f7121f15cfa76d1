"""The daemon's counts of work under way (``_daemon/flow.Flow``) and the
decisions read off them, checked against a plain model of each item's life."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fgo_actors._daemon.flow import Flow

OPS = ("accept", "feed", "seal", "start", "finish_leaf", "finish_none", "retry", "drop", "arrive")


@given(st.lists(st.tuples(st.sampled_from(OPS), st.integers(1, 5)), max_size=80))
def test_counts_follow_each_item_and_decisions_read_them(ops: list[tuple[str, int]]) -> None:
    flow = Flow()
    # The model: where each trajectory and subset is.
    in_store = in_packer = sealed = optimizing = retrying = in_transit = 0
    for op, n in ops:
        if op == "accept":
            flow.accepted(n)
            in_store += n
        elif op == "feed" and in_store:
            flow.fed()
            in_store -= 1
            in_packer += 1
        elif op == "seal" and in_packer:
            k = min(n, in_packer)
            flow.sealed(k)
            in_packer -= k
            sealed += 1
        elif op == "start" and sealed:
            flow.started()
            sealed -= 1
            optimizing += 1
        elif op in ("finish_leaf", "finish_none") and optimizing:
            flow.finished(leaf=op == "finish_leaf")
            optimizing -= 1
            in_transit += op == "finish_leaf"
        elif op == "retry":
            flow.retry_scheduled()
            retrying += 1
        elif op == "drop" and retrying:
            flow.retry_dropped()
            retrying -= 1
        elif op == "arrive" and in_transit:
            flow.leaf_arrived()
            in_transit -= 1
        assert flow.queued == in_store + in_packer
        assert flow.unfed == in_store
        assert flow.pending == sealed + optimizing + retrying
        assert flow.optimizing == optimizing
        assert flow.in_transit == in_transit
        nothing_left = not (in_store or in_packer or sealed or optimizing or retrying or in_transit)
        assert flow.idle(merging=False) == nothing_left
        assert not flow.idle(merging=True)
        assert flow.flush_due() == (in_packer > 0 and in_store == 0)
        assert flow.saturated(3, 10) == (flow.pending >= 3 or in_store >= 10)
        assert flow.statistics() == {
            "queued": flow.queued,
            "unfed": flow.unfed,
            "pending": flow.pending,
            "optimizing": flow.optimizing,
            "in_transit": flow.in_transit,
        }


def test_a_restart_takes_the_counts_from_the_store() -> None:
    flow = Flow()
    flow.resumed(unassigned=7, pending=2)
    assert (flow.queued, flow.unfed, flow.pending) == (7, 7, 2)
    assert not flow.idle(merging=False)
    assert not flow.flush_due()  # the feeder has not given them to the packer yet
