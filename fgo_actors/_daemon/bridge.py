"""The asyncio bridge: the streaming optimizer inside an asyncio program.

Trio runs as a *guest* of the asyncio event loop (``trio.lowlevel.start_guest_run``):
both share the one thread, and asyncio drives trio's I/O. There is one guest
run per event loop, shared by every optimizer opened on that loop and stopped
when the last one closes.

asyncio code never calls trio directly. A call is handed to the guest with
the thread-safe ``TrioToken.run_sync_soon``, runs there as a trio task, and
its result comes back on an asyncio future. Cancelling the asyncio side
cancels the trio task.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import outcome
import trio

from .._core.model import Module, Trajectory
from .._storage.store import Version
from . import defaults
from .ingest import IngestResult
from .optimizer import DaemonConfig, StreamingOptimizer, open_optimizer

T = TypeVar("T")


class _Guest:
    """One trio guest run on one asyncio loop, hosting tasks on request."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.users = 0
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop: trio.Event | None = None
        self._done: asyncio.Future[None] = loop.create_future()

    async def start(self) -> None:
        ready: asyncio.Future[None] = self.loop.create_future()

        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.loop.call_soon_threadsafe(_resolve, ready, None)
                await self._stop.wait()
                nursery.cancel_scope.cancel()

        def done(result: outcome.Outcome[None]) -> None:
            if isinstance(result, outcome.Error):
                _fail(self._done, result.error)
                _fail(ready, result.error)
            else:
                _resolve(self._done, None)

        trio.lowlevel.start_guest_run(
            main,
            run_sync_soon_threadsafe=self.loop.call_soon_threadsafe,
            run_sync_soon_not_threadsafe=self.loop.call_soon,
            done_callback=done,
            host_uses_signal_set_wakeup_fd=True,
        )
        try:
            await ready
        except BaseException:
            if self._done.done():
                # The run ended before it was ready. Its error is raised here,
                # and nobody will wait for its end: retrieve the copy there,
                # which asyncio would otherwise log as never retrieved.
                self._done.exception()
            raise

    async def stop(self) -> None:
        if self._token is not None and self._stop is not None:
            self._token.run_sync_soon(self._stop.set)
        await self._done

    def call_soon(self, fn: Callable[[], object]) -> None:
        """Call the synchronous ``fn`` in trio's context, soon."""
        assert self._token is not None
        self._token.run_sync_soon(fn)

    def run(self, fn: Callable[[], Awaitable[T]]) -> asyncio.Future[T]:
        """Run ``fn()`` as a trio task in the guest; its result as an asyncio future."""
        future: asyncio.Future[T] = self.loop.create_future()
        assert self._token is not None

        def spawn() -> None:
            assert self._nursery is not None
            self._nursery.start_soon(self._call, fn, future)

        self._token.run_sync_soon(spawn)
        return future

    async def _call(self, fn: Callable[[], Awaitable[T]], future: asyncio.Future[T]) -> None:
        token = self._token
        assert token is not None
        with trio.CancelScope() as scope:

            def on_done(f: asyncio.Future[T]) -> None:
                if f.cancelled():
                    token.run_sync_soon(scope.cancel)

            future.add_done_callback(on_done)
            try:
                value = await fn()
            except trio.Cancelled:
                self.loop.call_soon_threadsafe(future.cancel)
                raise
            except Exception as e:
                # A nursery's group of one error reads better as that error.
                while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
                    inner = e.exceptions[0]
                    if not isinstance(inner, Exception):
                        break
                    e = inner
                self.loop.call_soon_threadsafe(_fail, future, e)
                return
            self.loop.call_soon_threadsafe(_resolve, future, value)
        if scope.cancelled_caught:
            self.loop.call_soon_threadsafe(future.cancel)


def _resolve(future: asyncio.Future[Any], value: object) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


_guests: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Guest] = weakref.WeakKeyDictionary()
_guest_lock: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


async def _acquire_guest() -> _Guest:
    loop = asyncio.get_running_loop()
    lock = _guest_lock.setdefault(loop, asyncio.Lock())
    async with lock:
        guest = _guests.get(loop)
        if guest is None:
            guest = _Guest(loop)
            await guest.start()
            _guests[loop] = guest
        guest.users += 1
        return guest


async def _release_guest(guest: _Guest) -> None:
    # A guest with users is registered, and its loop's lock made, by _acquire_guest.
    async with _guest_lock[guest.loop]:
        guest.users -= 1
        if guest.users == 0:
            del _guests[guest.loop]
            await guest.stop()


class AsyncioOptimizer:
    """The streaming optimizer's API for asyncio code (see :class:`StreamingOptimizer`)."""

    def __init__(self, guest: _Guest, optimizer: StreamingOptimizer) -> None:
        self._guest = guest
        self._optimizer = optimizer

    async def submit(self, trajectory: Trajectory | dict[str, Any]) -> IngestResult:
        return await self._guest.run(lambda: self._optimizer.submit(trajectory))

    async def submit_many(self, records: Sequence[Trajectory | object]) -> IngestResult:
        return await self._guest.run(lambda: self._optimizer.submit_many(records))

    async def submit_text(self, text: str) -> IngestResult:
        return await self._guest.run(lambda: self._optimizer.submit_text(text))

    async def flush(self) -> None:
        await self._guest.run(self._optimizer.flush)

    async def wait_idle(self) -> None:
        await self._guest.run(self._optimizer.wait_idle)

    async def rollback(self, n: int) -> Version:
        return await self._guest.run(lambda: self._optimizer.rollback(n))

    async def version(self, n: int) -> Version | None:
        return await self._guest.run(lambda: self._optimizer.version(n))

    async def list_versions(self) -> list[Version]:
        return await self._guest.run(self._optimizer.list_versions)

    def latest_module(self) -> Module | None:
        return self._optimizer.latest_module()

    def latest_version(self) -> Version | None:
        return self._optimizer.latest_version()

    @property
    def saturated(self) -> bool:
        return self._optimizer.saturated

    @contextlib.asynccontextmanager
    async def versions(self) -> AsyncIterator[AsyncIterator[Version]]:
        """``async with opt.versions() as versions: async for v in versions: ...``"""
        queue: asyncio.Queue[Version] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        subscribed: asyncio.Future[None] = loop.create_future()

        async def follow() -> None:
            async with self._optimizer.versions() as published:
                loop.call_soon_threadsafe(_resolve, subscribed, None)
                async for version in published:
                    loop.call_soon_threadsafe(queue.put_nowait, version)

        task = self._guest.run(follow)
        await subscribed

        async def iterate() -> AsyncIterator[Version]:
            while True:
                yield await queue.get()

        iterator = iterate()
        try:
            yield iterator
        finally:
            task.cancel()
            await iterator.aclose()  # type: ignore[attr-defined]


@contextlib.asynccontextmanager
async def open_optimizer_asyncio(
    config: DaemonConfig, *, grace: float = defaults.GRACE
) -> AsyncIterator[AsyncioOptimizer]:
    """:func:`~fgo_actors.open_optimizer` for asyncio programs::

    async with open_optimizer_asyncio(config) as opt:
        await opt.submit(trajectory)
        module = opt.latest_module()
    """
    guest = await _acquire_guest()
    loop = guest.loop
    opened: asyncio.Future[StreamingOptimizer] = loop.create_future()
    stop = trio.Event()

    async def hold() -> None:
        async with open_optimizer(config, grace=grace) as optimizer:
            loop.call_soon_threadsafe(_resolve, opened, optimizer)
            await stop.wait()

    held = guest.run(hold)
    try:
        # An optimizer that fails to open (a bad store, budgets that cannot fit)
        # ends ``held`` with the error before ``opened`` is set.
        waiting: list[asyncio.Future[Any]] = [opened, held]
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if not opened.done():
            held.result()  # raises the error
            raise RuntimeError("the optimizer stopped while opening")
        try:
            yield AsyncioOptimizer(guest, opened.result())
        finally:
            guest.call_soon(stop.set)
            await held
    finally:
        await _release_guest(guest)
