"""The Python API: typed arguments, no Hydra composition needed. The CLI maps its composed config onto these
functions and prints what they return; `reproduce` and the tests call them too.

    import tahoe_ft
    from tahoe_ft.config import CompareConfig, DataConfig, EvalConfig, PredictConfig, TrainConfig
    cfg = tahoe_ft.compose("train", ["+experiment=0906"])      # a round's experiment file, as the CLI does
    cfg = TrainConfig(data=DataConfig(path="screen.h5ad", test_perts=["STAT1"]), init_from=None)  # or by hand
    run_dir = tahoe_ft.train(cfg)
    tahoe_ft.predict(PredictConfig(run_dir=str(run_dir)))       # ckpt: best-val.pt of that run
    score = tahoe_ft.evaluate(EvalConfig(run_dir=str(run_dir)))  # -> tahoe_ft.evaluation.Score
    table = tahoe_ft.compare(CompareConfig(runs_dir="runs"))

Every function takes its command's config dataclass (`tahoe_ft.config`), checked on entry as the CLI's
composition checks it (`config.checked`: a bad type or option value is one line naming the key).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tahoe_ft.commands import API
from tahoe_ft.config import (
    CheckConfig,
    CompareConfig,
    DemoCheckConfig,
    EvalConfig,
    ExportConfig,
    ExportStateConfig,
    PredictConfig,
    ReproduceConfig,
    SweepConfig,
    TrainConfig,
    checked,
    compose,  # noqa: F401 - an API function (commands.API_EXTRAS), re-exported
)
from tahoe_ft.errors import UserError

if TYPE_CHECKING:
    from tahoe_ft.checkpoints.io import LoadedCheckpoint
    from tahoe_ft.evaluation import Score

log = logging.getLogger(__name__)

# every command's function and the two that are no command (`load_checkpoint`, `compose`): the command table
__all__ = list(API)


def train(config: TrainConfig, *, callbacks: list | None = None) -> Path:
    """Train one round; returns its run directory (`runs/<experiment>/<timestamp>/`)."""
    config = checked(config)
    from tahoe_ft.training import train as _train

    return _train(config, callbacks=callbacks)


def load_checkpoint(path: str | os.PathLike) -> LoadedCheckpoint:
    """A tahoe-ft or upstream ST checkpoint (or `state tx train` run folder), loaded: `.model` (a
    `StateTransitionModel` in eval mode), `.manifest`, `.step`, `.val_loss`, `.experiment`, `.checkpoint_path`
    (the file read) and `.run_folder` (upstream folders)."""
    from tahoe_ft.checkpoints.io import load_checkpoint as _load

    return _load(path)


def predict(config: PredictConfig) -> Path:
    """Predict the held-out perturbations with a checkpoint; returns the run directory that holds pred.h5ad
    (and, with `config.shuffle`, pred_shuffled.h5ad for eval's shuffle test).

    `config.ckpt`: a path, `run:EXP/FILE`, or a bare file name looked up in `run_dir/checkpoints/` (default
    run: the newest training run, of `exp` if given); or an upstream `state tx train` run folder (with
    `data_path=` and, if its config's split TOML is not readable here, `split_toml=`; the predictions go into
    the folder unless `run_dir=` says otherwise).
    """
    config = checked(config)
    from tahoe_ft.prediction import predict as _predict

    return _predict(config)


def compare(config: CompareConfig | None = None):
    """Every evaluated run in one table, best first (a DataFrame); writes compare.csv and compare.png."""
    from tahoe_ft.study.comparison import compare as _compare

    config = checked(config or CompareConfig())
    return _compare(config.runs_dir, config.out_dir)


def reproduce(config: ReproduceConfig | None = None) -> dict[str, Any]:
    """The whole case study: every round trained in order on `config.data`, then predicted, scored and
    compared (`config.train_overrides`, Hydra syntax, apply to every round's `train` config)."""
    config = checked(config or ReproduceConfig())
    from tahoe_ft.study.reproduce import reproduce as _reproduce

    return _reproduce(config)


def sweep(config: SweepConfig) -> dict[str, Any]:
    """A recipe search on validation folds (`tahoe-ft sweep`; package `tahoe_ft.search`): trials of the space
    `config.sweep` (rounds, fixed overrides, parameter ranges) trained on the folds of `reproduce folds=K`,
    scored on their validation perturbations, pruned from their validation losses, in a resumable Optuna study;
    writes trials.csv, best.yaml and plots into `runs_dir/sweeps/<name>/` and returns a summary (the best
    trial, the counts, the files; with `final`, the best recipe's reproduce on the folds' test perturbations).
    """
    config = checked(config)
    from tahoe_ft.search import run_sweep

    return run_sweep(config)


def check(config: CheckConfig) -> dict[str, Any]:
    """Open and validate a data set exactly as `train` would; return what it found (trains nothing)."""
    config = checked(config)
    from tahoe_ft.data.checks import check_values
    from tahoe_ft.training import training_data

    dm = training_data(config)
    # train reads a sample of a large X; check reads every block, so a corrupted one is found here
    for screen in dm.catalog.screens:
        check_values(screen, config.data.input_transform, every_block=True)
    summary: dict[str, Any] = {
        "files": [str(p) for p in dm.data_paths],
        "dims": dict(dm.dims),
        "genes": len(dm.gene_names),
        "perturbations": len(dm.pert_names),
        "cell_types": list(dm.cell_types),
        "batches": list(dm.batches) if dm.batches is not None else None,
        "control": config.data.control_pert,
        "input_transform": config.data.input_transform,
        "splits": {},
    }
    for split in ("train", "val", "test"):
        # counted per (cell type, perturbation), datasets merged
        sizes: dict[tuple[str, str], int] = {}
        for key, rows in dm.catalog.groups(split).items():
            sizes[key.cell_type, key.pert] = sizes.get((key.cell_type, key.pert), 0) + rows.size
        summary["splits"][split] = {
            "perturbations": sorted({p for _, p in sizes}),
            "groups": len(sizes),
            "cells": int(sum(sizes.values())),
            "smallest_group": int(min(sizes.values(), default=0)),
        }
    summary["batches_per_epoch"] = {"train": len(dm.train_dataloader()), "val": len(dm.val_dataloader())}
    return summary


def demo_check(config: DemoCheckConfig | None = None) -> dict[str, Any]:
    """The oracles of `tahoe_ft.datasets.demo_check` on the demo of `config.demo` for every seed of `config.seeds`; writes
    the figures to `config.out` (JSON) and returns them (`tahoe_ft.datasets.demo_check.report` renders them as text)."""
    config = checked(config or DemoCheckConfig())
    from tahoe_ft.datasets.demo_check import demo_check as _demo_check
    from tahoe_ft.fileio import atomic_write_text

    out = Path(config.out)
    spec = config.demo.asdict()
    result = _demo_check(
        list(config.seeds),
        spec,
        Path(config.paths.data_cache),
        Path(config.work_dir) if config.work_dir else out.with_suffix(""),
        num_threads=config.num_threads,
        per_cell_type=config.per_cell_type,
    )
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    log.info("demo-check figures -> %s", out)
    return result


def _newest_training_run(runs_dir: str | os.PathLike, exp: str | None, need: str) -> Path:
    from tahoe_ft.prediction import newest_training_run

    return newest_training_run(runs_dir, exp, need=need)


def evaluate(config: EvalConfig) -> Score:
    """Score a run's pred.h5ad against its real.h5ad with cell-eval, beside the baseline panel and the data
    ceiling built from the run's training cells; writes `<run>/eval/` (score.json, eval.log, the panel under
    `eval/baselines/`) and returns the `Score` (`tahoe_ft.evaluation.run.evaluate_run`).

    Default run: the newest one with a prediction (of `config.exp` if given); or `pred=` and `real=` files.
    The training cells come from `train=` (with `split_toml=`), else the run's checkpoint (predict.json names
    it); without either, the cell-mean baseline comes from the cache and the panel is left out.
    """
    config = checked(config)
    from tahoe_ft.evaluation.run import evaluate_run

    return evaluate_run(config)


def export(config: ExportConfig) -> Path:
    """Pack a prediction as a VCC submission with `cell-eval prep` (needs zstd and tar); returns its path.
    `format=vcc2026`: the 2026 upload file of the run's `pred_counts.h5ad` instead
    (`tahoe_ft.evaluation.upload.export_upload`: 400 cells per perturbation, no controls, the gene list's genes
    in order, integer counts, CSR; checked, and by vcc-cli's own validation when it is installed).

    `out` must name a new file (an existing file or a folder is refused); default: the run's own
    `<run>/submission.prep.vcc`, which exporting the run again replaces. Nothing else is written.
    """
    config = checked(config)
    import tempfile

    import anndata as ad

    from tahoe_ft.data.labels import VCC_LABELS, ScreenLabels
    from tahoe_ft.evaluation import prep_submission
    from tahoe_ft.runs import PredictRecord

    pred, run_dir, gene_list, out = config.pred, config.run_dir, config.gene_list, config.out
    exp, runs_dir = config.exp, config.runs_dir
    v2026 = str(config.format) == "vcc2026"
    # vcc2026: the counts twin predict output=counts writes
    pred_name, default_out = (
        ("pred_counts.h5ad", "submission.vcc2026.h5ad") if v2026 else ("pred.h5ad", "submission.prep.vcc")
    )
    if pred:
        pred = Path(pred)
        run_dir = pred.parent
    else:
        run_dir = Path(run_dir) if run_dir else _newest_training_run(runs_dir, exp, pred_name)
        pred = run_dir / pred_name
    if not pred.is_file():
        how = "tahoe-ft predict output=counts" if v2026 else "tahoe-ft predict"
        raise UserError(f"{pred} not found; run {how} first (or pass pred=)")
    # out= names a new file: an existing one (or a folder) is never replaced; the default, the run's own
    # submission, is re-made by exporting the run again
    target = Path(out) if out else Path(run_dir) / default_out
    if out and target.is_dir():
        raise UserError(
            f"out={out} is a folder; pass out=<a new file>, e.g. out={target / 'submission.prep.vcc'}"
        )
    if out and (target.exists() or target.is_symlink()):
        raise UserError(f"out={out} already exists; pass out=<a new file> (export never replaces a file)")
    parent = next((q for q in target.parents if q.exists() or q.is_symlink()), None)
    if parent is not None and not parent.is_dir():
        raise UserError(f"out={target}: {parent} is not a folder; pass out=<a file in a folder>")
    record = PredictRecord.read(run_dir)
    # the run's labels (VCC's without a predict record); the submission has no cell-type column
    labels = ScreenLabels(record.pert_col, record.control_pert) if record is not None else VCC_LABELS
    if v2026:
        from tahoe_ft.evaluation.upload import export_upload

        export_upload(
            pred,
            target,
            gene_list=gene_list,
            labels=ScreenLabels.of(record) if record is not None else VCC_LABELS,
            cells_per_pert=config.cells_per_pert,
            min_cells=config.min_cells,
            seed=config.seed,
        )
        return target
    if gene_list is not None:
        return prep_submission(pred, gene_list, target, labels=labels)
    # the evaluator's genes the model was trained on, in order: pred's var_names, in a temp file (nothing
    # is written beside pred but the submission)
    with tempfile.TemporaryDirectory(prefix="tahoe-ft-export-") as tmp:
        genes = Path(tmp) / "gene_names.csv"
        try:
            names = ad.read_h5ad(pred, backed="r").var_names
        except Exception as exc:  # h5py/anndata raise many types for a file that is not an AnnData
            raise UserError(
                f"pred {pred} is not a readable AnnData .h5ad ({type(exc).__name__}); predict it again "
                "(tahoe-ft predict) or pass pred=<an .h5ad file>"
            ) from None
        genes.write_text("".join(f"{g}\n" for g in names))
        return prep_submission(pred, genes, target, labels=labels)


def export_state(config: ExportStateConfig) -> Path:
    """Write a tahoe-ft checkpoint as an upstream `state tx train` run folder (config.yaml, var_dims.pkl,
    pert_onehot_map.pt, checkpoints/final.ckpt) that arc-state's `load_from_checkpoint` and `state tx infer`
    read; returns the folder. `ckpt` is found as by `predict`; `out` (default `<run_dir>/state-export`) must
    not exist.
    """
    config = checked(config)
    from tahoe_ft.checkpoints.upstream_export import export_state as _export_state
    from tahoe_ft.prediction import resolve_checkpoint

    c = config
    path, run = resolve_checkpoint(
        str(c.ckpt), run_dir=str(c.run_dir) if c.run_dir else None, exp=c.exp, runs_dir=str(c.runs_dir)
    )
    return _export_state(path, Path(c.out) if c.out else Path(run) / "state-export")
