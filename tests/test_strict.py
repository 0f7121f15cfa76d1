"""Strict-mode wire schemas: what is sent passes strict mode's rules, and replies
written under them come back in the protocol's shape."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from fgo_actors import GatewayConfig, LLMGateway, RunConfig, run
from fgo_actors._core.errors import ReplyRejectedError
from fgo_actors._core.schemas import schema_error
from fgo_actors._llm.gateway import _wire_schema
from fgo_actors._llm.strict import from_strict, strict_problems, strict_variant
from fgo_actors.testing import Fault, scripted_reply

from .helpers import StartLLM, expert_tidy, make_trajectories

NAMES = ("fgo_optimize", "fgo_merge")
PROTOCOL = {"fgo_optimize": "optimize_response", "fgo_merge": "merge_response"}


@pytest.mark.parametrize("name", NAMES)
def test_the_protocol_schemas_break_strict_mode_and_their_wire_variants_do_not(name: str) -> None:
    assert strict_problems(_wire_schema(name))  # optional fields, open objects
    wire, text_fields = strict_variant(_wire_schema(name))
    assert strict_problems(wire) == []
    assert text_fields == {"parameters"}
    jsonschema.Draft202012Validator.check_schema(wire)


def _strict_shape(value: Any, node: dict[str, Any], root: dict[str, Any]) -> Any:
    """``value`` as a server bound by the wire schema ``node`` writes it: every
    property present (null when absent), JSON-text fields as strings."""
    if "$ref" in node:
        return _strict_shape(value, _resolve(node, root), root)
    if "anyOf" in node:
        branches = node["anyOf"]
        if value is None and any(b.get("type") == "null" for b in branches):
            return None
        for branch in branches:
            if branch.get("type") == "null":
                continue
            op = branch.get("properties", {}).get("op", {}).get("enum", [None])[0]
            if op is None or (isinstance(value, dict) and value.get("op") == op):
                return _strict_shape(value, branch, root)
        raise AssertionError(f"no branch for {value!r}")
    if node.get("type") == "string" and isinstance(value, dict):
        return json.dumps(value)
    if node.get("type") == "object":
        return {k: _strict_shape(value.get(k), sub, root) for k, sub in node["properties"].items()}
    if node.get("type") == "array":
        return [_strict_shape(v, node["items"], root) for v in value]
    return value


def _resolve(node: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    target: Any = root
    for part in node["$ref"].removeprefix("#/").split("/"):
        target = target[part]
    return dict(target)


def _strict_server_reply(canonical: dict[str, Any], wire: dict[str, Any]) -> dict[str, Any]:
    reply = _strict_shape(canonical, wire, wire)
    jsonschema.validate(reply, wire)  # what a strict server guarantees
    return dict(reply)


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("fgo_optimize", {"analysis": "", "actions": [{"op": "add_rule", "text": "Open it."}]}),
        (
            "fgo_optimize",
            {"analysis": "a macro", "actions": [{"op": "add_function", "function": expert_tidy()}]},
        ),
        ("fgo_merge", {"analysis": "", "decisions": [{"op": "drop", "id": "r1"}], "functions": []}),
    ],
)
def test_a_strict_reply_maps_back_to_the_protocols_shape(
    name: str, canonical: dict[str, Any]
) -> None:
    wire, text_fields = strict_variant(_wire_schema(name))
    sent = _strict_server_reply(canonical, wire)
    assert sent != canonical
    back = from_strict(sent, text_fields)
    assert back == canonical
    assert schema_error(PROTOCOL[name], back) is None


def test_a_text_fields_own_nulls_are_kept() -> None:
    sent = {"function": {"parameters": '{"type": "object", "default": null}', "x": None}}
    back = from_strict(sent, frozenset({"parameters"}))
    assert back == {"function": {"parameters": {"type": "object", "default": None}}}


def test_a_text_field_that_is_not_json_is_a_reask() -> None:
    with pytest.raises(ReplyRejectedError, match="parameters"):
        from_strict({"function": {"parameters": "{not json"}}, frozenset({"parameters"}))


def _refuse_unless_strict(body: dict[str, Any]) -> Fault | None:
    """A server that enforces strict mode's schema rules, as OpenAI documents them."""
    rf = body.get("response_format") or {}
    if rf.get("type") != "json_schema":
        return None
    spec = rf["json_schema"]
    if spec.get("strict") is not True or strict_problems(spec["schema"]):
        return Fault(status=400)
    return None


def _strict_policy(body: dict[str, Any]) -> str:
    canonical = json.loads(scripted_reply(body))
    canonical.setdefault("analysis", "scripted")  # required on the wire
    wire = body["response_format"]["json_schema"]["schema"]
    return json.dumps(_strict_server_reply(canonical, wire))


async def test_a_run_against_a_strict_mode_server_succeeds_with_the_defaults(
    start_llm: StartLLM,
) -> None:
    server, url = await start_llm(policy=_strict_policy, fault_for=_refuse_unless_strict)
    config = RunConfig(context_tokens=4096, subset_tokens=1600, module_tokens=700)
    async with LLMGateway(GatewayConfig(base_url=url, model="m")) as gateway:
        result = await run(make_trajectories(12), gateway, config)
    assert result.report.status == "ok"
    assert result.report.failures == ()
    assert result.module is not None
    assert result.module.rules
    assert all(r.fault is None for r in server.requests)
    assert any(r.schema_name == "fgo_merge" for r in server.requests)


def test_strict_variant_of_a_schema_with_every_case_is_exactly_this() -> None:
    """One schema with each case the conversion handles, and its exact result."""
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {
            "op": {"const": "add"},
            "n": {"type": "integer", "minimum": 0, "maxLength": 3},
            "params": {"type": "object", "description": "Arguments."},
            "bare": {"type": "object"},
            "note": {"type": "string"},
            "inner": {
                "type": "object",
                "properties": {"a": {"type": "string", "minLength": 1}},
                "required": ["a"],
            },
            # Property names that are also keywords are names, not keywords.
            "maxLength": {"type": "integer"},
            "properties": {"type": "string"},
        },
        "required": ["op", "n", "params", "bare", "inner", "maxLength", "properties"],
    }
    wire, text_fields = strict_variant(schema)
    assert text_fields == {"params", "bare"}
    assert wire == {
        "type": "object",
        "properties": {
            "op": {"enum": ["add"], "type": "string"},
            "n": {"type": "integer", "minimum": 0},
            "params": {
                "type": "string",
                "description": "Arguments. The JSON object, written as a string.",
            },
            "bare": {"type": "string", "description": "The JSON object, written as a string."},
            "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "inner": {
                "type": "object",
                "properties": {"a": {"type": "string"}},
                "required": ["a"],
                "additionalProperties": False,
            },
            "maxLength": {"type": "integer"},
            "properties": {"type": "string"},
        },
        "required": ["op", "n", "params", "bare", "note", "inner", "maxLength", "properties"],
        "additionalProperties": False,
    }
    assert strict_problems(wire) == []
    assert schema["properties"]["n"]["maxLength"] == 3  # the input is left as it was


@pytest.mark.parametrize("kind", ["null", ["string", "null"]])
def test_an_optional_property_that_is_already_nullable_is_refused(kind: object) -> None:
    schema = {"type": "object", "properties": {"x": {"type": kind}}}
    with pytest.raises(ValueError, match=r"^property 'x' is already nullable$"):
        strict_variant(schema)
    # Required, it needs no null branch, and passes.
    strict_variant({**schema, "required": ["x"]})


def test_a_const_that_is_not_a_string_keeps_its_type() -> None:
    wire, _ = strict_variant(
        {"type": "object", "properties": {"k": {"const": 3}}, "required": ["k"]}
    )
    assert wire["properties"]["k"] == {"enum": [3]}


def test_strict_problems_names_each_broken_rule_by_its_path() -> None:
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "string", "const": "x"},
            "b": {"type": "object"},
            "c": {"type": "array", "items": {"type": "object", "properties": {}, "minItems": 1}},
        },
        "required": ["a"],
    }
    assert strict_problems(schema) == [
        "#: additionalProperties must be false",
        "#: properties not in required: b, c",
        "#/properties/a: unsupported keyword 'const'",
        "#/properties/b: additionalProperties must be false",
        "#/properties/b: an object must list its properties",
        "#/properties/c/items: additionalProperties must be false",
    ]
