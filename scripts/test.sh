#!/usr/bin/env bash
# The test suite: install, lint, then pytest (CPU only; about 10 minutes on 2 idle cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# upstream arc-state as the oracle for the model parity tests (a test extra; the product never imports it), and
# cell-eval2 (the vcc2026 extra: the VCC 2026 scorer, so tests/test_vcc2026.py runs rather than skips)
.venv/bin/python -m pip install --quiet -e ".[test,parity,vcc2026]"
# `tahoe-ft export` (cell-eval prep) needs zstd; install it where we can (Debian/Ubuntu as root)
if ! command -v zstd >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq zstd) >/dev/null 2>&1 || echo "zstd not installed; its test is skipped"
fi
.venv/bin/ruff check src tests scripts
.venv/bin/ruff format --check src tests scripts
exec .venv/bin/python -m pytest -q "$@"
