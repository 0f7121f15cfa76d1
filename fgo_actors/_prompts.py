"""Prompt templates and rendering of trajectories and modules for the LLM.

Rendering is deterministic, so a trajectory is measured once (by the
Partitioner) and the same text is reused in every prompt that holds it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ._errors import ReplyRejectedError
from ._model import Module, RenderedTrajectory, Trajectory
from ._tokens import TokenCounter

OPTIMIZE_SYSTEM = """\
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
Functions are Python source, run in a sandbox. The reference agent calls each \
one every turn as name(task, observation, valid_actions, history) and offers \
every list of actions it returns as one shortcut, e.g. \
[["open fridge", "put milk in fridge"]]; history is the [action, observation] \
pairs so far. Refer only to rule ids and function names that exist in the module. \
"evidence" is optional and names trajectories shown below. \
An empty "actions" list means: no change is needed."""

MERGE_SYSTEM = """\
You merge several versions of an LLM agent's MODULE into one. Each version was \
optimized on a different set of the agent's execution logs; together they \
hold everything learned. Produce ONE module that keeps every useful lesson: \
deduplicate rules that say the same thing, generalise near-duplicates into one \
rule, resolve conflicts in favour of the version with the stronger evidence \
(more successful trajectories), and keep instructions coherent.

Reply with one JSON object: {"analysis": "<brief reasoning>", "instructions": "...", \
"rules": [{"text": "...", "from": ["<child rule id>", ...]}], \
"functions": [{"name": "...", "description": "...", "parameters": {...}, "code": "..."}]}.
Every merged rule lists in "from" the ids of the child rules it came from. \
Use only rule ids shown below. "instructions" are the agent's own instructions \
(not these instructions to you): merge the versions' instructions, or reply \
with an empty string if they are all empty."""


def module_for_prompt(module: Module) -> dict[str, Any]:
    """The module as the LLM sees it: ids and texts, no provenance."""
    return {
        "instructions": module.instructions,
        "rules": [{"id": r.id, "text": r.text} for r in module.rules],
        "functions": [f.to_json() for f in module.functions],
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


def _step_text(step: Any) -> str:
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
    return " ".join(parts)


def _outcome_text(traj: Trajectory) -> str:
    o = traj.outcome
    text = "Outcome: " + ("SUCCESS" if o.success else "FAILURE")
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
    body = "\n".join(_step_text(s) for s in traj.steps)
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
    )


def optimize_messages(
    module: Module,
    items: Sequence[RenderedTrajectory],
    *,
    module_tokens: int,
) -> list[dict[str, str]]:
    successes = sum(1 for i in items if i.success)
    parts = [
        "Current module:\n<module>\n" + render_module(module) + "\n</module>",
        f"Keep the whole module under {module_tokens} tokens.",
        f"Trajectories ({len(items)}: {successes} succeeded, {len(items) - successes} failed):",
        *(i.text for i in items),
    ]
    parts.append("Reply with the JSON object now.")
    return [
        {"role": "system", "content": OPTIMIZE_SYSTEM},
        {"role": "user", "content": "\n\n".join(parts)},
    ]


def merge_messages(
    children: Sequence[tuple[str, Module, dict[str, Any]]], *, module_tokens: int
) -> list[dict[str, str]]:
    """``children`` are (node id, module, statistics of the subsets behind it)."""
    parts = [f"There are {len(children)} module versions to merge."]
    for node_id, module, stats in children:
        parts.append(
            f'<module version="{node_id}" stats="{json.dumps(stats, sort_keys=True)}">\n'
            + render_module(module)
            + "\n</module>"
        )
    parts.append(
        f"Keep the merged module under {module_tokens} tokens. Reply with the JSON object now."
    )
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
    """Tokens of an optimize prompt with no trajectories and a module of ``module_tokens``,
    including the room reserved for a re-ask note."""
    empty = optimize_messages(Module(), (), module_tokens=module_tokens)
    base = counter.count_messages(empty) - counter.count(render_module(Module()))
    return base + module_tokens + REASK_TOKENS + 16
