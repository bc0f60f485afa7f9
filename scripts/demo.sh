#!/usr/bin/env bash
# The main job: install, then run the whole case study on the embedded demo data
# (pretrain -> 0826 -> 0901, 0905 -> 0906 -> 0907 (and 0907aux) -> 0908 -> predict -> eval -> compare).
# Extra arguments go to `tahoe-ft reproduce` (e.g. data=papalexi, step_scale=0.05).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/tahoe-ft reproduce "$@"
