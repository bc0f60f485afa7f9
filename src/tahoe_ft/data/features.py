"""Perturbation features that carry information to perturbations the model never trained on.

With one-hot features a held-out perturbation selects a column of `pert_encoder.0` that never received a
gradient: it reaches the model as an untrained random vector. `data.pert_features` chooses the sources, one or
a list whose blocks are concatenated (each block scaled to unit mean row norm so none dominates):

- `onehot` (also null): one column per perturbation, control included — the study's and upstream's default;
- a file path: a `torch.load`-able dict name -> vector (ESM2, GenePT, DepMap, ...); a missing name is an error
  unless `data.allow_missing_pert_features=true`, and then it gets zeros and the manifest lists it;
- `pca`: for genetic screens whose targets are measured genes, the target gene's row of the top-K principal
  component scores of the *training* pseudobulk deltas (genes x training groups) — the gene embedding of the
  linear baseline of Ahlmann-Eltze et al. 2025: genes that respond alike to the training perturbations get
  alike vectors, so a held-out knock-out of a gene lands near the training knock-outs of its co-responders;
- `coexpression`: the target gene's row of the top-K principal component loadings (x singular values) of the
  control cells (genes that co-vary across unperturbed cells: the GEARS / GenePT intuition, from the user's
  own data, with no download).

`pca` and `coexpression` read training perturbations and control cells only, never a held-out group; a
perturbation whose target is not a measured gene gets the mean row and the manifest lists it (`unmeasured`),
and the control gets zeros (no perturbation). Width: `data.pert_feature_dim` (K) per derived source.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from tahoe_ft.data.inputs import build_pert_matrix
from tahoe_ft.errors import UserError

if TYPE_CHECKING:
    from tahoe_ft.data.catalog import CellCatalog

log = logging.getLogger(__name__)

DERIVED = ("pca", "coexpression")
# cells read per training group (pca) and control cells read (coexpression): means and covariances, not data
MAX_CELLS_PER_GROUP = 200
MAX_CONTROL_CELLS = 2000


def sources(spec: Any) -> list[str]:
    """The configured sources as a list (null -> ["onehot"])."""
    if spec is None or spec == "":
        return ["onehot"]
    if isinstance(spec, str):
        return [spec]
    out = [str(s) for s in spec]
    if not out:
        return ["onehot"]
    return out


def build_features(
    catalog: CellCatalog,
    spec: Any,
    *,
    allow_missing: bool = False,
    dim: int = 16,
    seed: int = 0,
) -> tuple[np.ndarray, dict[str, Any]]:
    """(float32 `[n_perts, P]`, row i = `catalog.pert_names[i]`; the features' record for the manifest)."""
    names = list(catalog.pert_names)
    control = catalog.control_pert
    srcs = sources(spec)
    if len(srcs) == 1 and srcs[0] not in DERIVED:  # the original single-source behaviour, unchanged
        return build_pert_matrix(
            names, control, None if srcs[0] == "onehot" else srcs[0], allow_missing=allow_missing
        )
    blocks, record = [], {"source": "+".join(srcs), "sources": [], "sha256": None}
    for src in srcs:
        if src in DERIVED:
            gene_emb = (
                _pca_embedding(catalog, dim, seed)
                if src == "pca"
                else _coexpression_embedding(catalog, dim, seed)
            )
            mat, unmeasured = _by_target(gene_emb, catalog.gene_names, names, control)
            info: dict[str, Any] = {"source": src, "dim": int(mat.shape[1]), "unmeasured": unmeasured}
            if unmeasured:
                log.info(
                    "%s features: %d perturbations target no measured gene (mean row)", src, len(unmeasured)
                )
        else:
            mat, info = build_pert_matrix(
                names, control, None if src == "onehot" else src, allow_missing=allow_missing
            )
        blocks.append(_unit_rows(mat))
        record["sources"].append(info)
    return np.concatenate(blocks, axis=1).astype(np.float32), record


def _unit_rows(mat: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(mat, axis=1)
    scale = norm[norm > 0].mean() if (norm > 0).any() else 1.0
    return mat / scale


def _by_target(
    gene_emb: np.ndarray, genes: Sequence[str], perts: Sequence[str], control: str
) -> tuple[np.ndarray, list[str]]:
    """Each perturbation's row: its target gene's embedding (the mean row if not measured; control: zeros)."""
    index = {g: i for i, g in enumerate(genes)}
    mean_row = gene_emb.mean(axis=0)
    out = np.zeros((len(perts), gene_emb.shape[1]), dtype=np.float64)
    unmeasured = []
    for i, p in enumerate(perts):
        if p == control:
            continue
        if p in index:
            out[i] = gene_emb[index[p]]
        else:
            out[i] = mean_row
            unmeasured.append(p)
    return out, unmeasured


def _pca_embedding(catalog: CellCatalog, k: int, seed: int) -> np.ndarray:
    """Top-k principal component scores of the genes over the training pseudobulk deltas: `[G, k]`."""
    rng = np.random.default_rng(seed)
    groups = {key: rows for key, rows in catalog.groups("train").items() if key.pert != catalog.control_pert}
    if len(groups) < 2:
        raise UserError(
            "data.pert_features=pca needs at least 2 training perturbations (groups); use onehot or a features file"
        )
    ctrl_mean: dict[tuple[str, str], np.ndarray] = {}
    deltas = []
    for key in sorted(groups):
        ck = (key.dataset, key.cell_type)
        if ck not in ctrl_mean:
            ctrl = catalog.controls(*ck)
            ctrl_mean[ck] = _mean_expression(catalog, ctrl, MAX_CONTROL_CELLS, rng)
        deltas.append(_mean_expression(catalog, groups[key], MAX_CELLS_PER_GROUP, rng) - ctrl_mean[ck])
    y = np.stack(deltas, axis=1)  # [G, n]
    u, s, _ = np.linalg.svd(y, full_matrices=False)
    k = min(k, s.size)
    return u[:, :k] * s[:k]


def _coexpression_embedding(catalog: CellCatalog, k: int, seed: int) -> np.ndarray:
    """Gene loadings x singular values of the standardised control cells (all cell types pooled): `[G, k]`."""
    rng = np.random.default_rng(seed)
    ctrl = np.flatnonzero(catalog.pert_of == catalog.control_idx)
    if ctrl.size > MAX_CONTROL_CELLS:
        ctrl = np.sort(rng.choice(ctrl, MAX_CONTROL_CELLS, replace=False))
    x = catalog.read_expression(ctrl).astype(np.float64)
    # centre per cell type, so the embedding is co-variation within a cell type, not the cell-type offsets
    for t in np.unique(catalog.cell_type_of[ctrl]):
        sel = catalog.cell_type_of[ctrl] == t
        x[sel] -= x[sel].mean(axis=0)
    sd = x.std(axis=0)
    x /= np.where(sd > 0, sd, 1.0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    k = min(k, s.size)
    return (vt[:k].T * s[:k]) / np.sqrt(max(ctrl.size - 1, 1))


def _mean_expression(
    catalog: CellCatalog, rows: np.ndarray, cap: int, rng: np.random.Generator, *, linear: bool = False
) -> np.ndarray:
    """Mean log1p expression of at most `cap` of `rows` (`linear`: the mean of expm1, i.e. on the count scale)."""
    if rows.size > cap:
        rows = np.sort(rng.choice(rows, cap, replace=False))
    x = catalog.read_expression(rows).astype(np.float64)
    return (np.expm1(x) if linear else x).mean(axis=0)


# -- the target gene of each perturbation (the knock-down path, model.target_knockdown) ---------------------


def target_gene_index(perts: Sequence[str], genes: Sequence[str], control: str) -> np.ndarray:
    """int64 `[n_perts]`: the column of each perturbation's target gene among `genes` (a genetic screen names
    a perturbation by its target), -1 for the control and for targets that are not measured genes."""
    index = {g: i for i, g in enumerate(genes)}
    return np.array([-1 if p == control else index.get(p, -1) for p in perts], dtype=np.int64)


def training_knockdown_ratio(catalog: CellCatalog, seed: int) -> tuple[float | None, int]:
    """Median over training groups whose target is a measured gene of mean(expm1 target | perturbed) /
    mean(expm1 target | control cells of the cell type), read from training cells only (the baseline panel's
    `target_knockdown` ratio, from the same cells the model trains on); and the number of groups."""
    rng = np.random.default_rng(seed)
    target = target_gene_index(catalog.pert_names, catalog.gene_names, catalog.control_pert)
    pert_idx = {p: i for i, p in enumerate(catalog.pert_names)}
    ctrl_level: dict[tuple[str, str], np.ndarray] = {}
    ratios = []
    for key, rows in sorted(catalog.groups("train").items()):
        g = int(target[pert_idx[key.pert]])
        if key.pert == catalog.control_pert or g < 0:
            continue
        ck = (key.dataset, key.cell_type)
        if ck not in ctrl_level:
            ctrl_level[ck] = _mean_expression(
                catalog, catalog.controls(*ck), MAX_CONTROL_CELLS, rng, linear=True
            )
        base = ctrl_level[ck][g]
        if base > 0:
            ratios.append(_mean_expression(catalog, rows, MAX_CELLS_PER_GROUP, rng, linear=True)[g] / base)
    return (float(np.median(ratios)) if ratios else None), len(ratios)
