#!/usr/bin/env bash
# How the defaults of model.head_skip, data.pert_features and loss.mean_weight were chosen: on the VALIDATION
# perturbations of Papalexi's 4 folds (never the test ones); and whether model.target_knockdown should be one.
# Each configuration trains one gene-space round
# from scratch per fold, predicts the fold's val perturbations and scores them with the baseline panel; then
# scripts/validation_table.py prints mean ± sd over folds. Usage: [ONLY="a b"] bash scripts/validation_sweep.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
T="$PWD/.venv/bin/tahoe-ft"
OUT="${1:-runs/validation-sweep}"
mkdir -p "$OUT/logs"
.venv/bin/python - "$OUT" <<'PY'
import sys
from tahoe_ft import api
from tahoe_ft.folds import make_folds
make_folds(api.compose("train", ["data=papalexi"]).data, 4, f"{sys.argv[1]}/folds", seed=0)
PY
# name  overrides (the study's architecture, st_small; everything else at the schema defaults of the time:
# head_skip=false, mean_weight=0, one-hot features)
CONFIGS=(
  "base           model.head_skip=false loss.mean_weight=0 data.pert_features=onehot trainer.max_steps=300 trainer.val_check_interval=100"
  "coex           model.head_skip=true loss.mean_weight=0 data.pert_features=coexpression trainer.max_steps=300 trainer.val_check_interval=100"
  "coexm          model.head_skip=true loss.mean_weight=1 data.pert_features=coexpression trainer.max_steps=300 trainer.val_check_interval=100"
  "pcam           model.head_skip=true loss.mean_weight=1 data.pert_features=pca trainer.max_steps=300 trainer.val_check_interval=100"
  "coex1k         model.head_skip=true loss.mean_weight=0 data.pert_features=coexpression trainer.max_steps=1000 trainer.val_check_interval=200 optim.lr=1e-3"
  "coex1km        model.head_skip=true loss.mean_weight=10 data.pert_features=coexpression trainer.max_steps=1000 trainer.val_check_interval=200 optim.lr=1e-3"
  "pca1k          model.head_skip=true loss.mean_weight=0 data.pert_features=pca trainer.max_steps=1000 trainer.val_check_interval=200 optim.lr=1e-3"
  "onehot1k       model.head_skip=true loss.mean_weight=0 data.pert_features=onehot trainer.max_steps=1000 trainer.val_check_interval=200 optim.lr=1e-3"
  # the knock-down path (model.target_knockdown), against the defaults it would be added to
  "pca1km         model.head_skip=true loss.mean_weight=10 data.pert_features=pca trainer.max_steps=1000 trainer.val_check_interval=200 optim.lr=1e-3"
  "pca1kmkd       model.head_skip=true loss.mean_weight=10 data.pert_features=pca trainer.max_steps=1000 trainer.val_check_interval=200 optim.lr=1e-3 model.target_knockdown=true"
)
# ONLY="name ..." runs just those configurations (the others' finished folds are kept either way)
for line in "${CONFIGS[@]}"; do
  read -r name rest <<<"$line"
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then continue; fi
  for f in 0 1 2 3; do
    rd="$OUT/f$f/$name"
    [ -f "$rd/.done" ] && continue
    # shellcheck disable=SC2086
    "$T" train runs_dir="$rd" data=papalexi data.split_toml="$OUT/folds/fold-$f.toml" init_from=null pretrained=null \
      logger=csv trainer.enable_progress_bar=false $rest >"$OUT/logs/$name-f$f.train.log" 2>&1
    "$T" predict runs_dir="$rd" split=val >"$OUT/logs/$name-f$f.predict.log" 2>&1
    "$T" eval runs_dir="$rd" >"$OUT/logs/$name-f$f.eval.log" 2>&1
    touch "$rd/.done"
  done
done
.venv/bin/python scripts/validation_table.py "$OUT"
