"""The baseline panel: predictors that learn nothing clever, built from a run's training cells only.

A fine-tuned round is only worth something where it beats these (Ahlmann-Eltze et al., Nat Methods 2025;
Csendes et al. 2025; Wong et al. 2025 — see `reference/baselines-and-features.md`). Each is written as a
prediction file in `pred.h5ad`'s format (the real file's obs layout and control cells) and scored by the same
cell-eval call and normalisation as the rounds:

- `control`: basal control cells copied (no effect);
- `cell_mean`: cell-eval's own cell-mean baseline (`build_base_mean_adata`: the mean of the training group
  means, control included) — the normaliser of every score, so its normalised score is 0 by definition;
- `pert_mean`: the perturbation's mean effect in the other cell types where it is training data, added to this
  cell type's controls (absent unless every held-out group has one);
- `target_knockdown`: `cell_mean` with the target gene's expression at the knock-down ratio of the training
  perturbations whose targets are measured genes (absent when no target is measured, e.g. a drug screen);
- `linear`: PCA + ridge of Ahlmann-Eltze et al.: gene embedding G = the top-K principal components (gene
  loadings) of the training pseudobulk deltas, a perturbation's embedding = its target gene's row of G (the
  mean row when the target is not measured), `delta ~ b + G W p` fitted by ridge.

Only `obs` and the control cells of the real file are read here, never its perturbed cells: the panel
cannot see what it is scored on. Values are log1p expression, clipped to [0, PRED_MAX] as predictions are.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

PANEL = ("control", "cell_mean", "pert_mean", "target_knockdown", "linear")
# cell-eval refuses values >= 15 as "not log1p"; predictions are clipped to [0, 14] as upstream does
PRED_MAX = 14.0


@dataclass(frozen=True)
class PanelSettings:
    """Knobs of the panel (config: `eval.linear_k`, `eval.linear_ridge`, `eval.seed`)."""

    linear_k: int = 10
    linear_ridge: float = 0.1
    seed: int = 0


@dataclass
class Panel:
    """The baselines' prediction files, and why any baseline is absent."""

    predictions: dict[str, ad.AnnData]
    notes: dict[str, str]


@dataclass(frozen=True)
class _Labels:
    pert_col: str
    control_pert: str
    celltype_col: str | None


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64)


class _Training:
    """Group means of the training cells: `mean[(ct, pert)]` (log1p), `ctrl[ct]`, linear-scale control means."""

    def __init__(self, train: ad.AnnData, lab: _Labels, genes: list[str]):
        x = _dense(train.X)
        perts = train.obs[lab.pert_col].astype(str).to_numpy()
        cts = (
            train.obs[lab.celltype_col].astype(str).to_numpy()
            if lab.celltype_col
            else np.full(len(perts), "")
        )
        self.mean: dict[tuple[str, str], np.ndarray] = {}
        self.n: dict[tuple[str, str], int] = {}
        self.lin: dict[tuple[str, str], np.ndarray] = {}
        keys = pd.MultiIndex.from_arrays([cts, perts])
        for (ct, p), idx in pd.Series(np.arange(len(perts))).groupby(keys).groups.items():
            rows = x[np.asarray(idx)]
            self.mean[(ct, p)] = rows.mean(axis=0)
            self.lin[(ct, p)] = np.expm1(rows).mean(axis=0)
            self.n[(ct, p)] = len(idx)
        self.control = lab.control_pert
        self.cell_types = sorted({ct for ct, _ in self.mean})
        self.ctrl_rows = {ct: x[(cts == ct) & (perts == lab.control_pert)] for ct in self.cell_types}
        self.gene_index = {g: i for i, g in enumerate(genes)}

    def ctrl(self, ct: str) -> np.ndarray:
        return self.mean[(ct, self.control)]

    def perturbed(self) -> list[tuple[str, str]]:
        return sorted(k for k in self.mean if k[1] != self.control)

    def delta(self, ct: str, p: str) -> np.ndarray:
        return self.mean[(ct, p)] - self.ctrl(ct)


def build_panel(
    train: ad.AnnData,
    real: ad.AnnData,
    *,
    pert_col: str,
    control_pert: str,
    celltype_col: str | None,
    settings: PanelSettings | None = None,
) -> Panel:
    """The panel's prediction files for the held-out groups of `real` (only its obs and controls are read)."""
    settings = settings or PanelSettings()
    lab = _Labels(pert_col, control_pert, celltype_col)
    genes = [str(g) for g in real.var_names]
    tr = _Training(train, lab, genes)
    obs = real.obs.copy()
    cts = obs[celltype_col].astype(str).to_numpy() if celltype_col else np.full(real.n_obs, "")
    perts = obs[pert_col].astype(str).to_numpy()
    is_ctrl = perts == control_pert
    ctrl_x = _dense(real.X[np.flatnonzero(is_ctrl)])  # the real controls, copied into every file
    groups = sorted({(c, p) for c, p in zip(cts[~is_ctrl], perts[~is_ctrl], strict=True)})
    missing = sorted({c for c, _ in groups} - set(tr.cell_types))
    if missing:
        from tahoe_ft.errors import UserError

        raise UserError(
            f"the training cells have no cell type {missing}; baselines need training controls of every "
            "evaluated cell type"
        )
    rng = np.random.default_rng(settings.seed)
    # basal cells per held-out cell: random draws of that cell type's training controls, cell types in sorted
    # order (a set's order follows Python's per-process string hashing: the draws, and with them the control
    # and linear scores, changed from one process to the next)
    basal = np.zeros((real.n_obs, len(genes)))
    for c in sorted({c for c, _ in groups}):
        rows = np.flatnonzero((cts == c) & ~is_ctrl)
        pool = tr.ctrl_rows[c]
        basal[rows] = pool[rng.integers(0, len(pool), size=rows.size)]

    notes: dict[str, str] = {}
    effects: dict[str, dict[tuple[str, str], np.ndarray] | None] = {
        "control": {g: np.zeros(len(genes)) for g in groups},
        "pert_mean": _pert_mean(tr, groups, notes),
        "linear": _linear(tr, groups, settings),
    }
    cell_mean = _cell_mean(tr, groups)
    levels: dict[str, dict[tuple[str, str], np.ndarray] | None] = {
        "cell_mean": cell_mean,
        "target_knockdown": _target_knockdown(tr, groups, cell_mean, notes),
    }
    out: dict[str, ad.AnnData] = {}
    for name in PANEL:
        x = np.zeros((real.n_obs, len(genes)))
        x[is_ctrl] = ctrl_x
        if name in effects:
            eff = effects[name]
            if eff is None:
                continue
            for c, p in groups:
                rows = np.flatnonzero((cts == c) & (perts == p))
                x[rows] = basal[rows] + eff[(c, p)]
        else:
            lev = levels[name]
            if lev is None:
                continue
            for c, p in groups:
                x[(cts == c) & (perts == p)] = lev[(c, p)]
        np.clip(x, 0.0, PRED_MAX, out=x)
        pred = ad.AnnData(X=x.astype(np.float32), obs=obs.copy(), var=pd.DataFrame(index=list(genes)))
        pred.uns["tahoe_ft"] = {"kind": "baseline", "baseline": name}
        out[name] = pred
    return Panel(out, notes)


def _cell_mean(tr: _Training, groups: list[tuple[str, str]]) -> dict[tuple[str, str], np.ndarray]:
    """cell-eval's `build_base_mean_adata` vector per cell type: the mean of the training group means."""
    by_ct = {c: np.mean([m for (ct, _), m in tr.mean.items() if ct == c], axis=0) for c, _ in groups}
    return {(c, p): by_ct[c] for c, p in groups}


def _pert_mean(
    tr: _Training, groups: list[tuple[str, str]], notes: dict[str, str]
) -> dict[tuple[str, str], np.ndarray] | None:
    out = {}
    for c, p in groups:
        others = [tr.delta(c2, p) for c2 in tr.cell_types if c2 != c and (c2, p) in tr.mean]
        if others:
            out[(c, p)] = np.mean(others, axis=0)
    if len(out) < len(groups):
        notes["pert_mean"] = (
            f"absent: {len(groups) - len(out)} of {len(groups)} held-out groups have their perturbation in no "
            "other training cell type"
        )
        return None
    return out


def knockdown_ratio(tr: _Training) -> tuple[float | None, int]:
    """Median over training groups whose target is a measured gene of mean(expm1 target | pert) /
    mean(expm1 target | control) of the cell type; and how many groups it is taken over."""
    ratios = []
    for c, p in tr.perturbed():
        g = tr.gene_index.get(p)
        base = tr.lin[(c, tr.control)][g] if g is not None else 0.0
        if g is not None and base > 0:
            ratios.append(tr.lin[(c, p)][g] / base)
    return (float(np.median(ratios)) if ratios else None), len(ratios)


def _target_knockdown(
    tr: _Training,
    groups: list[tuple[str, str]],
    cell_mean: dict[tuple[str, str], np.ndarray],
    notes: dict[str, str],
) -> dict[tuple[str, str], np.ndarray] | None:
    ratio, n = knockdown_ratio(tr)
    if ratio is None:
        notes["target_knockdown"] = "absent: no training perturbation targets a measured gene"
        return None
    notes["target_knockdown"] = f"knock-down ratio {ratio:.3f} (median over {n} training groups)"
    out = {}
    for c, p in groups:
        level = cell_mean[(c, p)].copy()
        g = tr.gene_index.get(p)
        if g is not None:
            level[g] = np.log1p(ratio * tr.lin[(c, tr.control)][g])
        out[(c, p)] = level
    return out


def _linear(
    tr: _Training, groups: list[tuple[str, str]], settings: PanelSettings
) -> dict[tuple[str, str], np.ndarray]:
    """Ahlmann-Eltze's linear model on training pseudobulk deltas Y (genes x groups), pooled over cell types.

    As their `run_linear_pretrained_model.R`: the gene embedding A is the top-K principal component scores of
    the genes (A = U_K S_K of Y, genes as observations); a perturbation's embedding is its target gene's row of
    A (the mean row when the target is not measured); `Y - center = A K B` is solved by ridge on both sides
    (`solve_y_axb`) and a held-out perturbation is predicted as `A K b + center`. Two departures, both for
    small panels: deltas rather than expression (pooling cell types would otherwise make the cell type the
    first component), and Y's columns are not centred first (with a few hundred genes the per-perturbation
    mean is part of the effect, and centring drops it from every prediction).
    """
    keys = tr.perturbed()
    y = np.stack([tr.delta(c, p) for c, p in keys], axis=1)  # [G, n]
    k = max(1, min(settings.linear_k, y.shape[1] - 1, y.shape[0]))
    u, sv, _ = np.linalg.svd(y, full_matrices=False)
    emb = u[:, :k] * sv[:k]  # [G, K] gene embedding
    mean_row = emb.mean(axis=0)

    def pert_emb(p: str) -> np.ndarray:
        g = tr.gene_index.get(p)
        return emb[g] if g is not None else mean_row

    b_train = np.stack([pert_emb(p) for _, p in keys], axis=1)  # [K, n]
    center = y.mean(axis=1, keepdims=True)
    lam, eye = settings.linear_ridge, np.eye(k)
    kk = np.linalg.solve(emb.T @ emb + lam * eye, emb.T @ (y - center) @ b_train.T)  # [K, K]
    kk = np.linalg.solve(b_train @ b_train.T + lam * eye, kk.T).T
    return {(c, p): center[:, 0] + emb @ kk @ pert_emb(p) for c, p in groups}
