"""Ingest: a body of trajectories (JSON, a JSON array or JSONL) parsed into
records, each refused alone when it is not JSON, too deep or too large, then
validated and rendered for the store. Pure functions, run in worker threads."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import attrs

from .._core.errors import InputError
from .._core.io import (
    MAX_JSON_DEPTH,
    TOO_DEEP,
    JSONTooDeepError,
    json_depth,
    loads,
    split_json_array,
)
from .._core.model import RenderedTrajectory, Trajectory
from .._core.prompts import render_trajectory


@attrs.frozen
class Rejected:
    """A record ingest refused: where it was (1-based line or index) and why."""

    line: int
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"line": self.line, "reason": self.reason}


@attrs.frozen
class IngestResult:
    accepted: int
    duplicate: int
    rejected: tuple[Rejected, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "duplicate": self.duplicate,
            "rejected": len(self.rejected),
            "errors": [r.to_json() for r in self.rejected],
        }


def validate_records(
    records: Sequence[Trajectory | object], numbers: Sequence[int], refused: Sequence[Rejected]
) -> tuple[list[tuple[int, Trajectory, dict[str, Any]]], list[Rejected], int]:
    """The valid trajectories among ``records`` (first of each id), the
    records rejected (with ``refused``), and how many repeated an id."""
    rejected: list[Rejected] = list(refused)
    valid: list[tuple[int, Trajectory, dict[str, Any]]] = []
    seen: set[str] = set()
    duplicates = 0
    for number, record in zip(numbers, records, strict=True):
        try:
            if isinstance(record, Trajectory):
                trajectory, body = record, record.to_json()
            else:
                trajectory = Trajectory.from_json(record)
                body = dict(record) if isinstance(record, dict) else {}
        except InputError as e:
            rejected.append(Rejected(number, str(e)))
            continue
        if trajectory.id in seen:
            duplicates += 1
            continue
        seen.add(trajectory.id)
        valid.append((number, trajectory, body))
    return valid, rejected, duplicates


def _array_values(text: str) -> tuple[list[tuple[int, object]], list[Rejected]]:
    """The elements of an array body, by 1-based index, and those refused as
    not JSON. One element too deep for the parser does not sink the others:
    the array is then split by :func:`split_json_array` and each element
    parsed alone."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return [], [Rejected(e.lineno, f"not JSON: {e.msg}")]
    except RecursionError:
        items = split_json_array(text)
        if items is None:
            reason = f"refused JSON: {TOO_DEEP}, in an array that is not well-formed"
            return [], [Rejected(1, reason)]
        values: list[tuple[int, object]] = []
        refused: list[Rejected] = []
        for i, item in enumerate(items, start=1):
            try:
                values.append((i, json.loads(item)))
            except RecursionError:
                refused.append(Rejected(i, f"refused JSON: {TOO_DEEP}"))
            except json.JSONDecodeError as e:
                refused.append(Rejected(i, f"not JSON: {e.msg}"))
        return values, refused
    return list(enumerate(value, start=1)) if isinstance(value, list) else [(1, value)], []


def _size(value: object) -> int:
    """Bytes of ``value`` as compact JSON in UTF-8: what the record would take
    as one line of JSONL."""
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())


def parse_body(
    text: str, *, max_record_bytes: int | None = None
) -> tuple[list[tuple[int, object]], list[Rejected]]:
    """Records in a JSON or JSONL body: one JSON value (an object, or an array
    of objects) or one object per line. Returns (1-based line or array index,
    value) pairs and the records refused: not JSON, or over ``max_record_bytes``."""
    stripped = text.strip()
    if not stripped:
        return [], []
    if stripped.startswith("["):
        values, refused = _array_values(stripped)
        kept: list[tuple[int, object]] = []
        for i, v in values:
            if json_depth(v) > MAX_JSON_DEPTH:
                refused.append(Rejected(i, f"refused JSON: {TOO_DEEP}"))
            elif max_record_bytes is not None and (n := _size(v)) > (max_record_bytes):
                refused.append(
                    Rejected(i, f"record is {n} bytes, over the {max_record_bytes}-byte limit")
                )
            else:
                kept.append((i, v))
        return kept, sorted(refused, key=lambda r: r.line)
    records: list[tuple[int, object]] = []
    rejected: list[Rejected] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        size = len(line.encode())
        if max_record_bytes is not None and size > max_record_bytes:
            rejected.append(
                Rejected(number, f"record is {size} bytes, over the {max_record_bytes}-byte limit")
            )
            continue
        try:
            records.append((number, loads(line)))
        except JSONTooDeepError as e:
            rejected.append(Rejected(number, f"refused JSON: {e}"))
        except json.JSONDecodeError as e:
            # A pretty-printed single object spans lines: try the whole body.
            if not records and not rejected and stripped.startswith("{"):
                whole = _whole_object(stripped, number, max_record_bytes)
                if whole is not None:
                    return whole
            rejected.append(Rejected(number, f"not JSON: {e.msg} (column {e.colno})"))
    return records, rejected


def _whole_object(
    text: str, line: int, max_record_bytes: int | None
) -> tuple[list[tuple[int, object]], list[Rejected]] | None:
    """``text`` as one JSON value starting on ``line``, or None if it is not JSON."""
    try:
        value = loads(text)
    except JSONTooDeepError as e:
        return [], [Rejected(line, f"refused JSON: {e}")]
    except json.JSONDecodeError:
        return None
    size = len(text.encode())
    if max_record_bytes is not None and size > max_record_bytes:
        return [], [
            Rejected(line, f"record is {size} bytes, over the {max_record_bytes}-byte limit")
        ]
    return [(line, value)], []


def render_many(
    trajectories: Sequence[Trajectory], counter: Any, max_tokens: int, group_key: str
) -> list[RenderedTrajectory]:
    return [render_trajectory(t, counter, max_tokens, group_key=group_key) for t in trajectories]
