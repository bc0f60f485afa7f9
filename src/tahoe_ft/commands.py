"""CLI glue for `tahoe-ft eval` and `tahoe-ft compare`: find the files, then call the Python API
(`tahoe_ft.evaluate.evaluate`, `tahoe_ft.compare.compare`)."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from omegaconf import DictConfig

from tahoe_ft.checkpoint import safe_load
from tahoe_ft.errors import UserError
from tahoe_ft.predict import data_module_from_manifest, newest_training_run

log = logging.getLogger(__name__)


def training_cells(manifest: dict, *, max_per_group: int, seed: int) -> ad.AnnData:
    """The training cells (train perturbations + controls) in gene space, for cell-eval's cell-mean baseline.

    At most `max_per_group` cells per (cell type, perturbation): the baseline is a mean of group means.
    """
    with tempfile.TemporaryDirectory() as tmp:
        dm = data_module_from_manifest(manifest, data_path=None, seed=seed, workdir=Path(tmp))
    cells = dm.split_cells("train")
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for key, r in sorted(cells.items(), key=lambda kv: str(kv[0])):
        pick = np.sort(rng.choice(r, size=min(r.size, max_per_group), replace=False))
        ct, pert = key if isinstance(key, tuple) else (key, manifest["control_pert"])
        rows.append(pick)
        labels += [(pert, ct)] * pick.size
    x = dm.read_expression(np.concatenate(rows))
    obs = pd.DataFrame(labels, columns=[manifest["pert_col"], manifest["cell_type_col"]])
    obs.index = [f"train{i}" for i in range(len(obs))]
    obs = obs.astype("category")
    return ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=list(manifest["gene_names"])))


def run_eval(cfg: DictConfig) -> dict:
    """`tahoe-ft eval`: score pred.h5ad against real.h5ad; writes <run>/eval/ with score.json."""
    from tahoe_ft.evaluate import evaluate

    if cfg.pred or cfg.real:
        if not (cfg.pred and cfg.real):
            raise UserError("give both pred=<pred.h5ad> and real=<real.h5ad>, or neither (latest prediction)")
        pred, real = Path(cfg.pred), Path(cfg.real)
        run_dir = Path(cfg.run_dir) if cfg.run_dir else pred.parent
    else:
        run_dir = (
            Path(cfg.run_dir) if cfg.run_dir else newest_training_run(cfg.runs_dir, cfg.exp, need="pred.h5ad")
        )
        pred, real = run_dir / "pred.h5ad", run_dir / "real.h5ad"
    for p in (pred, real):
        if not p.is_file():
            raise UserError(f"{p} not found; run tahoe-ft predict first (or pass pred= and real=)")
    info_path = run_dir / "predict.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    train = None
    if info.get("checkpoint"):
        manifest = safe_load(info["checkpoint"]).get("manifest")
        if manifest:
            train = training_cells(manifest, max_per_group=cfg.max_train_cells_per_group, seed=0)
    pert_col = info.get("pert_col", "target_gene")
    celltype_col = info.get("cell_type_col") if cfg.per_cell_type else None
    score = evaluate(
        pred,
        real,
        train,
        run_dir / "eval",
        pert_col=pert_col,
        control_pert=info.get("control_pert", "non-targeting"),
        profile=cfg.profile,
        num_threads=cfg.num_threads,
        celltype_col=celltype_col,
        de_cache_dir=Path(cfg.runs_dir) / ".de_cache",
    )
    log.info(
        "score %s: avg_score %.4f (leaderboard %.2f)", run_dir, score["avg_score"], score["leaderboard_score"]
    )
    print(
        json.dumps(
            {
                "run_dir": str(run_dir),
                "avg_score": score["avg_score"],
                "leaderboard_score": score["leaderboard_score"],
                "metrics": score.get("metrics"),
            }
        )
    )
    return score


def run_compare(cfg: DictConfig):
    """`tahoe-ft compare`: every evaluated run in one table (compare.csv) and plots (compare.png)."""
    from tahoe_ft.compare import compare

    return compare(cfg.runs_dir, cfg.out_dir)


def run_export(cfg: DictConfig) -> Path:
    """`tahoe-ft export`: pack a prediction as a VCC submission (`cell-eval prep`; needs zstd and tar)."""
    from tahoe_ft.evaluate import prep_submission

    if cfg.pred:
        pred = Path(cfg.pred)
        run_dir = pred.parent
    else:
        run_dir = (
            Path(cfg.run_dir) if cfg.run_dir else newest_training_run(cfg.runs_dir, cfg.exp, need="pred.h5ad")
        )
        pred = run_dir / "pred.h5ad"
    if not pred.is_file():
        raise UserError(f"{pred} not found; run tahoe-ft predict first (or pass pred=)")
    info_path = run_dir / "predict.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    gene_list = Path(cfg.gene_list) if cfg.gene_list else run_dir / "gene_names.csv"
    if not cfg.gene_list:  # the evaluator's genes the model was trained on, in order
        genes = ad.read_h5ad(pred, backed="r").var_names
        gene_list.write_text("".join(f"{g}\n" for g in genes))
    out = Path(cfg.out) if cfg.out else run_dir / "submission.prep.vcc"
    path = prep_submission(
        pred,
        gene_list,
        out,
        pert_col=info.get("pert_col", "target_gene"),
        control_pert=info.get("control_pert", "non-targeting"),
    )
    print(json.dumps({"submission": str(path)}))
    return path


def run_check(cfg: DictConfig) -> dict:
    """`tahoe-ft check`: open and validate a data set as `train` would, print what it found; train nothing."""
    from tahoe_ft.train import training_data

    dm = training_data(cfg)
    summary = {
        "files": [str(p) for p in dm.data_paths],
        "dims": dict(dm.dims),
        "genes": len(dm.gene_names),
        "perturbations": len(dm.pert_names),
        "cell_types": list(dm.cell_types),
        "batches": list(dm.batches) if dm.batches is not None else None,
        "control": cfg.data.control_pert,
        "input_transform": cfg.data.input_transform,
        "splits": {},
    }
    for split in ("train", "val", "test"):
        cells = dm.split_cells(split)
        groups = {k: v for k, v in cells.items() if isinstance(k, tuple)}
        summary["splits"][split] = {
            "perturbations": sorted({p for _, p in groups}),
            "groups": len(groups),
            "cells": int(sum(v.size for v in groups.values())),
            "smallest_group": int(min((v.size for v in groups.values()), default=0)),
        }
    summary["batches_per_epoch"] = {"train": len(dm.train_dataloader()), "val": len(dm.val_dataloader())}
    print(json.dumps(summary, indent=2))
    return summary
