"""Pure functions that apply LLM replies to modules.

Optimizer replies are lists of edit actions; merge replies are whole modules
with lineage. Both are checked against the current module(s): an action that
names an unknown rule id or function name is an error to report back to the
LLM, never a silent no-op. Nothing here does I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import attrs

from ._model import FunctionSpec, Module, Rule


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _union(*seqs: Iterable[str]) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for seq in seqs:
        for item in seq:
            seen.setdefault(item, None)
    return tuple(seen)


def _next_ids(module: Module, prefix: str) -> Iterator[str]:
    pattern = re.compile(re.escape(prefix) + r"\.r(\d+)$")
    start = 1 + max(
        (int(m.group(1)) for r in module.rules if (m := pattern.match(r.id))), default=0
    )
    n = start
    while True:
        yield f"{prefix}.r{n}"
        n += 1


@attrs.frozen
class EditResult:
    module: Module
    errors: tuple[str, ...]
    applied: int


def apply_actions(
    module: Module,
    actions: Sequence[Mapping[str, Any]],
    *,
    subset_id: str,
    trajectory_ids: Sequence[str],
    id_prefix: str | None = None,
) -> EditResult:
    """Apply optimizer ``actions`` to a copy of ``module``.

    New rules get ids ``<id_prefix>.r<n>`` (``id_prefix`` defaults to the
    subset id) and provenance from the subset: the trajectories named in the
    action's optional ``evidence``, or else all of the subset's trajectories.
    Each action that cannot be applied adds one error message that names the
    action by index; the caller decides whether to re-ask.
    """
    prefix = id_prefix or subset_id
    ids = _next_ids(module, prefix)
    known_traj = set(trajectory_ids)
    instructions = module.instructions
    rules: dict[str, Rule] = {r.id: r for r in module.rules}
    functions: dict[str, FunctionSpec] = {f.name: f for f in module.functions}
    errors: list[str] = []
    applied = 0

    def evidence_of(i: int, action: Mapping[str, Any]) -> tuple[str, ...] | None:
        evidence = action.get("evidence")
        if not evidence:
            return tuple(trajectory_ids)
        unknown = [e for e in evidence if e not in known_traj]
        if unknown:
            errors.append(
                f"actions[{i}]: evidence names unknown trajectory ids {unknown}; "
                f"known ids: {sorted(known_traj)[:20]}"
            )
            return None
        return _union(evidence)

    for i, action in enumerate(actions):
        op = action.get("op")
        if op == "set_instructions":
            instructions = str(action["text"])
        elif op == "add_rule":
            text = str(action["text"]).strip()
            if not text:
                errors.append(f"actions[{i}]: add_rule text is empty")
                continue
            dup = next((r.id for r in rules.values() if _norm(r.text) == _norm(text)), None)
            if dup is not None:
                errors.append(
                    f"actions[{i}]: add_rule repeats existing rule {dup!r}; "
                    "use revise_rule to change it or leave it out"
                )
                continue
            ev = evidence_of(i, action)
            if ev is None:
                continue
            rid = next(ids)
            rules[rid] = Rule(id=rid, text=text, subsets=(subset_id,), trajectories=ev)
        elif op == "revise_rule":
            rid = str(action["id"])
            old = rules.get(rid)
            if old is None:
                errors.append(
                    f"actions[{i}]: revise_rule names unknown rule id {rid!r}; "
                    f"existing ids: {list(rules)}"
                )
                continue
            text = str(action["text"]).strip()
            if not text:
                errors.append(f"actions[{i}]: revise_rule text is empty; use remove_rule")
                continue
            dup = next(
                (r.id for r in rules.values() if r.id != rid and _norm(r.text) == _norm(text)),
                None,
            )
            if dup is not None:
                errors.append(
                    f"actions[{i}]: revise_rule would make {rid!r} repeat rule {dup!r}; "
                    "remove one of them instead"
                )
                continue
            ev = evidence_of(i, action)
            if ev is None:
                continue
            rules[rid] = attrs.evolve(
                old,
                text=text,
                subsets=_union(old.subsets, (subset_id,)),
                trajectories=_union(old.trajectories, ev),
            )
        elif op == "remove_rule":
            rid = str(action["id"])
            if rules.pop(rid, None) is None:
                errors.append(
                    f"actions[{i}]: remove_rule names unknown rule id {rid!r}; "
                    f"existing ids: {list(rules)}"
                )
                continue
        elif op in ("add_function", "revise_function"):
            fn = FunctionSpec.from_json(action["function"])
            exists = fn.name in functions
            if op == "add_function" and exists:
                errors.append(
                    f"actions[{i}]: add_function: a function named {fn.name!r} exists; "
                    "use revise_function"
                )
                continue
            if op == "revise_function" and not exists:
                errors.append(
                    f"actions[{i}]: revise_function names unknown function {fn.name!r}; "
                    f"existing functions: {list(functions)}"
                )
                continue
            functions[fn.name] = fn
        elif op == "remove_function":
            name = str(action["name"])
            if functions.pop(name, None) is None:
                errors.append(
                    f"actions[{i}]: remove_function names unknown function {name!r}; "
                    f"existing functions: {list(functions)}"
                )
                continue
        else:
            errors.append(f"actions[{i}]: unknown op {op!r}")
            continue
        applied += 1

    new = attrs.evolve(
        module,
        instructions=instructions,
        rules=tuple(rules.values()),
        functions=tuple(functions.values()),
    )
    return EditResult(module=new, errors=tuple(errors), applied=applied)


@attrs.frozen
class MergeResult:
    module: Module
    errors: tuple[str, ...]
    dropped_rules: tuple[str, ...]


def apply_merge(
    children: Sequence[Module], reply: Mapping[str, Any], *, node_id: str
) -> MergeResult:
    """Build the merged module from a merge reply, carrying provenance along lineage.

    Each merged rule's provenance is the union of the provenance of the child
    rules named in its ``from``. A ``from`` id that no child has is an error.
    Child rules that no merged rule names are returned as ``dropped_rules``.
    """
    by_id: dict[str, list[Rule]] = {}
    for child in children:
        for r in child.rules:
            by_id.setdefault(r.id, []).append(r)
    errors: list[str] = []
    rules: list[Rule] = []
    referenced: set[str] = set()
    # Merged ids never collide with a child's (an initial module may hold an
    # earlier run's m1.r1): numbering continues past any such id.
    ids = _next_ids(Module(rules=tuple(r for rs in by_id.values() for r in rs)), node_id)
    for i, item in enumerate(reply["rules"]):
        sources = [str(s) for s in item.get("from", [])]
        if not sources:
            errors.append(f"rules[{i}].from is empty: name the child rule ids this rule comes from")
            continue
        unknown = [s for s in sources if s not in by_id]
        if unknown:
            errors.append(
                f"rules[{i}].from names unknown rule ids {unknown}; "
                f"the children's rule ids are: {sorted(by_id)}"
            )
            continue
        text = str(item["text"]).strip()
        if not text:
            errors.append(f"rules[{i}].text is empty")
            continue
        referenced.update(sources)
        src_rules = [r for s in sources for r in by_id[s]]
        rules.append(
            Rule(
                id=next(ids),
                text=text,
                subsets=_union(*(r.subsets for r in src_rules)),
                trajectories=_union(*(r.trajectories for r in src_rules)),
                merged_from=tuple(dict.fromkeys(sources)),
            )
        )
    functions: dict[str, FunctionSpec] = {}
    for i, f in enumerate(reply["functions"]):
        fn = FunctionSpec.from_json(f)
        if fn.name in functions:
            errors.append(f"functions[{i}]: duplicate function name {fn.name!r}")
            continue
        functions[fn.name] = fn
    module = Module(
        instructions=str(reply["instructions"]),
        rules=tuple(rules),
        functions=tuple(functions.values()),
    )
    dropped = tuple(rid for rid in by_id if rid not in referenced)
    return MergeResult(module=module, errors=tuple(errors), dropped_rules=dropped)


def union_merge(children: Sequence[Module], *, node_id: str) -> Module:
    """Merge without an LLM: keep every distinct rule and function.

    Used when a merge call fails or the token budget has run out, so that no
    learned rule is lost. Rules with the same normalised text collapse into
    one, with the union of their provenance.
    """
    merged: dict[str, list[Rule]] = {}
    for child in children:
        for r in child.rules:
            merged.setdefault(_norm(r.text), []).append(r)
    ids = _next_ids(Module(rules=tuple(r for c in children for r in c.rules)), node_id)
    rules = tuple(
        Rule(
            id=next(ids),
            text=group[0].text,
            subsets=_union(*(r.subsets for r in group)),
            trajectories=_union(*(r.trajectories for r in group)),
            merged_from=_union(r.id for r in group),
        )
        for group in merged.values()
    )
    instructions = list(
        dict.fromkeys(c.instructions.strip() for c in children if c.instructions.strip())
    )
    functions: dict[str, FunctionSpec] = {}
    for child in children:
        for f in child.functions:
            functions.setdefault(f.name, f)
    return Module(
        instructions="\n\n".join(instructions),
        rules=rules,
        functions=tuple(functions.values()),
    )
