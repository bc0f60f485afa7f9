"""The data ceiling: the best score any model can reach on these real cells, given their sampling noise.

cell-eval 0.8.2's `MetricsEvaluator.compute_ceiling` splits each perturbation's real cells (and the controls)
into two disjoint halves, scores one half as the "prediction" of the other, and maps the half-depth result to
full depth with the Spearman-Brown correction — for the reliability metrics (PDS, DES); it gives no ceiling
for error metrics such as MAE (NaN). So that the ceiling has all three VCC metrics and an `avg_score` on the
rounds' scale, the MAE ceiling here is the MAE between the two halves' pseudobulks divided by 2: the
difference of two independent half-depth means has twice the standard deviation of a full-depth mean around
the truth, which is what a perfect predictor of the true mean would be off by. Normalised against the same
cell-mean baseline with cell-eval's own `score_agg_metrics`.
"""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import polars as pl

from tahoe_ft.data.labels import ScreenLabels

log = logging.getLogger(__name__)

CEILING_PROFILE = "vcc"


def half_split_mae(real: ad.AnnData, *, labels: ScreenLabels, seed: int = 0) -> float:
    """Mean over perturbations of MAE(mean of half A, mean of half B) / 2 (disjoint random halves)."""
    pert_col, control_pert = labels.pert_col, labels.control_pert
    rng = np.random.default_rng(seed)
    x = real.X
    out = []
    for pert, idx in real.obs.groupby(pert_col, observed=True).indices.items():
        if str(pert) == control_pert or len(idx) < 2:
            continue
        perm = rng.permutation(np.asarray(idx))
        h = perm.size // 2
        a = np.asarray(x[np.sort(perm[:h])].mean(axis=0)).ravel()
        b = np.asarray(x[np.sort(perm[h : 2 * h])].mean(axis=0)).ravel()
        out.append(float(np.abs(a - b).mean()) / 2.0)
    return float(np.mean(out)) if out else float("nan")


def ceiling_agg(
    real: ad.AnnData, *, labels: ScreenLabels, num_threads: int, outdir: str, prefix: str | None
) -> pl.DataFrame:
    """The ceiling as a one-row aggregate table in cell-eval's describe format (`statistic` = "mean"), of
    `real`'s cells of one cell type (`labels.cell_type_col` is not read; `prefix`: the cell type's)."""
    from cell_eval import MetricsEvaluator

    ev = MetricsEvaluator(
        None,
        real,
        control_pert=labels.control_pert,
        pert_col=labels.pert_col,
        num_threads=num_threads,
        outdir=outdir,
        allow_discrete=False,
        prefix=prefix,
    )
    _, agg = ev.compute_ceiling(profile=CEILING_PROFILE, seed=0, write_csv=True)
    row = {c: agg[c][0] for c in agg.columns if c != "statistic"}
    if "mae" in row:
        row["mae"] = half_split_mae(real, labels=labels)
    return pl.DataFrame(
        {"statistic": ["mean"], **{k: [None if v is None else float(v)] for k, v in row.items()}}
    )
