"""The daemon's event bus: every state change, fanned out to subscribers
(the SSE endpoint, ``versions()``) and logged."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog
import trio


class EventBus:
    """Fan-out of events to subscribers (SSE clients, ``versions()``). A slow
    subscriber loses events rather than slowing the daemon; losses are counted."""

    def __init__(self, buffer: int = 256) -> None:
        self._buffer = buffer
        self._subscribers: set[trio.MemorySendChannel[dict[str, Any]]] = set()
        self._seq = 0
        self.dropped = 0

    def emit(self, kind: str, **data: Any) -> None:
        self._seq += 1
        event = {"id": self._seq, "type": kind, "at": round(time.time(), 3), **data}
        structlog.get_logger().info(kind, **data)
        for send in list(self._subscribers):
            try:
                send.send_nowait(event)
            except trio.WouldBlock:
                self.dropped += 1
            except trio.BrokenResourceError:
                self._subscribers.discard(send)

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[trio.MemoryReceiveChannel[dict[str, Any]]]:
        send, receive = trio.open_memory_channel[dict[str, Any]](self._buffer)
        self._subscribers.add(send)
        try:
            with receive:
                yield receive
        finally:
            self._subscribers.discard(send)
            send.close()
