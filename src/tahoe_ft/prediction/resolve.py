"""Which checkpoint `predict` reads and which run directory receives its files."""

from __future__ import annotations

import os
from pathlib import Path

from tahoe_ft.errors import UserError
from tahoe_ft.runs import RUN_REF, list_runs, resolve_ref


def newest_training_run(runs_dir: str | Path, experiment: str | None = None, need: str | None = None) -> Path:
    """The most recent run directory under runs_dir (of `experiment`, if given) that holds `need`."""
    root = Path(runs_dir)
    exps = (
        [experiment]
        if experiment
        else sorted(p.name for p in root.iterdir() if p.is_dir())
        if root.is_dir()
        else []
    )
    runs = [r for e in exps for r in list_runs(root, e) if need is None or (r / need).exists()]
    if not runs:
        what = f"of experiment '{experiment}' " if experiment else ""
        has = f"with {need} " if need else ""
        raise UserError(
            f"no training run {what}{has}under {root.resolve()}; train one first (tahoe-ft train +experiment=...)"
        )
    return max(runs, key=lambda r: r.name)


def resolve_checkpoint(
    ckpt: str, *, run_dir: str | Path | None = None, exp: str | None = None, runs_dir: str | Path = "runs"
) -> tuple[Path, Path]:
    """(checkpoint path, run directory that receives the predictions).

    `ckpt`: a path or `run:EXP/FILE` (used as is; run directory default: two levels above it, or the folder
    itself for an upstream run folder), or a bare file name looked up in `<run_dir>/checkpoints/` (default: the
    newest run of `exp` holding it, under `runs_dir`).
    """
    ckpt = str(ckpt)
    if RUN_REF.match(ckpt) or "/" in ckpt or os.sep in ckpt:
        path = resolve_ref(ckpt, runs_dir)
        return path, Path(run_dir) if run_dir else path if path.is_dir() else path.parent.parent
    if not run_dir:
        try:
            newest = newest_training_run(runs_dir, exp)
        except UserError:  # no run at all: said below, naming the checkpoint
            newest = Path(os.devnull)
        if not (newest / "checkpoints" / ckpt).exists() and (newest / "checkpoints" / "final.pt").exists():
            raise UserError(  # not silently an older run's best-val.pt
                f"the newest run {newest} had no validation loss, so it has final.pt and no {ckpt}; predict it "
                f"with ckpt=final.pt, or an older run with run_dir=..."
            )
    run = Path(run_dir) if run_dir else newest_training_run(runs_dir, exp, need=f"checkpoints/{ckpt}")
    path = run / "checkpoints" / ckpt
    if not path.is_file():
        raise UserError(f"{path} does not exist; choose a checkpoint in {run / 'checkpoints'}")
    return path, run
