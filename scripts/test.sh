#!/usr/bin/env bash
# The test suite: install, lint, then pytest (CPU only; about 5 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/ruff check src tests scripts
exec .venv/bin/python -m pytest -q "$@"
