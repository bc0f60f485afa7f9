"""Refit the chains a finished `tahoe-ft reproduce folds=K` left, without training them again.

`tahoe-ft reproduce refit=true` trains each split's chain, then refits it (`tahoe_ft.study.reproduce.refit_chain`:
every round again on the training + validation perturbations, for the step count its validation chose, predicted
from final.pt and scored beside a panel of the same training perturbations). This script runs only the second
part on chains already trained, with the same overrides as the command that trained them, and compares the refits
over the splits into `<runs_dir>/refit/compare.csv` (each split's in `<chain>/refit/`):

    .venv/bin/python scripts/refit_chains.py runs_dir=RUNS folds=2 "data_seeds=[0]" num_threads=1
    .venv/bin/python scripts/refit_chains.py            # the chain of `bash scripts/demo.sh` in runs/

It reads the folds the command dealt (`<runs_dir>[/data-D]/folds/fold-K.toml`), never deals them again, and
each seed's base model from `seed-S/pretrain/latest` when `pretrain` is one of the experiments.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console

from tahoe_ft.config import compose
from tahoe_ft.errors import UserError
from tahoe_ft.study.comparison import compare_splits
from tahoe_ft.study.reproduce import BASE, StageClock, experiment_name, fold_data, refit_chain, with_demo_seed


def main(argv: list[str]) -> None:
    cfg = compose("reproduce", argv)
    clock = StageClock(Console(stderr=True))
    runs = Path(cfg.runs_dir)
    if cfg.folds == 0 and len(cfg.seeds) <= 1 and not cfg.data_seeds:  # one chain on the data set's own split
        seed = int(cfg.seeds[0]) if cfg.seeds else 0
        refit_chain(cfg, clock, runs, cfg.data, seed=seed, skip=[BASE])
        return
    if cfg.folds < 2:
        raise UserError("give the folds=K (>= 2) of the reproduce command that trained the chains")
    exps = [experiment_name(e) for e in cfg.experiments]
    splits = []
    for d in [int(s) for s in cfg.data_seeds] or [None]:
        data = cfg.data if d is None else with_demo_seed(cfg.data, cfg.paths, d)
        root = runs if d is None else runs / f"data-{d}"
        for seed in [int(s) for s in cfg.seeds] or [0]:
            base = root / f"seed-{seed}"
            shared = []
            if BASE in exps:
                shared = [f"pretrained={(base / BASE / 'latest').resolve() / 'checkpoints' / 'best-val.pt'}"]
            for k in range(cfg.folds):
                toml = root / "folds" / f"fold-{k}.toml"
                chain = base / f"fold-{k}"
                if not (toml.is_file() and chain.is_dir()):
                    raise UserError(
                        f"no fold {k} at {toml} / {chain}: give the runs_dir, folds and seeds it ran with"
                    )
                label = f"{'' if d is None else f'data {d} '}seed {seed} fold-{k}: "
                out = refit_chain(cfg, clock, chain, fold_data(data, str(toml)), shared, seed=seed, prefix=label,
                                   skip=[BASE])  # fmt: skip
                labels = {"seed": seed, "fold": k} if d is None else {"data_seed": d, "seed": seed, "fold": k}
                splits.append((labels, out))
    if cfg.evaluate:
        compare_splits(splits, runs / "refit")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
