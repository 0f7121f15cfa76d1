"""Pure functions that apply LLM replies to modules.

Optimizer replies are lists of edit actions, checked against the current
module: an action is applied, read the way it clearly means (and noted), or
skipped with its reason; never a silent no-op. Merge replies are decisions
over the children's rule ids, applied by code so that nothing the reply does
not mention is lost (see ``apply_merge``). Nothing here does I/O.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import attrs

from .model import FunctionSpec, Module, Rule
from .playbook import PLAYBOOK
from .playbook import merge_functions as merge_playbooks


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


_OPS = ("set_instructions", "add_rule", "revise_rule", "remove_rule", "add_function")


_BARE_NAME = re.compile(r"^[A-Za-z_]\w*(\(.*\))?(\s*->.*)?$", re.DOTALL)


def _not_a_lesson(text: str, rules: Mapping[str, Rule]) -> str | None:
    """Why ``text`` is no rule for the agent, or None. A small model sometimes
    copies the re-ask note (``revise_rule names unknown rule id ...``) into a
    rule; such a text is about this editing, never a lesson about the task.
    So is a bare name or signature (the 1.5B model wrote rules such as
    ``playbook`` and ``pick_up_object(task, observation) -> action_list``)."""
    lowered = text.lower()
    for word in (*_OPS, *rules):
        if re.search(rf"(?<![\w.]){re.escape(word.lower())}(?![\w])", lowered):
            return (
                f"names {word!r}, a word of these edit instructions, not of the task: "
                "write a lesson about the task"
            )
    if _BARE_NAME.match(text):
        return "is a name, not a lesson: write the rule as a short sentence about the task"
    return None


_COPY_MIN_WORDS = 4


def _word_line(text: str) -> str:
    """``text``'s words, lowercased, between single spaces (and one at each end)."""
    return " " + " ".join(re.findall(r"\w+", text.lower())) + " "


def copies_prompt(text: str, shown: str) -> bool:
    """True when ``text`` repeats a passage of ``shown`` (the prompt's own
    instructions and example) word for word, at least four words long. The
    1.5B optimizer wrote the function contract's worked example,
    ``THEN = {'key': ['use key']}``, as a rule: it came from the prompt, not
    from the trajectories, so it teaches the agent nothing. Punctuation,
    quotes and case are ignored; a shorter text may be a real lesson that
    happens to share a phrase."""
    words = _word_line(text)
    return words.count(" ") - 1 >= _COPY_MIN_WORDS and words in _word_line(shown)


@attrs.frozen
class EditResult:
    """What an optimizer reply did to a module.

    ``errors`` are the actions skipped, one message each (``actions[i]: why``):
    nothing in them could be applied as written or read another way. ``notes``
    are the actions read another way than written, deterministically (an
    unknown rule id revised becomes an added rule, an evidence id is matched
    to the subset's). A reply with usable actions is kept whatever it skipped;
    ``worth_reask`` says when a re-ask could give more.
    """

    module: Module
    errors: tuple[str, ...]
    applied: int
    notes: tuple[str, ...] = ()
    unchanged: int = 0  # actions that would change nothing (noted), neither applied nor errors

    @property
    def worth_reask(self) -> bool:
        """True when the reply's actions were all skipped: it asked for edits and
        got none in. A re-ask costs the whole prompt again, so a reply that
        applied something is kept, and its skips are recorded instead."""
        return bool(self.errors) and self.applied == 0


def match_evidence(given: str, known: Sequence[str]) -> str | None:
    """The subset trajectory id that an evidence entry means, or None.

    Small models decorate ids (``trajectory twc/train/50``, ``twc/train/50
    (score 1.0)``) or shorten them (``train/50``). An exact id wins; else the
    longest known id that the entry contains; else the one known id that ends
    with the entry after a separator. Anything looser would guess.
    """
    if given in known:
        return given
    inside = [k for k in known if k and k in given]
    if inside:
        return max(inside, key=len)
    tail = given.strip()
    ends = [k for k in known if tail and re.search(rf"[^\w]{re.escape(tail)}$", k)]
    return ends[0] if len(ends) == 1 else None


_JSON_TYPES = frozenset({"string", "number", "integer", "boolean", "array", "object", "null"})


def object_schema(parameters: Mapping[str, Any]) -> dict[str, Any] | None:
    """``parameters`` as the JSON Schema object it clearly means, or None when it
    is one already or means something else.

    Small models write a function's parameters as the properties alone
    (``{"task": {"type": "string"}}`` or ``{"task": "string"}``), or as an
    object schema without its ``"type"``. A schema with another ``type`` is
    left alone: what it means is unclear, and the function check says so.
    """
    if "type" in parameters:
        return None
    if "properties" in parameters:
        return {"type": "object", **parameters}
    return {"type": "object", "properties": {str(k): _property(v) for k, v in parameters.items()}}


def _property(value: object) -> dict[str, Any]:
    """One bare property as a schema: a schema already, a type name or a list
    of them (``"string"``, ``["string", "null"]``), or else its description."""
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, str) and value in _JSON_TYPES:
        return {"type": value}
    if (
        isinstance(value, list)
        and value
        and all(isinstance(v, str) and v in _JSON_TYPES for v in value)
    ):
        return {"type": list(value)}
    return {"description": str(value)}


def apply_actions(
    module: Module,
    actions: Sequence[Mapping[str, Any]],
    *,
    subset_id: str,
    trajectory_ids: Sequence[str],
    id_prefix: str | None = None,
    shown: str = "",
) -> EditResult:
    """Apply optimizer ``actions`` to a copy of ``module``.

    New rules get ids ``<id_prefix>.r<n>`` (``id_prefix`` defaults to the
    subset id) and provenance from the subset: the trajectories named in the
    action's optional ``evidence``, or else all of the subset's trajectories.

    What a small model gets wrong but means clearly is read as meant, and
    noted: ``revise_rule`` of an unknown id adds the rule; ``revise_function``
    of an unknown name adds the function and ``add_function`` of an existing
    one revises it; evidence ids are matched to the subset's
    (``match_evidence``), unmatched ones left out; a function's parameters
    written as bare properties become an object schema (``object_schema``).
    What changes nothing is
    skipped and noted: removing what is not there, adding a rule the module
    already has. What is no edit at all (an empty rule, a rule that is not a
    lesson about the task, an unknown op, an edit of the playbook) is skipped
    as an error that names the action by index. So is a rule that copies a
    passage of ``shown``, the prompt's own instructions (``copies_prompt``).
    """
    prefix = id_prefix or subset_id
    ids = _next_ids(module, prefix)
    instructions = module.instructions
    rules: dict[str, Rule] = {r.id: r for r in module.rules}
    functions: dict[str, FunctionSpec] = {f.name: f for f in module.functions}
    errors: list[str] = []
    notes: list[str] = []
    applied = 0
    unchanged = 0

    def evidence_of(i: int, action: Mapping[str, Any]) -> tuple[str, ...]:
        evidence = [str(e) for e in action.get("evidence") or ()]
        matched = {e: match_evidence(e, trajectory_ids) for e in evidence}
        for e, m in matched.items():
            if m is not None and m != e:
                notes.append(f"actions[{i}]: evidence {e!r} read as {m!r}")
        unknown = [e for e, m in matched.items() if m is None]
        found = _union(m for m in matched.values() if m is not None)
        if unknown:
            notes.append(
                f"actions[{i}]: evidence names unknown trajectory ids {unknown}, left out"
                + ("" if found else "; the whole subset is the evidence")
            )
        return found or tuple(trajectory_ids)

    def lesson_problem(text: str) -> str | None:
        if not text:
            return "text is empty"
        if copies_prompt(text, shown):
            return (
                "text copies the prompt's own instructions or example, not a lesson "
                "from the trajectories: write what the logs taught"
            )
        problem = _not_a_lesson(text, rules)
        return None if problem is None else f"text {problem}"

    def duplicate_of(text: str, besides: str | None = None) -> str | None:
        return next(
            (r.id for r in rules.values() if r.id != besides and _norm(r.text) == _norm(text)),
            None,
        )

    def add_rule(i: int, action: Mapping[str, Any], text: str) -> bool:
        dup = duplicate_of(text)
        if dup is not None:
            notes.append(f"actions[{i}]: the module already has this rule as {dup!r}; skipped")
            return False
        rid = next(ids)
        rules[rid] = Rule(
            id=rid, text=text, subsets=(subset_id,), trajectories=evidence_of(i, action)
        )
        return True

    for i, action in enumerate(actions):
        op = action.get("op")
        if op == "set_instructions":
            instructions = str(action["text"])
        elif op in ("add_rule", "revise_rule"):
            text = str(action.get("text", "")).strip()
            problem = lesson_problem(text)
            if problem is not None:
                hint = "; use remove_rule" if op == "revise_rule" and not text else ""
                errors.append(f"actions[{i}]: {op} {problem}{hint}")
                continue
            rid = str(action.get("id", ""))
            old = rules.get(rid) if op == "revise_rule" else None
            if old is None:
                if op == "revise_rule":
                    notes.append(f"actions[{i}]: revise_rule of unknown rule id {rid!r} adds it")
                if not add_rule(i, action, text):
                    unchanged += 1
                    continue
            else:
                dup = duplicate_of(text, besides=rid)
                if dup is not None:
                    notes.append(
                        f"actions[{i}]: revise_rule would make {rid!r} repeat {dup!r}; skipped"
                    )
                    unchanged += 1
                    continue
                rules[rid] = attrs.evolve(
                    old,
                    text=text,
                    subsets=_union(old.subsets, (subset_id,)),
                    trajectories=_union(old.trajectories, evidence_of(i, action)),
                )
        elif op == "remove_rule":
            rid = str(action["id"])
            if rules.pop(rid, None) is None:
                notes.append(f"actions[{i}]: remove_rule of unknown rule id {rid!r}; skipped")
                unchanged += 1
                continue
        elif op in ("add_function", "revise_function", "remove_function") and (
            str((action.get("function") or {}).get("name", action.get("name", ""))) == PLAYBOOK
        ):
            errors.append(
                f"actions[{i}]: {op}: {PLAYBOOK!r} is written from the logs' scores by the "
                "optimizer's code; leave it out of the actions"
            )
            continue
        elif op in ("add_function", "revise_function"):
            fn = FunctionSpec.from_json(action["function"])
            fixed = object_schema(fn.parameters)
            if fixed is not None:
                notes.append(f"actions[{i}]: {fn.name!r}'s parameters read as a JSON Schema object")
                fn = attrs.evolve(fn, parameters=fixed)
            exists = fn.name in functions
            if op == "add_function" and exists:
                notes.append(f"actions[{i}]: add_function of existing {fn.name!r} revises it")
            if op == "revise_function" and not exists:
                notes.append(f"actions[{i}]: revise_function of unknown {fn.name!r} adds it")
            functions[fn.name] = fn
        elif op == "remove_function":
            name = str(action["name"])
            if functions.pop(name, None) is None:
                notes.append(f"actions[{i}]: remove_function of unknown {name!r}; skipped")
                unchanged += 1
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
    return EditResult(
        module=new, errors=tuple(errors), applied=applied, notes=tuple(notes), unchanged=unchanged
    )


def revert_functions(before: Module, after: Module, names: Iterable[str]) -> Module:
    """``after`` with the functions ``names`` as ``before`` holds them: a
    revised one gets its old version back, an added one is removed. The rest
    of ``after`` (rules, instructions, other functions) is kept as it is."""
    names = set(names)
    functions = []
    for fn in after.functions:
        if fn.name not in names:
            functions.append(fn)
        elif (old := before.function(fn.name)) is not None:
            functions.append(old)
    return attrs.evolve(after, functions=tuple(functions))


# -- merges: decisions applied by code ------------------------------------------------
#
# A merge reply is a list of decisions over the children's rule ids (combine
# these ids into this text; drop this id because ...). Code applies them, so a
# rule the reply does not mention is kept, lineage comes from the decisions,
# and the module cap is enforced here, for the LLM's result and the fallback
# alike. Every child rule ends up in the result (by id or in a ``from``) or in
# a recorded drop.

_WORD = re.compile(r"[a-z][a-z0-9]{2,}")
_STOP = frozenset(
    {
        *("the", "and", "for", "with", "that", "this", "then", "than", "when", "from"),
        *("into", "onto", "are", "was", "were", "you", "your", "its", "has", "have"),
        *("not", "but", "all", "any", "can", "use", "one"),
    }
)


def _words(text: str) -> frozenset[str]:
    return frozenset(w for w in _WORD.findall(text.lower()) if w not in _STOP)


@attrs.frozen
class MergeChild:
    """One child of a merge: its node id, module and how many successes back it."""

    id: str
    module: Module
    successes: int = 0


@attrs.frozen
class FunctionConflict:
    """Children hold different code under one function name."""

    name: str
    versions: tuple[tuple[str, FunctionSpec], ...]  # (child node id, version)


@attrs.frozen
class MergeInput:
    """What a merge decides over: the children's rules with unique ids (exact
    duplicates already collapsed), the functions they agree on, the ones in
    conflict, and their distinct instructions. ``covers`` maps each candidate
    rule id to the child rule ids behind it."""

    rules: tuple[Rule, ...]
    covers: Mapping[str, tuple[str, ...]]
    functions: tuple[FunctionSpec, ...]
    conflicts: tuple[FunctionConflict, ...]
    instructions: tuple[str, ...]
    child_rule_ids: tuple[str, ...]


@attrs.frozen
class Drop:
    """A rule left out of a merge result, the child rules it carried, and why."""

    id: str
    covers: tuple[str, ...]
    reason: str
    text: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "from": list(self.covers), "reason": self.reason}


@attrs.frozen
class MergeResult:
    module: Module
    errors: tuple[str, ...]  # worth a re-ask: the reply's function code fails its checks
    notes: tuple[str, ...]  # what was fixed deterministically (unknown ids, inferred lineage)
    dropped: tuple[Drop, ...]
    dropped_functions: tuple[Drop, ...] = ()

    @property
    def dropped_rules(self) -> tuple[str, ...]:
        """The child rule ids that no longer appear in the result, by any route."""
        return _union(*(d.covers for d in self.dropped))


def merge_input(children: Sequence[MergeChild], *, node_id: str) -> MergeInput:
    """Collect the children's rules and functions for a merge (pure).

    Rules with the same normalised text become one candidate with a new id
    (``<node_id>.r<n>``), their provenance unioned and the sources in its
    ``from``. A rule id that two children hold with different texts (both
    revised a rule of the initial module) keeps its id for the first text and
    a new id for each other one. Functions are merged by name: the same code
    is one function, versions that differ only in their data tables are
    united (``merge_function_data``), and any other difference is a conflict
    for the LLM.
    """
    all_rules = [r for c in children for r in c.module.rules]
    ids = _next_ids(Module(rules=tuple(all_rules)), node_id)
    by_text: dict[str, list[Rule]] = {}
    for r in all_rules:
        by_text.setdefault(_norm(r.text), []).append(r)
    rules: list[Rule] = []
    covers: dict[str, tuple[str, ...]] = {}
    taken: set[str] = set()
    for group in by_text.values():
        sources = _union(r.id for r in group)
        first = group[0]
        merged = attrs.evolve(
            first,
            subsets=_union(*(r.subsets for r in group)),
            trajectories=_union(*(r.trajectories for r in group)),
        )
        if len(sources) > 1 or first.id in taken:
            merged = attrs.evolve(merged, id=next(ids), merged_from=sources)
        taken.add(merged.id)
        rules.append(merged)
        covers[merged.id] = sources
    functions: dict[str, list[tuple[str, FunctionSpec]]] = {}
    for c in children:
        for f in c.module.functions:
            versions = functions.setdefault(f.name, [])
            if all(v.code != f.code for _, v in versions):
                versions.append((c.id, f))
    agreed: list[FunctionSpec] = []
    conflicts: list[FunctionConflict] = []
    for name, vs in functions.items():
        if len(vs) == 1:
            merged_fn: FunctionSpec | None = vs[0][1]
        elif name == PLAYBOOK:
            merged_fn = merge_playbooks([f for _, f in vs])
        else:
            merged_fn = merge_function_data([f for _, f in vs])
        if merged_fn is not None:
            agreed.append(merged_fn)
        else:
            conflicts.append(FunctionConflict(name, tuple(vs)))
    instructions = tuple(
        dict.fromkeys(
            c.module.instructions.strip() for c in children if c.module.instructions.strip()
        )
    )
    return MergeInput(
        rules=tuple(rules),
        covers=covers,
        functions=tuple(agreed),
        conflicts=tuple(conflicts),
        instructions=instructions,
        child_rule_ids=_union(r.id for r in all_rules),
    )


_Literal = ast.Dict | ast.List | ast.Tuple


def _data_assignments(tree: ast.Module) -> tuple[dict[str, _Literal], list[ast.stmt]]:
    """Top-level ``NAME = <literal dict/list/tuple of constants>`` (the
    function's knowledge as data), and every other statement."""
    data: dict[str, _Literal] = {}
    other: list[ast.stmt] = []
    for stmt in tree.body:
        if (
            isinstance(stmt, ast.Assign)
            and len(stmt.targets) == 1
            and isinstance(stmt.targets[0], ast.Name)
            and isinstance(stmt.value, _Literal)
            and stmt.targets[0].id not in data
        ):
            try:
                ast.literal_eval(stmt.value)
            except ValueError:
                other.append(stmt)
                continue
            data[stmt.targets[0].id] = stmt.value
        else:
            other.append(stmt)
    return data, other


def _union_literal(values: Sequence[Any]) -> Any:
    first = values[0]
    if isinstance(first, dict):
        out: dict[Any, Any] = {}
        for v in values:
            for key, item in v.items():
                out.setdefault(key, item)  # the first version wins a disputed key
        return out
    items = list(dict.fromkeys(x for v in values for x in v))
    return type(first)(items) if not isinstance(first, list) else items


def merge_function_data(versions: Sequence[FunctionSpec]) -> FunctionSpec | None:
    """One function from versions that differ only in their data (pure).

    When every version has the same code apart from top-level literal
    assignments (``PLACES = {...}``), the result is the first version with each
    literal replaced by the union of all versions' (dict keys the first
    version has keep its value). Otherwise None: a real conflict, for the LLM.
    Comments do not survive (the code is regenerated with ``ast.unparse``).
    """
    try:
        trees = [ast.parse(v.code) for v in versions]
    except (SyntaxError, ValueError):
        return None
    parts = [_data_assignments(t) for t in trees]
    shape = [ast.dump(stmt) for stmt in parts[0][1]]
    names = list(parts[0][0])
    for data, other in parts[1:]:
        if [ast.dump(stmt) for stmt in other] != shape or list(data) != names:
            return None
    if not names:
        return None
    merged = {
        name: _union_literal([ast.literal_eval(data[name]) for data, _ in parts]) for name in names
    }
    for data, _ in parts:
        for name, node in data.items():
            if type(ast.literal_eval(node)) is not type(merged[name]):
                return None
    tree = trees[0]
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Name):
            name = stmt.targets[0].id
            if name in merged and stmt.value is parts[0][0].get(name):
                stmt.value = ast.parse(repr(merged[name]), mode="eval").body
    return attrs.evolve(versions[0], code=ast.unparse(tree) + "\n")


def infer_lineage(text: str, candidates: Sequence[Rule]) -> tuple[str, ...]:
    """The candidate rules ``text`` most likely consolidates: those at least half
    of whose content words it shares; else the one sharing the most words."""
    words = _words(text)
    if not words:
        return ()
    scored = []
    for r in candidates:
        own = _words(r.text)
        if own:
            scored.append((len(own & words) / len(own), r.id))
    strong = tuple(rid for share, rid in scored if share >= 0.5)
    if strong:
        return strong
    best = max(scored, default=(0.0, ""))
    return (best[1],) if best[0] > 0 else ()


def apply_merge(
    inp: MergeInput,
    reply: Mapping[str, Any],
    *,
    node_id: str,
    size: Callable[[Module], int],
    cap: int,
    successes: Mapping[str, int] | None = None,
    max_drop_share: float = 0.5,
) -> MergeResult:
    """Apply a merge reply's decisions to ``inp``, then fit the result to ``cap``.

    - ``combine`` replaces the named candidates with one new rule whose
      provenance is the union of theirs and whose ``from`` is the child rules
      behind them. A text that is no lesson about the task (it names a
      candidate id or an edit op, as ``_not_a_lesson`` reads it) is ignored,
      and its sources kept. Unknown or already-used ids are ignored (noted). With no
      usable ids, the lineage is inferred from shared words and flagged.
    - ``drop`` removes a candidate (or a function, by name) and records the
      reason. At most
      ``max_drop_share`` of the candidates may be dropped by one reply; the
      rest of its drops are ignored (noted), so a reply cannot erase a merge.
    - ``functions`` in the reply resolve conflicts by name; a conflict left
      unresolved keeps the version of the child with most ``successes``.
      Other names are ignored: merges do not invent functions.
    - ``instructions`` is used only when the children's instructions differ.

    ``size`` measures a module as the LLM sees it; ``cap`` holds for the
    result (see ``fit_to_cap``). Pure: the caller checks resolved function
    code (``MergeResult.module.functions`` named in conflicts).
    """
    notes: list[str] = []
    pool: dict[str, Rule] = {r.id: r for r in inp.rules}
    covers: dict[str, tuple[str, ...]] = dict(inp.covers)
    out: list[Rule] = []
    dropped: list[Drop] = []
    used: set[str] = set()
    ids = _next_ids(Module(rules=tuple(inp.rules)), node_id)
    # Numbering continues past any child id of this node's form too.
    taken = set(inp.child_rule_ids) | set(pool)
    max_drops = int(len(inp.rules) * max_drop_share)
    # The playbook is what the scores say, not an opinion: a merge cannot drop it.
    fn_names = ({f.name for f in inp.functions} | {c.name for c in inp.conflicts}) - {PLAYBOOK}
    dropped_fns: dict[str, Drop] = {}
    for i, d in enumerate(reply.get("decisions", [])):
        op = d.get("op")
        if op == "combine":
            text = str(d.get("text", "")).strip()
            if not text:
                notes.append(f"decisions[{i}]: combine with empty text, ignored")
                continue
            problem = _not_a_lesson(text, pool)
            if problem is not None:
                # e.g. "[s003.r1], [s003.r2] into a single rule": about the merge,
                # not the task. Its sources stay as they were.
                notes.append(f"decisions[{i}]: combine text {problem}; ignored")
                continue
            named = [str(x) for x in d.get("ids") or []]
            unknown = [x for x in named if x not in pool]
            if unknown:
                notes.append(f"decisions[{i}]: unknown or reused ids {unknown} ignored")
            sources = [x for x in dict.fromkeys(named) if x in pool and x not in used]
            inferred = False
            if not sources:
                free = [r for r in inp.rules if r.id not in used]
                sources = list(infer_lineage(text, free))
                inferred = True
                notes.append(f"decisions[{i}]: lineage inferred as {sources}")
            src = [pool[x] for x in sources]
            if len(src) == 1 and _norm(src[0].text) == _norm(text):
                continue  # "combining" one rule into itself is a keep
            used.update(sources)
            rid = next(ids)
            while rid in taken:
                rid = next(ids)
            taken.add(rid)
            covered = _union(*(covers[x] for x in sources))
            covers[rid] = covered
            out.append(
                Rule(
                    id=rid,
                    text=text,
                    subsets=_union(*(r.subsets for r in src)),
                    trajectories=_union(*(r.trajectories for r in src)),
                    merged_from=covered,
                    lineage_inferred=inferred,
                )
            )
        elif op == "drop" and str(d.get("id", "")) in fn_names and d.get("id") not in pool:
            name = str(d["id"])
            reason = str(d.get("reason", "")).strip() or "dropped by the merge (no reason given)"
            if name not in dropped_fns:
                dropped_fns[name] = Drop(name, (), f"merge: {reason}")
        elif op == "drop":
            rid = str(d.get("id", ""))
            if rid not in pool or rid in used:
                notes.append(f"decisions[{i}]: drop of unknown or reused id {rid!r} ignored")
                continue
            if len(dropped) >= max_drops:
                notes.append(f"decisions[{i}]: drop of {rid!r} ignored: at most {max_drops} drops")
                continue
            used.add(rid)
            reason = str(d.get("reason", "")).strip() or "dropped by the merge (no reason given)"
            dropped.append(Drop(rid, covers[rid], f"merge: {reason}", pool[rid].text))
        else:
            notes.append(f"decisions[{i}]: unknown op {op!r} ignored")
    kept = [r for r in inp.rules if r.id not in used]
    rules = kept + out

    errors: list[str] = []
    functions: dict[str, FunctionSpec] = {f.name: f for f in inp.functions}
    conflicts = {c.name: c for c in inp.conflicts}
    for i, f in enumerate(reply.get("functions", []) or []):
        fn = FunctionSpec.from_json(f)
        if fn.name not in conflicts:
            notes.append(f"functions[{i}]: {fn.name!r} is not in conflict, ignored")
            continue
        if fn.name in functions:
            errors.append(f"functions[{i}]: {fn.name!r} given twice")
            continue
        functions[fn.name] = fn
    for name in dropped_fns:
        functions.pop(name, None)
    wins = successes or {}
    for name, c in conflicts.items():
        if name not in functions and name not in dropped_fns:
            child, version = max(c.versions, key=lambda v: wins.get(v[0], 0))
            functions[name] = version
            notes.append(f"function {name!r}: conflict unresolved, kept {child}'s version")

    if len(inp.instructions) <= 1:
        instructions = inp.instructions[0] if inp.instructions else ""
    else:
        given = str(reply.get("instructions") or "").strip()
        instructions = given or "\n\n".join(inp.instructions)
    module = Module(
        instructions=instructions, rules=tuple(rules), functions=tuple(functions.values())
    )
    fitted, cap_drops, fn_drops = fit_to_cap(module, size=size, cap=cap, covers=covers)
    return MergeResult(
        module=fitted,
        errors=tuple(errors),
        notes=tuple(notes),
        dropped=(*dropped, *cap_drops),
        dropped_functions=(*dropped_fns.values(), *fn_drops),
    )


def union_merge(
    inp: MergeInput,
    *,
    node_id: str,
    size: Callable[[Module], int],
    cap: int,
    successes: Mapping[str, int] | None = None,
) -> MergeResult:
    """Merge without an LLM (a failed call, an exhausted budget): keep every
    candidate, then fit the cap by evidence like any other merge."""
    return apply_merge(
        inp, {"decisions": []}, node_id=node_id, size=size, cap=cap, successes=successes
    )


def fit_to_cap(
    module: Module,
    *,
    size: Callable[[Module], int],
    cap: int,
    covers: Mapping[str, tuple[str, ...]] | None = None,
) -> tuple[Module, tuple[Drop, ...], tuple[Drop, ...]]:
    """``module`` cut down to ``size(module) <= cap``; the rules and functions cut.

    Rules go first, weakest evidence first (fewest subsets, then fewest
    trajectories; among equals the later rule). If the rules are gone and it
    still does not fit, functions go, largest first, and last the
    instructions are shortened. Each cut is recorded with its reason.
    """
    total = size(module)
    if total <= cap:
        return module, (), ()
    covers = covers or {}
    order = sorted(range(len(module.rules)), key=lambda i: (*module.rules[i].evidence, -i))
    keep = set(range(len(module.rules)))
    drops: list[Drop] = []
    current = module
    for i in order:
        if total <= cap:
            break
        r = module.rules[i]
        keep.discard(i)
        current = attrs.evolve(module, rules=tuple(module.rules[j] for j in sorted(keep)))
        total = size(current)
        subsets, trajectories = r.evidence
        drops.append(
            Drop(
                r.id,
                covers.get(r.id, (r.id,)),
                f"module cap: {cap} tokens; weakest evidence "
                f"({subsets} subsets, {trajectories} trajectories)",
                r.text,
            )
        )
    fn_drops: list[Drop] = []
    functions = sorted(current.functions, key=lambda f: -len(f.code))
    while total > cap and functions:
        f = functions.pop(0)
        current = attrs.evolve(current, functions=tuple(g for g in current.functions if g != f))
        total = size(current)
        fn_drops.append(Drop(f.name, (), f"module cap: {cap} tokens; largest function"))
    while total > cap and current.instructions:
        keep_chars = max(0, len(current.instructions) * cap // max(total, 1) - 16)
        current = attrs.evolve(current, instructions=current.instructions[:keep_chars].rstrip())
        total = size(current)
    return current, tuple(drops), tuple(fn_drops)
