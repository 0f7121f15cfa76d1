"""The ``fgo`` command line: the group, and the commands registered on it."""

from __future__ import annotations

import click

from .bench import bench_command
from .episodes import collect, eval_command
from .local_llm import local_llm
from .optimize import optimize
from .render import render_command
from .serve import serve_command
from .traces import import_traces_command


@click.group()
@click.version_option(package_name="fgo-actors")
def main() -> None:
    """FGO Actors: optimize LLM agent modules from execution trajectories."""


for command in (
    optimize,
    collect,
    eval_command,
    bench_command,
    serve_command,
    render_command,
    import_traces_command,
    local_llm,
):
    main.add_command(command)

if __name__ == "__main__":  # pragma: no cover
    main()
