"""Prompt templates and rendering of trajectories and modules for the LLM.

Rendering is deterministic, so a trajectory is measured once (by the
Partitioner) and the same text is reused in every prompt that holds it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from .edits import MergeInput
from .errors import ReplyRejectedError
from .model import FunctionSpec, Module, RenderedTrajectory, Trajectory, turns_of
from .playbook import is_playbook
from .tokens import TokenCounter, default_counter

# The function contract the agent calls, with one small worked example; shown
# to the optimizer and to the call that fixes a function that failed its checks.
FUNCTION_CONTRACT = """\
Functions (Python, sandboxed) run each turn as name(task, observation, \
valid_actions, history) (history: [action, observation] pairs) and return action \
lists, each offered as one shortcut. Put knowledge in a dict and keep the logic \
generic over valid_actions, not sequences behind task == tests. Example:
THEN = {"key": ["use key"]}  # a word in an action -> what followed it in successes
def follow(task, observation, valid_actions, history):
    return [[a] + THEN[w] for a in valid_actions for w in THEN if w in a]"""

OPTIMIZE_SYSTEM = (
    """\
You improve an LLM agent from its execution logs. The agent is steered by a \
MODULE: instructions, numbered rules learned from experience, and tool functions.

You get the current module and a set of trajectories (what the agent saw and \
did, and whether it succeeded). Find what made successful runs succeed and \
failing runs fail, then edit the module so the agent does better on tasks \
like these. Prefer a few general, actionable rules over many narrow ones. \
Keep rules short and imperative. Do not repeat an existing rule.

Reply with one JSON object: {"analysis": "<brief reasoning>", "actions": [...]}.
Each action is one of:
  {"op": "set_instructions", "text": "..."}
  {"op": "add_rule", "text": "...", "evidence": ["<trajectory id>", ...]}
  {"op": "revise_rule", "id": "<existing rule id>", "text": "..."}
  {"op": "remove_rule", "id": "<existing rule id>"}
  {"op": "add_function", "function": {"name": "...", "description": "...", \
"parameters": {<JSON Schema>}, "code": "<python source>"}}
  {"op": "revise_function", "function": {...same shape, existing name...}}
  {"op": "remove_function", "name": "<existing function name>"}
Refer only to rule ids and function names that exist in the module. \
"evidence" is optional and names trajectories shown below. \
An empty "actions" list means: no change is needed.

"""
    + FUNCTION_CONTRACT
)

FIX_FUNCTION_SYSTEM = (
    """\
You fix the tool functions of an LLM agent's module: each failed the checks it \
must pass before the agent may call it.

"""
    + FUNCTION_CONTRACT
    + """

Reply with one JSON object: {"analysis": "<brief>", "actions": [{"op": \
"add_function", "function": {"name": "<the same name>", "description": "...", \
"parameters": {"type": "object", "properties": {...}}, "code": "<python source>"}}]}, \
one action per function you fix. An empty "actions" list means: leave them out."""
)


MERGE_SYSTEM = """\
You consolidate what an LLM agent learned from different sets of its execution \
logs. You get its RULES, each with an id and its evidence (how many log subsets \
and trajectories support it). Rules you do not mention are KEPT unchanged, so \
only name the rules you want to change:
  {"op": "combine", "ids": ["<id>", "<id>", ...], "text": "<one general rule>"} \
replaces rules that say the same thing, or special cases of one lesson, with one \
short imperative rule;
  {"op": "drop", "id": "<id>", "reason": "..."} removes a rule (or a function, \
by name) that is wrong, contradicted by one with more evidence, or too narrow \
to help.
Reply with one JSON object: {"analysis": "<brief>", "decisions": [...]}. \
Only when asked, also give "instructions" (the agent's merged instructions) or \
"functions" (one merged version of each conflicting function, same JSON shape)."""


def module_for_prompt(module: Module) -> dict[str, Any]:
    """The module as the LLM sees it: ids and texts, no provenance, and no
    playbook: code writes it from the scores and the LLM may not edit it.
    (Shown by name and description, the 1.5B model copied both into rules.)"""
    return {
        "instructions": module.instructions,
        "rules": [{"id": r.id, "text": r.text} for r in module.rules],
        "functions": [f.to_json() for f in module.functions if not is_playbook(f)],
    }


def render_module(module: Module) -> str:
    return json.dumps(module_for_prompt(module), ensure_ascii=False, indent=1)


def accept_edits(
    counter: TokenCounter, module: Module, errors: Sequence[str], cap: int, advice: str
) -> Module:
    """``module`` if its reply had no errors and it fits ``cap`` tokens as the LLM
    sees it; else ReplyRejectedError, worded for a re-ask."""
    if errors:
        raise ReplyRejectedError("; ".join(errors))
    size = counter.count(render_module(module))
    if size > cap:
        raise ReplyRejectedError(
            f"the resulting module is {size} tokens, above the limit of {cap}; {advice}"
        )
    return module


def _step_score(step: Any) -> float | None:
    """The task score an assistant step records after its actions (its
    ``score`` extra field, as the reference agent and the oracle write it), or None."""
    if step.role != "assistant":
        return None
    score = step.extra.get("score")
    if isinstance(score, bool) or not isinstance(score, int | float):
        return None
    return float(score)


def _step_text(step: Any, score_before: float | None = None) -> str:
    """One step as a line; an assistant step that recorded a score different
    from ``score_before`` ends with the change, e.g. ``[score +0.25 -> 0.5]``."""
    head = f"[{step.role}" + (f":{step.name}" if step.name else "") + "]"
    parts = [head]
    if step.content:
        parts.append(step.content)
    for call in step.tool_calls or ():
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict):
            args = fn.get("arguments", "")
            if not isinstance(args, str):
                args = json.dumps(args, ensure_ascii=False)
            parts.append(f"-> call {fn.get('name', '?')}({args})")
        else:
            parts.append(f"-> call {json.dumps(call, ensure_ascii=False)}")
    score = _step_score(step)
    if score is not None and score_before is not None and abs(score - score_before) > 1e-9:
        parts.append(f"[score {score - score_before:+g} -> {score:g}]")
    return " ".join(parts)


# Repeated step texts longer than this are shown as a reference to the first.
REPEAT_MIN_CHARS = 80


def _steps_text(steps: Sequence[Any]) -> str:
    """The steps, one per line, with the score changes the optimizer should see:
    which actions earned (or lost) points. An episode starts at score 0; steps
    that record no score leave it as it was."""
    lines: list[str] = []
    score = 0.0
    seen: dict[tuple[str, str], int] = {}
    for n, step in enumerate(steps, start=1):
        content = step.content or ""
        first = seen.setdefault((step.role, content), n)
        if first != n and len(content) > REPEAT_MIN_CHARS and not step.tool_calls:
            # A long text seen before in this episode (a room described again)
            # is named, not repeated: tokens are paid in every prompt.
            step = attrs.evolve(step, content=f"(same text as step {first})")
        lines.append(_step_text(step, score))
        recorded = _step_score(step)
        if recorded is not None:
            score = recorded
    return "\n".join(lines)


_OUTCOME_HEAD = "Outcome: "
_LINE_HEAD = re.compile(r"^(\[[^\]\n]{1,40}\] |[A-Z][A-Za-z ]{0,30}: )")


def _shareable(line: str) -> bool:
    """Long enough to be worth a reference, and not an outcome: each
    trajectory's own result always shows in full."""
    return len(line) > REPEAT_MIN_CHARS and not line.startswith(_OUTCOME_HEAD)


def share_repeated_lines(items: Sequence[RenderedTrajectory]) -> list[str]:
    """The texts of ``items`` for one prompt, each line longer than
    ``REPEAT_MIN_CHARS`` that an earlier trajectory of the prompt already
    showed named instead of repeated: ``[system] (same as in trajectory t1)``.

    Logs repeat the same long texts in every episode (the agent's system
    prompt, the task statement); shown once, they are not paid for again in
    every trajectory. A line keeps its head (a step's ``[role]``, a header's
    ``Task:``); lines without one that follow on from the line above in the
    same earlier trajectory join its reference (``(same 3 lines as in
    trajectory t1)``). The first trajectory is shown whole, every outcome
    line in full, and a text repeated inside one trajectory is left to its
    rendering, which names repeated steps by number."""
    first_seen: dict[str, tuple[str, int]] = {}
    texts: list[str] = []
    for item in items:
        lines = item.text.split("\n")
        out: list[str] = []
        # The reference being written: its index in ``out``, head, source
        # trajectory, the source's last line covered, and lines covered.
        run: tuple[int, str, str, int, int] | None = None
        for line in lines:
            source = first_seen.get(line) if _shareable(line) else None
            if source is None:
                out.append(line)
                run = None
                continue
            head_match = _LINE_HEAD.match(line)
            if head_match is None and run is not None and source == (run[2], run[3] + 1):
                at, head, src, _, count = run
                run = (at, head, src, source[1], count + 1)
                out[at] = f"{head}(same {count + 1} lines as in trajectory {src})"
                continue
            head = head_match.group(1) if head_match else ""
            run = (len(out), head, source[0], source[1], 1)
            out.append(f"{head}(same as in trajectory {source[0]})")
        for n, line in enumerate(lines):
            if _shareable(line):
                first_seen.setdefault(line, (item.id, n))
        texts.append("\n".join(out))
    return texts


def _outcome_text(traj: Trajectory) -> str:
    o = traj.outcome
    text = _OUTCOME_HEAD + ("SUCCESS" if o.success else "FAILURE")
    if o.score is not None:
        text += f" (score {o.score:g})"
    if o.feedback:
        text += f". Feedback: {o.feedback}"
    return text


def group_key_of(traj: Trajectory, key: str) -> str:
    if traj.metadata is not None and key in traj.metadata:
        return str(traj.metadata[key])
    return ""


# Below this a trajectory cannot even be cut down to a marker.
MIN_RENDER_TOKENS = 16


def render_trajectory(
    traj: Trajectory, counter: TokenCounter, max_tokens: int, *, group_key: str = "task_type"
) -> RenderedTrajectory:
    """Render and measure one trajectory; truncate the middle when it exceeds ``max_tokens``.

    The header (id, task) and the outcome are always kept; steps keep their
    head and tail.
    """
    if max_tokens < MIN_RENDER_TOKENS:
        raise ValueError(f"max_tokens must be at least {MIN_RENDER_TOKENS}, got {max_tokens}")
    header = f"### Trajectory {traj.id}\nTask: {traj.task}"
    if traj.task_type:
        header += f"\nTask type: {traj.task_type}"
    body = _steps_text(traj.steps)
    outcome = _outcome_text(traj)
    text = f"{header}\nSteps:\n{body}\n{outcome}"
    tokens = counter.count(text)
    truncated = False
    if tokens > max_tokens:
        truncated = True
        fixed = counter.count(f"{header}\nSteps:\n\n{outcome}") + 2
        room = max_tokens - fixed
        while True:
            if room <= 0:
                # Even header + outcome alone do not fit: cut the task text too.
                text = counter.truncate_middle(f"{header}\n{outcome}", max_tokens, " [...] ")
            else:
                omitted = f"\n[... {len(traj.steps)} steps, middle omitted to fit budget ...]\n"
                short = counter.truncate_middle(body, room, omitted)
                text = f"{header}\nSteps:\n{short}\n{outcome}"
            tokens = counter.count(text)
            if tokens <= max_tokens or room <= 0:
                break
            room -= tokens - max_tokens + 1
        while tokens > max_tokens:  # pathological re-tokenisation: hard cut
            text = counter.truncate_middle(text, max_tokens - (tokens - max_tokens), " [...] ")
            tokens = counter.count(text)
    return RenderedTrajectory(
        id=traj.id,
        text=text,
        tokens=tokens,
        success=traj.outcome.success,
        group=group_key_of(traj, group_key),
        truncated=truncated,
        task=traj.task,
        turns=turns_of(traj),
        score=traj.outcome.score,
    )


# Cap on the line that lists the actions which earned score (reserved in
# ``optimize_overhead_tokens``), and on one action in it, in characters.
SCORING_TOKENS = 32
_SCORING_ACTION_CHARS = 60


def scoring_actions(items: Sequence[RenderedTrajectory]) -> list[str]:
    """The actions played on recorded turns where the score rose, deduplicated,
    in first-seen order (all the actions of a macro turn)."""
    seen: dict[str, None] = {}
    for item in items:
        before = 0.0
        for turn in item.turns:
            if turn.score is None:
                continue
            if turn.score > before:
                seen.update(dict.fromkeys(a[:_SCORING_ACTION_CHARS] for a in turn.played))
            before = turn.score
    return list(seen)


def scoring_line(items: Sequence[RenderedTrajectory], counter: TokenCounter) -> str | None:
    """One line listing ``scoring_actions``, as many as fit SCORING_TOKENS; None if none."""
    head = "Actions that raised the score in these runs: "
    shown: list[str] = []
    for action in scoring_actions(items):
        if counter.count(head + json.dumps([*shown, action], ensure_ascii=False)) > SCORING_TOKENS:
            break
        shown.append(action)
    return head + json.dumps(shown, ensure_ascii=False) if shown else None


def _ask_with_scoring(
    system: str,
    parts: list[str],
    items: Sequence[RenderedTrajectory],
    counter: TokenCounter | None,
) -> list[dict[str, str]]:
    """``system``, then ``parts`` with the scoring line of ``items`` (if any)
    and the closing request, as one user message."""
    scoring = scoring_line(items, counter or default_counter())
    tail = [scoring] if scoring is not None else []
    return [
        {"role": "system", "content": system},
        {
            "role": "user",
            "content": "\n\n".join([*parts, *tail, "Reply with the JSON object now."]),
        },
    ]


def optimize_messages(
    module: Module,
    items: Sequence[RenderedTrajectory],
    *,
    module_tokens: int,
    counter: TokenCounter | None = None,
) -> list[dict[str, str]]:
    """The optimize prompt: the module, the trajectories and, when their turns
    were recorded, the actions that earned score (measured with ``counter``,
    by default ``default_counter()``)."""
    successes = sum(1 for i in items if i.success)
    parts = [
        "Current module:\n<module>\n" + render_module(module) + "\n</module>",
        f"Keep the whole module under {module_tokens} tokens.",
        f"Trajectories ({len(items)}: {successes} succeeded, {len(items) - successes} failed):",
        *share_repeated_lines(items),
    ]
    return _ask_with_scoring(OPTIMIZE_SYSTEM, parts, items, counter)


def fix_function_messages(
    functions: Sequence[FunctionSpec],
    problems: Mapping[str, Sequence[str]],
    items: Sequence[RenderedTrajectory],
    counter: TokenCounter | None = None,
) -> list[dict[str, str]]:
    """The short prompt that asks for ``functions`` fixed: each one as the
    optimizer wrote it with its ``problems`` (by name), and the actions that
    earned score in ``items``, but not the trajectories themselves. A
    function's contract and its errors are enough to fix it; the subset's
    whole prompt again would cost several times more."""
    parts = ["These functions failed their checks:"]
    for fn in functions:
        listed = "\n".join(f"- {p}" for p in problems.get(fn.name, ()))
        parts.append(
            "<function>\n"
            + json.dumps(fn.to_json(), ensure_ascii=False)
            + f"\n</function>\nProblems:\n{listed}"
        )
    return _ask_with_scoring(FIX_FUNCTION_SYSTEM, parts, items, counter)


def merge_messages(
    inp: MergeInput,
    children: Sequence[tuple[str, dict[str, Any]]],
    *,
    module_tokens: int,
    module_size: int,
) -> list[dict[str, str]]:
    """The merge prompt: candidate rules with evidence, and only what conflicts.

    ``children`` are (node id, statistics of the subsets behind it);
    ``module_size`` is the size of the module if every rule were kept.
    """
    parts = [
        "\n".join(f"Version {cid}: {json.dumps(stats, sort_keys=True)}" for cid, stats in children)
    ]
    lines = [
        f"- [{r.id}] ({len(r.subsets)} subsets, {len(r.trajectories)} runs) {r.text}"
        for r in inp.rules
    ]
    parts.append("Rules:\n" + ("\n".join(lines) if lines else "(none)"))
    editable = [f for f in inp.functions if not is_playbook(f)]
    if editable:
        parts.append(
            "Functions (kept unless dropped):\n"
            + "\n".join(f"- {f.name}: {f.description}" for f in editable)
        )
    if len(inp.instructions) > 1:
        parts.append(
            'The versions\' instructions differ; give merged "instructions":\n'
            + "\n".join(f"<instructions>\n{t}\n</instructions>" for t in inp.instructions)
        )
    for c in inp.conflicts:
        versions = "\n".join(
            f'<function name="{c.name}" version="{cid}">\n'
            + json.dumps(f.to_json(), ensure_ascii=False)
            + "\n</function>"
            for cid, f in c.versions
        )
        parts.append(
            f"Function {c.name!r} has {len(c.versions)} versions; give one merged version "
            f'in "functions":\n{versions}'
        )
    if module_size > module_tokens:
        parts.append(
            f"Kept as they are, these make a module of {module_size} tokens, over its limit "
            f"of {module_tokens}: combine or drop rules to save about "
            f"{module_size - module_tokens} tokens, or the rules with least evidence are cut."
        )
    parts.append("Reply with the JSON object now.")
    return [
        {"role": "system", "content": MERGE_SYSTEM},
        {"role": "user", "content": "\n\n".join(parts)},
    ]


# Separator and boundary slack per trajectory in a prompt ("\n\n" plus BPE merges).
PER_ITEM_SLACK = 3
# Room kept free for the note a re-ask appends (see LLMGateway).
REASK_TOKENS = 160


def reask_message(counter: TokenCounter, error: str) -> dict[str, str]:
    """The user message appended on a re-ask; never more than REASK_TOKENS tokens."""
    head = "Your previous reply was rejected: "
    tail = "\nReply again with one corrected JSON object."
    room = REASK_TOKENS - counter.count(head + tail) - 8
    return {"role": "user", "content": head + counter.truncate_middle(error, room, " ... ") + tail}


def optimize_overhead_tokens(counter: TokenCounter, module_tokens: int) -> int:
    """Tokens of an optimize prompt with no trajectories and a module of ``module_tokens``
    (as the prompt shows it), including the room reserved for a re-ask note."""
    empty = optimize_messages(Module(), (), module_tokens=module_tokens)
    base = counter.count_messages(empty) - counter.count(render_module(Module()))
    return base + module_tokens + REASK_TOKENS + SCORING_TOKENS + 16
