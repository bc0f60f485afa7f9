"""`tahoe-ft predict`: predict the held-out perturbations with a checkpoint (SPEC §7).

For each held-out (cell type, perturbation): draw basal control cells of that cell type, predict a set the
size of the observed one (sets of at most `cell_set_len` cells, unpadded, as upstream), and write
`pred.h5ad` / `real.h5ad` in cell-eval's format: the evaluator's genes as `var_names` (same order in both),
the perturbation and cell-type columns, and the same real control cells in both files. Embedding-input
rounds predict through their gene decoder, so every round is scored in gene space.

Everything comes from the checkpoint: the architecture from its hparams and the data settings (genes,
perturbation features, split, columns, transform) from its manifest; only the cells are read from the
data file(s) recorded there (or `data_path=`).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from rich.progress import Progress

from tahoe_ft.checkpoint import load_checkpoint
from tahoe_ft.config import DataConfig
from tahoe_ft.data import PerturbationDataModule
from tahoe_ft.errors import UserError
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


def resolve_checkpoint(cfg: DictConfig) -> tuple[Path, Path]:
    """(checkpoint path, run directory that receives the predictions)."""
    ckpt = str(cfg.ckpt)
    if RUN_REF.match(ckpt) or "/" in ckpt or os.sep in ckpt:
        path = resolve_ref(ckpt, cfg.runs_dir)
        run_dir = Path(cfg.run_dir) if cfg.run_dir else path.parent.parent
        return path, run_dir
    run_dir = (
        Path(cfg.run_dir)
        if cfg.run_dir
        else newest_training_run(cfg.runs_dir, cfg.exp, need=f"checkpoints/{ckpt}")
    )
    path = run_dir / "checkpoints" / ckpt
    if not path.is_file():
        raise UserError(f"{path} does not exist; choose a checkpoint in {run_dir / 'checkpoints'}")
    return path, run_dir


def data_module_from_manifest(
    manifest: dict[str, Any], *, data_path: Any, seed: int, workdir: Path
) -> PerturbationDataModule:
    """A data module that reads cells exactly as the checkpoint saw them, from the manifest alone."""
    genes = workdir / "genes.csv"
    genes.write_text("".join(f"{g}\n" for g in manifest["gene_names"]))
    paths = data_path if data_path is not None else manifest["data_paths"]
    cfg = DataConfig(
        name="from-manifest",
        path=list(paths) if isinstance(paths, (list, tuple)) else [paths],
        pert_col=manifest["pert_col"],
        control_pert=manifest["control_pert"],
        cell_type_col=manifest["cell_type_col"],
        batch_col=manifest.get("batch_col"),
        input_transform=manifest["input_transform"],
        pert_features=None,  # the checkpoint carries the feature rows it was trained with
        gene_list=str(genes),
        val_perts=list(manifest["splits"].get("val", [])),
        test_perts=list(manifest["splits"].get("test", [])),
    )
    for p in cfg.path:
        if not Path(p).is_file():
            raise UserError(
                f"data file {p} (from the checkpoint's manifest) not found; pass data_path=<file>"
            )
    dm = PerturbationDataModule(
        cfg, embed_key=manifest.get("embed_key"), need_counts=False, cell_set_len=1, seed=seed
    )
    dm.setup("predict")
    return dm


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
        if getattr(model, "gene_decoder", None) is not None:
            y = model.decode(y)  # [1, s, G]: embedding rounds are scored in gene space
        out.append(y[0].float().cpu().numpy())
    return np.concatenate(out, axis=0)


def _write_h5ad(adata: ad.AnnData, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    adata.write_h5ad(tmp)
    os.replace(tmp, path)


def predict(cfg: DictConfig) -> Path:
    """Write pred.h5ad, real.h5ad and predict.json into the run directory; return the run directory."""
    ckpt_path, run_dir = resolve_checkpoint(cfg)
    model = load_checkpoint(ckpt_path)
    manifest = model.manifest
    if not manifest:
        raise UserError(f"{ckpt_path} has no data manifest; predict needs a tahoe-ft checkpoint")
    device = _device(cfg.device)
    model.to(device)
    with tempfile.TemporaryDirectory() as tmp:
        dm = data_module_from_manifest(manifest, data_path=cfg.data_path, seed=cfg.seed, workdir=Path(tmp))
        cells = dm.split_cells(cfg.split)
    groups = sorted(k for k in cells if isinstance(k, tuple))
    if not groups:
        raise UserError(
            f"the checkpoint's manifest has no '{cfg.split}' perturbations to predict; use split=val"
        )
    pert_index = {p: i for i, p in enumerate(manifest["pert_names"])}
    pert_matrix = torch.as_tensor(manifest["pert_matrix"], dtype=torch.float32)
    rng = np.random.default_rng(cfg.seed)

    pred_blocks, real_rows, labels = [], [], []
    with Progress(transient=True) as bar:
        task = bar.add_task(f"predict {cfg.split}", total=len(groups))
        for ct, pert in groups:
            rows = cells[(ct, pert)]
            if pert not in pert_index:
                raise UserError(
                    f"perturbation '{pert}' is not in the checkpoint's manifest; it cannot be predicted"
                )
            ctrl = cells[ct]
            basal_rows = rng.choice(ctrl, size=rows.size, replace=rows.size > ctrl.size)
            basal = dm.read_input(np.sort(basal_rows))
            pred_blocks.append(predict_sets(model, pert_matrix[pert_index[pert]], basal, device))
            real_rows.append(rows)
            labels += [(pert, ct)] * rows.size
            bar.advance(task)

    pred_x = np.concatenate(pred_blocks).astype(np.float32)
    n_clip = int((pred_x > PRED_MAX).sum() + (pred_x < 0).sum())
    if n_clip:
        log.info("clipped %d predicted values to [0, %g]", n_clip, PRED_MAX)
    np.clip(pred_x, 0.0, PRED_MAX, out=pred_x)
    real_x = dm.read_expression(np.concatenate(real_rows))
    # the same real control cells in both files (cell-eval computes deltas against each file's controls)
    ctrl_rows, ctrl_labels = [], []
    for ct in sorted({ct for ct, _ in groups}):
        pool = cells[ct]
        pick = np.sort(rng.choice(pool, size=min(pool.size, cfg.max_controls), replace=False))
        ctrl_rows.append(pick)
        ctrl_labels += [(manifest["control_pert"], ct)] * pick.size
    ctrl_x = dm.read_expression(np.concatenate(ctrl_rows))

    var = pd.DataFrame(index=pd.Index(manifest["gene_names"], name=None))
    obs = pd.DataFrame(labels + ctrl_labels, columns=[manifest["pert_col"], manifest["cell_type_col"]])
    obs.index = [f"cell{i}" for i in range(len(obs))]
    for col in obs.columns:
        obs[col] = obs[col].astype("category")
    pred = ad.AnnData(X=np.vstack([pred_x, ctrl_x]), obs=obs.copy(), var=var.copy())
    real = ad.AnnData(X=np.vstack([real_x, ctrl_x]), obs=obs.copy(), var=var.copy())
    for a, kind in ((pred, "prediction"), (real, "observed")):
        a.uns["tahoe_ft"] = {"kind": kind, "checkpoint": str(ckpt_path), "split": cfg.split}
    _write_h5ad(real, run_dir / "real.h5ad")
    _write_h5ad(pred, run_dir / "pred.h5ad")
    write_json_atomic(
        run_dir / "predict.json",
        {
            "checkpoint": str(Path(ckpt_path).resolve()),
            "checkpoint_step": model.checkpoint_info.get("step"),
            "split": cfg.split,
            "n_groups": len(groups),
            "n_pred_cells": int(pred_x.shape[0]),
            "n_control_cells": int(ctrl_x.shape[0]),
            "n_genes": len(manifest["gene_names"]),
            "pert_col": manifest["pert_col"],
            "control_pert": manifest["control_pert"],
            "cell_type_col": manifest["cell_type_col"],
            "data_paths": [str(p) for p in dm.data_paths],
            "seed": cfg.seed,
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
