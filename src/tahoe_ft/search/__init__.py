"""`tahoe-ft sweep`: a recipe search on validation folds with Optuna, pruned from the validation losses a
trial logs, in a resumable study (`run_sweep`: what `tahoe_ft.sweep(SweepConfig)` and the CLI call). The
package is `tahoe_ft.search` so that `tahoe_ft.sweep` is the API function, as every command's is.

    tahoe-ft sweep +sweep=genespace n_trials=20 folds=4 [storage=URL objective=val_loss|val_score final=true
                   pruner=median|halving|none runs_dir=... data=... seed=... "train_overrides=['logger=csv']"]

A search space is a file `configs/sweep/NAME.yaml` (`+sweep=NAME`):

    name: genespace              # the study's name: runs_dir/sweeps/NAME/ and the Optuna study name
    rounds: ["0905"]             # the round(s) a trial trains, in order (configs/experiment/); each resolves its
                                 # parent by name (run:EXP/best-val.pt) inside the trial's fold folder, as
                                 # reproduce does; the first round's parent (its init_from, usually
                                 # ${pretrained}) is resolved once under runs_dir
    overrides: ["model.head_skip=true"]  # fixed training overrides of every round (Hydra syntax); optional
    params:                      # training key -> range; nested (optim: {lr: ...}) or dotted (optim.lr: ...)
      optim.lr: logfloat(1e-5, 1e-2)     # log-uniform float, lo > 0
      loss.mean_weight: float(0, 20)     # uniform float
      trainer.max_steps: int(20, 100, 20)  # integer, optional step (int(lo, hi) = step 1)
      model.feature_prior: choice(true, false)  # one of the listed values (numbers, true/false, null, strings)

Every value of a parameter applies to every round of the chain. On the command line a range is quoted:
`"sweep.params.optim.lr='logfloat(1e-4, 1e-2)'"`; `~sweep.params.KEY` drops one. A key no round's config has,
an empty or inverted range, a bound that is not a number, an unknown round or space name, or a storage URL
that cannot be opened is one line (`error: ...`, exit status 2) before anything is written: every round is
composed (`config.compose_round`) with both ends of every range and every choice.

A trial trains the rounds on each fold of `reproduce folds=K` (`study.folds.make_folds`, same seed and n_val,
files in `<sweep>/folds/`; folds=0: the data set's own split) as ordinary runs,
`<sweep>/trial-NNNN/fold-K/<round>/<timestamp>/` (run.json's `sweep` block: study, trial, fold, params; the
wandb run grouped as `sweep-NAME`). The objective reads validation perturbations only: `val_loss` (default,
minimised) is the mean over folds of the last round's best validation loss (run.json `best_val_loss`);
`val_score` (maximised) is the mean of cell-eval's avg_score of the last round's prediction of the folds'
validation perturbations (predict split=val, eval without the panel). Test perturbations are read only by
`final=true`, which trains the best recipe on the folds with reproduce (`<sweep>/final/`) and scores it once
with the panel and the ceiling.

The study is an Optuna RDB study, default `sqlite:///<runs_dir>/sweeps/<NAME>/study.db`. Running the command
again continues it: `n_trials` is the total of finished (complete + pruned) trials; a trial left RUNNING by a
killed process of this host is marked FAIL (and not counted), one of another host once its heartbeat stops.
Several processes, on one machine or many, with the same `storage=` URL share the study (Optuna's distributed
mode; a worker may finish one trial past `n_trials`). At the end the folder has `trials.csv`, `best.yaml` (an
experiment file: `tahoe_ft.search.outputs`), `history.png`, `importances.png`, `slice.png` and `sweep.json`.

Modules: `space` (the grammar), `plan` (every check before a write), `storage` (the database, dead trials),
`trial` (one trial; the pruning callback), `outputs` (trials.csv, best.yaml, plots), `study` (`run_sweep`).
"""

from __future__ import annotations

__all__ = ["run_sweep"]


def run_sweep(cfg):  # noqa: ANN001, ANN201 - re-exported lazily: `import tahoe_ft.search` stays light
    from tahoe_ft.search.study import run_sweep as _run

    return _run(cfg)
