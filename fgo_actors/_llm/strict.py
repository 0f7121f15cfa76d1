"""Strict-mode wire schemas for ``json_schema`` structured output (pure).

OpenAI's strict structured outputs accept only a subset of JSON Schema. The
two rules nearly every schema breaks: every object, nested ones and ``anyOf``
branches included, sets ``additionalProperties: false``, and every property
is listed in ``required`` (an optional one is made nullable instead). A
free-form object (``"parameters": {"type": "object"}``) cannot be written
under those rules at all, so it travels as a string holding its JSON.

``strict_variant`` turns one of our protocol schemas into such a wire schema;
``from_strict`` maps a reply back to the protocol's shape (a null optional
becomes absent, a JSON-text field becomes its object) before it is validated
against the protocol schema as usual. ``strict_problems`` checks a schema
against the rules, for the tests.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

from .._core.errors import ReplyRejectedError

# Keywords strict mode is not documented to support; the protocol schema still
# checks them after the reply is mapped back.
_DROPPED = ("minLength", "maxLength", "minProperties", "maxProperties", "uniqueItems")


def _free_form(node: dict[str, Any]) -> bool:
    return node.get("type") == "object" and "properties" not in node


def strict_variant(schema: dict[str, Any]) -> tuple[dict[str, Any], frozenset[str]]:
    """(the wire schema, the property names carried as JSON text)."""
    out = copy.deepcopy(schema)
    text_fields: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                visit(item)
            return
        if not isinstance(node, dict):
            return
        for key in _DROPPED:
            node.pop(key, None)
        if "const" in node:
            value = node.pop("const")
            node["enum"] = [value]
            if isinstance(value, str):
                node.setdefault("type", "string")
        props = node.get("properties")
        if isinstance(props, dict):
            required = set(node.get("required", []))
            for name, sub in list(props.items()):
                if isinstance(sub, dict) and _free_form(sub):
                    text_fields.add(name)
                    described = sub.get("description", "")
                    sub = {
                        "type": "string",
                        "description": (described + " " if described else "")
                        + "The JSON object, written as a string.",
                    }
                    props[name] = sub
                visit(sub)
                if name not in required:
                    if _nullable(sub):
                        raise ValueError(f"property {name!r} is already nullable")
                    props[name] = {"anyOf": [sub, {"type": "null"}]}
            node["required"] = list(props)
            node["additionalProperties"] = False
        for key, value in node.items():
            if key != "properties":
                visit(value)

    visit(out)
    return out, frozenset(text_fields)


def _nullable(node: dict[str, Any]) -> bool:
    kind = node.get("type")
    return kind == "null" or (isinstance(kind, list) and "null" in kind)


def from_strict(reply: Any, text_fields: frozenset[str]) -> Any:
    """``reply`` in the protocol's shape: null properties dropped, JSON-text
    fields parsed (a field that is not JSON text is a ReplyRejectedError)."""
    if isinstance(reply, list):
        return [from_strict(item, text_fields) for item in reply]
    if not isinstance(reply, dict):
        return reply
    out: dict[str, Any] = {}
    for key, value in reply.items():
        if value is None:
            continue
        if key in text_fields and isinstance(value, str):
            try:
                out[key] = json.loads(value)  # the object as written, nulls and all
            except ValueError as e:
                raise ReplyRejectedError(
                    f"field {key}: must be a JSON object written as a string ({e})"
                ) from e
            continue
        out[key] = from_strict(value, text_fields)
    return out


def strict_problems(schema: dict[str, Any]) -> list[str]:
    """Where ``schema`` breaks strict mode's rules, each named by its path."""
    problems: list[str] = []
    for path, node in _nodes(schema, "#"):
        problems += [
            f"{path}: unsupported keyword {k!r}" for k in (*_DROPPED, "const") if k in node
        ]
        if node.get("type") != "object":
            continue
        props = node.get("properties")
        if node.get("additionalProperties") is not False:
            problems.append(f"{path}: additionalProperties must be false")
        if not isinstance(props, dict):
            problems.append(f"{path}: an object must list its properties")
            continue
        missing = [name for name in props if name not in node.get("required", [])]
        if missing:
            problems.append(f"{path}: properties not in required: {', '.join(missing)}")
    return problems


def _nodes(node: Any, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every subschema of ``node`` with its path (property names are not schemas)."""
    if isinstance(node, list):
        for i, item in enumerate(node):
            yield from _nodes(item, f"{path}/{i}")
    elif isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            if key == "properties" and isinstance(value, dict):
                for name, sub in value.items():
                    yield from _nodes(sub, f"{path}/properties/{name}")
            else:
                yield from _nodes(value, f"{path}/{key}")
