"""Measure what a per-call cgroup and the system-call filter add to one sandboxed call.

Runs the same trivial function in the sandbox, in turns with every layer,
without the call's cgroup, and without the seccomp filter (so load on the
machine falls on all alike), and prints the median wall time of each, side
by side, and each layer's cost. The calls run as the agent's do: isolated
and confined where this machine allows it (both are said in the output). A
layer this machine does not have (``limits_process_tree()`` false, or no
libseccomp) is left out, and the output says so.

    .venv/bin/python scripts/bench_sandbox.py
    .venv/bin/python scripts/bench_sandbox.py --calls 100
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from unittest import mock

import trio

from fgo_actors.agent import sandbox, seccomp
from fgo_actors.agent.sandbox import confines_files, isolation, run_function

CODE = "def add(a, b):\n    return a + b\n"


async def one_call() -> float:
    start = trio.current_time()
    result = await run_function(CODE, "add", {"a": 2, "b": 40})
    elapsed = trio.current_time() - start
    if not result.ok:
        raise SystemExit(f"the sandboxed call failed: {result.error}")
    return elapsed


def _without(layer: str) -> contextlib.AbstractContextManager[object]:
    if layer == "cgroup":
        return mock.patch.object(sandbox, "_cgroup_setup", return_value=None)
    if layer == "seccomp":
        return mock.patch.object(seccomp, "program", return_value=None)
    return contextlib.nullcontext()


async def measure(calls: int, layers: list[str]) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"every layer": [], **{f"without {x}": [] for x in layers}}
    await one_call()  # probes (and their start-up) are not part of a call
    for _ in range(calls):
        times["every layer"].append(await one_call())
        for layer in layers:
            with _without(layer):
                times[f"without {layer}"].append(await one_call())
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=40, help="calls of each kind (default 40)")
    args = parser.parse_args()
    layers = []
    setup = sandbox._cgroup_setup()
    if setup is not None:
        layers.append("cgroup")
    else:
        print("no per-call cgroup here (see the sandbox_no_cgroup warning)")
    if seccomp.program() is not None:
        layers.append("seccomp")
    else:
        print("no system-call filter here (see the sandbox_no_seccomp warning)")
    if not layers:
        sys.exit("nothing to compare")
    times = trio.run(measure, args.calls, layers)
    cgroup = f"cgroup v{setup.version}" if setup is not None else "no cgroup"
    print(
        f"isolated: {bool(isolation())}, files confined: {confines_files()}, {cgroup}, "
        f"{args.calls} calls of each kind, in turns"
    )
    print(f"{'':18}{'median ms':>10}{'min ms':>10}{'max ms':>10}")
    for label, t in times.items():
        print(
            f"{label:18}{statistics.median(t) * 1e3:10.1f}{min(t) * 1e3:10.1f}{max(t) * 1e3:10.1f}"
        )
    full = statistics.median(times["every layer"])
    for layer in layers:
        cost = full - statistics.median(times[f"without {layer}"])
        print(f"per-call {layer} overhead: {cost * 1e3:+.1f} ms (median against median)")


if __name__ == "__main__":
    main()
