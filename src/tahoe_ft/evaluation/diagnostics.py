"""Diagnostics beside a score: does the model use the perturbation at all, and has it collapsed?

- `collapse`: the mean Pearson correlation between the predicted mean effects (pseudobulk minus the control
  mean) of different held-out perturbations of a cell type, next to the same for the real cells. Near 1 on the
  predicted side while the real side is lower: the model predicts one effect for every perturbation (the
  mode collapse PerturBench reports), whatever its score.
- the shuffle test (`prediction.predict(shuffle=True)` writes `pred_shuffled.h5ad`: every held-out group
  predicted with the features of another held-out perturbation, a fixed derangement): `eval` scores it with the
  same call, and the drop from the real score is how much the score owes to the perturbation's identity. A
  model that ignores its perturbation input drops by ~0.
"""

from __future__ import annotations

import anndata as ad
import numpy as np


def _pseudobulks(a: ad.AnnData, pert_col: str, control_pert: str, celltype_col: str | None):
    cts = a.obs[celltype_col].astype(str).to_numpy() if celltype_col else np.full(a.n_obs, "")
    perts = a.obs[pert_col].astype(str).to_numpy()
    x = a.X
    out: dict[str, dict[str, np.ndarray]] = {}
    for ct in np.unique(cts):
        sel = cts == ct
        ctrl = np.asarray(x[sel & (perts == control_pert)].mean(axis=0)).ravel()
        out[ct] = {
            p: np.asarray(x[sel & (perts == p)].mean(axis=0)).ravel() - ctrl
            for p in sorted(set(perts[sel]) - {control_pert})
        }
    return out


def mean_pairwise_correlation(deltas: dict[str, np.ndarray]) -> float | None:
    """Mean Pearson correlation over pairs of different perturbations' effect vectors (None with < 2)."""
    if len(deltas) < 2:
        return None
    m = np.corrcoef(np.stack(list(deltas.values())))
    iu = np.triu_indices(m.shape[0], k=1)
    return float(np.nanmean(m[iu]))


def collapse(
    pred: ad.AnnData, real: ad.AnnData, *, pert_col: str, control_pert: str, celltype_col: str | None
) -> dict[str, float | None]:
    """`{"pred_effect_corr", "real_effect_corr"}`: mean over cell types of the mean pairwise correlation."""
    out = {}
    for name, a in (("pred_effect_corr", pred), ("real_effect_corr", real)):
        per_ct = [
            mean_pairwise_correlation(d)
            for d in _pseudobulks(a, pert_col, control_pert, celltype_col).values()
        ]
        vals = [v for v in per_ct if v is not None]
        out[name] = float(np.mean(vals)) if vals else None
    return out


def derangement(names: list[str], seed: int = 0) -> dict[str, str]:
    """A fixed permutation of `names` with no fixed point: whose features each perturbation is predicted with."""
    if len(names) < 2:
        return {}
    rng = np.random.default_rng(seed)
    order = sorted(names)
    while True:
        perm = rng.permutation(len(order))
        if not np.any(perm == np.arange(len(order))):
            return {order[i]: order[j] for i, j in enumerate(perm)}
