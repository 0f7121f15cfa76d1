#!/usr/bin/env bash
# Install FGO Actors with its development extras into .venv and run the tests.
# Extra arguments go to pytest, e.g. scripts/test.sh -k gateway
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[dev]'
.venv/bin/python -m pytest "$@"
