#!/usr/bin/env bash
# Set up FGO Actors on a fresh machine and run the main job: optimize the
# bundled example trajectories and print where the module and report are.
#
# With FGO_BASE_URL set, the run uses that OpenAI-compatible endpoint.
# Without it, a scripted stand-in server on loopback answers instead (the
# embedded local model is a later milestone); the run is then a real
# end-to-end run of the engine, but its "lessons" are canned.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e .

OUT=out/quickstart
mkdir -p "$OUT"
SERVER_PID=""
cleanup() { if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; fi; }
trap cleanup EXIT

if [ -z "${FGO_BASE_URL:-}" ]; then
    echo "FGO_BASE_URL is not set: starting the scripted stand-in LLM server on loopback." >&2
    .venv/bin/python -m fgo_actors.testing --port 0 --latency 0.2 > "$OUT/server.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 1 100); do
        if grep -q "server at" "$OUT/server.log"; then break; fi
        sleep 0.1
    done
    FGO_BASE_URL=$(grep -o 'http://[^ ]*' "$OUT/server.log" | head -n1)
    export FGO_BASE_URL
    if [ -z "$FGO_BASE_URL" ]; then echo "the stand-in server did not start" >&2; exit 1; fi
fi

.venv/bin/fgo optimize examples/trajectories.jsonl \
    --out "$OUT/module.json" --report "$OUT/report.json" \
    --context-tokens 4096 --module-tokens 700 "$@"

echo
echo "optimized module: $OUT/module.json"
echo "run report:       $OUT/report.json"
