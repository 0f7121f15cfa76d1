#!/usr/bin/env bash
# Install FGO Actors with its dev and local-model extras into .venv, install
# the local model, and run the tests. The real-model smoke test is skipped
# (loudly) only if the model or llama-cpp-python cannot be installed here.
# Extra arguments go to pytest, e.g. scripts/test.sh -k gateway
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=dev,local,envs,ray source scripts/_setup_venv.sh

if ! .venv/bin/fgo local-llm install; then
    echo "WARNING: the local model could not be installed; its smoke test will be skipped" >&2
fi
.venv/bin/python -m pytest "$@"
