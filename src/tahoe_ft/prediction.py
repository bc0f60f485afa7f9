"""`tahoe-ft predict` (`tahoe_ft.predict`): predict the held-out perturbations with a checkpoint (SPEC §7).

For each held-out (dataset, cell type, perturbation) group: draw basal control cells of that cell type in that
dataset, predict a set the size of the observed one (sets of at most `cell_set_len` cells, unpadded, as upstream), and write
`pred.h5ad` / `real.h5ad` in cell-eval's format: the evaluator's genes as `var_names` (same order in both),
the perturbation and cell-type columns, and the same real control cells in both files. Embedding-input
rounds predict through their gene decoder, so every round is scored in gene space.

Everything comes from the checkpoint: the architecture from its hparams and the data settings (genes,
perturbation features, held-out groups, columns, transform) from its manifest; only the cells are read, through
`CellCatalog.from_manifest`, from the data file(s) recorded there (or `data_path=`). An upstream `state tx train`
run folder has no manifest: genes and perturbations come from its `var_dims.pkl` / `pert_onehot_map.pt`, columns
from its `config.yaml`, the held-out groups from its split TOML (or `split_toml=`), the cells from `data_path=`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
from rich.progress import Progress

from tahoe_ft.checkpoint import load_checkpoint
from tahoe_ft.data import CellCatalog, GroupKey, Manifest
from tahoe_ft.errors import UserError
from tahoe_ft.evaluation.diagnostics import derangement
from tahoe_ft.fileio import atomic_path
from tahoe_ft.runs import RUN_REF, list_runs, resolve_ref, write_json_atomic

log = logging.getLogger(__name__)

# cell-eval refuses values >= 15 as "not log1p"; upstream (0.11.1) clips predictions to [0, 14] as well
PRED_MAX = 14.0


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
    run = Path(run_dir) if run_dir else newest_training_run(runs_dir, exp, need=f"checkpoints/{ckpt}")
    path = run / "checkpoints" / ckpt
    if not path.is_file():
        raise UserError(f"{path} does not exist; choose a checkpoint in {run / 'checkpoints'}")
    return path, run


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()
def predict_sets(model, pert_vec: torch.Tensor, basal: np.ndarray, device: torch.device) -> np.ndarray:
    """Predict one group: basal `[n, D_in]` in sets of <= cell_set_len cells -> genes `[n, G]`."""
    s = int(model.hparams["cell_set_len"])
    out = []
    for start in range(0, basal.shape[0], s):
        b = torch.from_numpy(basal[start : start + s]).to(device)[None]  # [1, s, D_in]
        p = pert_vec.to(device).expand(1, b.shape[1], -1)  # [1, s, P]
        y = model.forward_sets(p, b)  # [1, s, D_out]
        if decodes(model):
            y = model.decode(y)  # [1, s, G]: embedding rounds are scored in gene space
        out.append(y[0].float().cpu().numpy())
    return np.concatenate(out, axis=0)


def decodes(model) -> bool:
    """Whether predictions go through the gene decoder: with embedding input, as `state tx infer` decides.
    An HVG-mode upstream checkpoint (embed_key None, or X_hvg with output_space gene) carries a decoder that
    was never trained (its batches have no counts), which must not be used."""
    hp = model.hparams
    key, space = hp.get("embed_key"), hp.get("output_space")
    trained = key is not None and not (key == "X_hvg" and space == "gene")
    return getattr(model, "gene_decoder", None) is not None and trained


def draw_basal(rng: np.random.Generator, pool: np.ndarray, n: int) -> np.ndarray:
    """`n` basal control rows in the order they form sets: random draws of the pool (without replacement
    when it is large enough), never re-sorted, so a file stored by replicate (or batch) does not give sets
    of one replicate each, unlike training sets."""
    return rng.choice(pool, size=n, replace=n > pool.size)


def _prediction_order(keys: Iterable[GroupKey]) -> list[GroupKey]:
    # by cell type, perturbation, then dataset: the order predict has always drawn basal cells in, so a seed
    # draws the same cells (a dataset-first order would change the draws of multi-dataset runs)
    return sorted(keys, key=lambda k: (k.cell_type, k.pert, k.dataset))


def predict(
    ckpt: str | Path,
    *,
    out_dir: str | Path | None = None,
    split: str = "test",
    data_path: str | Path | Sequence[str | Path] | None = None,
    split_toml: str | Path | None = None,
    max_controls: int = 2000,
    seed: int = 0,
    device: str = "auto",
    shuffle: bool = True,
) -> Path:
    """Predict the held-out groups of `split` with the checkpoint `ckpt`; return the output directory.

    Writes `pred.h5ad`, `real.h5ad` and `predict.json` into `out_dir` (default: the run directory, two levels
    above the checkpoint). Cells are read from the files in the checkpoint's manifest, or `data_path`.
    `max_controls` real control cells per (dataset, cell type) go into both files; `seed` fixes every draw.
    `split_toml`: the held-out groups of an upstream run folder (default: its config's toml_config_path).
    `shuffle`: also write `pred_shuffled.h5ad`, every group predicted from the same basal cells with the
    features of another held-out perturbation (`evaluation.diagnostics.derangement`), for eval's shuffle test.
    """
    ckpt_path = Path(ckpt)
    run_dir = Path(out_dir) if out_dir is not None else ckpt_path.parent.parent
    model = load_checkpoint(ckpt_path)
    manifest = model.manifest
    if not manifest and model.run_folder is not None:  # an upstream run folder: its vocabulary and split
        m = model.run_folder.manifest(
            model.hparams, data_paths=data_path, split_toml=split_toml, decoded=decodes(model)
        )
    elif not manifest:
        raise UserError(
            f"{ckpt_path} has no data manifest; predict needs a tahoe-ft checkpoint or an upstream run folder"
        )
    else:
        m = Manifest.from_dict(manifest)
    dev = _device(device)
    model.to(dev)
    catalog = CellCatalog.from_manifest(m, data_paths=data_path)
    cells = catalog.groups(split)
    groups = _prediction_order(cells)
    if not groups:
        raise UserError(f"the checkpoint's manifest has no '{split}' perturbations to predict; use split=val")
    pert_index = {p: i for i, p in enumerate(m.pert_names)}
    rng = np.random.default_rng(seed)

    pred_blocks, real_rows, labels, basal_rows = [], [], [], []
    with Progress(transient=True) as bar:
        task = bar.add_task(f"predict {split}", total=len(groups))
        for key in groups:
            rows = cells[key]
            if key.pert not in pert_index:
                raise UserError(
                    f"perturbation '{key.pert}' is not in the checkpoint's manifest; it cannot be predicted"
                )
            basal_rows.append(draw_basal(rng, catalog.controls(key.dataset, key.cell_type), rows.size))
            basal = catalog.read_input(basal_rows[-1])
            pred_blocks.append(predict_sets(model, m.pert_matrix[pert_index[key.pert]], basal, dev))
            real_rows.append(rows)
            labels += [(key.pert, key.cell_type)] * rows.size
            bar.advance(task)

    pred_x = np.concatenate(pred_blocks).astype(np.float32)
    n_clip = int((pred_x > PRED_MAX).sum() + (pred_x < 0).sum())
    if n_clip:
        log.info("clipped %d predicted values to [0, %g]", n_clip, PRED_MAX)
    np.clip(pred_x, 0.0, PRED_MAX, out=pred_x)
    real_x = catalog.read_expression(np.concatenate(real_rows))
    # the same real control cells in both files (cell-eval computes deltas against each file's controls)
    ctrl_rows, ctrl_labels = [], []
    for ct, ds in sorted({(k.cell_type, k.dataset) for k in groups}):
        pool = catalog.controls(ds, ct)
        pick = np.sort(rng.choice(pool, size=min(pool.size, max_controls), replace=False))
        ctrl_rows.append(pick)
        ctrl_labels += [(m.control_pert, ct)] * pick.size
    ctrl_x = catalog.read_expression(np.concatenate(ctrl_rows))

    var = pd.DataFrame(index=pd.Index(m.gene_names, name=None))
    obs = pd.DataFrame(labels + ctrl_labels, columns=[m.pert_col, m.cell_type_col])
    obs.index = [f"cell{i}" for i in range(len(obs))]
    for col in obs.columns:
        obs[col] = obs[col].astype("category")
    pred = ad.AnnData(X=np.vstack([pred_x, ctrl_x]), obs=obs.copy(), var=var.copy())
    real = ad.AnnData(X=np.vstack([real_x, ctrl_x]), obs=obs.copy(), var=var.copy())
    for a, kind in ((pred, "prediction"), (real, "observed")):
        a.uns["tahoe_ft"] = {"kind": kind, "checkpoint": str(ckpt_path), "split": split}
    written = [(real, "real.h5ad"), (pred, "pred.h5ad")]
    derange = derangement(sorted({k.pert for k in groups})) if shuffle else {}
    if derange:  # same basal cells, another held-out perturbation's features (the main draws are untouched)
        blocks = [
            predict_sets(model, m.pert_matrix[pert_index[derange[key.pert]]], catalog.read_input(rows), dev)
            for key, rows in zip(groups, basal_rows, strict=True)
        ]
        shuffled_x = np.clip(np.concatenate(blocks).astype(np.float32), 0.0, PRED_MAX)
        shuffled = ad.AnnData(X=np.vstack([shuffled_x, ctrl_x]), obs=obs.copy(), var=var.copy())
        shuffled.uns["tahoe_ft"] = {"kind": "prediction, perturbation features shuffled", "shuffle": derange}
        written.append((shuffled, "pred_shuffled.h5ad"))
    for a, name in written:
        with atomic_path(run_dir / name, suffix=".h5ad") as tmp:
            a.write_h5ad(tmp)
    write_json_atomic(
        run_dir / "predict.json",
        {
            "checkpoint": str(Path(model.checkpoint_path).resolve()),
            "checkpoint_step": model.checkpoint_info.get("step"),
            "split": split,
            "n_groups": len(groups),
            "n_pred_cells": int(pred_x.shape[0]),
            "n_control_cells": int(ctrl_x.shape[0]),
            "n_genes": len(m.gene_names),
            "pert_col": m.pert_col,
            "control_pert": m.control_pert,
            "cell_type_col": m.cell_type_col,
            "data_paths": list(catalog.data_paths),
            "seed": seed,
            "shuffle": derange,
        },
    )
    log.info(
        "wrote %s and %s (%d groups, %d cells)",
        run_dir / "pred.h5ad",
        run_dir / "real.h5ad",
        len(groups),
        pred.n_obs,
    )
    return run_dir
