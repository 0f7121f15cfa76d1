"""How many threads the local model generates with: measured, not assumed.

Generation speed depends on the machine more than on its core count. On one
2-core machine of the kind this project runs on, one thread generated 4.9
tokens/s and two 6.9 (idle) or 2.0 against 2.9 (with a busy process beside
it); llama.cpp's own default is half the cores. So ``fgo local-llm start``
measures once per machine: it loads the model in a child process, generates
a few tokens with each candidate thread count, and keeps the fastest. The
measurement is recorded in the cache folder, keyed by the model, the CPUs
and the llama-cpp-python version, and reused until one of them changes or
``fgo local-llm tune`` measures again.

``choose`` is pure; ``measure`` runs the child; ``tuned`` is the cached
decision. Run as ``python -m fgo_actors._llm.local_threads MODEL.gguf
--threads 1,2`` the module is that child: it prints one JSON object of
generated tokens per second by thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from .._core.io import atomic_write_json

# A thread count whose speed is within this share of the fastest counts as
# fast: the fewest such threads leave the most room for the rest of the run.
TOLERANCE = 0.03
PROBE_TOKENS = 24
PROBE_TIMEOUT_S = 600.0
PROMPT = "Count from one to one hundred, writing every number out in words, one per line:\n"


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def candidates(cpus: int) -> tuple[int, ...]:
    """1, half the CPUs and all of them (each once, ascending)."""
    return tuple(sorted({1, max(1, cpus // 2), max(1, cpus)}))


def choose(measured: Mapping[int, float], tolerance: float = TOLERANCE) -> int:
    """The fewest threads whose tokens/s is within ``tolerance`` of the fastest."""
    if not measured:
        raise ValueError("nothing was measured")
    best = max(measured.values())
    return min(n for n, rate in measured.items() if rate >= best * (1 - tolerance))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def machine_key(model_sha256: str) -> dict[str, Any]:
    """What a recorded measurement holds for: another key measures again."""
    try:
        llama = version("llama_cpp_python")
    except PackageNotFoundError:
        llama = None
    return {
        "model_sha256": model_sha256,
        "cpus": available_cpus(),
        "cpu_model": _cpu_model(),
        "llama_cpp_python": llama,
    }


class ProbeError(RuntimeError):
    """The measuring child failed; its message says how."""


def measure(
    model_path: Path,
    threads: Iterable[int],
    *,
    batch_threads: int | None = None,
    tokens: int = PROBE_TOKENS,
    timeout: float = PROBE_TIMEOUT_S,
) -> dict[int, float]:
    """Generated tokens/s for each thread count, measured in a child process
    (the model's memory and native code stay out of this one)."""
    counts = ",".join(str(n) for n in threads)
    cmd = [
        sys.executable,
        "-m",
        "fgo_actors._llm.local_threads",
        str(model_path),
        "--threads",
        counts,
        "--batch-threads",
        str(batch_threads or available_cpus()),
        "--tokens",
        str(tokens),
    ]
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as e:
        raise ProbeError(f"measuring threads {counts} took over {timeout:g} s") from e
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise ProbeError(f"the thread probe exited with code {done.returncode}: {tail}")
    try:
        data = json.loads(done.stdout.strip().splitlines()[-1])
        return {int(n): float(rate) for n, rate in data.items()}
    except (ValueError, IndexError, AttributeError) as e:
        raise ProbeError(f"the thread probe printed no measurement: {done.stdout[-200:]!r}") from e


def _record_file(cache: Path) -> Path:
    return cache / "local-threads.json"


def recorded(cache: Path, key: Mapping[str, Any]) -> dict[str, Any] | None:
    """The recorded measurement for ``key``, or None."""
    try:
        data = json.loads(_record_file(cache).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != dict(key):
        return None
    if not isinstance(data.get("threads"), int) or data["threads"] < 1:
        return None
    return data


def tune(
    cache: Path,
    model_path: Path,
    model_sha256: str,
    *,
    refresh: bool = False,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """The recorded thread choice for this machine, measured first if there is none
    (or ``refresh``). Returns the record: ``threads``, ``measured`` (tokens/s by
    thread count), ``measured_at`` and ``key``."""
    key = machine_key(model_sha256)
    if not refresh and (old := recorded(cache, key)) is not None:
        return old
    counts = candidates(key["cpus"])
    log(f"measuring generation with {', '.join(map(str, counts))} threads (once per machine) ...")
    measured = measure(model_path, counts)
    record = {
        "key": key,
        "measured": {str(n): round(rate, 2) for n, rate in sorted(measured.items())},
        "threads": choose(measured),
        "measured_at": time.time(),
    }
    atomic_write_json(_record_file(cache), record)
    rates = ", ".join(f"{n}: {rate:.1f}" for n, rate in sorted(measured.items()))
    log(f"generated tokens/s by threads: {rates}; using {record['threads']}")
    return record


def _probe(model: str, threads: list[int], batch_threads: int, tokens: int) -> dict[int, float]:
    # Runs in the child only: llama_cpp is the [local] extra.
    from llama_cpp import Llama

    rates: dict[int, float] = {}
    for n in threads:
        llm = Llama(
            model_path=model,
            n_ctx=512,
            n_threads=n,
            n_threads_batch=batch_threads,
            seed=0,
            verbose=False,
        )
        # The first tokens pay for the prompt and warm the caches.
        llm.create_completion(PROMPT, max_tokens=2, temperature=0.0)
        start = time.perf_counter()
        out: Any = llm.create_completion(PROMPT, max_tokens=tokens, temperature=0.0)
        seconds = time.perf_counter() - start
        made = int(out["usage"]["completion_tokens"])
        rates[n] = made / seconds if seconds > 0 else 0.0
        del llm
    return rates


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Generated tokens/s of a GGUF model by thread count.")
    p.add_argument("model")
    p.add_argument("--threads", required=True, help="comma-separated thread counts")
    p.add_argument("--batch-threads", type=int, default=available_cpus())
    p.add_argument("--tokens", type=int, default=PROBE_TOKENS)
    args = p.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    rates = _probe(args.model, threads, args.batch_threads, args.tokens)
    print(json.dumps({str(n): rate for n, rate in rates.items()}), flush=True)


if __name__ == "__main__":  # pragma: no cover - the child process
    main()
