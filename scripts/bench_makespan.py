#!/usr/bin/env python3
"""Measure FGO's makespan against its critical path, and eager merging against a barrier.

A FakeLLMServer on loopback answers every call after a seeded, heavy-tailed
(lognormal, ``--sigma``) latency: optimize calls have mean 1.0 s and merge
calls mean 0.6 s, both multiplied by ``--scale``. The default scale, 0.2, keeps
the whole script well under a minute on trio's real clock while the ~0.1-0.2 s
of CPU one run spends (prompt rendering, token counting, JSON, schema checks,
the in-process server) stays small next to its latencies; at 0.05 that CPU
time, serialised on the one trio thread, is a third of the wall time and
inflates wall / lower bound.

Latencies are drawn from random generators seeded by the seed (``--seeds``)
and the request, so reruns and the eager and barrier runs see the same ones.
An optimize call's draw is keyed by a hash of its prompt (the subset's
trajectories): identical in every run. A merge call's prompt depends on which
trees happened to finish together, so with eager merging its content varies
from rerun to rerun with timing noise; by default (``--merge-keying
sequence``) the i-th merge request of a run gets the i-th draw of one seeded
stream, so every run, eager or barrier, sees exactly the same merge latencies,
in the order its merges start. ``--merge-keying content`` keys a merge by a
hash of the rules it merges (the subsets it covers) instead: the same merge
costs the same in any run, but differently shaped trees draw different
latencies, and with the heavy tail that moves the figures by tens of percent
from one rerun to the next.

The real ``run()`` pipeline (strategy "fgo") optimizes 64 synthetic
trajectories cut into 22 subsets (other --subset-tokens give other counts),
with ``max_concurrency`` 8 and 16, and
for each seed and concurrency:

* wall: the FGO run's wall time (``report.wall_seconds``), eager merging;
* lower bounds from the report's merge tree, as the longest leaf-to-root chain
  of durations: ``lb_tree`` uses each node's own finished_at - started_at
  (a leaf's includes waiting for a concurrency slot), ``lb_server`` uses the
  server-side latency of the node's request(s) from ``FakeLLMServer.requests``;
  ``lb_work`` is the sum of all server-side latencies / max_concurrency, and
  ``lb`` = max(lb_server, lb_work);
* wall / lb_server and wall / lb;
* the same run with ``RunConfig(eager_merge=False)`` (merges start only after
  every subset is optimized) on the same latencies: its wall time and the
  ratio barrier / eager.

A table is printed, then one JSON line with every figure. Run it from the
repository root::

    .venv/bin/python scripts/bench_makespan.py
    .venv/bin/python scripts/bench_makespan.py --seeds 5 --scale 0.05 --concurrency 4 8 16
    .venv/bin/python scripts/bench_makespan.py --merge-keying content
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import random
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import attrs
import structlog
import trio

from fgo_actors import (
    GatewayConfig,
    LLMGateway,
    MergeNode,
    Outcome,
    RunConfig,
    RunReport,
    RunState,
    Step,
    Trajectory,
    run,
)
from fgo_actors.testing import (
    FakeLLMServer,
    RecordedRequest,
    merge_prompt_rules,
    merge_prompt_versions,
    schema_name_of,
)

TASK_TYPES = ("put_away", "clean_and_place", "heat_and_place", "examine", "find_two")
_VOCABULARY = (
    "the a to of in on at with from into for and then again open close take put go "
    "look examine use heat cool clean place find drawer cabinet shelf countertop fridge "
    "microwave sink table desk bed lamp book mug plate knife apple potato bread egg key "
    "nothing happens you see closed is was now carrying error failed found missing "
    "cannot need must because next step plan check verify location state goal left"
)
_WORDS = tuple(_VOCABULARY.split())
_TRAJECTORY = re.compile(r"^### Trajectory (\S+)$", re.MULTILINE)


def _sentence(rng: random.Random, n_words: int) -> str:
    words = [
        rng.choice(_WORDS) if rng.random() < 0.85 else f"{rng.choice(_WORDS)}_{rng.randint(1, 99)}"
        for _ in range(n_words)
    ]
    return " ".join(words).capitalize() + "."


def make_trajectories(n: int, seed: int) -> list[Trajectory]:
    """``n`` distinct trajectories of roughly 500-1,000 tokens, 5 task types, ~60 % successes."""
    rng = random.Random(seed)
    out: list[Trajectory] = []
    for i in range(n):
        task_type = TASK_TYPES[i % len(TASK_TYPES)]
        success = rng.random() < 0.6
        steps = [Step(role="user", content=_sentence(rng, rng.randint(15, 30)))]
        for k in range(rng.randint(6, 12)):
            role: Literal["assistant", "tool"] = "assistant" if k % 2 == 0 else "tool"
            steps.append(Step(role=role, content=_sentence(rng, rng.randint(25, 70))))
        out.append(
            Trajectory(
                id=f"t{i:03d}",
                task=f"{task_type.replace('_', ' ')}: {_sentence(rng, rng.randint(6, 12))}",
                steps=tuple(steps),
                outcome=Outcome(success=success, score=1.0 if success else 0.0),
                metadata={"task_type": task_type},
            )
        )
    return out


# -- latencies ------------------------------------------------------------------


def _first_user(body: Mapping[str, Any]) -> str:
    for m in body.get("messages", []):
        if isinstance(m, dict) and m.get("role") == "user":
            return str(m.get("content") or "")
    return ""


def _merged_rule_texts(prompt: str) -> list[str]:
    return sorted(text for _id, text in merge_prompt_rules(prompt))


@attrs.define
class LatencyModel:
    """Seconds to wait before answering a request: lognormal with a seeded draw.

    An optimize call's draw is keyed by its prompt. A merge call's draw is keyed
    by the rules it merges (``merge_keying="content"``: the same subsets cost
    the same in any tree), or is the next draw of one seeded stream
    (``"sequence"``: the i-th merge request of a run gets the i-th draw, so an
    eager and a barrier run see exactly the same merge latencies, in the order
    their merges start). Make a new model per run.
    """

    seed: int
    scale: float
    sigma: float
    merge_keying: str = "sequence"
    optimize_mean: float = 1.0
    merge_mean: float = 0.6
    merges_seen: int = 0

    def key(self, body: Mapping[str, Any]) -> tuple[str, str]:
        prompt = _first_user(body)
        if schema_name_of(dict(body)) == "fgo_merge":
            if self.merge_keying == "sequence":
                self.merges_seen += 1
                return "merge", f"#{self.merges_seen}"
            rules = _merged_rule_texts(prompt)
            return "merge", "\n".join(rules) if rules else prompt
        return "optimize", prompt

    def __call__(self, body: dict[str, Any]) -> float:
        kind, content = self.key(body)
        digest = hashlib.sha256(f"{self.seed}|{kind}|{content}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "big"))
        mean = self.merge_mean if kind == "merge" else self.optimize_mean
        # A lognormal with this mean: mu = ln(mean) - sigma^2 / 2.
        mu = math.log(mean) - self.sigma**2 / 2
        return self.scale * rng.lognormvariate(mu, self.sigma)


# -- critical path ----------------------------------------------------------------


def _server_seconds(r: RecordedRequest) -> float:
    return (r.finished if r.finished is not None else r.started) - r.started


def server_durations(
    report: RunReport, requests: Sequence[RecordedRequest]
) -> tuple[dict[str, float], int]:
    """Per merge-tree node, the server-side seconds of its request(s) (re-asks summed).

    Leaves are matched by the first trajectory id of their optimize prompt (the
    scripted reply cites it as the rule's first piece of evidence), merges by the
    child versions named in their prompt. Returns the map and the number of
    nodes that could not be matched (they are left out of the map).
    """
    by_first_trajectory: dict[str, float] = {}
    by_children: dict[tuple[str, ...], float] = {}
    for r in requests:
        prompt = _first_user(r.body)
        if r.schema_name == "fgo_merge":
            children = tuple(merge_prompt_versions(prompt))
            by_children[children] = by_children.get(children, 0.0) + _server_seconds(r)
        else:
            ids = _TRAJECTORY.findall(prompt)
            if ids:
                by_first_trajectory[ids[0]] = by_first_trajectory.get(
                    ids[0], 0.0
                ) + _server_seconds(r)
    out: dict[str, float] = {}
    missing = 0
    for node in report.merge_tree:
        seconds: float | None = None
        if node.kind == "merge":
            seconds = by_children.get(tuple(node.children))
        else:
            evidence = [t for rule in node.module.rules for t in rule.trajectories[:1]]
            if evidence:
                seconds = by_first_trajectory.get(evidence[0])
        if seconds is None:
            missing += 1
        else:
            out[node.id] = seconds
    return out, missing


def longest_chain(
    nodes: Mapping[str, MergeNode], root: str, duration: Callable[[MergeNode], float]
) -> float:
    """The largest sum of durations on a leaf-to-root path of the merge tree."""
    memo: dict[str, float] = {}

    def chain(node_id: str) -> float:
        if node_id not in memo:
            node = nodes[node_id]
            below = max((chain(c) for c in node.children if c in nodes), default=0.0)
            memo[node_id] = duration(node) + below
        return memo[node_id]

    return chain(root)


def tree_depth(nodes: Mapping[str, MergeNode], root: str) -> int:
    node = nodes[root]
    return 1 + max((tree_depth(nodes, c) for c in node.children if c in nodes), default=0)


# -- one run ------------------------------------------------------------------------


async def one_run(
    trajectories: Sequence[Trajectory],
    config: RunConfig,
    latency: LatencyModel,
    concurrency: int,
) -> dict[str, Any]:
    server = FakeLLMServer(latency=latency)
    async with trio.open_nursery() as nursery:
        url: str = await nursery.start(server.serve)
        gateway_config = GatewayConfig(base_url=url, model="bench", max_concurrency=concurrency)
        async with LLMGateway(gateway_config) as gateway:
            start, cpu_start = time.perf_counter(), time.process_time()
            result = await run(trajectories, gateway, config, state=RunState())
            elapsed = time.perf_counter() - start
            cpu = time.process_time() - cpu_start
        nursery.cancel_scope.cancel()
    report = result.report
    if report.status != "ok" or report.root is None:
        raise SystemExit(f"run failed: {report.status} {report.error} {report.failures}")
    nodes = {n.id: n for n in report.merge_tree}
    root = report.root
    server_s, unmatched = server_durations(report, server.requests)
    total_server = sum(_server_seconds(r) for r in server.requests)
    lb_tree = longest_chain(nodes, root, lambda n: n.finished_at - n.started_at)
    lb_server = longest_chain(nodes, root, lambda n: server_s.get(n.id, 0.0))
    lb_work = total_server / concurrency
    lb = max(lb_server, lb_work)
    wall = report.wall_seconds
    leaves = [n for n in report.merge_tree if n.kind == "leaf"]
    # A leaf's own time beyond its server-side latency: waiting for a gateway slot
    # (merges hold some of them) plus client-side work.
    leaf_waits = [
        (n.finished_at - n.started_at) - server_s[n.id] for n in leaves if n.id in server_s
    ]
    return {
        "eager": config.eager_merge,
        "concurrency": concurrency,
        "wall_s": round(wall, 4),
        "elapsed_s": round(elapsed, 4),
        # CPU seconds of this process (client, actors and server) during run().
        "cpu_s": round(cpu, 4),
        "subsets": report.subsets,
        "merges": report.llm_calls["merge"],
        "llm_calls": dict(report.llm_calls),
        "failures": len(report.failures),
        "depth": tree_depth(nodes, root),
        "max_in_flight": report.max_in_flight,
        "server_requests": len(server.requests),
        "server_seconds_total": round(total_server, 4),
        "server_seconds_optimize": round(
            sum(_server_seconds(r) for r in server.requests if r.schema_name != "fgo_merge"), 4
        ),
        "server_seconds_merge": round(
            sum(_server_seconds(r) for r in server.requests if r.schema_name == "fgo_merge"), 4
        ),
        "unmatched_nodes": unmatched,
        # Run start to the first optimize call (partitioning, actor start-up) and
        # root finished to the end of run(): time no merge-tree node accounts for.
        "first_leaf_start_s": round(min(n.started_at for n in leaves), 4),
        "after_root_s": round(wall - nodes[root].finished_at, 4),
        "leaf_wait_s_total": round(sum(leaf_waits), 4),
        "leaf_wait_s_max": round(max(leaf_waits, default=0.0), 4),
        "lb_tree_s": round(lb_tree, 4),
        "lb_server_s": round(lb_server, 4),
        "lb_work_s": round(lb_work, 4),
        "lb_s": round(lb, 4),
        "wall_over_lb_server": round(wall / lb_server, 4) if lb_server else None,
        "wall_over_lb": round(wall / lb, 4) if lb else None,
        "wall_over_lb_tree": round(wall / lb_tree, 4) if lb_tree else None,
    }


async def bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    trajectories = make_trajectories(args.trajectories, args.data_seed)
    base = RunConfig(
        strategy="fgo",
        context_tokens=args.context_tokens,
        subset_tokens=args.subset_tokens,
        module_tokens=args.module_tokens,
        fan_in=2,
        seed=0,
    )
    rows: list[dict[str, Any]] = []
    for seed in range(args.seeds):
        for k in args.concurrency:
            runs = {}
            for eager_merge in (True, False):
                latency = LatencyModel(
                    seed=seed, scale=args.scale, sigma=args.sigma, merge_keying=args.merge_keying
                )
                config = attrs.evolve(base, eager_merge=eager_merge)
                runs[eager_merge] = await one_run(trajectories, config, latency, k)
            eager, barrier = runs[True], runs[False]
            row = {
                "seed": seed,
                "concurrency": k,
                "eager": eager,
                "barrier": barrier,
                "barrier_over_eager": round(barrier["wall_s"] / eager["wall_s"], 4),
            }
            rows.append(row)
            print(_row_line(row), flush=True)
    return rows


_HEADER = (
    f"{'seed':>4} {'K':>3} {'subs':>4} {'mrg':>3} {'dep':>3} "
    f"{'wall':>7} {'lb_tree':>7} {'lb_srv':>7} {'lb_work':>7} "
    f"{'w/lbsrv':>7} {'w/lb':>6} {'barrier':>7} {'b/e':>6} {'mrgS_e':>6} {'mrgS_b':>6}"
)


def _row_line(row: Mapping[str, Any]) -> str:
    e = row["eager"]
    return (
        f"{row['seed']:>4} {row['concurrency']:>3} {e['subsets']:>4} {e['merges']:>3} "
        f"{e['depth']:>3} {e['wall_s']:>7.3f} {e['lb_tree_s']:>7.3f} {e['lb_server_s']:>7.3f} "
        f"{e['lb_work_s']:>7.3f} {e['wall_over_lb_server']:>7.3f} {e['wall_over_lb']:>6.3f} "
        f"{row['barrier']['wall_s']:>7.3f} {row['barrier_over_eager']:>6.3f} "
        f"{e['server_seconds_merge']:>6.3f} {row['barrier']['server_seconds_merge']:>6.3f}"
    )


def summarise(rows: Sequence[Mapping[str, Any]], concurrency: Sequence[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in concurrency:
        mine = [r for r in rows if r["concurrency"] == k]
        out[str(k)] = {
            "median_wall_s": round(statistics.median(r["eager"]["wall_s"] for r in mine), 4),
            "median_barrier_wall_s": round(
                statistics.median(r["barrier"]["wall_s"] for r in mine), 4
            ),
            "median_wall_over_lb_server": round(
                statistics.median(r["eager"]["wall_over_lb_server"] for r in mine), 4
            ),
            "median_wall_over_lb": round(
                statistics.median(r["eager"]["wall_over_lb"] for r in mine), 4
            ),
            "median_barrier_over_eager": round(
                statistics.median(r["barrier_over_eager"] for r in mine), 4
            ),
        }
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--seeds", type=int, default=3, help="latency seeds 0..N-1")
    parser.add_argument("--scale", type=float, default=0.2, help="latency multiplier")
    parser.add_argument("--sigma", type=float, default=0.9, help="lognormal shape (tail weight)")
    parser.add_argument(
        "--merge-keying",
        choices=("content", "sequence"),
        default="sequence",
        help="the i-th merge request gets the i-th draw, or a draw keyed by the merged rules",
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--trajectories", type=int, default=64)
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the trajectories")
    parser.add_argument("--context-tokens", type=int, default=16384)
    parser.add_argument("--subset-tokens", type=int, default=5000)
    parser.add_argument("--module-tokens", type=int, default=2048)
    args = parser.parse_args(argv)

    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        cache_logger_on_first_use=True,
    )
    started = time.perf_counter()
    print(
        f"FGO makespan: {args.trajectories} trajectories, latencies lognormal(sigma "
        f"{args.sigma}) x scale {args.scale} (optimize mean {args.scale:g} s, merge mean "
        f"{0.6 * args.scale:g} s, merges keyed by {args.merge_keying}), fan-in 2; "
        "eager merging vs a barrier on the same latencies",
        flush=True,
    )
    print(
        "wall, lb_* and barrier in seconds; w/lbsrv = wall / lb_server, "
        "w/lb = wall / max(lb_server, lb_work), b/e = barrier wall / eager wall, "
        "mrgS_e/mrgS_b = server-side seconds of all merge calls (eager/barrier)",
        flush=True,
    )
    print(_HEADER, flush=True)
    rows = trio.run(bench, args)
    summary = summarise(rows, args.concurrency)
    for k, s in summary.items():
        print(
            f"K={k}: median wall {s['median_wall_s']:.3f} s, wall/lb_server "
            f"{s['median_wall_over_lb_server']:.3f}, wall/lb {s['median_wall_over_lb']:.3f}, "
            f"barrier {s['median_barrier_wall_s']:.3f} s, barrier/eager "
            f"{s['median_barrier_over_eager']:.3f}"
        )
    total = time.perf_counter() - started
    print(f"done in {total:.1f} s")
    print(
        json.dumps(
            {
                "config": {
                    k: (list(v) if isinstance(v, list) else v) for k, v in vars(args).items()
                },
                "summary": summary,
                "runs": rows,
                "seconds": round(total, 2),
            },
            sort_keys=True,
        )
    )


if __name__ == "__main__":
    main()
