#!/usr/bin/env bash
# fastllm's GPU check: build, test, sanitize and time every CUDA and Triton kernel on one
# NVIDIA GPU in minutes (benchmarks/gpu/check.py says what each stage does).
#
#   bash benchmarks/gpu/run.sh [--dry-run] [--quick] [--out DIR] [--commit SHA]
#                              [--budget SECONDS] [--stages build,tests,...]
#
# Runs from the repository root's copy on a machine with its own CUDA toolkit and a Python
# with torch and triton installed; installs nothing from a network. Wheels carried in the
# git-ignored folder .whl/ (e.g. liger-kernel, the peer the benchmarks time when present)
# are installed from there, --no-index, into a private directory first.
# Without a GPU, --dry-run checks that every stage's commands exist and parse and exits 0.
set -uo pipefail
cd "$(dirname "$0")/../.."

PYTHON="${PYTHON:-python3}"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "run.sh: no $PYTHON on PATH (set PYTHON=...)" >&2
    exit 2
fi

if compgen -G ".whl/*.whl" >/dev/null; then
    site="${TMPDIR:-/tmp}/fastllm-gpu-site"
    if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$site" .whl/*.whl; then
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
        echo "run.sh: installed the carried wheels: $(cd .whl && ls *.whl | tr '\n' ' ')"
    else
        echo "run.sh: the carried wheels in .whl/ did not install; going on without them" >&2
    fi
fi

exec "$PYTHON" benchmarks/gpu/check.py "$@"
