"""The baseline panel on tiny data with planted effects: each baseline does what it claims, none reads a
held-out cell, and the data ceiling is above all of them."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from tahoe_ft.data.labels import ScreenLabels
from tahoe_ft.evaluation.baselines import PanelSettings, build_panel

CTRL = "non-targeting"
N_GENES = 40


def _cells(rng, mean: np.ndarray, n: int, noise: float = 0.25) -> np.ndarray:
    return np.clip(mean + rng.normal(0, noise, size=(n, mean.size)), 0, None)


def screen(effects: dict[tuple[str, str], np.ndarray], *, n_cells=60, n_ctrl=120, seed=0, base=None):
    """log1p-like cells: control mean per cell type + each group's planted effect + noise."""
    rng = np.random.default_rng(seed)
    genes = [f"G{i}" for i in range(N_GENES)]
    cts = sorted({ct for ct, _ in effects})
    base = base if base is not None else {ct: rng.uniform(1.0, 2.5, N_GENES) for ct in cts}
    xs, obs = [], []
    for ct in cts:
        xs.append(_cells(rng, base[ct], n_ctrl))
        obs += [(CTRL, ct)] * n_ctrl
    for (ct, p), eff in sorted(effects.items()):
        xs.append(_cells(rng, base[ct] + eff, n_cells))
        obs += [(p, ct)] * n_cells
    o = pd.DataFrame(obs, columns=["target_gene", "cell_type"]).astype("category")
    o.index = [f"c{i}" for i in range(len(o))]
    return ad.AnnData(np.vstack(xs).astype(np.float32), obs=o, var=pd.DataFrame(index=genes)), base


def split(a: ad.AnnData, held_out: set[tuple[str, str]]):
    """(train: every other group + controls, real: the held-out groups + all controls)."""
    key = list(zip(a.obs["cell_type"].astype(str), a.obs["target_gene"].astype(str), strict=True))
    ctrl = (a.obs["target_gene"] == CTRL).to_numpy()
    out = np.array([k in held_out for k in key])
    return a[~out].copy(), a[out | ctrl].copy()


def _panel(train, real, **kw):
    return build_panel(train, real, labels=ScreenLabels("target_gene", CTRL, "cell_type"), **kw)


def _group_mean(a: ad.AnnData, ct: str, p: str) -> np.ndarray:
    sel = ((a.obs["cell_type"] == ct) & (a.obs["target_gene"] == p)).to_numpy()
    return np.asarray(a.X[sel]).mean(axis=0)


def test_pert_mean_is_exact_when_the_effect_is_the_same_in_every_cell_type():
    rng = np.random.default_rng(1)
    shared = {p: rng.normal(0, 0.6, N_GENES) for p in ("G1", "G2", "G3")}
    effects = {(ct, p): e for ct in ("A", "B", "C") for p, e in shared.items()}
    a, base = screen(effects, n_cells=400, n_ctrl=600)
    train, real = split(a, {("A", "G2")})
    pred = _panel(train, real).predictions["pert_mean"]
    got = _group_mean(pred, "A", "G2") - base["A"]
    # the planted effect, up to sampling noise of ~1,000 training cells (and clipping at 0)
    assert np.abs(got - shared["G2"]).mean() < 0.03 and np.abs(got - shared["G2"]).max() < 0.1
    # and unlike the cell mean, which averages every perturbation
    cm = _group_mean(_panel(train, real).predictions["cell_mean"], "A", "G2") - base["A"]
    assert np.abs(got - shared["G2"]).mean() < 0.3 * np.abs(cm - shared["G2"]).mean()


def test_pert_mean_is_absent_without_another_cell_type():
    effects = {("A", p): np.zeros(N_GENES) for p in ("G1", "G2")}
    a, _ = screen(effects)
    train, real = split(a, {("A", "G2")})
    panel = _panel(train, real)
    assert "pert_mean" not in panel.predictions and "absent" in panel.notes["pert_mean"]


def test_target_knockdown_sets_the_target_to_the_learned_ratio():
    level = {"A": np.random.default_rng(5).uniform(1.0, 2.5, N_GENES)}
    effects = {}
    for p in ("G1", "G2", "G3", "G4", "G5"):
        g, e = int(p[1:]), np.zeros(N_GENES)
        e[g] = (
            np.log1p(0.25 * np.expm1(level["A"][g])) - level["A"][g]
        )  # the target at a quarter of its counts
        effects[("A", p)] = e
    a, base = screen(effects, n_cells=200, base=level)
    train, real = split(a, {("A", "G5")})
    panel = _panel(train, real)
    kd, cm = panel.predictions["target_knockdown"], panel.predictions["cell_mean"]
    got, plain = _group_mean(kd, "A", "G5"), _group_mean(cm, "A", "G5")
    truth = _group_mean(real, "A", "G5")
    assert abs(got[5] - truth[5]) < 0.25 * abs(plain[5] - truth[5])  # the target gene is knocked down
    np.testing.assert_array_equal(np.delete(got, 5), np.delete(plain, 5))  # every other gene is the cell mean
    note = panel.notes["target_knockdown"]
    assert "knocked down; median over 4 training groups" in note and note.startswith("target at 0.2")


def test_target_knockdown_is_absent_when_no_target_is_measured():
    effects = {("A", p): np.zeros(N_GENES) for p in ("drugX", "drugY", "drugZ")}
    a, _ = screen(effects)
    train, real = split(a, {("A", "drugZ")})
    panel = _panel(train, real)
    assert (
        "target_knockdown" not in panel.predictions
        and "no training perturbation" in panel.notes["target_knockdown"]
    )


def test_linear_recovers_a_planted_linear_effect():
    """Genes 0-23 in 4 modules (the rest in none); perturbing a gene shifts its own module (a rank-4 linear
    effect of the target's embedding). A held-out perturbation of a measured gene is predicted from its
    module's training siblings."""
    module = np.r_[np.repeat(np.arange(4), 6), np.full(N_GENES - 24, 9)]
    shift = np.array([-0.8, 0.6, -0.5, 0.9])
    perts = [f"G{i}" for i in range(0, N_GENES, 2)]
    shift = np.r_[shift, np.zeros(6)]
    effects = {("A", p): shift[module[int(p[1:])]] * (module == module[int(p[1:])]) for p in perts}
    a, base = screen(effects, n_cells=150)
    held = ("A", "G14")
    train, real = split(a, {held})
    panel = _panel(train, real, settings=PanelSettings(linear_k=4, linear_ridge=0.1))
    truth = effects[held]
    lin = _group_mean(panel.predictions["linear"], *held) - base["A"]
    cm = _group_mean(panel.predictions["cell_mean"], *held) - base["A"]
    assert np.corrcoef(lin, truth)[0, 1] > 0.9
    assert np.abs(lin - truth).mean() < 0.5 * np.abs(cm - truth).mean()


def test_no_baseline_reads_a_held_out_cell():
    rng = np.random.default_rng(3)
    effects = {(ct, p): rng.normal(0, 0.5, N_GENES) for ct in ("A", "B") for p in ("G1", "G2", "G3")}
    a, _ = screen(effects)
    train, real = split(a, {("A", "G2"), ("B", "G3")})
    before = _panel(train, real).predictions
    poisoned = real.copy()
    held = (poisoned.obs["target_gene"] != CTRL).to_numpy()
    poisoned.X[held] = 13.0  # garbage in every held-out cell
    after = _panel(train, poisoned).predictions
    assert (
        set(before) == set(after) == {"control", "cell_mean", "pert_mean", "target_knockdown", "linear"}
    )  # no features given: no feature_ridge
    for name in before:
        np.testing.assert_array_equal(before[name].X, after[name].X, err_msg=name)
        assert before[name].obs.equals(real.obs)  # the real file's layout, its controls copied in
        ctrl = (real.obs["target_gene"] == CTRL).to_numpy()
        np.testing.assert_array_equal(before[name].X[ctrl], real.X[ctrl])


@pytest.mark.parametrize("name", ["control", "linear", "pert_mean"])
def test_cell_level_baselines_draw_basal_cells_of_the_same_cell_type(name):
    rng = np.random.default_rng(4)
    effects = {(ct, p): rng.normal(0, 0.3, N_GENES) for ct in ("A", "B") for p in ("G1", "G2")}
    a, base = screen(effects, base={"A": np.full(N_GENES, 1.0), "B": np.full(N_GENES, 3.0)})
    train, real = split(a, {("A", "G1")})
    pred = _panel(train, real).predictions[name]
    rows = ((pred.obs["cell_type"] == "A") & (pred.obs["target_gene"] == "G1")).to_numpy()
    assert abs(float(np.asarray(pred.X[rows]).mean()) - 1.0) < 0.5  # A's level, not B's (3.0)
    assert np.asarray(pred.X[rows]).std(axis=0).mean() > 0.1  # cells, not one repeated mean vector


def test_the_panel_is_the_same_in_every_process():
    """The panel's basal draws do not depend on Python's string hashing (PYTHONHASHSEED differs per process):
    the same inputs give the same baseline files in processes with different hash seeds."""
    import hashlib
    import os
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import hashlib, sys
        import numpy as np
        sys.path.insert(0, sys.argv[1])
        from test_baselines import N_GENES, _panel, screen, split
        rng = np.random.default_rng(4)
        cts = ("A", "B", "C", "D", "E", "F")
        effects = {(ct, p): rng.normal(0, 0.3, N_GENES) for ct in cts for p in ("G1", "G2")}
        a, _ = screen(effects)
        train, real = split(a, {(ct, "G1") for ct in cts})
        pred = _panel(train, real).predictions
        print(hashlib.sha256(np.asarray(pred["control"].X).tobytes()).hexdigest())
        """
    )
    here = os.path.dirname(__file__)
    digests = set()
    for seed in ("1", "2", "3", "4"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code, here], env=env, capture_output=True, text=True, check=True
        )
        digests.add(out.stdout.strip())
    assert len(digests) == 1, digests
    assert len(next(iter(digests))) == len(hashlib.sha256().hexdigest())


# -- scored by cell-eval: the panel against a screen with planted knock-downs ---------------------------------


def counts_screen(seed=0, n_genes=200, n_cells=80, n_ctrl=300):
    """Poisson counts, normalised to 1e4 and log1p (what cell-eval expects): perturbation `Gi` knocks its
    target gene down to 15 % and moves 12 other genes (half of them shared between the two cell types)."""
    rng = np.random.default_rng(seed)
    genes = [f"G{i}" for i in range(n_genes)]
    perts = [f"G{i}" for i in range(12)]
    base = {ct: rng.lognormal(1.0, 1.0, n_genes) for ct in ("A", "B")}
    shared = {p: rng.choice(np.arange(12, n_genes), 6, replace=False) for p in perts}
    fold = {}
    for ct in ("A", "B"):
        for p in perts:
            f = np.ones(n_genes)
            f[int(p[1:])] = 0.15
            own = rng.choice(np.arange(12, n_genes), 6, replace=False)
            f[np.r_[shared[p], own]] = rng.choice([0.3, 3.0], 12)
            fold[(ct, p)] = f

    def cells(lam, n):
        c = rng.poisson(lam * rng.lognormal(0, 0.2, (n, 1)))
        return np.log1p(c / np.maximum(c.sum(1, keepdims=True), 1) * 1e4)

    xs, obs = [], []
    for ct in ("A", "B"):
        xs.append(cells(base[ct], n_ctrl))
        obs += [(CTRL, ct)] * n_ctrl
        for p in perts:
            xs.append(cells(base[ct] * fold[(ct, p)], n_cells))
            obs += [(p, ct)] * n_cells
    o = pd.DataFrame(obs, columns=["target_gene", "cell_type"]).astype("category")
    o.index = [f"c{i}" for i in range(len(o))]
    return ad.AnnData(np.vstack(xs).astype(np.float32), obs=o, var=pd.DataFrame(index=genes))


@pytest.fixture(scope="module")
def scored_panel(tmp_path_factory):
    from tahoe_ft.evaluation.panel import score_panel

    root = tmp_path_factory.mktemp("panel")
    a = counts_screen()
    train, real = split(a, {("A", f"G{i}") for i in range(6)})
    real = real[(real.obs["cell_type"] == "A").to_numpy()].copy()
    panel = score_panel(
        train, real, root / "eval", labels=ScreenLabels("target_gene", CTRL, "cell_type"),
        de_cache_dir=root / ".de_cache",
    )  # fmt: skip
    return panel["baselines"]


def test_the_ceiling_scores_above_every_baseline(scored_panel):
    ceiling = scored_panel.pop("ceiling")
    assert set(scored_panel) == {"control", "cell_mean", "pert_mean", "target_knockdown", "linear"}
    for name, b in scored_panel.items():
        assert ceiling["avg_score"] > b["avg_score"], name
    assert ceiling["metrics"]["discrimination_score_l1"] >= max(
        b["metrics"]["discrimination_score_l1"] for b in scored_panel.values()
    )


def test_target_knockdown_beats_cell_mean_on_des(scored_panel):
    kd, cm = scored_panel["target_knockdown"]["metrics"], scored_panel["cell_mean"]["metrics"]
    assert kd["overlap_at_N"] > cm["overlap_at_N"] + 0.03
    assert scored_panel["cell_mean"]["avg_score"] == pytest.approx(0.0, abs=0.02)  # it is the normaliser


# -- feature_ridge and the re-centred basal cells (issue 20) -----------------------------------------------


def _featured_screen(seed=3, n_perts=24, dim=6):
    """Effects that are a linear map of each perturbation's features (+ a per-cell-type offset), and the
    features by name; controls included (their row is zeros)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.4, size=(dim, N_GENES))
    feats = {f"P{i}": rng.normal(size=dim) for i in range(n_perts)}
    offset = {"A": rng.normal(0, 0.2, N_GENES), "B": rng.normal(0, 0.2, N_GENES)}
    effects = {(ct, p): f @ w + offset[ct] for p, f in feats.items() for ct in ("A", "B")}
    feats[CTRL] = np.zeros(dim)
    a, base = screen(effects, n_cells=80, n_ctrl=200, seed=seed)
    return a, base, effects, feats


HELD = {("A", "P0"), ("B", "P0"), ("B", "P1"), ("A", "P2")}  # P0 held out everywhere


def test_feature_ridge_recovers_effects_that_are_linear_in_the_features():
    a, base, effects, feats = _featured_screen()
    train, real = split(a, HELD)
    panel = _panel(train, real, features=feats)
    assert "leave-one-out" in panel.notes["feature_ridge"]
    ridge, cm = panel.predictions["feature_ridge"], panel.predictions["cell_mean"]
    for ct, p in HELD:
        want = base[ct] + effects[(ct, p)]
        got = _group_mean(ridge, ct, p)
        # the planted effect up to the ridge's shrinkage and noise, far closer than the cell mean
        assert np.abs(got - want).mean() < 0.25 * np.abs(_group_mean(cm, ct, p) - want).mean()


def test_feature_ridge_uses_the_rounds_features_and_reads_no_held_out_cell():
    a, _, _, feats = _featured_screen()
    train, real = split(a, HELD)
    before = _panel(train, real, features=feats).predictions["feature_ridge"]
    # another held-out perturbation's features: its prediction moves, the others' do not
    moved = {**feats, "P0": feats["P0"] + 2.0}
    after = _panel(train, real, features=moved).predictions["feature_ridge"]
    p0 = (real.obs["target_gene"] == "P0").to_numpy()
    assert np.abs(np.asarray(after.X[p0]) - np.asarray(before.X[p0])).max() > 0.1
    np.testing.assert_array_equal(np.asarray(after.X[~p0]), np.asarray(before.X[~p0]))
    # poison the held-out cells: nothing changes
    poisoned = real.copy()
    held = (poisoned.obs["target_gene"] != CTRL).to_numpy()
    poisoned.X[held] = 9.0
    again = _panel(train, poisoned, features=feats).predictions["feature_ridge"]
    np.testing.assert_array_equal(np.asarray(again.X), np.asarray(before.X))


def test_feature_ridge_is_absent_without_features_and_says_why():
    a, _, _, feats = _featured_screen()
    train, real = split(a, HELD)
    panel = _panel(train, real)
    assert "feature_ridge" not in panel.predictions and "absent" in panel.notes["feature_ridge"]
    partial = {k: v for k, v in feats.items() if k != "P0"}
    panel = _panel(train, real, features=partial)
    assert "feature_ridge" not in panel.predictions and "P0" in panel.notes["feature_ridge"]


def test_recentred_basal_cells_keep_their_deviations_and_take_the_control_mean():
    a, _, _, _ = _featured_screen()
    train, real = split(a, HELD)
    on = _panel(train, real, settings=PanelSettings(recentre_basal=True)).predictions["control"]
    off = _panel(train, real, settings=PanelSettings(recentre_basal=False)).predictions["control"]
    for ct, p in HELD:
        sel = ((real.obs["cell_type"] == ct) & (real.obs["target_gene"] == p)).to_numpy()
        x_on, x_off = np.asarray(on.X[sel], dtype=np.float64), np.asarray(off.X[sel], dtype=np.float64)
        ctrl_mean = _group_mean(real, ct, CTRL)
        # the group's mean is the mean of the real file's controls, which cell-eval takes deltas against
        # (clipping at 0 aside: these cells are far from it)
        np.testing.assert_allclose(x_on.mean(axis=0), ctrl_mean, atol=1e-5)
        assert np.abs(x_off.mean(axis=0) - ctrl_mean).max() > 1e-3  # raw draws carry sampling noise
        # the same draws, each cell keeping its deviation from the draws' mean
        np.testing.assert_allclose(x_on - x_on.mean(axis=0), x_off - x_off.mean(axis=0), atol=1e-5)
