"""Count space (issue #33): the generator's round trip on a real screen, and the 2026 upload contract's rules."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import tahoe_ft
from conftest_train import TINY_MODEL
from tahoe_ft.config import PredictConfig, compose
from tahoe_ft.datasets.embedded import PAPALEXI_CONTROL, papalexi_path
from tahoe_ft.errors import UserError
from tahoe_ft.evaluation.counts import (
    LIBRARY_SIZE_COL,
    MAX_COUNTS_PER_CELL,
    TARGET_SUM,
    check_counts,
    library_sizes,
    renormalise,
    target_sum_of,
    to_counts,
)


@pytest.fixture(scope="module")
def papalexi() -> tuple[ad.AnnData, ad.AnnData, np.ndarray]:
    """Papalexi's raw counts, its own normalised expression (as tahoe-ft reads it: normalize_total 1e4 over
    the screen's genes, log1p, float32) and its library sizes."""
    raw = ad.read_h5ad(papalexi_path())
    lib = np.asarray(raw.X.sum(axis=1), dtype=np.float64).ravel()
    norm = raw.copy()
    norm.X = sp.csr_matrix(renormalise(raw.X, lib).astype(np.float32))
    return raw, norm, lib


def test_round_trip_papalexi_own_library_sizes_is_exact(papalexi):
    raw, norm, lib = papalexi
    own = norm.copy()
    own.obs[LIBRARY_SIZE_COL] = lib
    ctrl = raw[(raw.obs["target_gene"] == PAPALEXI_CONTROL).to_numpy()]
    out = to_counts(own, input_transform="counts", controls=ctrl, celltype_col="cell_type", seed=0)
    assert sp.isspmatrix_csr(out.X) and out.X.dtype == np.float32
    assert abs(out.X - raw.X).max() == 0  # the raw counts back, every one
    again = renormalise(out.X, np.asarray(out.X.sum(axis=1)).ravel())
    np.testing.assert_allclose(again, norm.X.toarray(), atol=1e-6)


def test_round_trip_papalexi_drawn_library_sizes_within_rounding(papalexi):
    raw, norm, _ = papalexi
    ctrl = raw[(raw.obs["target_gene"] == PAPALEXI_CONTROL).to_numpy()]
    out = to_counts(norm, input_transform="counts", controls=ctrl, celltype_col="cell_type", seed=3)
    check_counts(out.X, "generated")
    used = out.obs[LIBRARY_SIZE_COL].to_numpy(dtype=np.float64)
    # every drawn library size is a control cell's
    assert set(np.unique(used)) <= set(np.asarray(ctrl.X.sum(axis=1)).ravel().tolist())
    # within one count of expm1(x) * L / T, so re-normalised with L: within one count's step T / L
    y = np.expm1(norm.X.toarray().astype(np.float64)) * (used / TARGET_SUM)[:, None]
    assert np.abs(out.X.toarray() - y).max() < 1.0
    step = TARGET_SUM / used
    back = np.expm1(renormalise(out.X, used))
    assert np.all(np.abs(back - np.expm1(norm.X.toarray())) <= step[:, None] * (1 + 1e-6))
    # unbiased: the mean count per gene is kept (stochastic rounding, not rounding to nearest)
    np.testing.assert_allclose(out.X.toarray().sum(axis=0), y.sum(axis=0), rtol=0.02, atol=30)
    # seeded
    same = to_counts(norm, input_transform="counts", controls=ctrl, celltype_col="cell_type", seed=3)
    assert abs(same.X - out.X).max() == 0


def test_log1p_input_uses_the_controls_normalisation_total():
    rng = np.random.default_rng(0)
    counts = rng.poisson(3.0, size=(40, 30)).astype(np.float32)
    lib = counts.sum(axis=1)
    x = np.log1p(counts * (1e4 / lib)[:, None]).astype(np.float32)
    obs = pd.DataFrame({"cell_type": ["A"] * 40}, index=[f"c{i}" for i in range(40)])
    ctrl = ad.AnnData(X=x, obs=obs, layers={"counts": counts})
    assert target_sum_of("log1p", ctrl) == pytest.approx(1e4, rel=1e-5)
    assert library_sizes(ctrl)[1] == "row sums of layers['counts']"
    out = to_counts(
        ad.AnnData(X=x, obs=obs), input_transform="log1p", controls=ctrl, celltype_col="cell_type", seed=0
    )
    assert np.all(
        np.abs(out.X.toarray() - np.expm1(x) * (out.obs[LIBRARY_SIZE_COL].to_numpy() / 1e4)[:, None]) < 1
    )


def test_no_library_sizes_is_one_line():
    x = np.log1p(np.random.default_rng(0).random((5, 4))).astype(np.float32)
    ctrl = ad.AnnData(X=x, obs=pd.DataFrame(index=[f"c{i}" for i in range(5)]))
    with pytest.raises(UserError, match="hold no library sizes"):
        to_counts(ctrl.copy(), input_transform="log1p", controls=ctrl, celltype_col=None, seed=0)


@pytest.mark.parametrize(
    "values, needle",
    [
        (np.array([[1.5, 2.0]]), "fractional"),
        (np.array([[-1.0, 2.0]]), "negative"),
        (np.array([[np.nan, 2.0]]), "NaN"),
        (np.array([[MAX_COUNTS_PER_CELL, 1.0]]), "more than 1,000,000"),
    ],
)
def test_check_counts_refuses(values, needle):
    with pytest.raises(UserError, match=needle):
        check_counts(sp.csr_matrix(values), "x")
    check_counts(sp.csr_matrix(np.array([[MAX_COUNTS_PER_CELL - 1.0, 1.0]])), "x")  # exactly 1e6 passes


# -- predict output=counts and export format=vcc2026, on a tiny Papalexi run ------------------------------------


@pytest.fixture(scope="module")
def papalexi_run(tmp_path_factory) -> Path:
    """Papalexi 0905, 4 steps on CPU, predicted with output=counts."""
    root = tmp_path_factory.mktemp("counts")
    runs = root / "runs"
    args = [a for a in TINY_MODEL if not a.startswith("encoder.")] + [
        "+experiment=0905", "data=papalexi", "init_from=null", f"runs_dir={runs}", f"paths.data_cache={root}",
        "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.enable_progress_bar=false", "logger=csv",
        "data.batch_size=4", "trainer.accelerator=cpu",
    ]  # fmt: skip
    run_dir = tahoe_ft.train(compose("train", args))
    tahoe_ft.predict(PredictConfig(exp="0905", runs_dir=str(runs), output="counts", max_controls=300))
    return run_dir


def test_predict_output_counts_writes_the_count_twins(papalexi_run, papalexi):
    raw, _, lib = papalexi
    rec = json.loads((papalexi_run / "predict.json").read_text())
    assert rec["output"] == "counts"
    assert rec["counts"]["files"] == {
        "real.h5ad": "real_counts.h5ad", "pred.h5ad": "pred_counts.h5ad", "pred_shuffled.h5ad": "pred_shuffled_counts.h5ad"
    }  # fmt: skip
    assert "raw counts of X" in rec["counts"]["real"] and rec["counts"]["target_sum"] == TARGET_SUM
    real_log1p = ad.read_h5ad(papalexi_run / "real.h5ad")
    real = ad.read_h5ad(papalexi_run / "real_counts.h5ad")
    pred = ad.read_h5ad(papalexi_run / "pred_counts.h5ad")
    for a in (real, pred):
        assert sp.isspmatrix_csr(a.X) and a.X.dtype == np.float32
        check_counts(a.X, "count file")
        assert list(a.var_names) == list(real_log1p.var_names)
        assert a.obs[["target_gene", "cell_type"]].equals(real_log1p.obs[["target_gene", "cell_type"]])
    # the real side is the screen's own raw counts: re-normalised with its library sizes, real.h5ad exactly
    again = renormalise(real.X, real.obs[LIBRARY_SIZE_COL].to_numpy(dtype=np.float64))
    np.testing.assert_allclose(again, real_log1p.X, atol=2e-6)
    assert set(np.unique(real.obs[LIBRARY_SIZE_COL])) <= set(lib.astype(np.float32).tolist())
    # the control rows are the same real cells in both files
    ctrl = (pred.obs["target_gene"] == PAPALEXI_CONTROL).to_numpy()
    assert abs(pred.X[ctrl] - real.X[ctrl]).max() == 0
    # predicted cells: within one count of expm1(pred.h5ad) scaled by their drawn library size
    pl = ad.read_h5ad(papalexi_run / "pred.h5ad")
    used = pred.obs[LIBRARY_SIZE_COL].to_numpy(dtype=np.float64)[~ctrl]
    y = np.expm1(np.asarray(pl.X[~ctrl], dtype=np.float64)) * (used / TARGET_SUM)[:, None]
    assert np.abs(pred.X[~ctrl].toarray() - y).max() < 1.0
