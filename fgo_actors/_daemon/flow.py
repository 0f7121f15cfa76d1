"""Where the daemon's work is, as counts, and the decisions read off them.

Pure and synchronous (no trio, no store), so that ``saturated``, ``idle`` and
``flush_due`` are tested on their own; ``StreamingOptimizer`` calls one method
per event.
"""

from __future__ import annotations

import attrs


@attrs.define
class Flow:
    """Counts of the work between ingest and the merge forest.

    A trajectory is *queued* from the moment it is accepted until it is in a
    sealed subset, and *unfed* while it is only in the store (not yet given to
    the packer). A subset is *pending* from its sealing until an optimizer is
    done with it (a failed one waiting for its retry still is), and
    *optimizing* while an optimizer works on it. A leaf is *in transit* from
    the optimizer to the merge forest.
    """

    queued: int = 0
    unfed: int = 0
    pending: int = 0
    optimizing: int = 0
    in_transit: int = 0

    # -- events ------------------------------------------------------------
    def resumed(self, unassigned: int, pending: int) -> None:
        """A start: the store's unpacked trajectories and unfinished subsets."""
        self.queued = self.unfed = unassigned
        self.pending = pending

    def accepted(self, n: int) -> None:
        self.queued += n
        self.unfed += n

    def fed(self) -> None:
        self.unfed -= 1

    def sealed(self, trajectories: int) -> None:
        self.queued -= trajectories
        self.pending += 1

    def started(self) -> None:
        self.optimizing += 1

    def finished(self, leaf: bool) -> None:
        """An optimizer is done with a subset: a leaf is on its way, or none."""
        self.optimizing -= 1
        self.pending -= 1
        if leaf:
            self.in_transit += 1

    def retry_scheduled(self) -> None:
        self.pending += 1

    def retry_dropped(self) -> None:
        """A retry that will not happen in this run (the daemon is stopping)."""
        self.pending -= 1

    def leaf_arrived(self) -> None:
        self.in_transit -= 1

    # -- decisions ---------------------------------------------------------
    def saturated(self, max_pending_subsets: int, max_queued: int) -> bool:
        """The pipeline is full: ingest should push back."""
        return self.pending >= max_pending_subsets or self.unfed >= max_queued

    def flush_due(self) -> bool:
        """Everything accepted has reached the packer, but some waits in an open
        subset: seal it now rather than after ``max_wait``."""
        return self.queued > 0 and self.unfed == 0

    def idle(self, *, merging: bool) -> bool:
        """Nothing left between ingest and the forest, and (``merging`` False)
        nothing in the forest left to merge or publish."""
        return not merging and not (
            self.queued or self.pending or self.optimizing or self.in_transit
        )

    def statistics(self) -> dict[str, int]:
        return attrs.asdict(self)
