#!/usr/bin/env python3
"""Measure FGO's merges on a large run: calls, the module cap, lineage, and cost.

The real ``run()`` pipeline (strategy "fgo") optimizes N trajectories (400 by
default: synthetic ones, or a JSONL file with ``--data``) against the scripted
loopback server ``fgo_actors.testing.FakeLLMServer``. Optimize calls get the
scripted reply (one rule per subset, citing its trajectories). Merge calls get
one of two policies (``--merge-policy``):

* ``consolidate`` (default): what a real model often replies: the children's
  rules consolidated into one general rule, with no ids in its lineage;
* ``keep``: the scripted default (no decisions while few rules, then combine).

It prints, and writes as one JSON line:
* merge calls (re-asks included) against subsets - 1, and their ratio;
* the final module's tokens against its cap, and the largest module of any
  merge node against the cap;
* child rules accounted for: at every merge node, each child rule is in the
  result (by id or lineage) or in a recorded drop; the count of those that are
  not (must be 0), and how many lineages were inferred;
* FGO's total prompt tokens over the tokens of the rendered trajectories.

    .venv/bin/python scripts/bench_merge.py
    .venv/bin/python scripts/bench_merge.py --n 400 --merge-policy keep
    .venv/bin/python scripts/bench_merge.py --data train.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from typing import Any

import structlog
import trio

from fgo_actors import (
    GatewayConfig,
    LLMGateway,
    RunConfig,
    RunState,
    Trajectory,
    load_trajectories,
    run,
)
from fgo_actors._core.prompts import render_module, render_trajectory
from fgo_actors.testing import (
    FakeLLMServer,
    consolidating_merge_policy,
    scripted_reply,
    synthetic_trajectory,
)


async def measure(trajectories: Sequence[Trajectory], args: argparse.Namespace) -> dict[str, Any]:
    policy = consolidating_merge_policy if args.merge_policy == "consolidate" else scripted_reply
    server = FakeLLMServer(policy=policy)
    config = RunConfig(
        context_tokens=args.context_tokens,
        subset_tokens=args.subset_tokens,
        module_tokens=args.module_tokens,
    )
    async with trio.open_nursery() as nursery:
        url: str = await nursery.start(server.serve)
        gateway_config = GatewayConfig(base_url=url, model="bench", max_concurrency=4)
        async with LLMGateway(gateway_config) as gateway:
            result = await run(trajectories, gateway, config, state=RunState())
            counter = gateway.counter
        nursery.cancel_scope.cancel()
    report = result.report
    if result.module is None or report.root is None:
        raise SystemExit(f"run failed: {report.status} {report.error}")
    cap = int(report.config.get("module_tokens") or args.module_tokens)
    nodes = {n.id: n for n in report.merge_tree}
    unaccounted = 0
    inferred = 0
    largest = 0
    for node in nodes.values():
        if node.kind != "merge":
            continue
        module = node.module
        largest = max(largest, counter.count(render_module(module)))
        carried = {r.id for r in module.rules} | {s for r in module.rules for s in r.merged_from}
        recorded = {s for d in node.stats.get("dropped_rules", []) for s in d["from"]}
        inferred += len(node.stats.get("lineage_inferred", []))
        for child in node.children:
            for rule in nodes[child].module.rules:
                if rule.id not in carried and rule.id not in recorded:
                    unaccounted += 1
    data_tokens = sum(
        render_trajectory(t, counter, config.subset_budget).tokens for t in trajectories
    )
    merges = int(report.llm_calls.get("merge", 0))
    # Counted with tiktoken from what the server received (the scripted server's
    # own usage figures are a characters/4 estimate).
    sent = sum(counter.count_messages(r.body["messages"]) for r in server.requests)
    return {
        "trajectories": len(trajectories),
        "merge_policy": args.merge_policy,
        "subsets": report.subsets,
        "merge_calls": merges,
        "merge_calls_over_subsets_minus_1": round(merges / max(1, report.subsets - 1), 3),
        "reasks": int(report.llm_calls.get("reasks", 0)),
        # Merges the LLM was not asked for (nothing to decide), and failed ones.
        "merges_without_llm": sum(1 for n in nodes.values() if n.method == "union"),
        "merge_fallbacks": sum(1 for f in report.failures if f.kind in ("merge", "budget")),
        "final_rules": len(result.module.rules),
        "final_module_tokens": counter.count(render_module(result.module)),
        "largest_merge_module_tokens": largest,
        "module_cap": cap,
        "child_rules_unaccounted": unaccounted,
        "lineages_inferred": inferred,
        "rules_dropped": sum(len(n.stats.get("dropped_rules", [])) for n in nodes.values()),
        "prompt_tokens": sent,
        "data_tokens": data_tokens,
        "prompt_over_data": round(sent / max(1, data_tokens), 3),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400, help="synthetic trajectories")
    parser.add_argument("--data", help="a trajectories JSONL file instead of synthetic ones")
    parser.add_argument("--merge-policy", choices=["consolidate", "keep"], default="consolidate")
    parser.add_argument("--context-tokens", type=int, default=8192)
    parser.add_argument("--subset-tokens", type=int, default=4096)
    parser.add_argument("--module-tokens", type=int, default=1000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    trajectories = (
        load_trajectories(args.data)
        if args.data
        else [synthetic_trajectory(i, steps=6, words=14) for i in range(args.n)]
    )
    row = trio.run(measure, trajectories, args)
    width = max(len(k) for k in row)
    for key, value in row.items():
        print(f"{key:<{width}}  {value}")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
