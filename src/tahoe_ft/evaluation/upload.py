"""The VCC 2026 upload file (`tahoe-ft export format=vcc2026`, issue #33), built and checked as vcc-cli does.

The contract (vcc-cli 0.3.0, cell-eval2 0.20.0's vcc2026 preset): one `.h5ad` for all contexts, obs
`target_gene` and `context`; exactly 400 cells per (context, perturbation); no control rows; the gene list's
genes, in its order; integer counts (no fractional or negative value, no cell totalling above 1e6); X sparse
(CSR). `vcc prep -i <file> -g <gene list> -p pert_counts.csv` packs it into the `.vcc` that is uploaded.

`build_upload` draws the cells: a (context, perturbation) with at least `cells_per_pert` predicted cells gives
`cells_per_pert` of them without replacement; one with fewer (but at least `min_cells`) gives every predicted
cell once and draws the rest with replacement (a seeded draw; the copies are whole cells, so the per-cell
distribution is kept); fewer than `min_cells` is refused (one line). Every choice is recorded in `uns`.

`check_upload` refuses each broken rule with one line; `vcc_cli_check` runs vcc-cli's own validation
(`vcc.prep.run_prep(dry_run=True)`, offline) when vcc-cli is installed (the `test` extra: never needed at run
time), with a perturbation list written from the file itself, so its per-perturbation count check runs too.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from tahoe_ft.data.labels import DEFAULT_CONTROL_PERT, DEFAULT_PERT_COL, ScreenLabels
from tahoe_ft.errors import UserError
from tahoe_ft.evaluation.counts import check_counts

log = logging.getLogger(__name__)

CELLS_PER_PERT = 400  # vcc-cli 0.3.0's EXPECTED_CELLS_PER_PERT
MIN_CELLS = 10  # fewer predicted cells than this: refused rather than copied up to 400
PERT_COL = DEFAULT_PERT_COL  # the column names vcc-cli reads (the VCC's labels)
CONTEXT_COL = "context"
CONTROL = DEFAULT_CONTROL_PERT


def check_genes(var_names, genes: list[str], where: str) -> None:
    """The prediction's genes are the gene list's (any order); else one line naming what differs."""
    have, want = list(map(str, var_names)), set(genes)
    extra = [g for g in have if g not in want]
    if extra:
        raise UserError(
            f"{where} has {len(extra)} genes outside the gene list (e.g. {extra[0]!r}); predict in the gene "
            "list's genes, or pass the matching gene_list="
        )
    missing = [g for g in genes if g not in set(have)]
    if missing:
        raise UserError(
            f"{where} lacks {len(missing)} genes of the gene list (e.g. {missing[0]!r}); the upload needs every "
            "one: train on the gene list's genes, or pass the matching gene_list="
        )


def build_upload(
    pred: ad.AnnData,
    genes: list[str],
    *,
    labels: ScreenLabels,
    where: str,
    cells_per_pert: int = CELLS_PER_PERT,
    min_cells: int = MIN_CELLS,
    seed: int = 0,
) -> ad.AnnData:
    """The upload file of a counts prediction `pred` (see the module docstring for the draw); the context of a
    cell is `labels.cell_type_col` (None: one context)."""
    pert_col, control_pert, context_col = labels.pert_col, labels.control_pert, labels.cell_type_col
    if cells_per_pert < 1 or min_cells < 1:
        raise UserError(f"cells_per_pert={cells_per_pert} and min_cells={min_cells} must be >= 1")
    if pert_col not in pred.obs:
        raise UserError(f"obs column '{pert_col}' not found in {where}; pass the perturbation column")
    check_genes(pred.var_names, genes, where)
    check_counts(pred.X, where)
    perts = pred.obs[pert_col].astype(str).to_numpy()
    if context_col is not None and context_col not in pred.obs:
        raise UserError(f"obs column '{context_col}' (the context) not found in {where}")
    ctx = (
        pred.obs[context_col].astype(str).to_numpy()
        if context_col
        else np.full(pred.n_obs, "A", dtype=object)
    )
    rng = np.random.default_rng(seed)
    keep = perts != control_pert
    rows, short = [], {}
    for c, p in sorted({(c, p) for c, p in zip(ctx[keep], perts[keep], strict=True)}):
        pool = np.flatnonzero(keep & (ctx == c) & (perts == p))
        if pool.size < min_cells:
            raise UserError(
                f"perturbation {p!r} in context {c!r} has {pool.size} predicted cells in {where}, fewer than "
                f"min_cells={min_cells} to draw {cells_per_pert} from; predict more cells or lower min_cells"
            )
        if pool.size >= cells_per_pert:
            pick = np.sort(rng.choice(pool, size=cells_per_pert, replace=False))
        else:
            pick = np.concatenate([pool, rng.choice(pool, size=cells_per_pert - pool.size, replace=True)])
            short[f"{c}/{p}"] = int(pool.size)
        rows.append(pick)
    if not rows:
        raise UserError(
            f"{where} holds no perturbed cells (only controls '{control_pert}'); nothing to upload"
        )
    rows = np.concatenate(rows)
    x = pred.X[rows] if sp.issparse(pred.X) else sp.csr_matrix(np.asarray(pred.X)[rows])
    x = sp.csr_matrix(x, dtype=np.float32)
    order = pd.Index(pred.var_names.astype(str)).get_indexer(genes)
    x = x[:, order].tocsr()
    x.sort_indices()
    x.eliminate_zeros()
    obs = pd.DataFrame(
        {PERT_COL: pd.Categorical(perts[rows]), CONTEXT_COL: pd.Categorical(ctx[rows])},
        index=[f"cell{i}" for i in range(rows.size)],
    )
    out = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=pd.Index(genes)))
    out.uns["tahoe_ft_upload"] = {
        "cells_per_pert": cells_per_pert,
        "min_cells": min_cells,
        "seed": seed,
        "rule": "every predicted cell once, the rest drawn with replacement, when fewer than cells_per_pert; "
        "else cells_per_pert drawn without replacement",
        "topped_up": short,
        "context_from": context_col or "one context 'A' (no cell-type column)",
    }
    return out


def check_upload(
    a: ad.AnnData, genes: list[str], *, where: str = "the upload file", cells_per_pert: int = CELLS_PER_PERT
) -> None:
    """Every rule of the 2026 upload contract, one line for the first broken one."""
    for col in (PERT_COL, CONTEXT_COL):
        if col not in a.obs:
            raise UserError(
                f"{where} has no obs column '{col}'; the upload needs '{PERT_COL}' and '{CONTEXT_COL}'"
            )
    if not sp.issparse(a.X) or a.X.format != "csr":
        raise UserError(f"{where}: X is {type(a.X).__name__}, not a sparse CSR matrix; store it sparse")
    if list(map(str, a.var_names)) != list(genes):
        check_genes(a.var_names, genes, where)
        raise UserError(f"{where}: the genes are not in the gene list's order; reorder them to the gene list")
    perts = a.obs[PERT_COL].astype(str)
    if (perts == CONTROL).any():
        raise UserError(
            f"{where} holds {int((perts == CONTROL).sum())} control rows ('{CONTROL}'); drop them"
        )
    check_counts(a.X, where)
    n = pd.crosstab(a.obs[CONTEXT_COL].astype(str), perts)
    sizes = n.to_numpy()[n.to_numpy() > 0]
    if sizes.size and (sizes != cells_per_pert).any():
        bad = n.stack()
        bad = bad[(bad > 0) & (bad != cells_per_pert)]
        (c, p), k = next(iter(bad.items()))
        raise UserError(
            f"{where}: {bad.size} perturbations do not have exactly {cells_per_pert} cells (e.g. {p!r} in context "
            f"{c!r}: {k}); draw exactly {cells_per_pert} per perturbation"
        )


def vcc_cli_check(path: Path, genes_csv: Path, contexts: list[str], *, cells_per_pert: int) -> dict[str, Any]:
    """vcc-cli 0.3.0's validation of the file (`run_prep(dry_run=True)`: offline, writes nothing), when vcc-cli
    is installed; `{"vcc_cli": None}` when it is not."""
    try:
        from vcc import __version__ as vcc_version
        from vcc.prep import PrepError, run_prep
    except ImportError:
        return {"vcc_cli": None, "note": "vcc-cli not installed: tahoe-ft's own checks only"}
    a = ad.read_h5ad(path, backed="r")
    pairs = a.obs[[PERT_COL, CONTEXT_COL]].astype(str).drop_duplicates()
    a.file.close()
    with tempfile.TemporaryDirectory(prefix="tahoe-ft-vcc-") as tmp:
        perts = Path(tmp) / "pert_counts.csv"
        pairs.to_csv(perts, index=False)
        try:
            res = run_prep(
                input_path=str(path),
                genes_path=str(genes_csv),
                perts_path=str(perts),
                cells_per_pert=cells_per_pert,
                required_contexts=tuple(sorted(set(contexts))),
                expected_gene_dim=None,
                dry_run=True,
            )
        except PrepError as e:
            raise UserError(f"vcc-cli {vcc_version} refuses {path}: {' '.join(str(e).split())}") from e
    return {
        "vcc_cli": vcc_version,
        "normalization": res.normalization,
        "n_cells": res.n_cells,
        "nnz": res.nnz,
    }


def export_upload(
    pred_path: Path,
    target: Path,
    *,
    gene_list: str | None,
    labels: ScreenLabels,
    cells_per_pert: int = CELLS_PER_PERT,
    min_cells: int = MIN_CELLS,
    seed: int = 0,
) -> dict[str, Any]:
    """Build, check and write the upload file of the counts prediction `pred_path` to `target` (written under a
    temp name, renamed when every check passed); returns what was checked."""
    from tahoe_ft.fileio import atomic_path

    try:
        pred = ad.read_h5ad(pred_path)
    except Exception as exc:  # h5py/anndata raise many types for a file that is not an AnnData
        raise UserError(f"pred {pred_path} is not a readable AnnData .h5ad ({type(exc).__name__})") from None
    if gene_list is not None:
        gl = Path(gene_list)
        if not gl.is_file():
            raise UserError(f"gene list not found: {gl}; pass a CSV with one gene name per line, no header")
        genes = pd.read_csv(gl, header=None).iloc[:, 0].astype(str).tolist()
    else:
        genes = list(map(str, pred.var_names))
    context_col = labels.cell_type_col
    if context_col is None or context_col not in pred.obs:  # a file from elsewhere: a context column it has
        context_col = next((c for c in (CONTEXT_COL, "cell_type", "celltype") if c in pred.obs), None)
    up = build_upload(
        pred,
        genes,
        labels=dataclasses.replace(labels, cell_type_col=context_col),
        where=f"pred ({pred_path})",
        cells_per_pert=cells_per_pert,
        min_cells=min_cells,
        seed=seed,
    )
    check_upload(up, genes, cells_per_pert=cells_per_pert)
    with (
        tempfile.TemporaryDirectory(prefix="tahoe-ft-export-") as tmp,
        atomic_path(target, suffix=".h5ad") as out,
    ):
        up.write_h5ad(out)
        again = ad.read_h5ad(out)  # the file as written, checked again
        check_upload(again, genes, where=str(target), cells_per_pert=cells_per_pert)
        genes_csv = Path(tmp) / "gene_names.csv"
        genes_csv.write_text("".join(f"{g}\n" for g in genes))
        vcc = vcc_cli_check(
            Path(out),
            genes_csv,
            up.obs[CONTEXT_COL].astype(str).unique().tolist(),
            cells_per_pert=cells_per_pert,
        )
    checks = {
        "file": str(target),
        "n_cells": int(up.n_obs),
        "n_genes": int(up.n_vars),
        "contexts": sorted(up.obs[CONTEXT_COL].astype(str).unique().tolist()),
        "n_perturbations": int(up.obs[[CONTEXT_COL, PERT_COL]].drop_duplicates().shape[0]),
        "topped_up": up.uns["tahoe_ft_upload"]["topped_up"],
        **vcc,
    }
    log.info("upload file %s: %s", target, checks)
    return checks
