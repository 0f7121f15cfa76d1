#!/usr/bin/env python3
"""The playbook alone: what FGO's module holds before any LLM edit.

Reads trajectories (JSONL with recorded turns, e.g. from ``fgo collect``),
mines the plays that raised the score in chunks of ``--chunk`` trajectories
(FGO mines each subset on its own, and merges add the tables up), and writes
``--base`` (default: the empty module) with the resulting ``playbook``
function. It makes no LLM call. Play the result with ``fgo eval`` to see what
the playbook alone is worth, and compare with FGO's module to see what the
LLM's rules add. It prints the plays, objects, and the five most seen plays.

    .venv/bin/fgo collect --tasks twc:train:0-99 --policy oracle --out train.jsonl
    .venv/bin/python scripts/playbook_only.py train.jsonl --out playbook.json
    .venv/bin/fgo eval --tasks twc:dev:0-19 --module playbook.json --baseline empty --max-steps 8
"""

from __future__ import annotations

import argparse
import json
import sys

from fgo_actors._core.io import atomic_write_json, load_module, load_trajectories
from fgo_actors._core.model import Module, turns_of
from fgo_actors._core.playbook import PLAYBOOK, merge_plays, mine, to_function


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trajectories")
    parser.add_argument("--out", required=True, help="module JSON to write")
    parser.add_argument("--base", help="module to add the playbook to (default: empty)")
    parser.add_argument("--chunk", type=int, default=6, help="trajectories mined together")
    args = parser.parse_args()
    if args.chunk < 1:
        parser.error("--chunk must be at least 1")
    trajectories = load_trajectories(args.trajectories)
    base = load_module(args.base) if args.base else Module()
    tables = [
        mine(turns_of(t) for t in trajectories[i : i + args.chunk])
        for i in range(0, len(trajectories), args.chunk)
    ]
    plays = merge_plays(tables)
    if not plays:
        print(f"{args.trajectories}: no plays: no recorded turns whose score rose", file=sys.stderr)
        return 1
    others = tuple(f for f in base.functions if f.name != PLAYBOOK)
    module = Module(
        instructions=base.instructions, rules=base.rules, functions=(*others, to_function(plays))
    )
    atomic_write_json(args.out, module.to_json())
    print(
        json.dumps(
            {
                "trajectories": len(trajectories),
                "chunks": len(tables),
                "plays": len(plays),
                "objects": sum(len(row) for row in plays.values()),
                "most_seen": [
                    {"steps": list(steps), "objects": sum(row.values())}
                    for steps, row in list(plays.items())[:5]
                ],
                "out": args.out,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
