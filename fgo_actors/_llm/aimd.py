"""Adaptive concurrency for one LLM endpoint: additive increase, multiplicative
decrease (AIMD), as TCP does for congestion.

A provider's rate limit is unknown and changes by the minute, so a client
told "16 at once" against an endpoint that takes 4 would fail its calls with
HTTP 429. The window starts at the ceiling (``--max-concurrency``). A 429 or
503 cuts it by a quarter, once per burst: the calls sent before a cut and
refused after it are the same burst, and do not cut again. After ``size``
successes in a row it grows by one, up to the ceiling. (Halving, as TCP
does, leaves a quarter of a fixed limit unused on average; a refusal here
costs only a short wait, so overshooting is cheap and undershooting is not.)

A refusal while the window could still shrink is our own doing, not the
endpoint failing: the caller waits (``Retry-After``, when given) and sends the
call again without spending one of its retries. Only a refusal with the
window already at 1 counts as a failure. Pure: no I/O, no clock.
"""

from __future__ import annotations

import attrs


@attrs.define
class Window:
    """The number of calls allowed in flight, between 1 and ``ceiling``."""

    ceiling: int
    size: int = attrs.field(init=False)
    cuts: int = attrs.field(default=0, init=False)  # times the window was cut
    _epoch: int = attrs.field(default=0, init=False)  # bumps at each cut
    _streak: int = attrs.field(default=0, init=False)  # successes since the last change

    def __attrs_post_init__(self) -> None:
        if self.ceiling < 1:
            raise ValueError("the window's ceiling must be at least 1")
        self.size = self.ceiling

    def sent(self) -> int:
        """A call is sent: the token to hand back with its refusal."""
        return self._epoch

    def refused(self, token: int) -> bool:
        """A call sent with ``token`` was refused (429, 503). True: it is ours
        (the window was cut for it, or for its burst); send it again after the
        wait, without spending a retry. False: the window was already at 1
        when it was sent, so the endpoint is failing."""
        if token != self._epoch:
            return True  # the burst it belongs to has cut the window already
        if self.size == 1:
            return False
        self.size = max(1, self.size * 3 // 4)
        self._epoch += 1
        self._streak = 0
        self.cuts += 1
        return True

    def succeeded(self) -> None:
        """A call was answered: after ``size`` in a row, one more may fly."""
        if self.size >= self.ceiling:
            return
        self._streak += 1
        if self._streak >= self.size:
            self.size += 1
            self._streak = 0
