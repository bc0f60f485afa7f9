"""Count space (issue #33): the generator's round trip on a real screen, and the 2026 upload contract's rules."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import tahoe_ft
import tahoe_ft.api
from conftest_train import TINY_MODEL, train
from tahoe_ft.config import ExportConfig, PredictConfig, compose
from tahoe_ft.data.labels import ScreenLabels
from tahoe_ft.datasets.embedded import PAPALEXI_CONTROL, papalexi_path
from tahoe_ft.errors import UserError
from tahoe_ft.evaluation.counts import (
    LIBRARY_SIZE_COL,
    MAX_COUNTS_PER_CELL,
    TARGET_SUM,
    check_counts,
    emit_like,
    library_sizes,
    renormalise,
    target_sum_of,
    to_counts,
)
from tahoe_ft.evaluation.upload import (
    CELLS_PER_PERT,
    CONTEXT_COL,
    PERT_COL,
    build_upload,
    check_upload,
    vcc_cli_check,
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


def test_the_papalexi_screen_trains_and_predicts_on_its_own_split(papalexi_run):
    """data=papalexi: raw counts, normalised + log1p on read; its own split's six test knock-outs predicted. (The
    README's own-screen test scores the same screen through the CLI.)"""
    pred = ad.read_h5ad(papalexi_run / "pred.h5ad")
    assert pred.n_vars == 299
    assert set(pred.obs["target_gene"]) - {PAPALEXI_CONTROL} == {
        "CD86", "IFNGR2", "IRF7", "SMAD4", "STAT2", "TNFRSF14"
    }  # fmt: skip
    real = ad.read_h5ad(papalexi_run / "real.h5ad")
    # real side = log1p(normalize_total 1e4) of the raw counts: per-cell expm1 sums are 1e4 over all 299 genes
    x = real.X.toarray() if sp.issparse(real.X) else np.asarray(real.X)
    np.testing.assert_allclose(np.expm1(x.astype(np.float64)).sum(1), 1e4, rtol=1e-3)


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


# -- the 2026 upload contract ------------------------------------------------------------------------------------


def _valid_upload(n_genes: int = 6, cells: int = CELLS_PER_PERT) -> tuple[ad.AnnData, list[str]]:
    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(n_genes)]
    perts = [(c, p) for c in ("A", "B") for p in ("P1", "P2")]
    obs = pd.DataFrame(
        [{PERT_COL: p, CONTEXT_COL: c} for c, p in perts for _ in range(cells)],
        index=[f"c{i}" for i in range(len(perts) * cells)],
    )
    x = sp.csr_matrix(rng.poisson(2.0, size=(len(obs), n_genes)).astype(np.float32))
    return ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=genes)), genes


def _broken(rule: str) -> tuple[ad.AnnData, list[str]]:
    a, genes = _valid_upload()
    if rule == "400 cells":
        a = a[1:].copy()
    elif rule == "no controls":
        a.obs[PERT_COL] = a.obs[PERT_COL].astype(str)
        a.obs.iloc[:CELLS_PER_PERT, 0] = "non-targeting"
    elif rule == "gene order":
        a = a[:, genes[::-1]].copy()
    elif rule == "genes outside the list":
        genes = genes[:-1]
    elif rule == "integers":
        a.X = a.X.copy()
        a.X.data[0] = 0.5
    elif rule == "sparse":
        a.X = a.X.toarray()
    elif rule == "<= 1e6":
        x = a.X.toarray()
        x[0, 0] = MAX_COUNTS_PER_CELL
        a.X = sp.csr_matrix(x)
    return a, genes


RULES = {
    "400 cells": "exactly 400 cells",
    "no controls": "control rows",
    "gene order": "not in the gene list's order",
    "genes outside the list": "outside the gene list",
    "integers": "fractional",
    "sparse": "not a sparse CSR matrix",
    "<= 1e6": "more than 1,000,000",
}


def test_a_valid_upload_passes():
    a, genes = _valid_upload()
    check_upload(a, genes)


@pytest.mark.parametrize("rule", list(RULES))
def test_each_contract_rule_fails(rule):
    a, genes = _broken(rule)
    with pytest.raises(UserError, match=RULES[rule]):
        check_upload(a, genes)


@pytest.mark.parametrize("rule", ["400 cells", "no controls", "gene order", "integers", "<= 1e6"])
def test_vcc_cli_refuses_what_check_upload_refuses(rule, tmp_path):
    pytest.importorskip("vcc.prep")  # vcc-cli 0.3.0, the test extra
    a, genes = _broken(rule)
    a.write_h5ad(tmp_path / "up.h5ad")
    (tmp_path / "genes.csv").write_text("".join(f"{g}\n" for g in genes))
    ok, ok_genes = _valid_upload()
    ok.write_h5ad(tmp_path / "ok.h5ad")
    assert vcc_cli_check(tmp_path / "ok.h5ad", tmp_path / "genes.csv", ["A", "B"], cells_per_pert=400)[
        "vcc_cli"
    ]
    if rule == "gene order":  # vcc-cli reorders genes itself; tahoe-ft writes them in order
        return
    with pytest.raises(UserError, match="vcc-cli 0.3.0 refuses"):
        # the list of perturbations comes from the valid file: its 400-cells check is what fails on a short one
        vcc_cli_check(tmp_path / "up.h5ad", tmp_path / "genes.csv", ["A", "B"], cells_per_pert=400)


def test_build_upload_draw_rule():
    a, genes = _valid_upload(cells=30)
    a.obs[PERT_COL] = a.obs[PERT_COL].astype(str)
    a.obs.iloc[:5, 0] = "non-targeting"  # controls are dropped
    up = build_upload(a, genes[::-1], labels=ScreenLabels(PERT_COL, "non-targeting", CONTEXT_COL),
                      where="x", cells_per_pert=40, min_cells=10)  # fmt: skip
    check_upload(up, genes[::-1], cells_per_pert=40)
    assert up.uns["tahoe_ft_upload"]["topped_up"] == {"A/P1": 25, "A/P2": 30, "B/P1": 30, "B/P2": 30}
    with pytest.raises(UserError, match="has 25 predicted cells in x, fewer than min_cells=26"):
        build_upload(a, genes, labels=ScreenLabels(PERT_COL, "non-targeting", CONTEXT_COL),
                     where="x", cells_per_pert=40, min_cells=26)  # fmt: skip


def test_export_vcc2026_of_a_predicted_run(papalexi_run, tmp_path):
    out = tmp_path / "upload.h5ad"
    got = tahoe_ft.api.export(ExportConfig(run_dir=str(papalexi_run), format="vcc2026", out=str(out)))
    assert got == out
    up = ad.read_h5ad(out)
    pred = ad.read_h5ad(papalexi_run / "pred_counts.h5ad")
    check_upload(up, list(pred.var_names))
    assert up.n_obs == 6 * CELLS_PER_PERT and set(up.obs[CONTEXT_COL]) == {"THP-1"}
    # every uploaded cell is one of the predicted cells
    rows = {tuple(r) for r in pred.X.toarray().tolist()}
    assert all(tuple(r) in rows for r in up.X[:50].toarray().tolist())
    with pytest.raises(UserError, match="already exists"):
        tahoe_ft.api.export(ExportConfig(run_dir=str(papalexi_run), format="vcc2026", out=str(out)))


def test_predict_output_counts_on_a_log1p_screen_reads_layers_counts(tmp_path):
    """The demo: X log1p (normalize_total 1e4 over all genes), raw counts in layers['counts']. The real side is
    those counts; a later log1p prediction into the same run removes the count files it did not write."""
    run_dir = train(tmp_path, "0905", "init_from=null", "trainer.max_steps=2", "trainer.val_check_interval=2")
    runs = str(tmp_path / "runs")
    tahoe_ft.predict(PredictConfig(run_dir=str(run_dir), runs_dir=runs, output="counts", shuffle=False))
    rec = json.loads((run_dir / "predict.json").read_text())
    assert "raw counts of layers['counts']" in rec["counts"]["real"]
    assert rec["counts"]["target_sum"] == pytest.approx(1e4, rel=1e-4)  # the controls' expm1 row sums
    assert rec["counts"]["files"] == {"real.h5ad": "real_counts.h5ad", "pred.h5ad": "pred_counts.h5ad"}
    real, real_log1p = ad.read_h5ad(run_dir / "real_counts.h5ad"), ad.read_h5ad(run_dir / "real.h5ad")
    screen = ad.read_h5ad(next((tmp_path / "cache").glob("demo-*")) / "screen.h5ad")
    counts = screen.layers["counts"]
    # each real cell's counts are a screen cell's raw counts (the genes are the screen's, in its order)
    assert list(real.var_names) == list(screen.var_names)
    lib = real.obs[LIBRARY_SIZE_COL].to_numpy(dtype=np.float64)
    np.testing.assert_allclose(renormalise(real.X, lib), real_log1p.X, atol=2e-6)
    raw_rows = {tuple(r) for r in counts.toarray().tolist()}
    assert all(tuple(r) in raw_rows for r in real.X.toarray().tolist())
    check_counts(ad.read_h5ad(run_dir / "pred_counts.h5ad").X, "pred_counts.h5ad")
    # no layers['counts'], only obs n_counts: the real cells through the generator with their own library
    # size give back the same raw counts
    no_layer = screen.copy()
    del no_layer.layers["counts"]
    no_layer.write_h5ad(tmp_path / "no_layer.h5ad")
    cfg = PredictConfig(run_dir=str(run_dir), runs_dir=runs, output="counts", shuffle=False)
    tahoe_ft.predict(dataclasses.replace(cfg, data_path=str(tmp_path / "no_layer.h5ad")))
    rec = json.loads((run_dir / "predict.json").read_text())
    assert "own library size (obs['n_counts'])" in rec["counts"]["real"]
    assert abs(ad.read_h5ad(run_dir / "real_counts.h5ad").X - real.X).max() == 0
    tahoe_ft.predict(PredictConfig(run_dir=str(run_dir), runs_dir=runs, shuffle=False))
    assert not (run_dir / "pred_counts.h5ad").exists() and not (run_dir / "real_counts.h5ad").exists()
    assert json.loads((run_dir / "predict.json").read_text())["output"] == "log1p"


def test_emit_like_puts_any_log1p_prediction_on_the_run_terms(papalexi_run):
    """A baseline or the ceiling (here: pred.h5ad itself) emitted like the run's prediction: its perturbed cells
    through the generator with the run's target sum, then real_counts.h5ad's control cells."""
    ref = ad.read_h5ad(papalexi_run / "real_counts.h5ad")
    pl = ad.read_h5ad(papalexi_run / "pred.h5ad")
    kw = {"labels": ScreenLabels("target_gene", PAPALEXI_CONTROL, "cell_type"), "seed": 0}
    out = emit_like(pl, ref, **kw)
    check_counts(out.X, "emitted")
    ctrl = (out.obs["target_gene"] == PAPALEXI_CONTROL).to_numpy()
    ref_ctrl = (ref.obs["target_gene"] == PAPALEXI_CONTROL).to_numpy()
    assert abs(out.X[ctrl] - ref.X[ref_ctrl]).max() == 0 and ctrl.sum() == ref_ctrl.sum()
    assert out.uns["counts"]["target_sum"] == ref.uns["counts"]["target_sum"] == TARGET_SUM
    # the same seed as predict's: the same counts as pred_counts.h5ad
    pred = ad.read_h5ad(papalexi_run / "pred_counts.h5ad")
    assert abs(out.X[~ctrl] - pred.X[~ctrl]).max() == 0
    with pytest.raises(UserError, match="no generator record"):
        emit_like(pl, pl, **kw)
