"""`tahoe-ft demo-check` (tahoe_ft.datasets.demo_check): the oracles that say whether the demo holds the case study's
mechanism, run before any training."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tahoe_ft.api import demo_check
from tahoe_ft.config import DemoCheckConfig, DemoConfig, PathsConfig, compose
from tahoe_ft.datasets.demo_check import fit_decoder, report, ridge_loo, summarize
from tahoe_ft.errors import UserError

# the demo of tests/test_demo.py's SMALL spec: 300 genes, X_state 10-d (about the default's 64 of 2,000), two
# cell types, 24 perturbations (6 held out for test); the check takes ~45 s on 2 cores over 3 seeds
SMALL = dict(
    n_genes=300, n_cell_types=2, n_perts=24, cells_per_pert=40, n_ctrl=150, n_programs=6, state_dim=10,
    pert_feature_dim=16, n_drugs=6, pretrain_cells_per_drug=20, pretrain_ctrl=100, n_pretrain_cell_types=1,
    n_val_perts=2, n_test_perts=6,
)  # fmt: skip
# How far past its spread over the seeds each oracle's separation must be. Measured on SMALL, seeds 0-2:
# (a) ceiling 0.63 vs decode of the true X_state 0.30, separation 0.33, spread 0.07; (b) features -> genes
# 0.12 vs -> X_state -> genes 0.05, separation 0.074, spread 0.035. A demo whose X_state kept the
# gene-specific effects (or whose features carried nothing beyond the programs) would give ~0 for both.
MARGIN = 0.02


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo-check")
    cfg = DemoCheckConfig(
        seeds=[0, 1, 2],
        demo=DemoConfig(**SMALL),
        out=str(root / "demo-check.json"),
        paths=PathsConfig(data_cache=str(root / "cache")),
    )
    return cfg, demo_check(cfg)


def test_the_mechanism_is_present_on_a_small_demo(checked):
    cfg, result = checked
    summary = result["summary"]
    for oracle in ("a", "b"):
        v = summary["oracles"][oracle]
        assert v["separation"] - v["spread"] > MARGIN, (oracle, v)
        assert min(v["per_seed"]) > 0, (oracle, v)
    assert summary["mechanism_present"]
    # the embedding keeps little of the DE genes' effect (measured 0.16 +- 0.04)
    assert summary["kept_share"]["de_genes"]["mean"] < 0.4
    # every side beats the cell-mean baseline's 0 except where the embedding cannot, and stays below 1
    for r in result["per_seed"].values():
        for name, s in r["scores"].items():
            assert -0.5 < s["avg_score"] < 1.0, name
            assert set(s["metrics"]) == {"mae", "discrimination_score_l1", "overlap_at_N"}
    assert json.loads(open(cfg.out).read()) == json.loads(json.dumps(result))
    text = report(result)
    assert "the mechanism is present" in text and "(a)" in text and "(c)" in text


def test_summary_separates_only_past_the_spread():
    def per_seed(gene_a, emb_a, gene_b, emb_b):
        scores = {
            "ceiling": gene_a,
            "decode_true_state": emb_a,
            "gene_ridge": gene_b,
            "state_ridge_decoded": emb_b,
        }
        return {
            "scores": {k: {"avg_score": v} for k, v in scores.items()},
            "kept_share": {"target": 0.1, "de_genes": 0.1, "all_genes": 0.4},
        }

    clear = summarize(
        {0: per_seed(0.6, 0.3, 0.2, 0.1), 1: per_seed(0.5, 0.25, 0.25, 0.12), 2: per_seed(0.7, 0.3, 0.3, 0.1)}
    )
    assert clear["mechanism_present"]
    # (b) flips sign on one seed: not separated, whatever the mean
    mixed = summarize(
        {0: per_seed(0.6, 0.3, 0.3, 0.1), 1: per_seed(0.5, 0.25, 0.1, 0.12), 2: per_seed(0.7, 0.3, 0.3, 0.1)}
    )
    assert mixed["oracles"]["a"]["separated"] and not mixed["oracles"]["b"]["separated"]
    assert not mixed["mechanism_present"]


def test_ridge_loo_chooses_small_penalty_on_signal_and_large_on_noise():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(30, 8))
    w = rng.normal(size=(8, 50))
    _, coef, alpha_signal = ridge_loo(f, f @ w + 0.01 * rng.normal(size=(30, 50)))
    np.testing.assert_allclose(coef, w, atol=0.05)
    _, _, alpha_noise = ridge_loo(f, rng.normal(size=(30, 50)))
    assert alpha_noise > 100 * alpha_signal


def test_decoder_is_the_least_squares_map():
    rng = np.random.default_rng(1)
    s = rng.normal(size=(200, 5))
    b = rng.normal(size=(5, 40))
    x = 2.0 + s @ b
    intercept, coef = fit_decoder(s, x)
    np.testing.assert_allclose(coef, b, atol=1e-4)
    np.testing.assert_allclose(intercept + s @ coef, x, atol=1e-4)


def test_config_and_bad_input(tmp_path):
    cfg = compose("demo-check", ["seeds=[3,4]", "demo.n_genes=500", f"out={tmp_path / 'x.json'}"])
    assert isinstance(cfg, DemoCheckConfig) and cfg.seeds == [3, 4] and cfg.demo.n_genes == 500
    with pytest.raises(UserError, match="n_gene"):
        compose("demo-check", ["demo.n_gene=500"])
    for bad, match in (
        (dict(seeds=[0]), ">= 2 distinct"),
        (dict(seeds=[0, 0]), ">= 2 distinct"),
        (dict(demo=DemoConfig(seed=5)), "leave demo.seed unset"),
    ):
        with pytest.raises(UserError, match=match):
            demo_check(DemoCheckConfig(out=str(tmp_path / "x.json"), **bad))
    assert not (tmp_path / "x.json").exists()
