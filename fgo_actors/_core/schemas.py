"""Access to the JSON Schemas in ``protocols/`` and validation against them.

The schema files are the single source of truth for every wire format. An
installed wheel carries them as ``fgo_actors/_protocols``; a source checkout
reads them from the top-level ``protocols/`` folder.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
from jsonschema.exceptions import ValidationError, best_match

SCHEMA_NAMES = (
    "trajectory",
    "module",
    "optimize_response",
    "merge_response",
    "report",
    "environment",
    "online_report",
)


def protocols_dir() -> Path:
    package = Path(__file__).resolve().parent.parent  # fgo_actors/
    for candidate in (package / "_protocols", package.parent / "protocols"):
        if (candidate / "module.schema.json").is_file():
            return candidate
    raise FileNotFoundError("cannot find the protocols/ schema folder next to fgo_actors")


@functools.cache
def load_schema(name: str) -> dict[str, Any]:
    """Return the parsed schema ``protocols/<name>.schema.json``."""
    if name not in SCHEMA_NAMES:
        raise KeyError(f"unknown schema {name!r}; known: {', '.join(SCHEMA_NAMES)}")
    with (protocols_dir() / f"{name}.schema.json").open(encoding="utf-8") as f:
        schema: dict[str, Any] = json.load(f)
    return schema


@functools.cache
def _validator(name: str) -> jsonschema.Draft202012Validator:
    schema = load_schema(name)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def schema_error(name: str, instance: object) -> tuple[str, str] | None:
    """Validate ``instance`` against schema ``name``.

    Returns None when valid, else ``(field, message)`` where ``field`` is a
    dotted path such as ``steps[2].role`` (``"<root>"`` for the top level).
    """
    error = best_match(_validator(name).iter_errors(instance))
    if error is None:
        return None
    return _field_of(error), _message_of(error)


def _field_of(error: ValidationError) -> str:
    parts: list[str] = []
    for p in error.absolute_path:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        else:
            parts.append(("." if parts else "") + str(p))
    if error.validator == "required" and isinstance(error.validator_value, list):
        # Name the missing property itself, not its parent object.
        instance = error.instance if isinstance(error.instance, dict) else {}
        missing = [k for k in error.validator_value if k not in instance]
        if missing:
            parts.append(("." if parts else "") + str(missing[0]))
    return "".join(parts) or "<root>"


def _message_of(error: ValidationError) -> str:
    if error.validator == "required":
        return "is required but missing"
    if error.validator == "type":
        return f"must be of type {error.validator_value!r}, got {type(error.instance).__name__}"
    return error.message
