"""The Virtual Cell Challenge submission file: predictions packed by cell-eval's `prep`."""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
from pathlib import Path

import polars as pl

from tahoe_ft.data.labels import VCC_LABELS, ScreenLabels
from tahoe_ft.errors import UserError
from tahoe_ft.evaluation.inputs import one_line, read_input
from tahoe_ft.fileio import atomic_path

log = logging.getLogger(__name__)


def prep_submission(
    pred_path: str | os.PathLike,
    gene_list_csv: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    labels: ScreenLabels = VCC_LABELS,
) -> Path:
    """Pack predictions for the Virtual Cell Challenge with cell-eval's `prep` (a tar of pred.h5ad.zst).

    `gene_list_csv`: the expected genes in order, one per line, no header (genes are reordered to it;
    missing or extra genes are an error). Needs `zstd` and `tar` on PATH.
    """
    for tool in ("tar", "zstd"):
        if shutil.which(tool) is None:
            raise UserError(
                f"`{tool}` not found on PATH, needed to pack the submission; install {tool}: "
                f"`apt-get install {tool}` (Debian/Ubuntu), `brew install {tool}`, or `conda install {tool}`"
            )
    from cell_eval._cli._prep import strip_anndata

    gene_list_csv = Path(gene_list_csv)
    if not gene_list_csv.is_file():
        raise UserError(
            f"gene list not found: {gene_list_csv}; pass a CSV with one gene name per line, no header"
        )
    genes = pl.read_csv(gene_list_csv, has_header=False).to_series(0).cast(str).to_list()
    pert_col, control_pert, celltype_col = labels.pert_col, labels.control_pert, labels.cell_type_col
    pred = read_input(pred_path, "pred", labels=labels, clip_negative=True)
    if control_pert not in set(pred.adata.obs[pert_col]):
        raise UserError(
            f"control {control_pert!r} not found in {pert_col!r} of pred ({pred.where}); "
            "copy the real control cells into the predicted file"
        )
    out_path = Path(out_path)
    try:
        with atomic_path(out_path) as tmp:
            strip_anndata(
                pred.adata,
                output_path=str(tmp),
                genelist=genes,
                pert_col=pert_col,
                celltype_col=celltype_col,
                ntc_name=control_pert,
                encoding=32,
                allow_discrete=False,
                exp_gene_dim=None,
            )
            _check_tar(tmp)
    except ValueError as e:
        raise UserError(f"cell-eval prep rejected {pred.where}: {one_line(e)}") from e
    log.info("submission written to %s", out_path)
    return out_path


def _check_tar(path: Path) -> None:
    """cell-eval does not check the exit status of zstd / tar: check the result instead."""
    try:
        with tarfile.open(path) as tf:
            names = tf.getnames()
    except tarfile.TarError as e:
        raise UserError(f"cell-eval prep wrote no valid tar ({e}); check that zstd and tar work") from e
    if "pred.h5ad.zst" not in names:
        raise UserError(f"cell-eval prep wrote a tar without pred.h5ad.zst ({names}); check that zstd works")
