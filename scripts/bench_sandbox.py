"""Measure what a per-call cgroup adds to one sandboxed call.

Runs the same trivial function in the sandbox, in turns with and without the
call's cgroup (so load on the machine falls on both alike), and prints the
median wall time of each, side by side, and their difference. The calls run
as the agent's do: isolated and confined where this machine allows it (both
are said in the output). Without a cgroup here (``limits_process_tree()``
false) there is nothing to compare, and it says so.

    .venv/bin/python scripts/bench_sandbox.py
    .venv/bin/python scripts/bench_sandbox.py --calls 100
"""

from __future__ import annotations

import argparse
import statistics
import sys
from unittest import mock

import trio

from fgo_actors.agent import sandbox
from fgo_actors.agent.sandbox import confines_files, isolation, limits_process_tree, run_function

CODE = "def add(a, b):\n    return a + b\n"


async def one_call() -> float:
    start = trio.current_time()
    result = await run_function(CODE, "add", {"a": 2, "b": 40})
    elapsed = trio.current_time() - start
    if not result.ok:
        raise SystemExit(f"the sandboxed call failed: {result.error}")
    return elapsed


async def measure(calls: int) -> tuple[list[float], list[float]]:
    with_cgroup: list[float] = []
    without: list[float] = []
    await one_call()  # probes (and their start-up) are not part of a call
    for _ in range(calls):
        with_cgroup.append(await one_call())
        with mock.patch.object(sandbox, "_cgroup_setup", return_value=None):
            without.append(await one_call())
    return with_cgroup, without


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=40, help="calls of each kind (default 40)")
    args = parser.parse_args()
    if not limits_process_tree():
        sys.exit("no per-call cgroup here (see the sandbox_no_cgroup warning): nothing to compare")
    setup = sandbox._cgroup_setup()
    assert setup is not None
    with_cgroup, without = trio.run(measure, args.calls)
    a, b = statistics.median(with_cgroup), statistics.median(without)
    print(
        f"isolated: {bool(isolation())}, files confined: {confines_files()}, "
        f"cgroup v{setup.version}, {args.calls} calls of each kind, in turns"
    )
    print(f"{'':16}{'median ms':>10}{'min ms':>10}{'max ms':>10}")
    for label, times in (("with cgroup", with_cgroup), ("without cgroup", without)):
        print(
            f"{label:16}{statistics.median(times) * 1e3:10.1f}"
            f"{min(times) * 1e3:10.1f}{max(times) * 1e3:10.1f}"
        )
    print(f"per-call cgroup overhead: {(a - b) * 1e3:+.1f} ms (median against median)")


if __name__ == "__main__":
    main()
