#!/usr/bin/env bash
# Set up FGO Actors on a fresh machine and run the main job: optimize the
# bundled example trajectories (examples/twc_train.jsonl: 8 TextWorldExpress
# twc episodes recorded with the reference agent and the local model) with the
# embedded local model, then print where the optimized module and the report are.
#
# With FGO_BASE_URL set (and FGO_MODEL, FGO_API_KEY as needed), the run uses
# that OpenAI-compatible endpoint instead of the local model.
# Extra arguments go to `fgo optimize`.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=local source scripts/_setup_venv.sh

if [ -z "${FGO_BASE_URL:-}" ]; then
    .venv/bin/fgo local-llm install
fi

OUT=out/quickstart
mkdir -p "$OUT"
.venv/bin/fgo optimize examples/twc_train.jsonl \
    --out "$OUT/module.json" --report "$OUT/report.json" "$@"

echo
echo "optimized module: $OUT/module.json"
echo "run report:       $OUT/report.json"
