"""The data model: trajectories in, modules out, and the records in between.

All records are frozen attrs classes. JSON conversion is explicit (``to_json``
and ``from_json``) so that the wire names in ``protocols/`` are visible here and
unknown fields of trajectories survive a round trip.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import attrs

from .errors import InputError
from .schemas import schema_error

Role = Literal["system", "user", "assistant", "tool"]
JSON = dict[str, Any]


def _copy_extra(obj: Mapping[str, Any], known: Iterable[str]) -> JSON:
    known_set = set(known)
    return {k: v for k, v in obj.items() if k not in known_set}


@attrs.frozen
class Step:
    """One chat message of a trajectory, in the OpenAI chat message shape."""

    role: Role
    content: str | None = None
    name: str | None = None
    tool_calls: tuple[JSON, ...] | None = None
    tool_call_id: str | None = None
    extra: JSON = attrs.field(factory=dict, eq=False)

    _KNOWN = ("role", "content", "name", "tool_calls", "tool_call_id")

    def to_json(self) -> JSON:
        out: JSON = {"role": self.role, "content": self.content}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls is not None:
            out["tool_calls"] = list(self.tool_calls)
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        out.update(self.extra)
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Step:
        tool_calls = obj.get("tool_calls")
        return cls(
            role=obj["role"],
            content=obj.get("content"),
            name=obj.get("name"),
            tool_calls=tuple(tool_calls) if tool_calls is not None else None,
            tool_call_id=obj.get("tool_call_id"),
            extra=_copy_extra(obj, cls._KNOWN),
        )


@attrs.frozen
class Outcome:
    """How a trajectory ended: success, an optional score and feedback text."""

    success: bool
    score: float | None = None
    feedback: str | None = None
    extra: JSON = attrs.field(factory=dict, eq=False)

    _KNOWN = ("success", "score", "feedback")

    def to_json(self) -> JSON:
        out: JSON = {"success": self.success}
        if self.score is not None:
            out["score"] = self.score
        if self.feedback is not None:
            out["feedback"] = self.feedback
        out.update(self.extra)
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Outcome:
        return cls(
            success=obj["success"],
            score=obj.get("score"),
            feedback=obj.get("feedback"),
            extra=_copy_extra(obj, cls._KNOWN),
        )


@attrs.frozen
class Trajectory:
    """One agent execution: task, steps and outcome (``protocols/trajectory.schema.json``)."""

    id: str
    task: str
    steps: tuple[Step, ...]
    outcome: Outcome
    metadata: JSON | None = attrs.field(default=None, eq=False)
    extra: JSON = attrs.field(factory=dict, eq=False)

    _KNOWN = ("id", "task", "steps", "outcome", "metadata")

    @property
    def task_type(self) -> str | None:
        if self.metadata is None:
            return None
        value = self.metadata.get("task_type")
        return value if isinstance(value, str) else None

    def to_json(self) -> JSON:
        out: JSON = {
            "id": self.id,
            "task": self.task,
            "steps": [s.to_json() for s in self.steps],
            "outcome": self.outcome.to_json(),
        }
        if self.metadata is not None:
            out["metadata"] = dict(self.metadata)
        out.update(self.extra)
        return out

    @classmethod
    def from_json(
        cls, obj: object, *, path: str | None = None, line: int | None = None
    ) -> Trajectory:
        """Validate against the schema and convert; raises InputError naming the field."""
        problem = schema_error("trajectory", obj)
        if problem is not None:
            field, message = problem
            raise InputError(message, path=path, line=line, field=field)
        assert isinstance(obj, dict)
        return cls(
            id=obj["id"],
            task=obj["task"],
            steps=tuple(Step.from_json(s) for s in obj["steps"]),
            outcome=Outcome.from_json(obj["outcome"]),
            metadata=obj.get("metadata"),
            extra=_copy_extra(obj, cls._KNOWN),
        )


@attrs.frozen
class Rule:
    """A learned rule with a stable id, its provenance and its merge lineage."""

    id: str
    text: str
    subsets: tuple[str, ...] = ()
    trajectories: tuple[str, ...] = ()
    merged_from: tuple[str, ...] = ()
    # True when a merge reply gave no lineage and ``merged_from`` was inferred
    # from the words this rule shares with the child rules.
    lineage_inferred: bool = False

    @property
    def evidence(self) -> tuple[int, int]:
        """How strongly the logs support this rule: (subsets, trajectories)."""
        return (len(self.subsets), len(self.trajectories))

    def to_json(self) -> JSON:
        out: JSON = {
            "id": self.id,
            "text": self.text,
            "provenance": {
                "subsets": list(self.subsets),
                "trajectories": list(self.trajectories),
            },
            "from": list(self.merged_from),
        }
        if self.lineage_inferred:
            out["from_inferred"] = True
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Rule:
        prov = obj.get("provenance", {})
        return cls(
            id=obj["id"],
            text=obj["text"],
            subsets=tuple(prov.get("subsets", ())),
            trajectories=tuple(prov.get("trajectories", ())),
            merged_from=tuple(obj.get("from", ())),
            lineage_inferred=bool(obj.get("from_inferred", False)),
        )


@attrs.frozen
class FunctionSpec:
    """A tool function the agent may call. Its code is data here: it is never executed."""

    name: str
    description: str
    parameters: JSON = attrs.field(eq=False)
    code: str

    def to_json(self) -> JSON:
        return {
            "name": self.name,
            "description": self.description,
            "parameters": self.parameters,
            "code": self.code,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> FunctionSpec:
        return cls(
            name=obj["name"],
            description=obj["description"],
            parameters=dict(obj["parameters"]),
            code=obj["code"],
        )


@attrs.frozen
class Module:
    """The optimizable part of an agent (``protocols/module.schema.json``)."""

    instructions: str = ""
    rules: tuple[Rule, ...] = ()
    functions: tuple[FunctionSpec, ...] = ()
    metadata: JSON = attrs.field(factory=dict, eq=False)

    def rule(self, rule_id: str) -> Rule | None:
        return next((r for r in self.rules if r.id == rule_id), None)

    def function(self, name: str) -> FunctionSpec | None:
        return next((f for f in self.functions if f.name == name), None)

    def system_prompt(self) -> str:
        """The module as an agent's system prompt takes it: its instructions and
        its rules, worded exactly as the reference agent puts them after its own
        opening. Empty for a module with neither."""
        parts = []
        if self.instructions.strip():
            parts.append("Instructions:\n" + self.instructions.strip())
        if self.rules:
            parts.append(
                "Rules learned from experience:\n" + "\n".join(f"- {r.text}" for r in self.rules)
            )
        return "\n\n".join(parts)

    def openai_tools(self) -> list[JSON]:
        """The module's functions as OpenAI tool definitions
        (``{"type": "function", "function": {name, description, parameters}}``);
        their code stays here, for a runtime that runs it in a sandbox."""
        return [
            {
                "type": "function",
                "function": {
                    "name": f.name,
                    "description": f.description,
                    "parameters": f.parameters,
                },
            }
            for f in self.functions
        ]

    def digest(self) -> str:
        """A short key of the module's content (its JSON, metadata included)."""
        text = json.dumps(self.to_json(), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_json(self) -> JSON:
        out: JSON = {
            "instructions": self.instructions,
            "rules": [r.to_json() for r in self.rules],
            "functions": [f.to_json() for f in self.functions],
        }
        if self.metadata:
            out["metadata"] = dict(self.metadata)
        return out

    @classmethod
    def from_json(
        cls,
        obj: object,
        *,
        path: str | None = None,
        line: int | None = None,
        validate: bool = True,
    ) -> Module:
        """Validate against the schema (unless ``validate`` is False: for JSON this
        program wrote itself, such as the daemon's store) and convert."""
        problem = schema_error("module", obj) if validate else None
        if problem is not None:
            field, message = problem
            raise InputError(message, path=path, line=line, field=field)
        assert isinstance(obj, dict)
        module = cls(
            instructions=obj["instructions"],
            rules=tuple(Rule.from_json(r) for r in obj["rules"]),
            functions=tuple(FunctionSpec.from_json(f) for f in obj["functions"]),
            metadata=dict(obj.get("metadata", {})),
        )
        seen: set[str] = set()
        for i, r in enumerate(module.rules):
            if r.id in seen:
                raise InputError(
                    f"duplicate rule id {r.id!r}", path=path, line=line, field=f"rules[{i}].id"
                )
            seen.add(r.id)
        names: set[str] = set()
        for i, f in enumerate(module.functions):
            if f.name in names:
                raise InputError(
                    f"duplicate function name {f.name!r}",
                    path=path,
                    line=line,
                    field=f"functions[{i}].name",
                )
            names.add(f.name)
        return module


@attrs.frozen
class Turn:
    """One recorded agent turn in numbered-options mode, as a module function sees it.

    Recorded by the reference agent and the oracle policy in the steps' extra
    fields: a ``user`` step carries ``valid_actions`` (the options the
    environment offered) and the ``assistant`` step after it carries
    ``played`` (the environment actions that turn played, several for a
    macro) and ``score`` (the task score after them). Function checks replay
    a proposed function on these turns.
    """

    observation: str
    valid_actions: tuple[str, ...]
    played: tuple[str, ...]
    score: float | None = None


def turns_of(traj: Trajectory) -> tuple[Turn, ...]:
    """The recorded turns of ``traj``: each user step with ``valid_actions``
    followed by an assistant step with ``played``. Other steps are skipped;
    a trajectory logged by another runtime simply has no turns."""
    turns: list[Turn] = []
    steps = traj.steps
    for i, step in enumerate(steps[:-1]):
        valid = step.extra.get("valid_actions")
        if step.role != "user" or not isinstance(valid, list):
            continue
        reply = steps[i + 1]
        played = reply.extra.get("played")
        if reply.role != "assistant" or not isinstance(played, list):
            continue
        score = reply.extra.get("score")
        turns.append(
            Turn(
                observation=step.content or "",
                valid_actions=tuple(str(a) for a in valid),
                played=tuple(str(a) for a in played),
                score=float(score) if isinstance(score, int | float) else None,
            )
        )
    return tuple(turns)


@attrs.frozen
class RenderedTrajectory:
    """A trajectory as it appears in a prompt, measured once.

    ``task`` and ``turns`` are kept (not compared) so that functions an
    optimizer proposes can be replayed on the subset's own recorded turns.
    ``score`` is the outcome's score, for the Partitioner's stratification.
    """

    id: str
    text: str
    tokens: int
    success: bool
    group: str
    truncated: bool = False
    task: str = attrs.field(default="", eq=False)
    turns: tuple[Turn, ...] = attrs.field(default=(), eq=False)
    score: float | None = None


@attrs.frozen
class Subset:
    """A token-budgeted group of trajectories optimized together."""

    id: str
    items: tuple[RenderedTrajectory, ...]

    @property
    def trajectory_ids(self) -> tuple[str, ...]:
        return tuple(i.id for i in self.items)

    @property
    def tokens(self) -> int:
        return sum(i.tokens for i in self.items)

    @property
    def successes(self) -> int:
        return sum(1 for i in self.items if i.success)

    def stats(self) -> JSON:
        groups = sorted({i.group for i in self.items})
        return {
            "trajectories": len(self.items),
            "successes": self.successes,
            "failures": len(self.items) - self.successes,
            "groups": groups,
        }


NodeKind = Literal["leaf", "merge"]
NodeMethod = Literal["llm", "union", "gate"]


@attrs.frozen
class MergeNode:
    """A node of the merge tree: a leaf (one optimized subset) or a merge of children."""

    id: str
    kind: NodeKind
    module: Module
    children: tuple[str, ...]
    subsets: tuple[str, ...]
    started_at: float
    finished_at: float
    method: NodeMethod = "llm"
    stats: JSON = attrs.field(factory=dict, eq=False)

    @classmethod
    def leaf(
        cls, subset_id: str, module: Module, *, started_at: float, finished_at: float, stats: JSON
    ) -> MergeNode:
        """The leaf of one optimized subset (batch, online and the daemon alike);
        ``stats`` describe the subset and how it was optimized."""
        return cls(
            id=subset_id,
            kind="leaf",
            module=module,
            children=(),
            subsets=(subset_id,),
            started_at=started_at,
            finished_at=finished_at,
            method="llm",
            stats={**stats, "subsets": 1},
        )

    def to_json(self) -> JSON:
        out: JSON = {
            "id": self.id,
            "kind": self.kind,
            "method": self.method,
            "children": list(self.children),
            "subsets": list(self.subsets),
            "started_at": round(self.started_at, 6),
            "finished_at": round(self.finished_at, 6),
        }
        if self.kind == "merge":
            for key in ("dropped_rules", "dropped_functions", "lineage_inferred"):
                out[key] = list(self.stats.get(key, []))
        return out


Status = Literal["ok", "budget_exhausted", "partial", "failed"]
Strategy = Literal["fgo", "all-at-once", "batch"]


@attrs.frozen
class Failure:
    """A unit (``s003/epoch1``, ``m4``) that failed cleanly, and why."""

    unit: str
    kind: str
    error: str

    def to_json(self) -> JSON:
        return {"unit": self.unit, "kind": self.kind, "error": self.error}


@attrs.frozen
class RunReport:
    """What a run did (``protocols/report.schema.json``)."""

    status: Status
    strategy: Strategy
    trajectories: int
    subsets: int
    epochs: int
    fan_in: int
    llm_calls: JSON
    prompt_tokens: int
    completion_tokens: int
    tokens_by_role: JSON
    token_budget: int | None
    truncated_trajectories: int
    wall_seconds: float
    max_in_flight: int
    merge_tree: tuple[MergeNode, ...]
    root: str | None
    failures: tuple[Failure, ...] = ()
    cut_trajectories: int | None = None
    error: str | None = None
    config: JSON = attrs.field(factory=dict, eq=False)

    def to_json(self) -> JSON:
        out: JSON = {
            "status": self.status,
            "error": self.error,
            "strategy": self.strategy,
            "trajectories": self.trajectories,
            "subsets": self.subsets,
            "epochs": self.epochs,
            "fan_in": self.fan_in,
            "llm_calls": dict(self.llm_calls),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "tokens_by_role": dict(self.tokens_by_role),
            "token_budget": self.token_budget,
            "truncated_trajectories": self.truncated_trajectories,
            "wall_seconds": round(self.wall_seconds, 6),
            "max_in_flight": self.max_in_flight,
            "root": self.root,
            "failures": [f.to_json() for f in self.failures],
            "merge_tree": [n.to_json() for n in self.merge_tree],
            "config": dict(self.config),
        }
        if self.cut_trajectories is not None:
            out["cut_trajectories"] = self.cut_trajectories
        return out
