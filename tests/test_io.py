"""File I/O of ``_core/io.py``: loading trajectories and modules, the messages
for bad input, and atomic writes."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fgo_actors import InputError, atomic_write_json, load_module, load_trajectories
from fgo_actors._core.io import split_json_array

from .helpers import (
    EXAMPLES,
    FUNC,
    SETTINGS,
    TRAJECTORY_V,
    JSONDict,
    errors_of,
    trajectory_dicts,
)

# ---------------------------------------------------------------------------
# load_trajectories: round trips
# ---------------------------------------------------------------------------


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


def test_example_file_loads_and_round_trips() -> None:
    trajs = load_trajectories(EXAMPLES)
    assert len(trajs) == 24
    assert len({t.id for t in trajs}) == 24
    raw = [json.loads(line) for line in EXAMPLES.read_text(encoding="utf-8").splitlines() if line]
    assert [t.to_json() for t in trajs] == raw
    for t in trajs:
        assert errors_of(TRAJECTORY_V, t.to_json()) == []


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


# JSON values whose strings hold the characters the array scanner must see past.
_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.text(alphabet=st.sampled_from('ab"\\[]{},: \n\u00e9'), max_size=8),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(alphabet='k"\\[]{},', max_size=4), children, max_size=4)
    ),
    max_leaves=12,
)


@given(st.lists(_json_values, max_size=6), st.sampled_from([None, 1]))
def test_split_json_array_finds_each_element(values: list[object], indent: int | None) -> None:
    items = split_json_array(json.dumps(values, indent=indent))
    assert items is not None
    assert [json.loads(i) for i in items] == values


def test_split_json_array_refuses_what_is_not_one_array() -> None:
    for text in ['{"a": 1}', "[1, 2", "[1, 2]]", "[1, 2] x", "[1,]", "x[1]", "[1, 2}"]:
        assert split_json_array(text) is None, text
    assert split_json_array("[]") == []
    deep = "[" * 2000 + "]" * 2000
    assert split_json_array(f"[1, {deep}]") == ["1", f" {deep}"]
    # A string left open: found in one pass (a review found the scan quadratic
    # here: minutes for this, days at the body limit).
    assert split_json_array("[" * 2000 + '"' + '\\"' * 200_000) is None
    assert split_json_array('["a\\"b", "c\\\\", 1]') == ['"a\\"b"', ' "c\\\\"', " 1"]
