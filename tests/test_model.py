"""The records of ``_core/model.py``: trajectories, modules and run reports,
their JSON round trips and their agreement with the protocol schemas."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fgo_actors import Failure, FunctionSpec, MergeNode, Module, Rule, RunReport, Trajectory

from .helpers import (
    MODULE_V,
    REPORT_V,
    SETTINGS,
    TRAJECTORY_V,
    JSONDict,
    errors_of,
    json_values,
    trajectory_dicts,
)

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


def test_a_leaf_is_one_subset_optimized() -> None:
    module = Module(rules=(Rule(id="s1.r1", text="Open it first."),))
    leaf = MergeNode.leaf(
        "s1", module, started_at=1.0, finished_at=2.5, stats={"trajectories": 3, "subsets": 7}
    )
    assert (leaf.id, leaf.kind, leaf.method, leaf.children, leaf.subsets) == (
        "s1",
        "leaf",
        "llm",
        (),
        ("s1",),
    )
    assert leaf.module == module
    assert (leaf.started_at, leaf.finished_at) == (1.0, 2.5)
    # A leaf stands for exactly one subset, whatever the caller's stats say.
    assert leaf.stats == {"trajectories": 3, "subsets": 1}


def test_a_module_digest_follows_its_content() -> None:
    a = Module(rules=(Rule(id="s1.r1", text="Open it first."),))
    assert a.digest() == Module.from_json(a.to_json()).digest()
    assert len(a.digest()) == 16
    assert a.digest() != Module(rules=(Rule(id="s1.r1", text="Open it last."),)).digest()
    assert a.digest() != Module().digest()


def test_a_module_renders_as_an_agent_loads_it() -> None:
    from fgo_actors._core.render import module_markdown
    from fgo_actors.agent.rollout import call_system_prompt, system_prompt

    spec = {"type": "object", "properties": {"x": {"type": "string"}}}
    module = Module(
        instructions="  Tidy the house.  ",
        rules=(
            Rule(id="s1.r1", text="Open it first.", subsets=("s1",), trajectories=("t1", "t2")),
            Rule(id="m1.r1", text="Put it back.", merged_from=("s1.r2", "s2.r1")),
        ),
        functions=(FunctionSpec(name="f", description="Does f.", parameters=spec, code="x=1"),),
    )
    prompt = module.system_prompt()
    assert prompt == (
        "Instructions:\nTidy the house.\n\n"
        "Rules learned from experience:\n- Open it first.\n- Put it back."
    )
    # Exactly what the reference agent puts after its own opening, in both modes.
    assert system_prompt(module).endswith("\n\n" + prompt)
    assert "\n\n" + prompt + "\n\nTask: t" in call_system_prompt(module, "t", ())
    assert Module().system_prompt() == ""
    assert module.openai_tools() == [
        {
            "type": "function",
            "function": {"name": "f", "description": "Does f.", "parameters": spec},
        }
    ]
    page = module_markdown(module, title="m.json")
    assert page.startswith("# m.json\n")
    assert "- **s1.r1**: Open it first.\n  - 1 subsets; 2 trajectories; e.g. t1, t2" in page
    assert "merged from s1.r2, s2.r1" in page
    assert "```python\nx=1\n```" in page
