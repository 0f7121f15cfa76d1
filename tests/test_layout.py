"""The package's layers: dependencies point one way, and the core stays pure.

Read off the source with ``ast`` (no import runs), so a new import that points
the wrong way fails here, named with its file and line.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fgo_actors"

# Lower layers first; a module may import its own layer and any lower one.
LAYERS: dict[str, int] = {
    "_core": 0,
    "_llm": 1,
    "_storage": 1,
    "traces": 1,
    "agent": 2,
    "actors": 3,
    "_daemon": 4,
    "_bench": 4,
    "testing": 4,
    "_cli": 5,
    "__init__": 6,
}
# Libraries the pure core may not use: I/O loops, HTTP, databases, the CLI.
IMPURE = {"trio", "httpx", "sqlite3", "click", "anyio", "starlette", "hypercorn"}


def layer_of(module: str) -> str:
    """The layer of ``fgo_actors.x.y`` (its first component under the package)."""
    parts = module.split(".")
    assert parts[0] == "fgo_actors", module
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> tuple[str, bool]:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return ".".join(parts), is_package


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in ``path``."""
    name, is_package = module_name(path)
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                found.append((node.lineno, node.module or ""))
                continue
            base = name.split(".") if is_package else name.split(".")[:-1]
            base = base[: len(base) - node.level + 1]
            target = ".".join([*base, node.module] if node.module else base)
            found.append((node.lineno, target))
            # ``from . import x`` may name a submodule: count it as imported too.
            found += [(node.lineno, f"{target}.{a.name}") for a in node.names]
    return found


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if "_protocols" not in p.parts)


def test_every_top_level_name_has_a_layer() -> None:
    tops = {layer_of(module_name(p)[0]) for p in SOURCES}
    assert tops <= set(LAYERS), tops - set(LAYERS)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path: Path) -> None:
    own = layer_of(module_name(path)[0])
    wrong = []
    for line, target in imports(path):
        if not target.startswith("fgo_actors.") and target != "fgo_actors":
            continue
        if target == "fgo_actors" and own != "__init__":
            wrong.append(f"{path.name}:{line} imports the package's public face")
            continue
        other = layer_of(target)
        if other in LAYERS and LAYERS[other] > LAYERS[own]:
            wrong.append(f"{path.relative_to(PACKAGE)}:{line} ({own}) imports {target} ({other})")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(
    "path",
    [p for p in SOURCES if layer_of(module_name(p)[0]) == "_core"],
    ids=lambda p: p.name,
)
def test_core_is_pure(path: Path) -> None:
    bad = [
        f"{path.name}:{line} imports {target}"
        for line, target in imports(path)
        if target.split(".")[0] in IMPURE
    ]
    assert not bad, "\n".join(bad)


def test_relative_imports_resolve_as_python_does() -> None:
    """The reader above resolves ``from .x`` and ``from ..x`` against the file's own package."""
    path = PACKAGE / "_core" / "model.py"
    targets = {t for _, t in imports(path)}
    assert "fgo_actors._core.errors" in targets
    assert "fgo_actors._core.schemas" in targets
    merger = {t for _, t in imports(PACKAGE / "actors" / "merger.py")}
    assert "fgo_actors._core.edits" in merger
    assert "fgo_actors.actors.state" in merger


def test_the_sandbox_runner_imports_only_the_standard_library() -> None:
    """``agent/sandbox_child.py`` runs in the sandboxed interpreter (``-I -c``),
    where nothing of ours is imported."""
    path = PACKAGE / "agent" / "sandbox_child.py"
    tops = {target.split(".")[0] for _, target in imports(path)}
    assert tops - {"__future__"} <= set(sys.stdlib_module_names), tops
