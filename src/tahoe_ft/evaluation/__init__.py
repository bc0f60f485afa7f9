"""Score predictions with cell-eval (0.8.2): a thin, careful shell over its Python API.

    from tahoe_ft.evaluation import score_predictions
    score = score_predictions("pred.h5ad", "real.h5ad", train_cells, "runs/x/eval")   # writes eval/score.json
    score.avg_score, score.leaderboard_score, score.normalized["mae"]

Modules, one job each:

- `inputs`: load and sanitise copies of the inputs (float32 log1p, NaN/Inf refused, integer counts and
  values >= 15 refused, negative predictions clipped, clean categories) and check cell-eval's input contract
  (genes, perturbations, control) with errors that say what differs.
- `de_cache`: the on-disk cache of the real side's DE table and the baselines' aggregate tables, so that
  evaluating many checkpoints against one real file computes them once.
- `score`: cell-eval's `MetricsEvaluator` on the prediction and on its cell-mean baseline, cell-eval's
  normalisation, per-cell-type scoring, and the `Score` that ``score.json`` holds.
- `baselines`, `ceiling`, `panel`: the baseline panel and the data ceiling, scored like a round;
  `diagnostics`: collapse and the shuffle test; `verdict`: the round against each baseline, held-out group by
  group, with a bootstrap interval and a verdict (better, indistinguishable, worse).
- `run`: evaluate a run (`evaluate_run(EvalConfig) -> Score`, what `tahoe-ft eval` does): which files, the
  run's `predict.json`, its training cells (the checkpoint's manifest, read without the weights:
  `read_manifest`), the score, the panel and the diagnostics, one `score.json`.
- `logs`: the libraries' logs, warnings and progress bars into `<run>/eval/eval.log`; `report`: the short
  table `tahoe-ft eval` prints (the round beside its panel and the ceiling).
- `submission`: the Virtual Cell Challenge submission file (cell-eval's `prep`).
- `counts`: count space (issue #33): the count generator (`to_counts`, `emit_like`: log1p predictions as integer
  counts, by the inverse of the input transform and library sizes of the context's real control cells) and the
  checks counts must pass (`check_counts`); `upload`: the VCC 2026 upload file (`export format=vcc2026`).
"""

from __future__ import annotations

from tahoe_ft.evaluation.score import Score, score_predictions, versions
from tahoe_ft.evaluation.submission import prep_submission

__all__ = ["Score", "prep_submission", "score_predictions", "versions"]
