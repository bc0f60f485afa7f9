#!/usr/bin/env bash
# Create .venv (if needed) and install tahoe-ft into it. torch goes first: a bare `torch` requirement
# (or a dependency pulling it) would download a multi-GB CUDA build; torch 2.13.0 is the CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install --quiet -e ".[test,vcc2026]"
