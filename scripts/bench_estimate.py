#!/usr/bin/env python3
"""How long a finished `fgo bench` would take on a machine with another speed.

The bench's time is nearly all the local model's, and machines of one kind
differ a lot (26 prompt and 8 generated tokens/s on the slowest seen here,
65-128 and 25-33 on the fastest). This reads ``bench.json`` from a bench's
``--out-dir`` and projects its wall time to the target rates:

* each optimization: its paid prompt tokens at ``--prompt-rate`` plus its
  completion tokens at ``--gen-rate`` (what it paid, so replays are left out);
* held-out play: its measured wall time scaled by ``--machine-prompt-rate``
  over ``--prompt-rate``. An agent turn generates a few tokens and is mostly
  prompt evaluation of the new turn (llama.cpp reuses the cached prefix), and
  the prompt tokens a turn sends say nothing of what was evaluated, so the
  measured time is scaled rather than the tokens counted. The environment's
  and the sandbox's share of that time does not slow down with the model, so
  this errs on the long side.

``--machine-prompt-rate`` is the rate the bench's machine measured, as printed
by ``scripts/bench_local_llm.py --skip-runs`` run beside the bench.

    .venv/bin/python scripts/bench_estimate.py bench-out --machine-prompt-rate 67
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def estimate(
    bench: dict[str, Any], *, prompt_rate: float, gen_rate: float, machine_prompt_rate: float
) -> dict[str, Any]:
    """Projected seconds by phase, and measured ones, from a ``bench.json``."""
    optimize: dict[str, float] = {}
    play = 0.0
    for arm in bench["arms"]:
        opt = arm.get("optimization")
        if opt:
            optimize[arm["name"]] = (
                opt["prompt_tokens"] / prompt_rate + opt["completion_tokens"] / gen_rate
            )
        evaluation = arm.get("evaluation")
        if evaluation:
            play += float(evaluation["wall_seconds"])
    played = play * machine_prompt_rate / prompt_rate
    return {
        "measured_wall_s": float(bench["wall_seconds"]),
        "optimize_s": {name: round(s, 1) for name, s in optimize.items()},
        "held_out_measured_s": round(play, 1),
        "held_out_s": round(played, 1),
        "total_s": round(sum(optimize.values()) + played, 1),
        "rates": {
            "prompt": prompt_rate,
            "generated": gen_rate,
            "machine_prompt": machine_prompt_rate,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="the bench's --out-dir")
    parser.add_argument("--prompt-rate", type=float, default=26.0, help="target prompt tokens/s")
    parser.add_argument("--gen-rate", type=float, default=8.0, help="target generated tokens/s")
    parser.add_argument(
        "--machine-prompt-rate",
        type=float,
        required=True,
        help="prompt tokens/s of the machine that ran the bench",
    )
    args = parser.parse_args(argv)
    path = args.out_dir / "bench.json"
    try:
        bench = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        print(f"error: {path}: {e}", file=sys.stderr)
        return 2
    if min(args.prompt_rate, args.gen_rate, args.machine_prompt_rate) <= 0:
        print("error: every rate must be above 0", file=sys.stderr)
        return 2
    got = estimate(
        bench,
        prompt_rate=args.prompt_rate,
        gen_rate=args.gen_rate,
        machine_prompt_rate=args.machine_prompt_rate,
    )
    print(f"measured: {got['measured_wall_s'] / 60:.1f} min")
    for name, s in got["optimize_s"].items():
        print(f"optimize {name:<12} {s / 60:6.1f} min at the target rates")
    print(
        f"held-out play       {got['held_out_s'] / 60:6.1f} min "
        f"(measured {got['held_out_measured_s'] / 60:.1f})"
    )
    print(f"total               {got['total_s'] / 60:6.1f} min")
    print(json.dumps(got))
    return 0


if __name__ == "__main__":
    sys.exit(main())
