#!/usr/bin/env python3
"""Measure the library's own overhead: the LLM gateway, the partitioner and memory.

Three figures, each printed as plain text lines, then all of them as one JSON
line at the end:

a. Gateway overhead. A zero-latency FakeLLMServer on loopback (same process,
   same trio run) answers N calls made through ``LLMGateway.chat(role,
   messages)`` with K concurrent callers, and the same N calls made with a raw
   ``httpx.AsyncClient.post`` of the identical JSON body (same K, same
   connection-pool size, the reply parsed as JSON in both). Calls/s of each and
   the ratio gateway/raw (goal: >= 0.90). The two are measured in alternating
   rounds (the order flips each round) after a warm-up, because the machine is
   shared and noisy; every round is printed and the median round is the
   headline (the best is printed too). Server and client share one process, so
   the absolute calls/s are low; only the side-by-side ratio matters.

b. Partition throughput. 10,000 synthetic trajectories of about 1,000 tokens
   (seeded; 5 task types in metadata, about 60 % successes, a few long ones
   that need truncation) are rendered and measured (``render_all`` with
   ``default_counter()``, inside ``trio.run``) and packed (``make_subsets``).
   Generation is not timed. Trajectories/s overall (goal: >= 1,000/s), render
   and pack times, subsets produced and total tokens; best and median of
   ``--partition-repeats`` passes.

c. Peak memory. The process's peak RSS (``ru_maxrss``, KiB on Linux) after the
   timed partition passes, next to the RSS before the trajectories were
   generated, and the tracemalloc peak of one partition pass run separately
   (tracemalloc slows Python down, so that pass is not timed; its peak counts
   the Python allocations of rendering and packing only, not the input
   trajectories, which exist before it starts).

Run it from the repository root::

    .venv/bin/python scripts/bench_overhead.py
    .venv/bin/python scripts/bench_overhead.py --calls 5000 --concurrency 16 --rounds 5
    .venv/bin/python scripts/bench_overhead.py --skip-gateway --trajectories 20000
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import resource
import statistics
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import httpx
import structlog
import trio

from fgo_actors import (
    GatewayConfig,
    LLMGateway,
    Outcome,
    RunConfig,
    Step,
    Subset,
    TokenCounter,
    Trajectory,
    default_counter,
)
from fgo_actors._core.model import RenderedTrajectory
from fgo_actors._core.partition import item_budget
from fgo_actors._core.prompts import PER_ITEM_SLACK, optimize_overhead_tokens
from fgo_actors.actors.partitioner import make_subsets, render_all
from fgo_actors.testing import FakeLLMServer

TASK_TYPES = ("put_away", "clean_and_place", "heat_and_place", "examine", "find_two")

# A small vocabulary of agent-log words plus generated identifiers: varied
# enough that BPE sees realistic text, not one repeated token.
_VOCABULARY = (
    "the a an to of in on at with from into for and or but not then again first "
    "open close take put go look inventory examine use heat cool clean place find "
    "drawer cabinet shelf countertop fridge microwave sink table desk bed sofa "
    "lamp book mug plate knife apple potato tomato bread egg key cellphone pen "
    "pencil laptop pillow towel soap bottle vase box bowl cup spoon fork pan pot "
    "nothing happens you see closed is are was now arrive carrying there here "
    "error failed success result found missing already cannot need should must "
    "because therefore next step plan check verify location state before after "
    "observation action thought reasoning current goal remaining items left right"
)
_WORDS = tuple(_VOCABULARY.split())
_SYLLABLE_TEXT = "ka to ri ne mo sa lu vi de pa ho ge fi zu xo qui bra ste lin dor"
_SYLLABLES = tuple(_SYLLABLE_TEXT.split())


def _identifier(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4)))


def _sentence(rng: random.Random, n_words: int) -> str:
    words: list[str] = []
    for _ in range(n_words):
        r = rng.random()
        if r < 0.78:
            words.append(rng.choice(_WORDS))
        elif r < 0.9:
            words.append(_identifier(rng))
        elif r < 0.96:
            words.append(str(rng.randint(0, 9999)))
        else:
            words.append(f"{_identifier(rng)}_{rng.randint(1, 99)}")
    return " ".join(words).capitalize() + "."


def make_trajectory(rng: random.Random, index: int, *, long_fraction: float) -> Trajectory:
    """One synthetic trajectory of about 1,000 cl100k tokens (longer with ``long_fraction``)."""
    task_type = TASK_TYPES[index % len(TASK_TYPES)]
    success = rng.random() < 0.6
    n_steps = 10 if rng.random() >= long_fraction else rng.randint(35, 60)
    steps: list[Step] = [
        Step(role="system", content="You are a household agent. Act with one command per turn."),
        Step(role="user", content=_sentence(rng, rng.randint(20, 40))),
    ]
    for k in range(n_steps - 2):
        if k % 2 == 0:
            tool_calls: tuple[dict[str, Any], ...] | None = None
            if rng.random() < 0.5:
                args = json.dumps({"target": _identifier(rng), "n": rng.randint(1, 9)})
                tool_calls = (
                    {
                        "id": f"call_{index}_{k}",
                        "type": "function",
                        "function": {
                            "name": rng.choice(("act", "look", "search")),
                            "arguments": args,
                        },
                    },
                )
            steps.append(
                Step(
                    role="assistant",
                    content=_sentence(rng, rng.randint(35, 65)),
                    tool_calls=tool_calls,
                )
            )
        else:
            steps.append(Step(role="tool", content=_sentence(rng, rng.randint(70, 120))))
    return Trajectory(
        id=f"t{index:06d}",
        task=f"{task_type.replace('_', ' ')}: " + _sentence(rng, rng.randint(8, 16)),
        steps=tuple(steps),
        outcome=Outcome(
            success=success,
            score=1.0 if success else round(rng.random() * 0.5, 2),
            feedback=None if success else _sentence(rng, rng.randint(6, 14)),
        ),
        metadata={"task_type": task_type, "env": "synthetic"},
    )


def make_trajectories(n: int, seed: int, *, long_fraction: float) -> list[Trajectory]:
    rng = random.Random(seed)
    return [make_trajectory(rng, i, long_fraction=long_fraction) for i in range(n)]


# -- memory helpers -------------------------------------------------------------


def max_rss_kib() -> int:
    """Peak resident set size of this process so far (KiB on Linux)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def current_rss_kib() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


# -- a. gateway overhead --------------------------------------------------------


def _constant_reply(body: dict[str, Any]) -> str:
    return '{"analysis": "ok", "actions": []}'


def _prompt_messages(tokens: int, counter: TokenCounter) -> list[dict[str, str]]:
    rng = random.Random(1234)
    text = ""
    while counter.count(text) < tokens:
        text += _sentence(rng, 40) + "\n"
    return [
        {"role": "system", "content": "You improve an LLM agent from its execution logs."},
        {"role": "user", "content": text},
    ]


async def _drive(call: Callable[[], Awaitable[object]], n: int, k: int) -> float:
    """Make ``n`` calls with ``k`` concurrent callers; return calls per second."""
    remaining = n

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(k):
            nursery.start_soon(worker)
    return n / (time.perf_counter() - start)


async def gateway_overhead(
    calls: int, concurrency: int, rounds: int, warmup: int, prompt_tokens: int
) -> dict[str, Any]:
    counter = default_counter()
    messages = _prompt_messages(prompt_tokens, counter)
    server = FakeLLMServer(policy=_constant_reply, latency=None)
    async with trio.open_nursery() as nursery:
        url: str = await nursery.start(server.serve)
        config = GatewayConfig(base_url=url, model="bench", max_concurrency=concurrency)
        # Exactly the body LLMGateway.chat sends for a call without a schema.
        body: dict[str, Any] = {
            "model": config.model,
            "messages": list(messages),
            "temperature": config.temperature,
            "max_tokens": config.max_completion_tokens,
        }
        endpoint = url.rstrip("/") + "/chat/completions"
        raw_client = httpx.AsyncClient(
            timeout=httpx.Timeout(config.call_timeout, connect=config.connect_timeout),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )

        async def raw_call() -> str:
            response = await raw_client.post(endpoint, json=body)
            response.raise_for_status()
            data = response.json()
            content = data["choices"][0]["message"]["content"]
            assert isinstance(content, str)
            return content

        gw_rates: list[float] = []
        raw_rates: list[float] = []
        async with raw_client, LLMGateway(config) as gateway:

            async def gateway_call() -> str:
                return await gateway.chat("optimize", messages)

            await _drive(gateway_call, warmup, concurrency)
            await _drive(raw_call, warmup, concurrency)
            for r in range(rounds):
                order = ("gateway", "raw") if r % 2 == 0 else ("raw", "gateway")
                line = []
                for which in order:
                    server.requests.clear()
                    if which == "gateway":
                        rate = await _drive(gateway_call, calls, concurrency)
                        gw_rates.append(rate)
                    else:
                        rate = await _drive(raw_call, calls, concurrency)
                        raw_rates.append(rate)
                    line.append(f"{which} {rate:8.1f} calls/s")
                print(
                    f"  round {r + 1}: {line[0]}, {line[1]}, "
                    f"ratio {gw_rates[-1] / raw_rates[-1]:.3f}",
                    flush=True,
                )
            stats = gateway.statistics()
        nursery.cancel_scope.cancel()
    gw_med, raw_med = statistics.median(gw_rates), statistics.median(raw_rates)
    per_round = [g / r for g, r in zip(gw_rates, raw_rates, strict=True)]
    return {
        "calls": calls,
        "concurrency": concurrency,
        "rounds": rounds,
        "prompt_tokens": counter.count_messages(messages),
        "gateway_calls_per_s": [round(x, 1) for x in gw_rates],
        "raw_calls_per_s": [round(x, 1) for x in raw_rates],
        "ratio_per_round": [round(x, 4) for x in per_round],
        "gateway_median": round(gw_med, 1),
        "raw_median": round(raw_med, 1),
        # Paired: each round's gateway and raw runs sit side by side in time.
        "ratio_median": round(statistics.median(per_round), 4),
        "ratio_of_medians": round(gw_med / raw_med, 4),
        "ratio_best": round(max(gw_rates) / max(raw_rates), 4),
        "overhead_us_per_call": round((1 / gw_med - 1 / raw_med) * 1e6, 1),
        "gateway_max_in_flight": stats.max_in_flight,
        "gateway_retries": stats.retries,
    }


# -- b. partition throughput ----------------------------------------------------


def _partition_budgets(
    counter: TokenCounter, context_tokens: int, max_tokens: int
) -> tuple[int, int]:
    """(item budget, per-trajectory max tokens) as ``prompt_budgets`` derives
    them for the daemon, which sets aside the module cap (a batch FGO run with
    an empty initial module has more room). Only throughput is measured here."""
    cfg = RunConfig(context_tokens=context_tokens)
    budget = item_budget(cfg.subset_budget, optimize_overhead_tokens(counter, cfg.module_budget))
    return budget, min(max_tokens, budget - PER_ITEM_SLACK)


async def _render(
    trajectories: Sequence[Trajectory], counter: TokenCounter, max_tokens: int
) -> tuple[list[RenderedTrajectory], float]:
    start = time.perf_counter()
    rendered = await render_all(trajectories, counter, max_tokens, "task_type")
    return rendered, time.perf_counter() - start


def partition_pass(
    trajectories: Sequence[Trajectory], counter: TokenCounter, max_tokens: int, budget: int
) -> tuple[list[RenderedTrajectory], list[Subset], float, float]:
    rendered, render_s = trio.run(_render, trajectories, counter, max_tokens)
    start = time.perf_counter()
    subsets = make_subsets(rendered, budget, 0)
    pack_s = time.perf_counter() - start
    return rendered, subsets, render_s, pack_s


def partition_throughput(
    trajectories: Sequence[Trajectory], repeats: int, context_tokens: int, max_tokens: int
) -> dict[str, Any]:
    counter = default_counter()
    counter.count("warm up the encoder")
    budget, max_tokens = _partition_budgets(counter, context_tokens, max_tokens)
    n = len(trajectories)
    totals: list[float] = []
    renders: list[float] = []
    packs: list[float] = []
    counts: dict[str, int] = {}
    for r in range(repeats):
        rendered, subsets, render_s, pack_s = partition_pass(
            trajectories, counter, max_tokens, budget
        )
        renders.append(render_s)
        packs.append(pack_s)
        totals.append(render_s + pack_s)
        print(
            f"  pass {r + 1}: render+count {render_s:6.3f} s, pack {pack_s:6.3f} s, "
            f"{n / (render_s + pack_s):8.1f} trajectories/s",
            flush=True,
        )
        # Every pass gives the same result; summarise it, then let it go before the next.
        counts = {
            "subsets": len(subsets),
            "total_tokens": sum(x.tokens for x in rendered),
            "truncated": sum(1 for x in rendered if x.truncated),
            "successes": sum(1 for x in rendered if x.success),
            "groups": len({x.group for x in rendered}),
        }
        del rendered, subsets
    best = min(totals)
    med = statistics.median(totals)
    return {
        "trajectories": n,
        "repeats": repeats,
        "item_budget": budget,
        "max_tokens": max_tokens,
        "render_s": [round(x, 4) for x in renders],
        "pack_s": [round(x, 4) for x in packs],
        "trajectories_per_s_best": round(n / best, 1),
        "trajectories_per_s_median": round(n / med, 1),
        "render_s_median": round(statistics.median(renders), 4),
        "pack_s_median": round(statistics.median(packs), 4),
        **counts,
        "mean_tokens": round(counts.get("total_tokens", 0) / max(n, 1), 1),
    }


def partition_tracemalloc(
    trajectories: Sequence[Trajectory], context_tokens: int, max_tokens: int
) -> dict[str, Any]:
    counter = default_counter()
    budget, max_tokens = _partition_budgets(counter, context_tokens, max_tokens)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        rendered, subsets, render_s, pack_s = partition_pass(
            trajectories, counter, max_tokens, budget
        )
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return {
        "tracemalloc_peak_kib": (peak - base) // 1024,
        "tracemalloc_result_kib": (current - base) // 1024,
        "untimed_pass_s": round(render_s + pack_s, 3),
        "subsets": len(subsets),
        "rendered": len(rendered),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = parser.add_argument_group("a. gateway overhead")
    g.add_argument("--calls", type=int, default=2000, help="calls per round and per client")
    g.add_argument("--concurrency", type=int, default=8, help="concurrent callers and pool size")
    g.add_argument("--rounds", type=int, default=3, help="alternating gateway/raw rounds")
    g.add_argument("--warmup", type=int, default=200, help="untimed calls per client first")
    g.add_argument("--prompt-tokens", type=int, default=1000, help="size of the user message")
    g.add_argument("--skip-gateway", action="store_true")
    p = parser.add_argument_group("b/c. partition throughput and memory")
    p.add_argument("--trajectories", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--long-fraction", type=float, default=0.02, help="share of long (truncated) ones"
    )
    p.add_argument("--context-tokens", type=int, default=16384, help="RunConfig.context_tokens")
    p.add_argument("--max-tokens", type=int, default=3000, help="cap per rendered trajectory")
    p.add_argument("--partition-repeats", type=int, default=3, help="timed passes")
    p.add_argument("--skip-partition", action="store_true")
    args = parser.parse_args(argv)

    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        cache_logger_on_first_use=True,
    )
    results: dict[str, Any] = {"rss_start_kib": current_rss_kib()}

    if not args.skip_gateway:
        print(
            f"a. gateway overhead: {args.calls} calls x {args.rounds} rounds, "
            f"concurrency {args.concurrency}, zero-latency FakeLLMServer on loopback",
            flush=True,
        )
        gw = trio.run(
            gateway_overhead,
            args.calls,
            args.concurrency,
            args.rounds,
            args.warmup,
            args.prompt_tokens,
        )
        results["gateway"] = gw
        print(
            f"  gateway median {gw['gateway_median']:.1f} calls/s, "
            f"raw httpx median {gw['raw_median']:.1f} calls/s"
        )
        print(
            f"  ratio gateway/raw: median of rounds {gw['ratio_median']:.3f}, "
            f"best/best {gw['ratio_best']:.3f} "
            f"(goal >= 0.90); overhead ~{gw['overhead_us_per_call']:.0f} us/call "
            f"with a {gw['prompt_tokens']}-token prompt"
        )

    if not args.skip_partition:
        print(
            f"b. partition throughput: {args.trajectories} synthetic trajectories "
            f"(seed {args.seed}), {args.partition_repeats} timed passes",
            flush=True,
        )
        rss_before_gen = current_rss_kib()
        gen_start = time.perf_counter()
        trajectories = make_trajectories(
            args.trajectories, args.seed, long_fraction=args.long_fraction
        )
        gen_s = time.perf_counter() - gen_start
        rss_after_gen = current_rss_kib()
        print(f"  generated in {gen_s:.2f} s (not timed below)", flush=True)
        part = partition_throughput(
            trajectories, args.partition_repeats, args.context_tokens, args.max_tokens
        )
        part["generation_s"] = round(gen_s, 3)
        results["partition"] = part
        print(
            f"  {part['trajectories_per_s_median']:.1f} trajectories/s median, "
            f"{part['trajectories_per_s_best']:.1f} best (goal >= 1000/s)"
        )
        print(
            f"  render+count median {part['render_s_median']:.3f} s, "
            f"pack median {part['pack_s_median']:.3f} s"
        )
        print(
            f"  {part['subsets']} subsets (item budget {part['item_budget']} tokens, "
            f"max {part['max_tokens']} per trajectory), {part['total_tokens']} tokens in all, "
            f"{part['mean_tokens']:.0f} per trajectory, {part['truncated']} truncated, "
            f"{part['successes']} successes, {part['groups']} groups"
        )
        peak_rss = max_rss_kib()
        print("c. memory", flush=True)
        mem = partition_tracemalloc(trajectories, args.context_tokens, args.max_tokens)
        mem.update(
            {
                "rss_before_generation_kib": rss_before_gen,
                "rss_after_generation_kib": rss_after_gen,
                "peak_rss_after_timed_passes_kib": peak_rss,
            }
        )
        results["memory"] = mem
        print(
            f"  peak RSS (ru_maxrss) after the timed passes: {peak_rss} KiB "
            f"({peak_rss / 1024:.1f} MiB); RSS before generating: {rss_before_gen} KiB, "
            f"after generating: {rss_after_gen} KiB"
        )
        print(
            f"  tracemalloc peak of one partition pass (separate, untimed pass): "
            f"{mem['tracemalloc_peak_kib']} KiB ({mem['tracemalloc_peak_kib'] / 1024:.1f} MiB), "
            f"of which its result (rendered texts and subsets) holds "
            f"{mem['tracemalloc_result_kib']} KiB"
        )

    results["peak_rss_kib"] = max_rss_kib()
    print(json.dumps(results, sort_keys=True))


if __name__ == "__main__":
    main()
