"""Data model, file I/O and wire schemas: round trips, validation and bad-input messages."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fgo_actors import (
    Failure,
    GatewayConfig,
    InputError,
    LLMGateway,
    MergeNode,
    Module,
    RunConfig,
    RunReport,
    Trajectory,
    atomic_write_json,
    load_module,
    load_trajectories,
    run,
)
from fgo_actors._core.schemas import load_schema, schema_error
from fgo_actors.testing import FakeLLMServer

ROOT = Path(__file__).resolve().parent.parent
PROTOCOLS = ROOT / "protocols"
EXAMPLES = ROOT / "examples" / "trajectories.jsonl"

JSONDict = dict[str, Any]

SETTINGS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def protocol(name: str) -> JSONDict:
    with (PROTOCOLS / f"{name}.schema.json").open(encoding="utf-8") as f:
        schema: JSONDict = json.load(f)
    return schema


def validator(name: str) -> jsonschema.Draft202012Validator:
    schema = protocol(name)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


TRAJECTORY_V = validator("trajectory")
MODULE_V = validator("module")
OPTIMIZE_V = validator("optimize_response")
MERGE_V = validator("merge_response")
REPORT_V = validator("report")


def errors_of(v: jsonschema.Draft202012Validator, instance: object) -> list[str]:
    return [e.message for e in v.iter_errors(instance)]


# ---------------------------------------------------------------------------
# hypothesis strategies
# ---------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values: st.SearchStrategy[Any] = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)


def extras(known: tuple[str, ...]) -> st.SearchStrategy[JSONDict]:
    """Unknown extra fields: any key that is not a known one, any JSON value."""
    key = st.text(min_size=1, max_size=10).filter(lambda k: k not in known)
    return st.dictionaries(key, json_values, max_size=3)


STEP_KNOWN = ("role", "content", "name", "tool_calls", "tool_call_id")
OUTCOME_KNOWN = ("success", "score", "feedback")
TRAJ_KNOWN = ("id", "task", "steps", "outcome", "metadata")


@st.composite
def steps(draw: st.DrawFn) -> JSONDict:
    step: JSONDict = {
        "role": draw(st.sampled_from(["system", "user", "assistant", "tool"])),
        # Step.to_json always writes "content" (null when absent), so generate it.
        "content": draw(st.none() | st.text(max_size=40)),
    }
    if draw(st.booleans()):
        step["name"] = draw(st.text(max_size=10))
    if draw(st.booleans()):
        call = st.fixed_dictionaries(
            {
                "id": st.text(max_size=6),
                "type": st.just("function"),
                "function": st.fixed_dictionaries(
                    {"name": st.text(max_size=8), "arguments": st.text(max_size=20)}
                ),
            },
            optional={"extra": json_values},
        )
        step["tool_calls"] = draw(st.lists(call, max_size=2))
    if draw(st.booleans()):
        step["tool_call_id"] = draw(st.text(max_size=10))
    step.update(draw(extras(STEP_KNOWN)))
    return step


@st.composite
def outcomes(draw: st.DrawFn) -> JSONDict:
    out: JSONDict = {"success": draw(st.booleans())}
    if draw(st.booleans()):
        out["score"] = draw(
            st.floats(allow_nan=False, allow_infinity=False) | st.integers(-100, 100)
        )
    if draw(st.booleans()):
        out["feedback"] = draw(st.text(max_size=30))
    out.update(draw(extras(OUTCOME_KNOWN)))
    return out


@st.composite
def trajectory_dicts(draw: st.DrawFn, ident: str | None = None) -> JSONDict:
    traj: JSONDict = {
        "id": ident if ident is not None else draw(st.text(min_size=1, max_size=12)),
        "task": draw(st.text(max_size=40)),
        "steps": draw(st.lists(steps(), max_size=5)),
        "outcome": draw(outcomes()),
    }
    if draw(st.booleans()):
        meta: JSONDict = draw(st.dictionaries(st.text(max_size=8), json_values, max_size=3))
        if draw(st.booleans()):
            meta["task_type"] = draw(st.text(max_size=10))
        traj["metadata"] = meta
    traj.update(draw(extras(TRAJ_KNOWN)))
    return traj


ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789.-_", min_size=1, max_size=8)
func_names = st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_]{0,10}\Z")


@st.composite
def module_dicts(draw: st.DrawFn) -> JSONDict:
    rule_ids = draw(st.lists(ids, unique=True, max_size=5))
    rules = [
        {
            "id": rid,
            "text": draw(st.text(min_size=1, max_size=40)),
            "provenance": {
                "subsets": draw(st.lists(ids, max_size=3)),
                "trajectories": draw(st.lists(ids, max_size=4)),
            },
            "from": draw(st.lists(ids, max_size=3)),
        }
        for rid in rule_ids
    ]
    names = draw(st.lists(func_names, unique=True, max_size=3))
    functions = [
        {
            "name": name,
            "description": draw(st.text(max_size=30)),
            "parameters": draw(st.dictionaries(st.text(max_size=6), json_values, max_size=3)),
            "code": draw(st.text(max_size=60)),
        }
        for name in names
    ]
    out: JSONDict = {
        "instructions": draw(st.text(max_size=60)),
        "rules": rules,
        "functions": functions,
    }
    if draw(st.booleans()):
        # Module.to_json writes metadata only when it is non-empty.
        out["metadata"] = draw(
            st.dictionaries(st.text(max_size=6), json_values, min_size=1, max_size=3)
        )
    return out


# ---------------------------------------------------------------------------
# trajectories: round trips
# ---------------------------------------------------------------------------


@SETTINGS
@given(trajectory_dicts())
def test_trajectory_round_trip_keeps_every_field(d: JSONDict) -> None:
    assert errors_of(TRAJECTORY_V, d) == []
    t = Trajectory.from_json(d)
    out = t.to_json()
    # Equality of the JSON, not just of the objects: extras are eq=False on the classes.
    assert out == d
    assert errors_of(TRAJECTORY_V, out) == []
    again = Trajectory.from_json(json.loads(json.dumps(out)))
    assert again == t
    assert again.to_json() == d
    assert t.outcome.success is d["outcome"]["success"]
    assert len(t.steps) == len(d["steps"])
    expected_type = d.get("metadata", {}).get("task_type")
    assert t.task_type == expected_type


@settings(SETTINGS, max_examples=50)
@given(st.lists(trajectory_dicts(), min_size=1, max_size=5), st.integers(0, 2))
def test_load_trajectories_matches_from_json(dicts: list[JSONDict], blank_every: int) -> None:
    for i, d in enumerate(dicts):
        d["id"] = f"t{i}"  # ids must be unique within a file
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.jsonl"
        lines: list[str] = []
        for d in dicts:
            if blank_every:
                lines.append(" " * blank_every)
            lines.append(json.dumps(d, ensure_ascii=False))
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        loaded = load_trajectories(path)
    assert [t.to_json() for t in loaded] == dicts
    assert [t.id for t in loaded] == [d["id"] for d in dicts]


def test_unknown_fields_pass_through_everywhere() -> None:
    d: JSONDict = {
        "id": "x1",
        "task": "do it",
        "steps": [
            {"role": "user", "content": "hi", "x-step": {"nested": [1, 2]}},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "c1", "type": "function"}],
                "reasoning": "because",
            },
            {"role": "tool", "content": "42", "tool_call_id": "c1", "name": "calc"},
        ],
        "outcome": {"success": False, "score": 0.25, "feedback": "meh", "judge": "gpt"},
        "metadata": {"task_type": "calc", "env": "lab"},
        "source": "export-7",
        "tags": ["a", "b"],
    }
    t = Trajectory.from_json(d)
    assert t.extra == {"source": "export-7", "tags": ["a", "b"]}
    assert t.steps[0].extra == {"x-step": {"nested": [1, 2]}}
    assert t.steps[1].extra == {"reasoning": "because"}
    assert t.outcome.extra == {"judge": "gpt"}
    assert t.task_type == "calc"
    assert t.to_json() == d
    assert json.loads(json.dumps(t.to_json())) == d


def test_missing_step_content_normalizes_to_null() -> None:
    d: JSONDict = {
        "id": "a",
        "task": "",
        "steps": [{"role": "user"}],
        "outcome": {"success": True},
    }
    out = Trajectory.from_json(d).to_json()
    assert out["steps"] == [{"role": "user", "content": None}]
    assert errors_of(TRAJECTORY_V, out) == []
    assert Trajectory.from_json(out).to_json() == out


def test_example_file_loads_and_round_trips() -> None:
    trajs = load_trajectories(EXAMPLES)
    assert len(trajs) == 24
    assert len({t.id for t in trajs}) == 24
    raw = [json.loads(line) for line in EXAMPLES.read_text(encoding="utf-8").splitlines() if line]
    assert [t.to_json() for t in trajs] == raw
    for t in trajs:
        assert errors_of(TRAJECTORY_V, t.to_json()) == []


# ---------------------------------------------------------------------------
# modules: round trips
# ---------------------------------------------------------------------------


@SETTINGS
@given(module_dicts())
def test_module_round_trip(d: JSONDict) -> None:
    assert errors_of(MODULE_V, d) == []
    m = Module.from_json(d)
    out = m.to_json()
    assert errors_of(MODULE_V, out) == []
    # FunctionSpec.parameters and Module.metadata are eq=False: compare the JSON too.
    assert out == d
    again = Module.from_json(json.loads(json.dumps(out)))
    assert again == m
    assert again.to_json() == d
    for rd, rule in zip(d["rules"], m.rules, strict=True):
        assert rule.id == rd["id"]
        assert list(rule.merged_from) == rd["from"]
        assert list(rule.subsets) == rd["provenance"]["subsets"]
        assert list(rule.trajectories) == rd["provenance"]["trajectories"]
        assert m.rule(rule.id) == rule
    for fd in d["functions"]:
        f = m.function(fd["name"])
        assert f is not None
        assert f.to_json() == fd


def test_empty_module_json() -> None:
    out = Module().to_json()
    assert out == {"instructions": "", "rules": [], "functions": []}
    assert errors_of(MODULE_V, out) == []
    assert Module.from_json(out) == Module()


# ---------------------------------------------------------------------------
# optimize / merge response schemas
# ---------------------------------------------------------------------------

FUNC: JSONDict = {
    "name": "lookup",
    "description": "look a thing up",
    "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
    "code": "def lookup(q):\n    return q\n",
}

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


# ---------------------------------------------------------------------------
# load_trajectories: bad input
# ---------------------------------------------------------------------------

GOOD = {
    "id": "a",
    "task": "t",
    "steps": [{"role": "user", "content": "x"}],
    "outcome": {"success": True},
}


def good(ident: str) -> str:
    return json.dumps({**GOOD, "id": ident})


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def load_error(path: Path) -> InputError:
    with pytest.raises(InputError) as info:
        load_trajectories(path)
    return info.value


def test_malformed_json_line(tmp_path: Path) -> None:
    p = write_lines(tmp_path / "t.jsonl", [good("a"), '{"id": "b", "task": ', good("c")])
    e = load_error(p)
    assert e.path == str(p)
    assert e.line == 2
    assert f"{p}:2: " in str(e)
    assert "malformed JSON" in str(e)
    assert "problems in all" not in str(e)


def test_missing_nested_field(tmp_path: Path) -> None:
    bad = {**GOOD, "id": "b", "outcome": {"score": 1.0}}
    p = write_lines(tmp_path / "t.jsonl", [good("a"), good("c"), json.dumps(bad)])
    e = load_error(p)
    assert (e.path, e.line, e.field) == (str(p), 3, "outcome.success")
    assert str(e).startswith(f"{p}:3: field 'outcome.success': ")
    assert "required" in str(e)


def test_missing_top_level_id(tmp_path: Path) -> None:
    bad = {k: v for k, v in GOOD.items() if k != "id"}
    p = write_lines(tmp_path / "t.jsonl", [json.dumps(bad)])
    e = load_error(p)
    assert (e.line, e.field) == (1, "id")
    assert f"{p}:1: field 'id': " in str(e)


@pytest.mark.parametrize("role", [5, "robot", None])
def test_wrong_step_role(tmp_path: Path, role: object) -> None:
    bad = {**GOOD, "steps": [{"role": "user", "content": "x"}, {"role": role, "content": "y"}]}
    p = write_lines(tmp_path / "t.jsonl", [json.dumps(bad)])
    e = load_error(p)
    assert (e.line, e.field) == (1, "steps[1].role")
    assert f"{p}:1: field 'steps[1].role': " in str(e)
    assert json.dumps(role) in str(e) or repr(role) in str(e)


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({**GOOD, "outcome": {"success": "yes"}}, "outcome.success"),
        ({**GOOD, "outcome": {"success": True, "score": "high"}}, "outcome.score"),
        ({**GOOD, "steps": {"role": "user"}}, "steps"),
        ({**GOOD, "steps": [{"content": "no role"}]}, "steps[0].role"),
        ({**GOOD, "id": ""}, "id"),
        ({**GOOD, "id": 7}, "id"),
        ({**GOOD, "metadata": {"task_type": 3}}, "metadata.task_type"),
        ([GOOD], "<root>"),
    ],
)
def test_wrong_types_name_the_field(tmp_path: Path, bad: object, field: str) -> None:
    p = write_lines(tmp_path / "t.jsonl", [good("z"), json.dumps(bad)])
    e = load_error(p)
    assert (e.path, e.line, e.field) == (str(p), 2, field)
    assert f"{p}:2: field {field!r}: " in str(e)


def test_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.jsonl"
    p.write_bytes(b"")
    e = load_error(p)
    assert e.path == str(p)
    assert e.line is None
    assert str(e).startswith(f"{p}: ")
    assert "empty" in str(e)


def test_only_blank_lines(tmp_path: Path) -> None:
    p = tmp_path / "blank.jsonl"
    p.write_bytes(b"\n   \n\t\n\r\n\n")
    e = load_error(p)
    assert e.path == str(p)
    assert e.line is None
    assert "no trajectories" in str(e)


def test_duplicate_ids(tmp_path: Path) -> None:
    p = write_lines(tmp_path / "t.jsonl", [good("a"), good("b"), good("a")])
    e = load_error(p)
    assert (e.path, e.line, e.field) == (str(p), 3, "id")
    assert f"{p}:3: field 'id': " in str(e)
    assert "'a'" in str(e)
    assert "line 1" in str(e)  # where it was first seen


def test_non_utf8_bytes(tmp_path: Path) -> None:
    p = tmp_path / "t.jsonl"
    p.write_bytes(good("a").encode() + b"\n" + b'{"id": "\xff\xfe", "task": "t"}\n')
    e = load_error(p)
    assert (e.path, e.line) == (str(p), 2)
    assert f"{p}:2: " in str(e)
    assert "UTF-8" in str(e)


def test_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "nope.jsonl"
    e = load_error(p)
    assert e.path == str(p)
    assert e.line is None
    assert str(e).startswith(f"{p}: ")
    assert "No such file" in str(e)


def test_blank_lines_skipped_and_line_numbers_are_physical(tmp_path: Path) -> None:
    bad = {**GOOD, "id": "c", "outcome": {}}
    p = write_lines(
        tmp_path / "t.jsonl", ["", good("a"), "   ", "", good("b"), "", json.dumps(bad)]
    )
    e = load_error(p)
    assert e.line == 7
    assert f"{p}:7: field 'outcome.success': " in str(e)

    ok = write_lines(tmp_path / "ok.jsonl", ["", good("a"), "  ", good("b"), ""])
    assert [t.id for t in load_trajectories(ok)] == ["a", "b"]


def test_crlf_line_endings(tmp_path: Path) -> None:
    p = tmp_path / "t.jsonl"
    p.write_bytes(f"{good('a')}\r\n\r\n{{bad\r\n".encode())
    e = load_error(p)
    assert e.line == 3


def test_multiple_problems_are_counted(tmp_path: Path) -> None:
    p = write_lines(
        tmp_path / "t.jsonl",
        [
            good("a"),
            "not json",
            json.dumps({**GOOD, "id": "b", "outcome": {}}),
            good("a"),
            json.dumps({**GOOD, "id": "c", "steps": [{"role": 5}]}),
        ],
    )
    e = load_error(p)
    msg = str(e)
    # The first problem locates the error; the others are listed.
    assert (e.line, e.field) == (2, None)
    assert msg.startswith(f"{p}:2: ")
    assert "4 problems" in msg
    assert f"{p}:3: field 'outcome.success'" in msg
    assert f"{p}:4: field 'id'" in msg
    assert f"{p}:5: field 'steps[0].role'" in msg


def test_many_problems_are_summarized(tmp_path: Path) -> None:
    p = write_lines(tmp_path / "t.jsonl", ["{"] * 25)
    msg = str(load_error(p))
    assert "25 problems" in msg
    assert f"{p}:1: " in msg
    assert f"{p}:11: " in msg  # ten more are listed
    assert f"{p}:12: " not in msg
    assert "and 14 more" in msg


# ---------------------------------------------------------------------------
# load_module
# ---------------------------------------------------------------------------

RULE: JSONDict = {
    "id": "r1",
    "text": "Check the door.",
    "provenance": {"subsets": ["s001"], "trajectories": ["t1"]},
    "from": [],
}


def write_module(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj, indent=2), encoding="utf-8")
    return path


def module_error(path: Path) -> InputError:
    with pytest.raises(InputError) as info:
        load_module(path)
    return info.value


def test_load_module_good(tmp_path: Path) -> None:
    d = {"instructions": "hi", "rules": [RULE], "functions": [FUNC], "metadata": {"v": 1}}
    m = load_module(write_module(tmp_path / "m.json", d))
    assert m.to_json() == d
    assert m.rule("r1") is not None


def test_load_module_bad_json(tmp_path: Path) -> None:
    p = tmp_path / "m.json"
    p.write_text('{\n  "instructions": "x",\n  "rules": [,]\n}\n', encoding="utf-8")
    e = module_error(p)
    assert (e.path, e.line) == (str(p), 3)
    assert str(e).startswith(f"{p}:3: ")
    assert "malformed JSON" in str(e)


def test_load_module_duplicate_rule_ids(tmp_path: Path) -> None:
    d = {"instructions": "", "rules": [RULE, {**RULE, "text": "other"}], "functions": []}
    e = module_error(write_module(tmp_path / "m.json", d))
    assert e.field == "rules[1].id"
    assert str(e).startswith(f"{tmp_path / 'm.json'}: field 'rules[1].id': ")
    assert "duplicate rule id 'r1'" in str(e)


def test_load_module_duplicate_function_names(tmp_path: Path) -> None:
    d = {"instructions": "", "rules": [], "functions": [FUNC, {**FUNC, "code": "x"}]}
    e = module_error(write_module(tmp_path / "m.json", d))
    assert e.field == "functions[1].name"
    assert "duplicate function name 'lookup'" in str(e)


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        ({"rules": [], "functions": []}, "instructions"),
        ({"instructions": 3, "rules": [], "functions": []}, "instructions"),
        ({"instructions": "", "rules": [{**RULE, "text": ""}], "functions": []}, "rules[0].text"),
        (
            {
                "instructions": "",
                "rules": [{k: v for k, v in RULE.items() if k != "from"}],
                "functions": [],
            },
            "rules[0].from",
        ),
        (
            {
                "instructions": "",
                "rules": [{k: v for k, v in RULE.items() if k != "provenance"}],
                "functions": [],
            },
            "rules[0].provenance",
        ),
        (
            {"instructions": "", "rules": [], "functions": [{**FUNC, "name": "no spaces"}]},
            "functions[0].name",
        ),
        (
            {
                "instructions": "",
                "rules": [],
                "functions": [{k: v for k, v in FUNC.items() if k != "code"}],
            },
            "functions[0].code",
        ),
        ({"instructions": "", "rules": [], "functions": [], "extra": 1}, "<root>"),
        (["not", "an", "object"], "<root>"),
    ],
)
def test_load_module_schema_violations(tmp_path: Path, obj: object, field: str) -> None:
    p = write_module(tmp_path / "m.json", obj)
    e = module_error(p)
    assert e.path == str(p)
    assert e.field == field
    assert f"{p}: field {field!r}: " in str(e)


def test_load_module_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "none.json"
    e = module_error(p)
    assert e.path == str(p)
    assert str(e).startswith(f"{p}: ")


def test_load_module_non_utf8(tmp_path: Path) -> None:
    p = tmp_path / "m.json"
    p.write_bytes(b'{"instructions": "\xff", "rules": [], "functions": []}')
    e = module_error(p)
    assert e.path == str(p)
    assert str(e).startswith(f"{p}: ")


# ---------------------------------------------------------------------------
# atomic_write_json
# ---------------------------------------------------------------------------


def test_atomic_write_json_writes_valid_json(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "dir" / "out.json"
    obj = {"name": "café ✓", "n": [1, 2.5, None, True], "nested": {"a": {}}}
    atomic_write_json(target, obj)
    text = target.read_text(encoding="utf-8")
    assert json.loads(text) == obj
    assert text.endswith("\n")
    assert "café ✓" in text  # not \u-escaped
    assert sorted(os.listdir(target.parent)) == ["out.json"]

    atomic_write_json(target, [1, 2, 3])  # replacing an existing file
    assert json.loads(target.read_text(encoding="utf-8")) == [1, 2, 3]
    assert sorted(os.listdir(target.parent)) == ["out.json"]


def test_atomic_write_json_failure_leaves_old_content(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    target.write_text('{"old": true}\n', encoding="utf-8")
    with pytest.raises(TypeError):
        atomic_write_json(target, {"fine": list(range(1000)), "bad": object()})
    assert target.read_text(encoding="utf-8") == '{"old": true}\n'
    assert os.listdir(tmp_path) == ["out.json"]


def test_atomic_write_json_failure_creates_nothing(tmp_path: Path) -> None:
    target = tmp_path / "new.json"
    circular: list[object] = []
    circular.append(circular)
    with pytest.raises(ValueError, match="Circular"):
        atomic_write_json(target, circular)
    assert not target.exists()
    assert os.listdir(tmp_path) == []


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.usefixtures("umask_022")
def test_atomic_write_json_file_mode_follows_umask(tmp_path: Path) -> None:
    """The result must be readable like any file the user creates (0644 under umask 022).

    mkstemp creates its file 0600, and the rename keeps that mode.
    """
    fresh = tmp_path / "fresh.json"
    atomic_write_json(fresh, {"a": 1})
    plain = tmp_path / "plain.json"
    plain.write_text("{}", encoding="utf-8")
    assert stat.S_IMODE(fresh.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o644


# ---------------------------------------------------------------------------
# RunReport
# ---------------------------------------------------------------------------


def _node(ident: str, kind: str, children: tuple[str, ...], subsets: tuple[str, ...]) -> MergeNode:
    return MergeNode(
        id=ident,
        kind=kind,  # type: ignore[arg-type]
        module=Module(),
        children=children,
        subsets=subsets,
        started_at=0.5,
        finished_at=1.25,
    )


def make_report(**overrides: Any) -> RunReport:
    fields: dict[str, Any] = {
        "status": "ok",
        "strategy": "fgo",
        "trajectories": 3,
        "subsets": 2,
        "epochs": 1,
        "fan_in": 2,
        "llm_calls": {"optimize": 2, "merge": 1, "retries": 0, "reasks": 1},
        "prompt_tokens": 100,
        "completion_tokens": 20,
        "tokens_by_role": {
            "optimize": {"prompt": 60, "completion": 10},
            "merge": {"prompt": 40, "completion": 10},
        },
        "token_budget": None,
        "truncated_trajectories": 0,
        "wall_seconds": 1.2345678,
        "max_in_flight": 2,
        "merge_tree": (
            _node("s001", "leaf", (), ("s001",)),
            _node("s002", "leaf", (), ("s002",)),
            _node("m1", "merge", ("s001", "s002"), ("s001", "s002")),
        ),
        "root": "m1",
    }
    fields.update(overrides)
    return RunReport(**fields)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"status": "budget_exhausted", "token_budget": 500},
        {
            "status": "failed",
            "error": "LLM endpoint down",
            "root": None,
            "merge_tree": (),
            "failures": (Failure(unit="s001/epoch1", kind="optimize", error="boom"),),
        },
        {"strategy": "all-at-once", "cut_trajectories": 2, "merge_tree": (), "root": None},
        {"strategy": "batch", "epochs": 3, "fan_in": 4, "merge_tree": (), "root": None},
    ],
)
def test_run_report_json_validates(overrides: dict[str, Any]) -> None:
    report = make_report(**overrides)
    out = report.to_json()
    assert errors_of(REPORT_V, out) == []
    assert json.loads(json.dumps(out)) == out
    assert out["status"] == report.status
    assert out["wall_seconds"] == round(report.wall_seconds, 6)
    assert ("cut_trajectories" in out) == (report.cut_trajectories is not None)
    assert [n["id"] for n in out["merge_tree"]] == [n.id for n in report.merge_tree]


def test_report_schema_rejects_bad_reports() -> None:
    out = make_report().to_json()
    for key, value in [
        ("status", "weird"),
        ("strategy", "greedy"),
        ("epochs", 0),
        ("fan_in", 1),
        ("trajectories", -1),
        ("llm_calls", {"optimize": 1}),
    ]:
        assert errors_of(REPORT_V, {**out, key: value}) != [], key
    missing = {k: v for k, v in out.items() if k != "merge_tree"}
    assert errors_of(REPORT_V, missing) != []


async def _run_pipeline(strategy: str, **config: Any) -> RunReport:
    trajectories = load_trajectories(EXAMPLES)
    server = FakeLLMServer()
    async with trio.open_nursery() as nursery:
        url = await nursery.start(server.serve)
        gw_config = GatewayConfig(
            base_url=url, model="fake", max_concurrency=3, max_completion_tokens=512
        )
        async with LLMGateway(gw_config) as gateway:
            result = await run(
                trajectories,
                gateway,
                RunConfig(strategy=strategy, **config),  # type: ignore[arg-type]
            )
        nursery.cancel_scope.cancel()
    assert result.module is not None
    assert errors_of(MODULE_V, result.module.to_json()) == []
    return result.report


@pytest.mark.parametrize(
    ("strategy", "config"),
    [
        ("fgo", {"context_tokens": 3000}),
        ("fgo", {"context_tokens": 3000, "fan_in": 3}),
        ("batch", {"context_tokens": 3000}),
        ("all-at-once", {}),
    ],
)
async def test_pipeline_report_validates(strategy: str, config: dict[str, Any]) -> None:
    report = await _run_pipeline(strategy, **config)
    out = report.to_json()
    assert errors_of(REPORT_V, out) == []
    assert out["status"] == "ok"
    assert out["strategy"] == strategy
    assert out["trajectories"] == 24
    assert out["llm_calls"]["optimize"] >= 1
    if strategy == "fgo":
        leaves = [n for n in out["merge_tree"] if n["kind"] == "leaf"]
        assert len(leaves) == out["subsets"] > 1
        root = next(n for n in out["merge_tree"] if n["id"] == out["root"])
        assert sorted(root["subsets"]) == sorted(n["id"] for n in leaves)
    else:
        assert out["merge_tree"] == []
        assert out["llm_calls"]["merge"] == 0
    if strategy == "all-at-once":
        assert out["cut_trajectories"] == 0
        assert out["subsets"] == 1


def test_tool_call_shapes_are_checked(tmp_path: Path) -> None:
    bad = {
        "id": "t1",
        "task": "x",
        "steps": [{"role": "assistant", "content": None, "tool_calls": [{"function": "act"}]}],
        "outcome": {"success": True},
    }
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(bad) + "\n")
    with pytest.raises(InputError) as info:
        load_trajectories(path)
    assert info.value.line == 1
    assert info.value.field == "steps[0].tool_calls[0].function"


def test_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    good = {"id": "t1", "task": "x", "steps": [], "outcome": {"success": True}}
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(good).encode() + b"\n")
    assert [t.id for t in load_trajectories(path)] == ["t1"]


def test_bundled_example_modules_are_valid() -> None:
    from fgo_actors import load_module

    examples = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.json"))
    assert [p.name for p in examples] == ["twc_expert.json", "twc_harmful.json"]
    for path in examples:
        module = load_module(path)
        assert module.rules


def test_atomic_write_jsonl_writes_one_object_per_line(tmp_path: Path) -> None:
    from fgo_actors._core.io import atomic_write_jsonl

    target = tmp_path / "rows.jsonl"
    target.write_text("old\n")
    atomic_write_jsonl(target, ({"i": i, "s": "é"} for i in range(3)))
    assert [json.loads(line) for line in target.read_text().splitlines()] == [
        {"i": 0, "s": "é"},
        {"i": 1, "s": "é"},
        {"i": 2, "s": "é"},
    ]
    with pytest.raises(TypeError):
        atomic_write_jsonl(target, [{"bad": {1, 2}}])
    assert len(target.read_text().splitlines()) == 3  # untouched by the failed write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]


def test_without_tiktoken_tokens_are_estimated_at_four_characters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import tiktoken

    from fgo_actors._core import tokens as _tokens

    def unavailable(name: str) -> object:
        raise OSError(f"cannot download {name}")

    monkeypatch.setattr(tiktoken, "get_encoding", unavailable)
    _tokens.default_counter.cache_clear()
    try:
        counter = _tokens.default_counter()
        assert counter.encoding_name == "chars/4"
        assert counter.count("abcd" * 10) == 10
        assert counter.count("abcde") == 2
        text = "x" * 400
        cut = counter.truncate_middle(text, 20, " [...] ")
        assert counter.count(cut) <= 20
        assert cut.startswith("x")
        assert cut.endswith("x")
        assert " [...] " in cut
    finally:
        _tokens.default_counter.cache_clear()
