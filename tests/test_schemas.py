"""The wire schemas (``_core/schemas.py``, ``protocols/``): optimize and merge
replies, accepted and refused, and the loader."""

from __future__ import annotations

import pytest

from fgo_actors._core.schemas import load_schema, schema_error

from .helpers import FUNC, JSONDict, errors_of, protocol, validator

OPTIMIZE_V = validator("optimize_response")
MERGE_V = validator("merge_response")

# ---------------------------------------------------------------------------
# optimize / merge response schemas
# ---------------------------------------------------------------------------


VALID_ACTIONS: list[JSONDict] = [
    {"op": "set_instructions", "text": "Be careful."},
    {"op": "add_rule", "text": "Check the door first.", "evidence": ["t1", "t2"]},
    {"op": "add_rule", "text": "No evidence needed."},
    {"op": "revise_rule", "id": "r1", "text": "Check the door and the window."},
    {"op": "remove_rule", "id": "r2"},
    {"op": "add_function", "function": FUNC},
    {"op": "revise_function", "function": {**FUNC, "code": "pass"}},
    {"op": "remove_function", "name": "lookup"},
]


def test_optimize_response_accepts_every_documented_op() -> None:
    ops = {a["op"] for a in VALID_ACTIONS}
    assert ops == {
        "set_instructions",
        "add_rule",
        "revise_rule",
        "remove_rule",
        "add_function",
        "revise_function",
        "remove_function",
    }
    for action in VALID_ACTIONS:
        assert errors_of(OPTIMIZE_V, {"actions": [action]}) == [], action
        assert schema_error("optimize_response", {"actions": [action]}) is None
    whole = {"analysis": "saw three failures", "actions": VALID_ACTIONS}
    assert errors_of(OPTIMIZE_V, whole) == []
    assert errors_of(OPTIMIZE_V, {"actions": []}) == []


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        ({"actions": [{"op": "frobnicate", "text": "x"}]}, "unknown op"),
        ({"actions": [{"text": "x"}]}, "no op"),
        ({"actions": [{"op": "add_rule"}]}, "add_rule without text"),
        ({"actions": [{"op": "add_rule", "text": ""}]}, "add_rule with empty text"),
        ({"actions": [{"op": "revise_rule", "id": "r1"}]}, "revise_rule without text"),
        ({"actions": [{"op": "revise_rule", "text": "x"}]}, "revise_rule without id"),
        ({"actions": [{"op": "remove_rule"}]}, "remove_rule without id"),
        ({"actions": [{"op": "set_instructions"}]}, "set_instructions without text"),
        (
            {
                "actions": [
                    {
                        "op": "add_function",
                        "function": {k: v for k, v in FUNC.items() if k != "code"},
                    }
                ]
            },
            "function without code",
        ),
        (
            {"actions": [{"op": "revise_function", "function": {**FUNC, "parameters": "x"}}]},
            "parameters not an object",
        ),
        (
            {"actions": [{"op": "add_function", "function": {**FUNC, "name": "1-bad name"}}]},
            "function name not an identifier",
        ),
        ({"actions": [{"op": "remove_function"}]}, "remove_function without name"),
        ({"actions": {"op": "add_rule", "text": "x"}}, "actions not a list"),
        ({"actions": "add a rule"}, "actions a string"),
        ({}, "no actions"),
        ({"analysis": "only analysis"}, "no actions, with analysis"),
        ({"analysis": 5, "actions": []}, "analysis not a string"),
        ([], "not an object"),
    ],
)
def test_optimize_response_rejects(reply: object, why: str) -> None:
    assert errors_of(OPTIMIZE_V, reply) != [], why
    assert schema_error("optimize_response", reply) is not None, why


def test_merge_response_accepts_documented_shape() -> None:
    reply: JSONDict = {
        "analysis": "merged two modules",
        "decisions": [
            {"op": "combine", "ids": ["s001.r1", "s002.r3"], "text": "Check the door."},
            {"op": "combine", "text": "A consolidated rule whose lineage is inferred."},
            {"op": "drop", "id": "s001.r2", "reason": "contradicted"},
            {"op": "drop", "id": "s001.r4"},
        ],
        "instructions": "Be careful.",
        "functions": [FUNC],
    }
    assert errors_of(MERGE_V, reply) == []
    assert schema_error("merge_response", reply) is None
    minimal: JSONDict = {"decisions": []}
    assert errors_of(MERGE_V, minimal) == []


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        ({"decisions": [{"op": "combine", "ids": ["a"]}]}, "combine without text"),
        ({"decisions": [{"op": "drop"}]}, "drop without id"),
        ({"decisions": [{"op": "combine", "ids": "a", "text": "x"}]}, "ids not a list"),
        ({"decisions": [{"op": "combine", "ids": [1], "text": "x"}]}, "ids hold a non-string"),
        ({"decisions": [{"op": "rewrite", "text": "x"}]}, "unknown op"),
        (
            {"decisions": [], "functions": [{k: v for k, v in FUNC.items() if k != "code"}]},
            "function without code",
        ),
        ({"instructions": "", "rules": [], "functions": []}, "the old whole-module shape"),
        ({"decisions": {}}, "decisions not a list"),
        ({"actions": []}, "an optimize reply"),
    ],
)
def test_merge_response_rejects(reply: object, why: str) -> None:
    assert errors_of(MERGE_V, reply) != [], why
    assert schema_error("merge_response", reply) is not None, why


def test_schema_loader_reads_the_protocol_files() -> None:
    for name in ("trajectory", "module", "optimize_response", "merge_response", "report"):
        assert load_schema(name) == protocol(name)
    with pytest.raises(KeyError, match="unknown schema"):
        load_schema("nope")
