"""The asyncio bridge, from plain ``asyncio.run`` programs."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
import trio

from fgo_actors._daemon.bridge import (
    _acquire_guest,
    _Guest,
    _guests,
    _release_guest,
    open_optimizer_asyncio,
)
from fgo_actors._storage.store import StoreError

from .helpers import daemon_config, make_trajectories

T = TypeVar("T")


def test_asyncio_program_submits_and_awaits_a_published_version(
    server_url: str, tmp_path: Path
) -> None:
    data = make_trajectories(12)

    async def program() -> tuple[int, int, int, bool]:
        async with (
            open_optimizer_asyncio(daemon_config(tmp_path / "a.db", server_url)) as opt,
            opt.versions() as versions,
        ):
            result = await opt.submit_many([t.to_json() for t in data])
            again = await opt.submit(data[0])
            first = await asyncio.wait_for(anext(versions), 30)
            assert first.n == 1
            await opt.wait_idle()
            latest = opt.latest_version()
            assert latest is not None
            same = opt.latest_module() == latest.module
            return result.accepted, again.duplicate, latest.lineage["trajectories"], same

    accepted, duplicate, covered, same = asyncio.run(program())
    assert (accepted, duplicate, covered, same) == (12, 1, 12, True)


def test_two_optimizers_on_one_loop_share_one_guest_run(server_url: str, tmp_path: Path) -> None:
    async def program() -> list[int]:
        loop = asyncio.get_running_loop()
        async with (
            open_optimizer_asyncio(daemon_config(tmp_path / "a.db", server_url)) as a,
            open_optimizer_asyncio(daemon_config(tmp_path / "b.db", server_url)) as b,
        ):
            assert _guests[loop].users == 2
            await a.submit_many(make_trajectories(3, prefix="a"))
            await b.submit_many(make_trajectories(5, prefix="b"))
            await asyncio.gather(a.wait_idle(), b.wait_idle())
            counts = [
                v.lineage["trajectories"]
                for v in (a.latest_version(), b.latest_version())
                if v is not None
            ]
        assert loop not in _guests  # the guest run stopped with its last user
        return counts

    assert asyncio.run(program()) == [3, 5]


def test_cancelling_an_asyncio_call_cancels_it_in_trio(server_url: str, tmp_path: Path) -> None:
    """A submit that waits on backpressure is cancelled by asyncio's timeout,
    and the optimizer goes on working."""
    data = make_trajectories(200)

    async def program() -> int:
        config = daemon_config(
            tmp_path / "c.db", "http://127.0.0.1:9/v1", max_pending_subsets=1, max_wait=0.01
        )
        async with open_optimizer_asyncio(config, grace=0) as opt:
            await opt.submit_many(list(data[:100]))
            while not opt.saturated:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(opt.submit_many(list(data[100:])), 1.0)
            assert opt.saturated
            return len(await opt.list_versions())

    assert asyncio.run(program()) == 0


def test_an_optimizer_that_cannot_open_raises_its_error(tmp_path: Path) -> None:
    bogus = tmp_path / "notes.db"
    bogus.write_text("not a database\n" * 100)

    async def program() -> None:
        async with open_optimizer_asyncio(daemon_config(bogus, "http://127.0.0.1:9/v1")):
            pass

    with pytest.raises(StoreError, match="cannot use as a store"):
        asyncio.run(program())


def test_a_guest_run_that_crashes_fails_its_stop_instead_of_hanging() -> None:
    """When the trio guest run itself dies (here, a callback that raises, which
    trio treats as an internal error), waiting for it to stop raises that
    error, caused by the callback's own error; it does not hang."""

    async def program() -> BaseException | None:
        guest = _Guest(asyncio.get_running_loop())
        await guest.start()

        def boom() -> None:
            raise RuntimeError("boom")

        guest.call_soon(boom)
        try:
            await asyncio.wait_for(guest.stop(), 20)
        except BaseException as e:
            return e
        return None

    error = asyncio.run(program())
    assert isinstance(error, trio.TrioInternalError)
    cause = error.__cause__
    while isinstance(cause, BaseExceptionGroup) and len(cause.exceptions) == 1:
        cause = cause.exceptions[0]
    assert isinstance(cause, RuntimeError)
    assert str(cause) == "boom"


def run_in_guest(program: Callable[[_Guest], Awaitable[T]]) -> tuple[T, list[str]]:
    """``program(guest)`` on a fresh asyncio loop with a started guest run,
    stopped after it; its result and whatever the loop reported as an error
    in a callback (which asyncio logs rather than raises)."""
    reported: list[str] = []

    async def main() -> T:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: reported.append(context["message"]))
        guest = _Guest(loop)
        await guest.start()
        try:
            return await program(guest)
        finally:
            await asyncio.wait_for(guest.stop(), 20)

    return asyncio.run(main()), reported


def test_a_nursery_group_of_one_error_is_that_error_and_of_two_stays_a_group() -> None:
    def failing(error: Exception) -> Callable[[], Awaitable[None]]:
        async def fails() -> None:
            raise error

        return fails

    async def program(guest: _Guest) -> list[BaseException]:
        out: list[BaseException] = []
        nested = ExceptionGroup("outer", [ExceptionGroup("inner", [ValueError("v")])])
        two = ExceptionGroup("two", [ValueError("a"), KeyError("b")])
        for error in (nested, two):
            try:
                await guest.run(failing(error))
            except Exception as e:
                out.append(e)
        return out

    (one, both), reported = run_in_guest(program)
    assert isinstance(one, ValueError)
    assert str(one) == "v"
    assert isinstance(both, ExceptionGroup)
    assert both.message == "two"
    assert reported == []


def test_an_asyncio_cancel_cancels_the_trio_task() -> None:
    """Cancelling the asyncio future (a timeout) cancels the trio task it
    stands for, which sees trio.Cancelled, and the guest run goes on; no
    callback fails on the asyncio side."""
    seen: list[str] = []

    async def forever() -> None:
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            seen.append("cancelled")
            raise

    async def quick() -> int:
        return 7

    async def program(guest: _Guest) -> int:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(guest.run(forever), 0.2)
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.01)
        return await guest.run(quick)

    value, reported = run_in_guest(program)
    assert (value, seen, reported) == (7, ["cancelled"], [])


def test_a_guest_run_that_dies_before_it_is_ready_fails_the_open_and_leaves_no_guest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If trio's guest run ends before it is ready to host tasks, opening an
    optimizer raises its error instead of hanging, and nothing half-started is
    left registered: the next open on the same loop starts a fresh guest."""

    reported: list[str] = []

    def no_token() -> trio.lowlevel.TrioToken:
        raise RuntimeError("no token today")

    async def program() -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: reported.append(context["message"]))
        config = daemon_config(tmp_path / "a.db", "http://127.0.0.1:9/v1")
        error = ""
        with monkeypatch.context() as patch:
            patch.setattr(trio.lowlevel, "current_trio_token", no_token)
            try:
                async with asyncio.timeout(20), open_optimizer_asyncio(config):
                    pass
            except RuntimeError as e:
                error = str(e)
        assert loop not in _guests
        for _ in range(3):  # free the failed guest, whose futures' unread errors asyncio logs
            gc.collect()
            await asyncio.sleep(0)
        guest = await _acquire_guest()
        users = guest.users
        await _release_guest(guest)
        assert loop not in _guests
        return error, users

    assert asyncio.run(program()) == ("no token today", 1)
    assert reported == []


def test_asyncio_signal_handlers_still_run_while_the_guest_runs() -> None:
    """asyncio's signal handlers wake its loop through ``signal.set_wakeup_fd``;
    the guest run must leave that file descriptor to asyncio, or a handler
    added before the guest started would never run."""

    async def main() -> bool:
        loop = asyncio.get_running_loop()
        got = asyncio.Event()
        loop.add_signal_handler(signal.SIGUSR1, got.set)
        try:
            guest = _Guest(loop)
            await guest.start()
            try:
                os.kill(os.getpid(), signal.SIGUSR1)
                await asyncio.wait_for(got.wait(), 10)
                return got.is_set()
            finally:
                await asyncio.wait_for(guest.stop(), 20)
        finally:
            loop.remove_signal_handler(signal.SIGUSR1)

    assert asyncio.run(main()) is True
