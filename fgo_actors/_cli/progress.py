"""Progress for long runs: a live rich display on a TTY, periodic JSON log lines otherwise."""

from __future__ import annotations

import structlog
import trio
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from .._llm.gateway import LLMGateway
from ..actors.state import RunState


def _summary(state: RunState, gateway: LLMGateway) -> str:
    g = gateway.statistics()
    prompt = sum(g.prompt_tokens.values())
    completion = sum(g.completion_tokens.values())
    elapsed = max(state.now(), 1e-9)
    budget = f" / {g.token_budget}" if g.token_budget is not None else ""
    window = (
        f" (window {g.window}, {g.throttled} throttled)"
        if g.window is not None and (g.window_cuts or g.throttled)
        else ""
    )
    return (
        f"phase {state.phase} · in flight {g.in_flight}{window} · "
        f"calls {sum(g.calls.values())} · "
        f"retries {g.retries} · re-asks {g.reasks} · tokens {prompt + completion}{budget} "
        f"(prompt {prompt}, completion {completion}, {completion / elapsed:.1f} gen tok/s)"
        + (f" · failures {len(state.failures)}" if state.failures else "")
    )


async def show_progress(
    state: RunState, gateway: LLMGateway, console: Console, *, interval: float = 0.25
) -> None:
    """Render until cancelled."""
    progress = Progress(
        TextColumn("{task.description:<18}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
    subsets = progress.add_task("subsets optimized", total=None)
    merges = progress.add_task("merges done", total=None)
    line = Text()
    with Live(Group(progress, line), console=console, auto_refresh=False, transient=False) as live:
        try:
            while True:
                s = state.statistics()
                progress.update(subsets, completed=s.subsets_done, total=s.subsets_total)
                progress.update(merges, completed=s.merges_done, total=s.merges_expected)
                line.plain = _summary(state, gateway)
                live.refresh()
                await trio.sleep(interval)
        finally:
            s = state.statistics()
            progress.update(subsets, completed=s.subsets_done, total=s.subsets_total)
            progress.update(merges, completed=s.merges_done, total=s.merges_expected)
            line.plain = _summary(state, gateway)
            live.refresh()


async def log_progress(state: RunState, gateway: LLMGateway, *, interval: float = 5.0) -> None:
    """Emit a ``progress`` log event every ``interval`` seconds until cancelled."""
    log = structlog.get_logger()
    while True:
        await trio.sleep(interval)
        s = state.statistics()
        g = gateway.statistics()
        log.info(
            "progress",
            phase=s.phase,
            subsets_done=s.subsets_done,
            subsets_total=s.subsets_total,
            merges_done=s.merges_done,
            merges_expected=s.merges_expected,
            in_flight=g.in_flight,
            window=g.window,
            throttled=g.throttled,
            retries=g.retries,
            reasks=g.reasks,
            prompt_tokens=sum(g.prompt_tokens.values()),
            completion_tokens=sum(g.completion_tokens.values()),
            failures=s.failures,
        )
