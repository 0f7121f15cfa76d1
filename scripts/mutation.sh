#!/usr/bin/env bash
# Mutation testing with mutmut: how many single-line changes to the code do
# the tests catch? Prints the score per module and in all.
#
#   scripts/mutation.sh                      # the pure core, the gateway, the bridge
#   scripts/mutation.sh fgo_actors/_core/stats.py tests/test_stats.py   # one module, its tests
#   JOBS=2 SHOW_SURVIVORS=1 KEEP=1 scripts/mutation.sh ...   # parallel; list survivors; keep the folder
#   TIMEOUT_MULTIPLIER=15 scripts/mutation.sh ...   # mutmut's own (slower) limit for a looping mutant
#   SAMPLE=200 SEED=0 scripts/mutation.sh fgo_actors/_llm/gateway.py tests/test_gateway.py
#       # judge a random sample of 200 mutants (seeded) and estimate the score
#       # with a 95% interval: for a module whose full run takes hours
#
# Arguments: the modules to mutate (fgo_actors/*.py), then the test files
# that judge them (tests/*.py); with none, the default set below. Each run
# works in a fresh copy of the tree under a temporary folder (mutmut writes
# its mutants next to the code), so the checkout is never touched. Slow:
# every mutant runs the tests that cover it; the default set takes hours on
# 2 cores, one small module a few minutes. Not part of .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON="$ROOT/.venv/bin/python"
if [ ! -x "$PYTHON" ]; then
    echo "no .venv: run scripts/test.sh once first" >&2
    exit 2
fi
"$PYTHON" -m pip install --quiet "mutmut==3.8.1"

modules=()
tests=()
for arg in "$@"; do
    case "$arg" in
    fgo_actors/*) modules+=("$arg") ;;
    tests/*) tests+=("$arg") ;;
    *) echo "not a module (fgo_actors/...) or a test file (tests/...): $arg" >&2; exit 2 ;;
    esac
done
if [ ${#modules[@]} -eq 0 ]; then
    modules=(fgo_actors/_llm/aimd.py fgo_actors/_core/stats.py fgo_actors/_core/forest.py
        fgo_actors/_core/partition.py fgo_actors/_core/edits.py fgo_actors/_core/prompts.py
        fgo_actors/_llm/strict.py fgo_actors/_core/playbook.py fgo_actors/_llm/gateway.py
        fgo_actors/_daemon/bridge.py)
fi
if [ ${#tests[@]} -eq 0 ]; then
    tests=(tests/test_aimd.py tests/test_stats.py tests/test_forest.py tests/test_partition.py
        tests/test_edits.py tests/test_merge.py tests/test_strict.py tests/test_playbook.py
        tests/test_gateway.py tests/test_bridge.py tests/test_mutants.py tests/test_pipeline.py)
fi

work=$(mktemp -d -t fgo-mutation-XXXXXX)
if [ -n "${KEEP:-}" ]; then
    echo "the work folder stays: $work (mutmut show NAME there)" >&2
else
    trap 'rm -rf "$work"' EXIT
fi
cp -r fgo_actors tests protocols examples scripts pyproject.toml "$work"/
cd "$work"
{
    echo
    echo "[tool.mutmut]"
    echo 'source_paths = ["fgo_actors/"]'
    printf 'only_mutate = ['; printf '"%s", ' "${modules[@]}"; echo ']'
    printf 'pytest_add_cli_args_test_selection = ['; printf '"%s", ' "${tests[@]}"; echo ']'
    echo 'pytest_add_cli_args = ["-q", "-p", "no:cacheprovider"]'
    # A mutant that loops (a cut that never shrinks) is a timeout, counted as
    # killed. mutmut's default limit is 30x the tests' own CPU time; 6x is
    # still far above the noise and spares minutes per looping mutant.
    echo "timeout_multiplier = ${TIMEOUT_MULTIPLIER:-3}"
    echo 'also_copy = ["examples/", "protocols/", "scripts/"]'
} >>pyproject.toml

echo "mutating ${modules[*]}" >&2
echo "judged by ${tests[*]}" >&2
# mutmut exits non-zero when mutants survive; the score below says how many.
if [ -n "${SAMPLE:-}" ]; then
    # A run filtered to a name that matches nothing generates the mutants and
    # records which tests cover which function, then stops; the sample is
    # drawn from the names it generated and judged by a second run.
    "$ROOT/.venv/bin/mutmut" run --max-children "${JOBS:-2}" "fgo-no-such-mutant" >/dev/null 2>&1 || true
    mapfile -t sample < <("$PYTHON" - "$SAMPLE" "${SEED:-0}" <<'PICK'
import json
import pathlib
import random
import sys

names = sorted(
    name
    for meta in pathlib.Path("mutants").rglob("*.meta")
    for name in json.loads(meta.read_text(encoding="utf-8"))["exit_code_by_key"]
)
size, seed = min(int(sys.argv[1]), len(names)), int(sys.argv[2])
print(f"sampling {size} of {len(names)} mutants (seed {seed})", file=sys.stderr)
print("\n".join(sorted(random.Random(seed).sample(names, size))))
PICK
    )
    if [ ${#sample[@]} -eq 0 ]; then
        echo "no mutants were generated: run once with SAMPLE unset to see mutmut's output" >&2
        exit 1
    fi
    "$ROOT/.venv/bin/mutmut" run --max-children "${JOBS:-2}" "${sample[@]}" >&2 || true
else
    "$ROOT/.venv/bin/mutmut" run --max-children "${JOBS:-2}" >&2 || true
fi
"$ROOT/.venv/bin/mutmut" results --all true >results.txt 2>/dev/null || true
if [ -n "${SHOW_SURVIVORS:-}" ]; then
    grep ': survived' results.txt | sed 's/^ */survived: /' >&2 || true
fi
"$PYTHON" - "${modules[@]}" <<'EOF'
import collections
import os
import sys

# Lines look like "    fgo_actors._core.stats.x_mean_interval__mutmut_3: survived".
counts = collections.defaultdict(collections.Counter)
for line in open("results.txt", encoding="utf-8"):
    name, _, status = line.strip().rpartition(": ")
    if not name:
        continue
    # "fgo_actors._llm.aimd.x_refused__mutmut_3" or "fgo_actors._llm.aimd.xǁWindowǁsent__mutmut_1"
    module = name.split("__mutmut")[0].rsplit(".", 1)[0]
    counts[module][status] += 1
total = collections.Counter()
print(f"{'module':<28} {'killed':>7} {'survived':>9} {'other':>6} {'score':>7}")
for module in sorted(counts):
    c = counts[module]
    killed = c["killed"] + c["timeout"] + c["segfault"]
    survived = c["survived"]
    other = sum(c.values()) - killed - survived
    total.update(killed=killed, survived=survived, other=other)
    judged = killed + survived
    score = f"{killed / judged:.1%}" if judged else "-"
    print(f"{module:<28} {killed:>7} {survived:>9} {other:>6} {score:>7}")
judged = total["killed"] + total["survived"]
score = f"{total['killed'] / judged:.1%}" if judged else "-"
print(f"{'all':<28} {total['killed']:>7} {total['survived']:>9} {total['other']:>6} {score:>7}")
print("(killed counts timeouts; other: not checked, e.g. no test covers the line)")
if judged and os.environ.get("SAMPLE"):
    # Wilson's 95% interval for the share killed, the judged mutants of the
    # sample standing for all of the module's mutants that tests cover.
    z, n, p = 1.96, judged, total["killed"] / judged
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    print(f"sampled: {score} of {judged} judged, 95% interval [{centre - half:.1%}, {centre + half:.1%}]")
EOF
