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


# what a prediction writes into its run directory (eval/ is read from these: it is theirs too)
PREDICTION_FILES = ("pred.h5ad", "real.h5ad", "pred_shuffled.h5ad", "predict.json")


def _is_run(folder: Path) -> bool:
    """A training run (tahoe-ft's, or an upstream `state tx train` folder): it has its own checkpoints."""
    return (folder / "checkpoints").is_dir() or (folder / "run.json").is_file()


def check_output_folder(ckpt: str | os.PathLike, out_dir: str | os.PathLike, read: str | os.PathLike) -> None:
    """Refuse to predict `ckpt` (the file `read` loaded) into `out_dir` when that would replace predictions
    it did not make: `out_dir` is another run (its predictions and eval/ belong to its own checkpoints), or a
    folder holding a prediction of another checkpoint. A run's own checkpoint (`<run>/checkpoints/<file>`,
    or an upstream run folder itself) may redo that run's prediction. Reads only; writes nothing."""
    ckpt, out = Path(ckpt).resolve(), Path(out_dir).resolve()
    own = out in (ckpt, ckpt.parent.parent)
    if _is_run(out) and not own:
        home = ckpt if (ckpt / "checkpoints").is_dir() else ckpt.parent.parent
        raise UserError(
            f"ckpt={ckpt} is not a checkpoint of run_dir={out_dir} (that run's own are in "
            f"{Path(out_dir) / 'checkpoints'}); its prediction would replace that run's files: predict from "
            f"the checkpoint's own run (run_dir={home}, or leave run_dir unset), or pass run_dir=<a new folder> "
            "for this prediction"
        )
    if own:
        return
    from tahoe_ft.runs import PredictRecord

    there = [name for name in PREDICTION_FILES if (out / name).exists()]
    if not there:
        return
    record = PredictRecord.read(out)
    if record is not None and Path(record.checkpoint).resolve() == Path(read).resolve():
        return  # the same checkpoint predicted into this folder again
    made_by = (
        f"of {record.checkpoint}" if record is not None else "of an unknown checkpoint (no predict.json)"
    )
    raise UserError(
        f"run_dir={out_dir} already holds a prediction {made_by} ({', '.join(there)}), which this one would "
        "replace; pass run_dir=<a new folder> for this prediction (or move those files away)"
    )


def retire_stale_outputs(out_dir: str | os.PathLike, *, shuffled: bool) -> list[Path]:
    """After a run's prediction was redone: what was derived from the one it replaced no longer describes
    it. `pred_shuffled.h5ad` (when this prediction wrote none) is removed, and `eval/` is moved to
    `eval.superseded/` (replacing an older one there), out of `compare`'s sight; returns what was moved or
    removed."""
    out = Path(out_dir)
    done = []
    stale = out / "pred_shuffled.h5ad"
    if not shuffled and stale.exists():
        stale.unlink()
        done.append(stale)
    eval_dir = out / "eval"
    if eval_dir.is_dir():
        import shutil

        old = out / "eval.superseded"
        if old.is_dir():
            shutil.rmtree(old)
        eval_dir.rename(old)
        done.append(old)
    return done
