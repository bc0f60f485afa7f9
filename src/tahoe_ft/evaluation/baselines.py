"""The baseline panel: predictors that learn nothing clever, built from a run's training cells only.

A fine-tuned round is only worth something where it beats these (Ahlmann-Eltze et al., Nat Methods 2025;
Csendes et al. 2025; Wong et al. 2025 — see `reference/baselines-and-features.md`). Each is written as a
prediction file in `pred.h5ad`'s format (the real file's obs layout and control cells) and scored by the same
cell-eval call and normalisation as the rounds:

- `control`: basal control cells copied (no effect);
- `cell_mean`: cell-eval's own cell-mean baseline (`build_base_mean_adata`: the mean of the training group
  means, control included) — the normaliser of every score, so its normalised score is 0 by definition;
- `pert_mean` (context transfer): the perturbation's measured effect in the other cell types where it is
  training data (each one's group mean minus that cell type's own control mean, averaged over those cell types),
  added to this cell type's controls: what the strongest untrained VCC 2026 entries did. Absent, with its
  reason, for a held-out group whose perturbation trains in no other cell type;
- `additive`: for a double perturbation "A+B" (`COMBO_SEP`), the sum of its singles' measured effects in the
  same cell type (each single's training group mean minus the cell type's control mean), added to the controls;
  absent, with its reason, for a group that is no combination or whose singles do not all train there;
- `target_knockdown`: `cell_mean` with the target gene's expression at the target-to-control ratio of the training
  perturbations whose targets are measured genes (absent when no target is measured, e.g. a drug screen);
- `linear`: PCA + ridge of Ahlmann-Eltze et al.: gene embedding G = the top-K principal components (gene
  loadings) of the training pseudobulk deltas, a perturbation's embedding = its target gene's row of G (the
  mean row when the target is not measured), `delta ~ b + G W p` fitted by ridge.
- `feature_ridge`: a ridge from exactly the round's perturbation features (the manifest's `pert_matrix`, one-hot
  included) and the cell type to the pseudobulk delta, its penalty chosen by leave-one-out over the training
  groups (`evaluation.feature_ridge`): what fine-tuning must beat to have added anything over a linear map of
  its own inputs (absent when the run's features are not known).

A baseline that exists for some held-out groups only (`pert_mean`, `additive`) is written for those groups
(with the controls) in `Panel.partial` and scored on them (`panel.score_panel`), beside the round scored on the
same groups, instead of being dropped whole.

Basal cells (`control`, `pert_mean`, `additive`, `linear`, `feature_ridge` add an effect to them) are drawn per held-out cell
from the cell type's training controls and, by default (`PanelSettings.recentre_basal`, as predict's
`recentre_basal`), re-centred group by group on the mean of the cell type's control cells in the real file (the
cells cell-eval takes deltas against): each cell keeps its deviation from the group's draw mean, and the draw
mean becomes the control mean, so a predicted pseudobulk carries no basal sampling noise (that noise alone cost
more MAE than the cell mean's whole error on the demo).

Only `obs` and the control cells of the real file are read here, never its perturbed cells: the panel
cannot see what it is scored on. Values are log1p expression, clipped to [0, PRED_MAX] as predictions are.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import anndata as ad
import numpy as np
import pandas as pd

from tahoe_ft.data.labels import ScreenLabels
from tahoe_ft.evaluation.feature_ridge import FeatureRidge, fit_on_groups

log = logging.getLogger(__name__)

PANEL = ("control", "cell_mean", "pert_mean", "additive", "target_knockdown", "linear", "feature_ridge")
# baselines defined for some held-out groups only: scored on those groups when not on all
PARTIAL = ("pert_mean", "additive")
# how a double perturbation's name joins its singles ("KLF1+MAP2K6", as in Norman 2019 / PerturBench)
COMBO_SEP = "+"
# cell-eval refuses values >= 15 as "not log1p"; predictions are clipped to [0, 14] as upstream does
PRED_MAX = 14.0


@dataclass(frozen=True)
class PanelSettings:
    """Knobs of the panel (config: `eval.linear_k`, `eval.linear_ridge`; the seed and the re-centring follow
    the prediction's `predict.json`)."""

    linear_k: int = 10
    linear_ridge: float = 0.1
    seed: int = 0
    recentre_basal: bool = True


@dataclass
class Panel:
    """The baselines' prediction files, and why any baseline is absent; `partial`: a baseline of `PARTIAL` that
    exists for some held-out groups only, as (its prediction file of those groups' cells and the controls, those
    groups as (cell type, perturbation))."""

    predictions: dict[str, ad.AnnData]
    notes: dict[str, str]
    partial: dict[str, tuple[ad.AnnData, list[tuple[str, str]]]] = field(default_factory=dict)


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64)


class _Training:
    """Group means of the training cells: `mean[(ct, pert)]` (log1p), `ctrl[ct]`, linear-scale control means."""

    def __init__(self, train: ad.AnnData, lab: ScreenLabels, genes: list[str]):
        x = train.X  # float64 group by group, never the whole matrix at once (2.9 GB at 20,000 x 18,080)
        perts = train.obs[lab.pert_col].astype(str).to_numpy()
        cts = (
            train.obs[lab.cell_type_col].astype(str).to_numpy()
            if lab.cell_type_col
            else np.full(len(perts), "")
        )
        self.mean: dict[tuple[str, str], np.ndarray] = {}
        self.n: dict[tuple[str, str], int] = {}
        self.lin: dict[tuple[str, str], np.ndarray] = {}
        keys = pd.MultiIndex.from_arrays([cts, perts])
        for (ct, p), idx in pd.Series(np.arange(len(perts))).groupby(keys).groups.items():
            rows = _dense(x[np.asarray(idx)])
            self.mean[(ct, p)] = rows.mean(axis=0)
            self.lin[(ct, p)] = np.expm1(rows).mean(axis=0)
            self.n[(ct, p)] = len(idx)
        self.control = lab.control_pert
        self.cell_types = sorted({ct for ct, _ in self.mean})
        self.ctrl_rows = {
            ct: _dense(x[np.flatnonzero((cts == ct) & (perts == lab.control_pert))]) for ct in self.cell_types
        }
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
    labels: ScreenLabels,
    settings: PanelSettings | None = None,
    features: Mapping[str, np.ndarray] | None = None,
) -> Panel:
    """The panel's prediction files for the held-out groups of `real` (only its obs and controls are read);
    `labels`: the obs columns and control label of train and real (`cell_type_col` None: one cell type);
    `features`: the round's perturbation features by name (for `feature_ridge`; None leaves it out)."""
    settings = settings or PanelSettings()
    pert_col, control_pert, celltype_col = labels.pert_col, labels.control_pert, labels.cell_type_col
    genes = [str(g) for g in real.var_names]
    tr = _Training(train, labels, genes)
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
    if settings.recentre_basal:  # on the mean of the control cells cell-eval takes deltas against
        for c, p in groups:
            rows = np.flatnonzero((cts == c) & (perts == p))
            basal[rows] = recentre(basal[rows], ctrl_x[cts[is_ctrl] == c].mean(axis=0))

    notes: dict[str, str] = {}
    effects: dict[str, dict[tuple[str, str], np.ndarray] | None] = {
        "control": {g: np.zeros(len(genes)) for g in groups},
        "pert_mean": _pert_mean(tr, groups, notes),
        "additive": _additive(tr, groups, notes),
        "linear": _linear(tr, groups, settings),
        "feature_ridge": _feature_ridge(tr, groups, features, notes),
    }
    cell_mean = _cell_mean(tr, groups)
    levels: dict[str, dict[tuple[str, str], np.ndarray] | None] = {
        "cell_mean": cell_mean,
        "target_knockdown": _target_knockdown(tr, groups, cell_mean, notes),
    }
    out: dict[str, ad.AnnData] = {}
    partial: dict[str, tuple[ad.AnnData, list[tuple[str, str]]]] = {}
    for name in PANEL:
        x = np.zeros((real.n_obs, len(genes)))
        x[is_ctrl] = ctrl_x
        if name in effects:
            eff = effects[name]
            if not eff:
                continue
            if len(eff) < len(groups):  # some groups only: those groups' cells and their cell types' controls
                covered = sorted(eff)
                keep = np.isin(cts, sorted({c for c, _ in covered})) & is_ctrl
                for c, p in covered:
                    rows = np.flatnonzero((cts == c) & (perts == p))
                    x[rows] = basal[rows] + eff[(c, p)]
                    keep[rows] = True
                np.clip(x, 0.0, PRED_MAX, out=x)
                sub = ad.AnnData(
                    X=x[keep].astype(np.float32), obs=obs[keep].copy(), var=pd.DataFrame(index=list(genes))
                )
                sub.uns["tahoe_ft"] = {
                    "kind": "baseline",
                    "baseline": name,
                    "groups": [list(g) for g in covered],
                }
                partial[name] = (sub, covered)
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
    return Panel(out, notes, partial)


def recentre(cells: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """`cells` [n, G] moved so that their mean is `mean`: each cell keeps its deviation from their own mean."""
    return cells - cells.mean(axis=0, keepdims=True) + mean


def _feature_ridge(
    tr: _Training,
    groups: list[tuple[str, str]],
    features: Mapping[str, np.ndarray] | None,
    notes: dict[str, str],
) -> dict[tuple[str, str], np.ndarray] | None:
    if features is None:
        notes["feature_ridge"] = (
            "absent: the run's perturbation features are not known (no checkpoint manifest)"
        )
        return None
    unknown = sorted({p for _, p in groups} - set(features))
    if unknown:
        notes["feature_ridge"] = f"absent: no feature row for held-out perturbations {unknown[:5]}"
        return None
    ridge = _fit_ridge(tr, features)
    notes["feature_ridge"] = (
        f"penalty {ridge.penalty:.4g} by leave-one-out over {len(tr.perturbed())} training groups "
        f"(LOO MSE {ridge.loo_mse:.4g})"
    )
    return {(c, p): ridge.predict(features[p], c) for c, p in groups}


def _fit_ridge(tr: _Training, features: Mapping[str, np.ndarray]) -> FeatureRidge:
    return fit_feature_ridge_on_means(tr.mean, tr.control, features)


def fit_feature_ridge_on_means(
    means: Mapping[tuple[str, str], np.ndarray], control_pert: str, features: Mapping[str, np.ndarray]
) -> FeatureRidge:
    """The feature ridge from training group means `{(cell type, pert): mean over genes}` (each cell type's
    controls under `control_pert`): every perturbed group's delta against its cell type's control mean."""
    deltas = {(ct, p): m - means[(ct, control_pert)] for (ct, p), m in means.items() if p != control_pert}
    return fit_on_groups(deltas, features)


def fit_feature_ridge_on_cells(
    train: ad.AnnData,
    *,
    labels: ScreenLabels,
    features: Mapping[str, np.ndarray],
) -> FeatureRidge:
    """The panel's `feature_ridge` fitted on training cells `train` (what `CellCatalog.training_cells` gives;
    `labels` their columns): the same fit as the panel's on the same cells, so a model's feature prior starts
    where the baseline is."""
    genes = [str(g) for g in train.var_names]
    return _fit_ridge(_Training(train, labels, genes), features)


def _cell_mean(tr: _Training, groups: list[tuple[str, str]]) -> dict[tuple[str, str], np.ndarray]:
    """cell-eval's `build_base_mean_adata` vector per cell type: the mean of the training group means."""
    by_ct = {c: np.mean([m for (ct, _), m in tr.mean.items() if ct == c], axis=0) for c, _ in groups}
    return {(c, p): by_ct[c] for c, p in groups}


def _coverage_note(
    what: str,
    out: dict[tuple[str, str], np.ndarray],
    groups: list[tuple[str, str]],
    why: dict[str, list[str]],
) -> str:
    """The note of a baseline defined for some groups only: for how many, and why not for the others (`why`:
    reason -> the groups it applies to, as "cell type/perturbation")."""
    reasons = "; ".join(
        f"{reason}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}" for reason, names in why.items()
    )
    if not out:
        return f"absent: {what} exists for none of the {len(groups)} held-out groups ({reasons})"
    if len(out) == len(groups):
        return f"{what}, for all {len(groups)} held-out groups"
    return (
        f"partial: {what} exists for {len(out)} of {len(groups)} held-out groups, scored on those only "
        f"({reasons})"
    )


def _group_name(c: str, p: str) -> str:
    return f"{c}/{p}" if c else p


def _pert_mean(
    tr: _Training, groups: list[tuple[str, str]], notes: dict[str, str]
) -> dict[tuple[str, str], np.ndarray]:
    """Context transfer: each held-out group's perturbation's effect in the other training cell types (delta
    against each one's own control mean, averaged over them); groups without one are left out (see `PARTIAL`)."""
    out = {}
    why: dict[str, list[str]] = {}
    for c, p in groups:
        others = [tr.delta(c2, p) for c2 in tr.cell_types if c2 != c and (c2, p) in tr.mean]
        if others:
            out[(c, p)] = np.mean(others, axis=0)
        else:
            why.setdefault("its perturbation trains in no other cell type", []).append(_group_name(c, p))
    notes["pert_mean"] = _coverage_note(
        "context transfer (the perturbation measured in another cell type)", out, groups, why
    )
    return out


def _additive(
    tr: _Training, groups: list[tuple[str, str]], notes: dict[str, str]
) -> dict[tuple[str, str], np.ndarray]:
    """The additive model of a double perturbation "A+B": delta(A) + delta(B), each single's training group mean
    minus the cell type's control mean (same cell type); groups without one are left out (see `PARTIAL`)."""
    out = {}
    why: dict[str, list[str]] = {}
    for c, p in groups:
        singles = [s.strip() for s in p.split(COMBO_SEP)]
        if len(singles) < 2 or not all(singles):
            why.setdefault(f"not a combination (no {COMBO_SEP!r})", []).append(_group_name(c, p))
            continue
        missing = [s for s in singles if (c, s) not in tr.mean or s == tr.control]
        if missing:
            why.setdefault("a single does not train in its cell type", []).append(
                f"{_group_name(c, p)} (lacks {', '.join(missing)})"
            )
            continue
        out[(c, p)] = np.sum([tr.delta(c, s) for s in singles], axis=0)
    notes["additive"] = _coverage_note(
        "an additive effect (each single measured in the cell type)", out, groups, why
    )
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
    way = "knocked down" if ratio < 1 else "raised, as under CRISPRa" if ratio > 1 else "unchanged"
    notes["target_knockdown"] = (
        f"target at {ratio:.3f} x its control level ({way}; median over {n} training groups)"
    )
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
