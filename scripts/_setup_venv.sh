# Sourced by the other scripts: make .venv and install the package with EXTRAS.
# llama-cpp-python (the [local] extra) is only an sdist, so pip compiles it;
# the flags below make a portable build (no -march=native) and pip keeps the
# built wheel in its cache, so the compile happens once per machine.
set -euo pipefail
: "${EXTRAS:=local}"
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON}"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if ! .venv/bin/python -m pip show llama_cpp_python >/dev/null 2>&1; then
    echo "installing llama-cpp-python: the first time, this compiles for about 5 minutes ..." >&2
fi
# BFCL (the bfcl extra, also wanted with envs) is installed without its declared
# dependencies: see the bfcl extra in pyproject.toml.
case ",${EXTRAS}," in
*,bfcl,*) BFCL_EVAL="bfcl-eval==2026.3.23" ;;
*,envs,*) EXTRAS="${EXTRAS},bfcl" BFCL_EVAL="bfcl-eval==2026.3.23" ;;
*) BFCL_EVAL="" ;;
esac
.venv/bin/python -m pip install --quiet -e ".[${EXTRAS}]"
if [ -n "${BFCL_EVAL}" ]; then
    .venv/bin/python -m pip install --quiet --no-deps "${BFCL_EVAL}"
fi
