"""Diagnostics: collapse (predicted effects all alike) and the shuffle test's permutation."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from tahoe_ft.data.labels import ScreenLabels
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
    got = collapse(collapsed, real, labels=ScreenLabels("target_gene", CTRL, "cell_type"))
    assert got["pred_effect_corr"] > 0.95
    assert abs(got["real_effect_corr"]) < 0.3


def test_derangement_moves_every_perturbation():
    names = [f"P{i}" for i in range(7)]
    d = derangement(names, seed=0)
    assert sorted(d) == sorted(names) and sorted(d.values()) == sorted(names)
    assert all(k != v for k, v in d.items())
    assert d == derangement(names, seed=0) and derangement(["P0"]) == {}


def test_shuffle_test_drops_for_a_predictor_that_uses_the_perturbation(tmp_path):
    """Scored by the same cell-eval call: true per-perturbation effects vs the same effects given to the wrong
    perturbations (a model that uses its input, then shuffled) drop; one effect for all does not."""
    from tahoe_ft.evaluation import score_predictions
    from test_baselines import counts_screen, split

    a = counts_screen()
    train, real = split(a, {("A", f"G{i}") for i in range(6)})
    real = real[(real.obs["cell_type"] == "A").to_numpy()].copy()
    perts = real.obs["target_gene"].astype(str).to_numpy()
    d = derangement(sorted(set(perts) - {CTRL}))
    uses = real.copy()  # the observed cells themselves: a predictor that uses the perturbation perfectly
    shuffled = real.copy()
    for p, q in d.items():
        src = np.asarray(real.X[perts == q])
        shuffled.X[perts == p] = src[np.arange((perts == p).sum()) % len(src)]
    kw = dict(labels=ScreenLabels("target_gene", CTRL, "cell_type"), de_cache_dir=tmp_path / "c")
    s_uses = score_predictions(uses, real, train, tmp_path / "uses", **kw)
    s_shuf = score_predictions(shuffled, real, train, tmp_path / "shuf", **kw)
    assert s_uses.avg_score - s_shuf.avg_score > 0.2
    # a predictor that ignores the perturbation: every group gets the same cells (the pooled perturbed cells);
    # shuffled the same way, its score does not move
    pool = np.asarray(real.X[perts != CTRL])
    ignores = real.copy()
    for p in d:
        ignores.X[perts == p] = pool[np.arange((perts == p).sum()) % len(pool)]
    ign_shuf = ignores.copy()
    for p, q in d.items():
        src = np.asarray(ignores.X[perts == q])
        ign_shuf.X[perts == p] = src[np.arange((perts == p).sum()) % len(src)]
    s_ign = score_predictions(ignores, real, train, tmp_path / "ign", **kw)
    s_ign_shuf = score_predictions(ign_shuf, real, train, tmp_path / "ign_shuf", **kw)
    assert s_ign.avg_score == pytest.approx(s_ign_shuf.avg_score, abs=1e-9)
    assert s_uses.avg_score - s_shuf.avg_score > (s_ign.avg_score - s_ign_shuf.avg_score) + 0.2
