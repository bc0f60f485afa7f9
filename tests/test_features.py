"""Perturbation features for unseen perturbations: informative, and built without any held-out cell."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from tahoe_ft.config import DataConfig
from tahoe_ft.data import CellCatalog
from tahoe_ft.data.features import build_features

CTRL = "non-targeting"
N_GENES, MODULE = 60, 8


def module_of(g: int) -> int:
    return g // MODULE if g < 4 * MODULE else -1


def write_screen(path, seed=0, poison=None):
    """Control cells co-vary within 4 gene modules; knocking out a module gene shifts its whole module."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(1.0, 2.0, N_GENES)
    mods = np.array([module_of(g) for g in range(N_GENES)])
    shift = np.array([-0.6, 0.5, -0.4, 0.7])

    def cells(n, pert=None):
        z = rng.normal(0, 0.4, (n, 4))  # per-cell module activity: the co-expression
        x = base + np.where(mods >= 0, z[:, np.clip(mods, 0, 3)], 0.0) + rng.normal(0, 0.15, (n, N_GENES))
        if pert is not None:
            m = module_of(int(pert[1:]))
            x = x + np.where(mods == m, shift[m], 0.0)
        return np.clip(x, 0, None)

    perts = [f"G{i}" for i in range(0, 4 * MODULE, 2)] + ["G50"]  # G50: outside every module
    xs, obs = [cells(400)], [CTRL] * 400
    for p in perts:
        xs.append(cells(60, p))
        obs += [p] * 60
    x = np.vstack(xs).astype(np.float32)
    o = pd.DataFrame({"target_gene": obs, "cell_type": "A"}).astype("category")
    o.index = [f"c{i}" for i in range(len(o))]
    if poison is not None:
        x[o["target_gene"].isin(poison).to_numpy()] = 9.0
    ad.AnnData(x, obs=o, var=pd.DataFrame(index=[f"G{i}" for i in range(N_GENES)])).write_h5ad(path)
    return perts


def features(path, spec, held=("G10", "G20")):
    cfg = DataConfig(path=str(path), test_perts=[held[0]], val_perts=[held[1]])
    catalog = CellCatalog.open(cfg, embed_key=None)
    mat, info = build_features(catalog, spec, dim=6)
    return {p: mat[i] for i, p in enumerate(catalog.pert_names)}, info


def _cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("spec", ["pca", "coexpression"])
def test_a_held_out_perturbation_lands_near_its_module(tmp_path, spec):
    write_screen(tmp_path / "s.h5ad")
    f, info = features(tmp_path / "s.h5ad", spec)
    held = f["G10"]  # module 1 (genes 8-15); G8, G12, G14 are its training siblings
    same = np.mean([_cos(held, f[p]) for p in ("G8", "G12", "G14")])
    other = np.mean([_cos(held, f[p]) for p in ("G0", "G2", "G24", "G26")])
    assert same > 0.8 and same > other + 0.5, (same, other)
    assert np.all(f[CTRL] == 0)  # the control: no perturbation
    assert info["sources"][0]["unmeasured"] == []


def test_derived_features_never_read_a_held_out_cell(tmp_path):
    write_screen(tmp_path / "clean.h5ad")
    write_screen(tmp_path / "poisoned.h5ad", poison=["G10", "G20"])
    for spec in (["pca", "coexpression", "onehot"],):
        clean, _ = features(tmp_path / "clean.h5ad", spec)
        poisoned, _ = features(tmp_path / "poisoned.h5ad", spec)
        for p in clean:
            np.testing.assert_array_equal(clean[p], poisoned[p], err_msg=p)


def test_sources_combine_and_unmeasured_targets_are_reported(tmp_path):
    write_screen(tmp_path / "s.h5ad")
    cfg = DataConfig(path=str(tmp_path / "s.h5ad"), test_perts=["G10"])
    catalog = CellCatalog.open(cfg, embed_key=None)
    mat, info = build_features(catalog, ["pca", "onehot"], dim=4)
    n = len(catalog.pert_names)
    assert mat.shape == (n, 4 + n)
    assert info["source"] == "pca+onehot" and [s["source"] for s in info["sources"]] == ["pca", "onehot"]
    # single sources keep the original record (old manifests and checkpoints stay comparable)
    one, rec = build_features(catalog, None)
    assert rec == {"source": "onehot", "sha256": None} and np.array_equal(one, np.eye(n, dtype=np.float32))
    # a drug-like name is not a measured gene: the mean row, and the manifest says so
    a = ad.read_h5ad(tmp_path / "s.h5ad")
    a.obs["target_gene"] = a.obs["target_gene"].cat.rename_categories({"G50": "drugX"})
    a.write_h5ad(tmp_path / "d.h5ad")
    catalog = CellCatalog.open(DataConfig(path=str(tmp_path / "d.h5ad"), test_perts=["G10"]), embed_key=None)
    mat, info = build_features(catalog, "pca", dim=4)
    assert info["sources"][0]["unmeasured"] == ["drugX"]
