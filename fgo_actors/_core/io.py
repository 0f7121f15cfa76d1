"""Reading trajectories and modules from disk, and writing results atomically."""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TextIO

from .errors import InputError
from .model import Module, Trajectory

MAX_LISTED_PROBLEMS = 10
# Deeper JSON is refused: a trajectory needs a few levels, and Python's
# parser, schema checks and renderers recurse (a 1,000-deep value would
# reach the recursion limit in one of them).
MAX_JSON_DEPTH = 64
TOO_DEEP = f"nested more than {MAX_JSON_DEPTH} levels deep"


class JSONTooDeepError(ValueError):
    """A JSON value nested deeper than MAX_JSON_DEPTH levels."""


def loads(text: str | bytes) -> Any:
    """``json.loads``, refusing values nested deeper than MAX_JSON_DEPTH with
    JSONTooDeepError (malformed JSON still raises json.JSONDecodeError)."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise JSONTooDeepError(TOO_DEEP) from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise JSONTooDeepError(TOO_DEEP)
    return value


def json_depth(value: Any) -> int:
    """How deep arrays and objects nest in ``value`` (a scalar: 0). Iterative,
    so no value is too deep to measure."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Iterable[Any] = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        stack.extend((child, depth) for child in children)
    return deepest


# A JSON string literal, or one structural character that matters for
# finding an array's elements.
_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"?|[\[\]{},]', re.DOTALL)


def _closed(string_token: str) -> bool:
    """Whether a string token from _JSON_TOKEN ends with its own closing quote
    (not an escaped one)."""
    if not string_token.endswith('"'):
        return False
    backslashes = len(string_token) - 1 - len(string_token[1:-1].rstrip("\\")) - 1
    return backslashes % 2 == 0


def split_json_array(text: str) -> list[str] | None:
    """The texts of the top-level elements of the JSON array ``text`` (which
    must start with ``[``), found by scanning its brackets and strings rather
    than parsing it, so an element nested too deep for Python's parser is still
    found, and can be refused alone. None when ``text`` is not one well-bracketed
    array (the elements themselves are not checked: parse each one)."""
    depth = 0
    start = 0
    items: list[str] = []
    for m in _JSON_TOKEN.finditer(text):
        token = m.group()
        if token[0] == '"':
            # The closing quote is optional in the pattern, so that a string
            # left open is found in one pass (else each later quote is tried
            # again, in time quadratic in the body): such a text is no array.
            if len(token) == 1 or not _closed(token):
                return None
            continue
        if token in "[{":
            if depth == 0 and (token != "[" or m.start() != 0):
                return None
            depth += 1
            if depth == 1:
                start = m.end()
        elif token in "]}":
            depth -= 1
            if depth < 0:
                return None
            if depth == 0:
                if token != "]" or text[m.end() :].strip():
                    return None
                last = text[start : m.start()]
                if last.strip():
                    items.append(last)
                elif items:  # a trailing comma
                    return None
                return items
        elif depth == 1:  # a comma between two elements
            items.append(text[start : m.start()])
            start = m.end()
    return None


def load_trajectories(path: str | os.PathLike[str]) -> list[Trajectory]:
    """Read a JSONL trajectory file, validating every line.

    Blank lines are skipped. Every problem found is collected; the raised
    InputError names the first one (file, line, field) and lists the others.
    """
    p = Path(path)
    name = str(p)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read file: {e.strerror or e}", path=name) from e
    problems: list[InputError] = []
    out: list[Trajectory] = []
    first_line: dict[str, int] = {}
    for lineno, raw_line in enumerate(raw.splitlines(), start=1):
        if not raw_line.strip():
            continue
        try:
            text = raw_line.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            problems.append(InputError(f"not valid UTF-8 ({e.reason})", path=name, line=lineno))
            continue
        try:
            obj = loads(text)
        except json.JSONDecodeError as e:
            problems.append(
                InputError(f"malformed JSON: {e.msg} at column {e.colno}", path=name, line=lineno)
            )
            continue
        except JSONTooDeepError as e:
            problems.append(InputError(f"refused JSON: {e}", path=name, line=lineno))
            continue
        try:
            traj = Trajectory.from_json(obj, path=name, line=lineno)
        except InputError as e:
            problems.append(e)
            continue
        if traj.id in first_line:
            problems.append(
                InputError(
                    f"duplicate id {traj.id!r} (first seen on line {first_line[traj.id]})",
                    path=name,
                    line=lineno,
                    field="id",
                )
            )
            continue
        first_line[traj.id] = lineno
        out.append(traj)
    if problems:
        first = problems[0]
        if len(problems) > 1:
            shown = problems[1 : 1 + MAX_LISTED_PROBLEMS]
            more = "".join(f"\n  also {p}" for p in shown)
            hidden = len(problems) - 1 - len(shown)
            if hidden:
                more += f"\n  ... and {hidden} more"
            raise InputError(
                f"{first.message} ({len(problems)} problems in all){more}",
                path=first.path,
                line=first.line,
                field=first.field,
            )
        raise first
    if not out:
        raise InputError("the file holds no trajectories (it is empty)", path=name)
    return out


def load_module(path: str | os.PathLike[str]) -> Module:
    """Read and validate a module JSON file; InputError names the field."""
    p = Path(path)
    name = str(p)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read module file: {e}", path=name) from e
    try:
        obj = loads(text)
    except json.JSONDecodeError as e:
        raise InputError(
            f"malformed JSON: {e.msg} at column {e.colno}", path=name, line=e.lineno
        ) from e
    except JSONTooDeepError as e:
        raise InputError(f"refused JSON: {e}", path=name) from e
    return Module.from_json(obj, path=name)


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once, at import: os.umask can only be read by setting it, which is not
# safe once other threads may create files.
_UMASK = _read_umask()


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write JSON to ``path`` via a temporary file in the same folder and a rename.

    A reader (or a crash) never sees a half-written file.
    """

    def write(f: TextIO) -> None:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")

    _atomic_write(path, write)


def atomic_write_jsonl(path: str | os.PathLike[str], rows: Iterable[Any]) -> None:
    """Write one JSON object per line, atomically like ``atomic_write_json``."""

    def write(f: TextIO) -> None:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    _atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8), atomically like ``atomic_write_json``."""
    _atomic_write(path, lambda f: f.write(text))


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data``, atomically like ``atomic_write_json``."""
    _atomic_write(path, lambda f: f.buffer.write(data))


def output_target(path: str | os.PathLike[str]) -> Path:
    """Where writing ``path`` goes: a symlink's target (the link is followed,
    not replaced). ValueError if that is there and not a regular file: a
    device such as /dev/full, a pipe or a socket is never replaced by a file."""
    target = Path(os.path.realpath(path))
    if target.exists() and not target.is_file():
        kind = "a folder" if target.is_dir() else "not a regular file (a device, pipe or socket)"
        shown = f"{path} (-> {target})" if target != Path(path).absolute() else str(path)
        raise ValueError(f"{shown} is {kind}; give the path of a file")
    return target


def _atomic_write(path: str | os.PathLike[str], write: Callable[[TextIO], object]) -> None:
    target = output_target(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        # mkstemp makes the file 0600; give it the mode a plain open() would.
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _fsync_dir(path: Path) -> None:
    """Make a rename durable: fsync the folder that holds the new name."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
