"""Episodes per second: threads of this process against Ray tasks, side by side.

The agent's LLM is the scripted loopback server with a fixed latency per
reply, so the figure is the executors' own cost around a known LLM wait;
the oracle rows play without an LLM, so there only the simulator and the
executor cost. Ray gets the same CPUs as the threads (``--cpus``), and the
ratio of the two is what to read on a shared, noisy machine. ``first s`` is
the wait for the first episode: what starting a run costs (the Ray actors'
processes and environments, the threads' environments), paid once per run.

    .venv/bin/python scripts/bench_executor.py --episodes 8 --latency 0.2
"""

from __future__ import annotations

import argparse
import re
import select
import subprocess
import sys
import time
from typing import Any

import trio

from fgo_actors import GatewayConfig, LLMGateway, Trajectory
from fgo_actors.agent.envs import Task
from fgo_actors.agent.executor import Executor, LocalExecutor, Policy, RayExecutor, connect_ray
from fgo_actors.agent.rollout import AgentConfig

TWC = "numLocations=1,numItemsToPutAway=2,includeDoors=0"


def start_server(latency: float) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "fgo_actors.testing", "--latency", str(latency)],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    if not ready:
        raise SystemExit("the scripted server did not start in 30 s")
    match = re.search(r"(http://\S+/v1)", proc.stdout.readline().decode())
    if match is None:
        raise SystemExit("the scripted server printed no address")
    return proc, match.group(1)


async def play(executor: Executor, tasks: list[Task], policy: Policy) -> tuple[float, int, float]:
    send, receive = trio.open_memory_channel[Trajectory](0)
    started = time.perf_counter()
    n = 0
    first = 0.0
    async with trio.open_nursery() as nursery:
        gateway = None
        if policy.gateway is not None:
            gateway = LLMGateway(policy.gateway)
        nursery.start_soon(lambda: executor.play(tasks, policy, send, gateway=gateway))
        async with receive:
            async for _ in receive:
                if not n:
                    first = time.perf_counter() - started
                n += 1
        if gateway is not None:
            await gateway.aclose()
    return time.perf_counter() - started, n, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--latency", type=float, default=0.2, help="seconds per LLM reply")
    parser.add_argument("--steps", type=int, default=6, help="turns per episode")
    parser.add_argument("--cpus", type=int, default=2, help="threads, and Ray's CPUs")
    args = parser.parse_args()

    proc, url = start_server(args.latency)
    try:
        connect_ray(None, num_cpus=args.cpus)
        agent = AgentConfig(max_steps=args.steps)
        gw = GatewayConfig(base_url=url, model="scripted", max_completion_tokens=64)
        policies = {
            "agent": Policy(kind="llm", agent=agent, gateway=gw),
            "oracle": Policy(kind="oracle", agent=agent),
        }
        rows: list[tuple[str, str, float, int, float]] = []

        async def run_all() -> None:
            for name, policy in policies.items():
                # A warm-up round on each executor (JVMs, Ray workers), then the
                # measured one on other seeds, local and Ray back to back.
                for round_, first in (("warm-up", 1000), ("measured", 0)):
                    tasks = [Task("twc", "train", first + s, TWC) for s in range(args.episodes)]
                    executors: dict[str, Any] = {
                        "local": LocalExecutor(workers=args.cpus),
                        "ray": RayExecutor(max_in_flight=args.cpus),
                    }
                    for label, executor in executors.items():
                        wall, n, first_s = await play(executor, tasks, policy)
                        if round_ == "measured":
                            rows.append((name, label, wall, n, first_s))

        trio.run(run_all)
    finally:
        proc.terminate()
        proc.wait()
    print(
        f"{args.episodes} episodes of {args.steps} turns, LLM latency {args.latency} s, "
        f"{args.cpus} threads / Ray CPUs"
    )
    print(f"{'policy':<8}{'executor':<10}{'wall s':>8}{'episodes/s':>12}{'first s':>9}")
    walls: dict[tuple[str, str], float] = {}
    for name, label, wall, n, first in rows:
        walls[(name, label)] = wall
        print(f"{name:<8}{label:<10}{wall:>8.2f}{n / wall:>12.2f}{first:>9.2f}")
    for name in policies:
        local, ray_ = walls[(name, "local")], walls[(name, "ray")]
        per = (ray_ - local) / args.episodes * args.cpus
        print(
            f"{name}: ray/local wall {ray_ / local:.2f}; Ray's cost per episode "
            f"about {per * 1000:.0f} ms of a worker"
        )


if __name__ == "__main__":
    main()
