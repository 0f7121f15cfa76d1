"""Strict-mode wire schemas pinned on exact results: branches of ``anyOf`` and
array items converted like any object, a const's own type kept, replies
mapped back through lists and nested objects, and each problem's path.

Written against the mutants that test_strict.py lets live
(``scripts/mutation.sh fgo_actors/_llm/strict.py tests/test_strict.py``): each
test names the mistake it catches.
"""

from __future__ import annotations

from typing import Any

import pytest

from fgo_actors._core.errors import ReplyRejectedError
from fgo_actors._llm.strict import from_strict, strict_problems, strict_variant


def test_objects_inside_anyof_and_items_are_converted_too() -> None:
    """The conversion walks lists (``anyOf`` branches) and every keyword's
    value but ``properties`` itself: each object found gets its ``required``
    and ``additionalProperties``, each dropped keyword goes, a free-form
    object deep down becomes a text field."""
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {
            "x": {
                "anyOf": [
                    {
                        "type": "object",
                        "properties": {"a": {"type": "string", "maxLength": 4}},
                        "minProperties": 1,
                    },
                    {"type": "array", "uniqueItems": True, "items": {"type": "object"}},
                ]
            },
            "list": {
                "type": "array",
                "items": {"type": "object", "properties": {"args": {"type": "object"}}},
            },
        },
        "required": ["x", "list"],
    }
    wire, text_fields = strict_variant(schema)
    assert text_fields == {"args"}
    assert wire == {
        "type": "object",
        "properties": {
            "x": {
                "anyOf": [
                    {
                        "type": "object",
                        "properties": {"a": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
                        "required": ["a"],
                        "additionalProperties": False,
                    },
                    {"type": "array", "items": {"type": "object"}},
                ]
            },
            "list": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "args": {
                            "anyOf": [
                                {
                                    "type": "string",
                                    "description": "The JSON object, written as a string.",
                                },
                                {"type": "null"},
                            ]
                        }
                    },
                    "required": ["args"],
                    "additionalProperties": False,
                },
            },
        },
        "required": ["x", "list"],
        "additionalProperties": False,
    }
    # A free-form object that is no property (an array's items) is left for
    # the protocol check: strict_problems says so.
    assert strict_problems(wire) == [
        "#/properties/x/anyOf/1/items: additionalProperties must be false",
        "#/properties/x/anyOf/1/items: an object must list its properties",
    ]


def test_a_string_const_keeps_a_type_it_already_has() -> None:
    """``setdefault``: a const's declared type is not overwritten with "string"."""
    wire, _ = strict_variant(
        {
            "type": "object",
            "properties": {"k": {"const": "a", "type": ["string", "null"]}},
            "required": ["k"],
        }
    )
    assert wire["properties"]["k"] == {"type": ["string", "null"], "enum": ["a"]}


def test_an_optional_property_becomes_nullable_once_and_required_lists_all_in_order() -> None:
    wire, _ = strict_variant(
        {
            "type": "object",
            "properties": {"b": {"type": "integer"}, "a": {"type": "string"}},
            "required": ["a"],
        }
    )
    assert wire == {
        "type": "object",
        "properties": {
            "b": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
            "a": {"type": "string"},
        },
        "required": ["b", "a"],
        "additionalProperties": False,
    }


def test_nullable_means_null_in_the_type_list() -> None:
    """A property of type ``["null", ...]`` only is nullable: the check reads
    the type list, and a plain type is not."""
    with pytest.raises(ValueError, match=r"^property 'x' is already nullable$"):
        strict_variant({"type": "object", "properties": {"x": {"type": ["null", "integer"]}}})
    wire, _ = strict_variant({"type": "object", "properties": {"x": {"type": ["integer"]}}})
    assert wire["properties"]["x"] == {"anyOf": [{"type": ["integer"]}, {"type": "null"}]}


# -- from_strict ------------------------------------------------------------------------


def test_from_strict_walks_lists_and_objects_and_leaves_scalars() -> None:
    """Nulls go at every depth, inside lists too; scalars, including a false
    and a zero, pass as they are; a text field already an object is walked."""
    reply = {
        "actions": [
            {"op": "add", "evidence": None, "n": 0, "ok": False},
            {"op": "fn", "function": {"parameters": '{"a": null}', "code": None}},
            [None, {"x": None, "y": "z"}],
        ],
        "parameters": {"nested": None, "k": 1},
        "analysis": None,
    }
    assert from_strict(reply, frozenset({"parameters"})) == {
        "actions": [
            {"op": "add", "n": 0, "ok": False},
            {"op": "fn", "function": {"parameters": {"a": None}}},
            [None, {"y": "z"}],
        ],
        "parameters": {"k": 1},
    }
    assert from_strict("text", frozenset()) == "text"
    assert from_strict(3, frozenset()) == 3


def test_a_field_not_named_as_text_is_not_parsed() -> None:
    assert from_strict({"code": '{"a": 1}'}, frozenset({"parameters"})) == {"code": '{"a": 1}'}


def test_a_text_field_that_is_not_json_names_the_field_and_the_reason() -> None:
    with pytest.raises(ReplyRejectedError) as e:
        from_strict({"parameters": "{not json"}, frozenset({"parameters"}))
    assert str(e.value) == (
        "field parameters: must be a JSON object written as a string "
        "(Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"
    )
    assert isinstance(e.value.__cause__, ValueError)


# -- strict_problems --------------------------------------------------------------------


@pytest.mark.parametrize(
    "keyword", ["minLength", "maxLength", "minProperties", "maxProperties", "uniqueItems", "const"]
)
def test_each_unsupported_keyword_is_named(keyword: str) -> None:
    assert strict_problems({"type": "string", keyword: 1}) == [
        f"#: unsupported keyword {keyword!r}"
    ]


def test_problems_are_found_in_lists_and_under_every_keyword_with_their_paths() -> None:
    """Paths name list indexes and keywords (``#/anyOf/1``, ``#/$defs/d``);
    ``properties`` holds names, not a schema, unless it is no dict."""
    schema = {
        "anyOf": [
            {"type": "string"},
            {"type": "object", "properties": {"p": {"type": "object"}}, "required": ["p"]},
        ],
        "$defs": {"d": {"type": "object", "properties": {}, "additionalProperties": True}},
    }
    assert strict_problems(schema) == [
        "#/anyOf/1: additionalProperties must be false",
        "#/anyOf/1/properties/p: additionalProperties must be false",
        "#/anyOf/1/properties/p: an object must list its properties",
        "#/$defs/d: additionalProperties must be false",
    ]


def test_a_required_list_that_misses_some_names_only_those() -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"type": "string"}, "b": {"type": "string"}, "c": {"type": "string"}},
        "required": ["b"],
        "additionalProperties": False,
    }
    assert strict_problems(schema) == ["#: properties not in required: a, c"]
    assert strict_problems({**schema, "required": ["a", "b", "c"]}) == []
    assert strict_problems({k: v for k, v in schema.items() if k != "required"}) == [
        "#: properties not in required: a, b, c"
    ]
