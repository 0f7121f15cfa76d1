"""A module as people read it: one Markdown page, each rule with the evidence
behind it. (What agents load is ``Module.system_prompt`` and
``Module.openai_tools``.)"""

from __future__ import annotations

import json

from .model import Module, Rule

# Trajectory ids listed per rule before the rest are only counted.
SHOWN_IDS = 5


def _provenance(rule: Rule) -> str:
    if not (rule.subsets or rule.trajectories or rule.merged_from):
        return "no recorded evidence (not learned from logs)"
    parts = [f"{len(rule.subsets)} subsets", f"{len(rule.trajectories)} trajectories"]
    if rule.merged_from:
        inferred = " (inferred)" if rule.lineage_inferred else ""
        parts.append(f"merged from {', '.join(rule.merged_from)}{inferred}")
    shown = ", ".join(rule.trajectories[:SHOWN_IDS])
    more = len(rule.trajectories) - SHOWN_IDS
    if shown:
        parts.append(f"e.g. {shown}" + (f" and {more} more" if more > 0 else ""))
    return "; ".join(parts)


def module_markdown(module: Module, *, title: str = "Module") -> str:
    """``module`` as a Markdown page: instructions, rules with provenance, and
    functions with their parameters and code."""
    lines = [f"# {title}", ""]
    lines += ["## Instructions", "", module.instructions.strip() or "(none)", ""]
    lines += [f"## Rules ({len(module.rules)})", ""]
    if not module.rules:
        lines += ["(none)", ""]
    for rule in module.rules:
        lines += [f"- **{rule.id}**: {rule.text}", f"  - {_provenance(rule)}"]
    if module.rules:
        lines.append("")
    lines += [f"## Functions ({len(module.functions)})", ""]
    if not module.functions:
        lines += ["(none)", ""]
    for fn in module.functions:
        lines += [f"### `{fn.name}`", "", fn.description or "(no description)", ""]
        lines += ["Parameters:", "", "```json", json.dumps(fn.parameters, indent=2), "```", ""]
        lines += ["```python", fn.code.rstrip(), "```", ""]
    return "\n".join(lines).rstrip() + "\n"
