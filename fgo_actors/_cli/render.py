"""``fgo render``: a module in the form an agent loads, or a person reads."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .._core.errors import InputError
from .._core.io import load_module
from .._core.render import module_markdown
from .common import EXIT_BAD_INPUT, _fail, start_command

FORMATS = ("system-prompt", "openai-tools", "markdown")


def rendered(module_path: Path, form: str) -> str:
    """The text ``fgo render`` prints."""
    module = load_module(module_path)
    if form == "system-prompt":
        return module.system_prompt() + "\n"
    if form == "openai-tools":
        return json.dumps(module.openai_tools(), indent=2, ensure_ascii=False) + "\n"
    return module_markdown(module, title=module_path.name)


@click.command("render")
@click.argument("module_path", metavar="MODULE", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--as",
    "form",
    type=click.Choice(FORMATS),
    default="system-prompt",
    show_default=True,
    help="system-prompt: the instructions and rules, as the reference agent puts them in "
    "its system prompt; openai-tools: the functions as OpenAI tool definitions (JSON); "
    "markdown: a page for people, each rule with the evidence behind it.",
)
def render_command(module_path: Path, form: str) -> None:
    """Print MODULE (a module JSON file, e.g. fgo optimize's --out) in the form an
    agent loads. In Python: Module.system_prompt() and Module.openai_tools()."""
    _, err, _ = start_command(log_json=False)
    try:
        text = rendered(module_path, form)
    except InputError as e:
        _fail(err, EXIT_BAD_INPUT, "error", e)
    click.echo(text, nl=False)
