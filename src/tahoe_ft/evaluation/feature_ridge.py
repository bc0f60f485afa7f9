"""`feature_ridge`: a ridge regression from the round's own perturbation features to the pseudobulk effect.

The comparator a fine-tuned round must beat to show that fine-tuning added something: a linear map of exactly
the inputs the model is given (Ahlmann-Eltze et al. 2025 compare deep models with such a map; PRESAGE and Cole
et al. 2026 find that the feature source matters more than the architecture).

    delta(cell type, pert) ~ b + [features(pert), onehot(cell type)] @ W

fitted on the training groups' pseudobulk deltas (group mean minus the cell type's control mean, log1p) only.
Feature columns are standardised on the training rows; the intercept is not penalised; the penalty is chosen
from a log grid by exact leave-one-out over the training groups (the ridge hat matrix's LOO identity, so no
refits). A held-out perturbation reaches the ridge only through its feature row: with one-hot features its
column is zero in every training row, so its prediction is the cell type's mean effect.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# the penalty grid, in units of the number of training groups (so the grid means the same at any panel size)
PENALTY_GRID = np.logspace(-4, 4, 33)


@dataclass(frozen=True)
class FeatureRidge:
    """A fitted feature ridge: `predict(features, cell_type)` -> the effect over genes."""

    center: np.ndarray  # [F + C] training column means
    scale: np.ndarray  # [F + C] training column sds (1 where a column is constant)
    coef: np.ndarray  # [F + C, G]
    intercept: np.ndarray  # [G]
    cell_types: tuple[str, ...]
    penalty: float
    loo_mse: float  # mean squared leave-one-out residual at `penalty` (over groups and genes)
    n_groups: int  # training groups it was fitted on

    def design(self, features: np.ndarray, cell_type: str | None) -> np.ndarray:
        """The standardised design row; a cell type the ridge never saw (or None) gets the training mean of
        the cell-type columns, i.e. no cell-type term beyond the intercept."""
        if cell_type in self.cell_types:
            onehot = np.array([ct == cell_type for ct in self.cell_types], dtype=np.float64)
        else:
            onehot = self.center[-len(self.cell_types) :]
        return (np.concatenate([np.asarray(features, dtype=np.float64), onehot]) - self.center) / self.scale

    def predict(self, features: np.ndarray, cell_type: str | None) -> np.ndarray:
        return self.intercept + self.design(features, cell_type) @ self.coef


def fit_feature_ridge(
    deltas: np.ndarray, features: np.ndarray, cell_types: Sequence[str], grid: np.ndarray = PENALTY_GRID
) -> FeatureRidge:
    """Fit on training groups: `deltas` [n, G], `features` [n, F] (each group's perturbation features),
    `cell_types` [n]; the penalty (x n) with the lowest exact leave-one-out error over the n groups."""
    y = np.asarray(deltas, dtype=np.float64)
    n = y.shape[0]
    if n < 2:
        raise ValueError(f"feature_ridge needs at least 2 training groups, got {n}")
    cts = tuple(sorted(set(cell_types)))
    onehot = np.array([[c == ct for ct in cts] for c in cell_types], dtype=np.float64)
    x = np.concatenate([np.asarray(features, dtype=np.float64), onehot], axis=1)
    center = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-12] = 1.0
    xc = (x - center) / scale
    y_mean = y.mean(axis=0)
    yc = y - y_mean
    u, s, vt = np.linalg.svd(xc, full_matrices=False)  # xc = u s vt, rank <= n - 1 after centring
    uty = u.T @ yc  # [r, G]
    best: tuple[float, float] | None = None
    for lam in grid * n:
        shrink = s**2 / (s**2 + lam)  # [r]
        fitted = u @ (shrink[:, None] * uty)
        # hat matrix of the intercept + ridge smoother: 1/n + u diag(shrink) u^T (centred columns are
        # orthogonal to the intercept), so the LOO residual is e_i / (1 - h_ii) exactly
        h = 1.0 / n + (u**2) @ shrink
        loo = (yc - fitted) / (1.0 - h)[:, None]
        err = float(np.mean(loo**2))
        if best is None or err < best[0] - 1e-15:
            best = (err, float(lam))
    assert best is not None
    err, lam = best
    coef = vt.T @ ((s / (s**2 + lam))[:, None] * uty)  # [F + C, G]
    return FeatureRidge(center, scale, coef, y_mean, cts, lam, err, n)


def fit_on_groups(
    deltas: Mapping[tuple[str, str], np.ndarray], features: Mapping[str, np.ndarray]
) -> FeatureRidge:
    """Fit on training groups `{(cell type, pert): delta over genes}` (sorted, so the fit is the same in any
    process), each group's row of `features` (its perturbation's feature vector)."""
    keys = sorted(deltas)
    missing = sorted({p for _, p in keys} - set(features))
    if missing:
        raise ValueError(f"feature_ridge: no feature row for training perturbations {missing[:5]}")
    return fit_feature_ridge(
        np.stack([deltas[k] for k in keys]),
        np.stack([np.asarray(features[p], dtype=np.float64) for _, p in keys]),
        [c for c, _ in keys],
    )
