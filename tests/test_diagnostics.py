"""Diagnostics: collapse (predicted effects all alike) and the shuffle test's permutation."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd

from tahoe_ft.evaluation.diagnostics import collapse, derangement

CTRL = "non-targeting"


def _adata(effects: dict[str, np.ndarray], seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    base = rng.uniform(1, 2, 50)
    xs, obs = [base + rng.normal(0, 0.05, (100, 50))], [CTRL] * 100
    for p, e in effects.items():
        xs.append(base + e + rng.normal(0, 0.05, (40, 50)))
        obs += [p] * 40
    o = pd.DataFrame({"target_gene": obs, "cell_type": "A"}).astype("category")
    o.index = [f"c{i}" for i in range(len(o))]
    return ad.AnnData(np.vstack(xs).astype(np.float32), obs=o)


def test_collapse_tells_one_effect_for_all_from_distinct_effects():
    rng = np.random.default_rng(1)
    real = _adata({f"P{i}": rng.normal(0, 0.5, 50) for i in range(5)})
    shared = rng.normal(0, 0.5, 50)
    collapsed = _adata({f"P{i}": shared for i in range(5)}, seed=2)
    got = collapse(collapsed, real, pert_col="target_gene", control_pert=CTRL, celltype_col="cell_type")
    assert got["pred_effect_corr"] > 0.95
    assert abs(got["real_effect_corr"]) < 0.3


def test_derangement_moves_every_perturbation():
    names = [f"P{i}" for i in range(7)]
    d = derangement(names, seed=0)
    assert sorted(d) == sorted(names) and sorted(d.values()) == sorted(names)
    assert all(k != v for k, v in d.items())
    assert d == derangement(names, seed=0) and derangement(["P0"]) == {}
