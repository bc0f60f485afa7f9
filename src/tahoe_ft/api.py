"""The Python API: typed arguments, no Hydra composition needed. The CLI maps its composed config onto these
functions and prints what they return; `reproduce` and the tests call them too.

    import tahoe_ft
    from tahoe_ft.config import TrainConfig, DataConfig
    cfg = tahoe_ft.compose("train", ["+experiment=0906"])      # a round's experiment file, as the CLI does
    cfg = TrainConfig(data=DataConfig(path="screen.h5ad", test_perts=["STAT1"]), init_from=None)  # or by hand
    run_dir = tahoe_ft.train(cfg)
    tahoe_ft.predict("best-val.pt", run_dir=run_dir)
    score = tahoe_ft.evaluate(run_dir)                          # -> tahoe_ft.evaluation.Score
    table = tahoe_ft.compare("runs")
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tahoe_ft.config import CheckConfig, DemoCheckConfig, ReproduceConfig, TrainConfig, compose
from tahoe_ft.errors import UserError

log = logging.getLogger(__name__)

__all__ = [
    "check",
    "compare",
    "compose",
    "demo_check",
    "evaluate",
    "export",
    "export_state",
    "load_checkpoint",
    "predict",
    "reproduce",
    "train",
]


def train(config: TrainConfig, *, callbacks: list | None = None) -> Path:
    """Train one round; returns its run directory (`runs/<experiment>/<timestamp>/`)."""
    from tahoe_ft.training import train as _train

    return _train(config, callbacks=callbacks)


def load_checkpoint(path: str | os.PathLike):
    """A tahoe-ft or upstream ST checkpoint as a `StateTransitionModel` in eval mode (`.manifest` attached)."""
    from tahoe_ft.checkpoints.io import load_checkpoint as _load

    return _load(path)


def predict(
    ckpt: str | os.PathLike = "best-val.pt",
    *,
    run_dir: str | os.PathLike | None = None,
    exp: str | None = None,
    runs_dir: str | os.PathLike = "runs",
    split: str = "test",
    data_path: Any = None,
    split_toml: str | os.PathLike | None = None,
    max_controls: int = 2000,
    seed: int = 0,
    device: str = "auto",
    shuffle: bool = True,
    sets_per_pass: int = 1,
    precision: str = "32",
) -> Path:
    """Predict the held-out perturbations with a checkpoint; returns the run directory that holds pred.h5ad
    (and, with `shuffle`, pred_shuffled.h5ad for eval's shuffle test).

    `ckpt`: a path, `run:EXP/FILE`, or a bare file name looked up in `run_dir/checkpoints/` (default run: the
    newest training run, of `exp` if given); or an upstream `state tx train` run folder (with `data_path=` and,
    if its config's split TOML is not readable here, `split_toml=`; the predictions go into the folder unless
    `run_dir=` says otherwise).
    """
    from tahoe_ft.prediction import predict as _predict
    from tahoe_ft.prediction import resolve_checkpoint

    path, out_dir = resolve_checkpoint(
        str(ckpt), run_dir=str(run_dir) if run_dir else None, exp=exp, runs_dir=str(runs_dir)
    )
    return _predict(
        path,
        out_dir=out_dir,
        split=split,
        data_path=data_path,
        split_toml=split_toml,
        max_controls=max_controls,
        seed=seed,
        device=device,
        shuffle=shuffle,
        sets_per_pass=sets_per_pass,
        precision=precision,
    )


def compare(runs_dir: str | os.PathLike = "runs", out_dir: str | os.PathLike | None = None):
    """Every evaluated run in one table, best first (a DataFrame); writes compare.csv and compare.png."""
    from tahoe_ft.study.comparison import compare as _compare

    return _compare(runs_dir, out_dir)


def reproduce(config: ReproduceConfig | None = None, *, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The whole case study: every round trained in order, then predicted, scored and compared.

    `overrides` (Hydra syntax, e.g. `["data=papalexi"]`) apply to every round's `train` config.
    """
    from tahoe_ft.study.reproduce import reproduce as _reproduce

    return _reproduce(config or ReproduceConfig(), overrides=overrides)


def check(config: CheckConfig) -> dict[str, Any]:
    """Open and validate a data set exactly as `train` would; return what it found (trains nothing)."""
    from tahoe_ft.training import training_data

    dm = training_data(config)
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
    import dataclasses

    from tahoe_ft.datasets.demo_check import demo_check as _demo_check
    from tahoe_ft.fileio import atomic_write_text

    config = config or DemoCheckConfig()
    out = Path(config.out)
    spec = dataclasses.asdict(config.demo) if dataclasses.is_dataclass(config.demo) else dict(config.demo)
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


def _predict_info(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "predict.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def evaluate(
    run_dir: str | os.PathLike | None = None,
    *,
    exp: str | None = None,
    runs_dir: str | os.PathLike = "runs",
    pred: str | os.PathLike | None = None,
    real: str | os.PathLike | None = None,
    profile: str = "vcc",
    num_threads: int = 2,
    per_cell_type: bool = True,
    max_train_cells_per_group: int = 500,
    baselines: bool = True,
    linear_k: int = 10,
    linear_ridge: float = 0.1,
):
    """Score a run's pred.h5ad against its real.h5ad with cell-eval, beside the baseline panel and the data
    ceiling built from the run's training cells; writes `<run>/eval/` (score.json, the panel under
    `eval/baselines/`) and returns the `Score`.

    Default run: the newest one with a prediction (of `exp` if given); or give `pred=` and `real=` files.
    Without the run's checkpoint (predict.json names it) there are no training cells: the cell-mean baseline
    then comes from the cache and the panel is left out.
    """
    import dataclasses

    from tahoe_ft.checkpoints.io import safe_load
    from tahoe_ft.data import CellCatalog
    from tahoe_ft.evaluation import score_predictions
    from tahoe_ft.evaluation.baselines import PanelSettings
    from tahoe_ft.evaluation.panel import score_panel
    from tahoe_ft.fileio import atomic_write_text

    if pred or real:
        if not (pred and real):
            raise UserError("give both pred=<pred.h5ad> and real=<real.h5ad>, or neither (latest prediction)")
        pred, real = Path(pred), Path(real)
        run_dir = Path(run_dir) if run_dir else pred.parent
    else:
        run_dir = Path(run_dir) if run_dir else _newest_training_run(runs_dir, exp, "pred.h5ad")
        pred, real = run_dir / "pred.h5ad", run_dir / "real.h5ad"
    for p in (pred, real):
        if not p.is_file():
            raise UserError(f"{p} not found; run tahoe-ft predict first (or pass pred= and real=)")
    run_dir = Path(run_dir)
    info = _predict_info(run_dir)
    train = None
    manifest = safe_load(info["checkpoint"]).get("manifest") if info.get("checkpoint") else None
    if manifest:
        train = CellCatalog.from_manifest(manifest).training_cells(max_train_cells_per_group, seed=0)
    labels = {
        "pert_col": info.get("pert_col", "target_gene"),
        "control_pert": info.get("control_pert", "non-targeting"),
    }
    celltype_col = info.get("cell_type_col") if per_cell_type else None
    common = dict(
        profile=profile,
        num_threads=num_threads,
        celltype_col=celltype_col,
        de_cache_dir=Path(runs_dir) / ".de_cache",
    )
    score = score_predictions(pred, real, train, run_dir / "eval", **labels, **common)
    if baselines and train is not None:
        import anndata as ad

        panel = score_panel(
            train,
            ad.read_h5ad(real),
            run_dir / "eval",
            **labels,
            **common,
            settings=PanelSettings(
                linear_k=linear_k, linear_ridge=linear_ridge, seed=int(info.get("seed", 0))
            ),
        )
        score = dataclasses.replace(score, baselines=panel["baselines"], baseline_notes=panel["notes"])
    diagnostics = _diagnostics(score, pred, real, train, run_dir, labels, common)
    if diagnostics or score.baselines is not None:
        score = dataclasses.replace(score, diagnostics=diagnostics)
        atomic_write_text(run_dir / "eval" / "score.json", score.to_json())
    log.info("score %s: avg_score %.4f (leaderboard %.2f)", run_dir, score.avg_score, score.leaderboard_score)
    return score


def _diagnostics(score, pred: Path, real: Path, train, run_dir: Path, labels: dict, common: dict) -> dict:
    """Collapse of the predicted effects, and the shuffle test when predict wrote pred_shuffled.h5ad."""
    import anndata as ad

    from tahoe_ft.evaluation import score_predictions
    from tahoe_ft.evaluation.diagnostics import collapse

    out: dict[str, Any] = {
        "collapse": collapse(
            ad.read_h5ad(pred), ad.read_h5ad(real), celltype_col=common["celltype_col"], **labels
        )
    }
    shuffled = pred.with_name("pred_shuffled.h5ad")
    if shuffled.is_file():
        s = score_predictions(shuffled, real, train, run_dir / "eval" / "shuffled", **labels, **common)
        out["shuffle"] = {
            "avg_score": s.avg_score,
            "metrics": s.to_dict()["metrics"],
            "drop": score.avg_score - s.avg_score,
            "note": "the same basal cells, each held-out perturbation predicted with another's features",
        }
    return out


def export(
    pred: str | os.PathLike | None = None,
    *,
    run_dir: str | os.PathLike | None = None,
    exp: str | None = None,
    runs_dir: str | os.PathLike = "runs",
    gene_list: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
) -> Path:
    """Pack a prediction as a VCC submission with `cell-eval prep` (needs zstd and tar); returns its path."""
    import anndata as ad

    from tahoe_ft.evaluation import prep_submission
    from tahoe_ft.fileio import atomic_write_text

    if pred:
        pred = Path(pred)
        run_dir = pred.parent
    else:
        run_dir = Path(run_dir) if run_dir else _newest_training_run(runs_dir, exp, "pred.h5ad")
        pred = run_dir / "pred.h5ad"
    if not pred.is_file():
        raise UserError(f"{pred} not found; run tahoe-ft predict first (or pass pred=)")
    info = _predict_info(Path(run_dir))
    if gene_list is None:  # the evaluator's genes the model was trained on, in order
        gene_list = Path(run_dir) / "gene_names.csv"
        atomic_write_text(gene_list, "".join(f"{g}\n" for g in ad.read_h5ad(pred, backed="r").var_names))
    return prep_submission(
        pred,
        gene_list,
        Path(out) if out else Path(run_dir) / "submission.prep.vcc",
        pert_col=info.get("pert_col", "target_gene"),
        control_pert=info.get("control_pert", "non-targeting"),
    )


def export_state(
    ckpt: str | os.PathLike = "best-val.pt",
    *,
    out: str | os.PathLike | None = None,
    run_dir: str | os.PathLike | None = None,
    exp: str | None = None,
    runs_dir: str | os.PathLike = "runs",
) -> Path:
    """Write a tahoe-ft checkpoint as an upstream `state tx train` run folder (config.yaml, var_dims.pkl,
    pert_onehot_map.pt, checkpoints/final.ckpt) that arc-state's `load_from_checkpoint` and `state tx infer`
    read; returns the folder. `ckpt` is found as by `predict`; `out` (default `<run_dir>/state-export`) must
    not exist.
    """
    from tahoe_ft.checkpoints.upstream_folder import export_state as _export_state
    from tahoe_ft.prediction import resolve_checkpoint

    path, run = resolve_checkpoint(
        str(ckpt), run_dir=str(run_dir) if run_dir else None, exp=exp, runs_dir=str(runs_dir)
    )
    return _export_state(path, Path(out) if out else Path(run) / "state-export")
