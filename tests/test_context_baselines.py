"""The context-transfer (`pert_mean`) and additive baselines against hand computations on tiny screens, the
baselines that exist for some held-out groups only scored on those, and the design flags of eval's table."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from tahoe_ft.data.labels import ScreenLabels
from tahoe_ft.evaluation.baselines import PanelSettings, build_panel
from tahoe_ft.evaluation.diagnostics import design, design_lines
from tahoe_ft.evaluation.report import score_table
from tahoe_ft.evaluation.score import Score

CTRL = "control"
N_GENES = 30
LABELS = ScreenLabels("condition", CTRL, "cell_type")


def screen(groups: dict[tuple[str, str], float], *, n=20, n_ctrl=40, seed=0) -> ad.AnnData:
    """Cells around 3 (no clipping at 0): each cell type's control level, each group its own random effect of
    scale `groups[(ct, pert)]`, plus noise; perturbations named so that none is a gene."""
    rng = np.random.default_rng(seed)
    cts = sorted({ct for ct, _ in groups})
    xs, obs = [], []
    for ct in cts:
        level = rng.uniform(2.5, 3.5, N_GENES)
        xs.append(level + rng.normal(0, 0.2, (n_ctrl, N_GENES)))
        obs += [(CTRL, ct)] * n_ctrl
        for (c, p), scale in sorted(groups.items()):
            if c == ct:
                xs.append(level + rng.normal(0, scale, N_GENES) + rng.normal(0, 0.2, (n, N_GENES)))
                obs += [(p, ct)] * n
    o = pd.DataFrame(obs, columns=["condition", "cell_type"]).astype("category")
    o.index = [f"cell{i}" for i in range(len(o))]
    return ad.AnnData(np.vstack(xs), obs=o, var=pd.DataFrame(index=[f"g{i}" for i in range(N_GENES)]))


def split(a: ad.AnnData, held_out: set[tuple[str, str]]) -> tuple[ad.AnnData, ad.AnnData]:
    key = list(zip(a.obs["cell_type"].astype(str), a.obs["condition"].astype(str), strict=True))
    out = np.array([k in held_out for k in key])
    ctrl = (a.obs["condition"] == CTRL).to_numpy()
    return a[~out].copy(), a[out | ctrl].copy()


def mean(a: ad.AnnData, ct: str, p: str) -> np.ndarray:
    sel = ((a.obs["cell_type"] == ct) & (a.obs["condition"] == p)).to_numpy()
    return np.asarray(a.X[sel], dtype=np.float64).mean(axis=0)


def panel(train, real):
    return build_panel(train, real, labels=LABELS, settings=PanelSettings(seed=0))


def test_context_transfer_is_the_mean_of_the_other_cell_types_deltas_on_the_target_controls():
    a = screen({(ct, p): 0.5 for ct in ("A", "B", "C") for p in ("KD1", "KD2")})
    train, real = split(a, {("A", "KD1")})
    got = panel(train, real).predictions["pert_mean"]
    # by hand: (B's KD1 mean - B's control mean + C's KD1 mean - C's control mean) / 2 on A's control mean
    # (the basal draws are re-centred on the real file's A controls: their mean is that mean exactly)
    hand = mean(real, "A", CTRL) + np.mean(
        [mean(train, c, "KD1") - mean(train, c, CTRL) for c in "BC"], axis=0
    )
    np.testing.assert_allclose(mean(got, "A", "KD1"), hand, atol=1e-5)
    # it reads no held-out cell: poisoned held-out cells give the same prediction
    poisoned = real.copy()
    sel = (poisoned.obs["condition"] == "KD1").to_numpy()
    poisoned.X[sel] = 13.0
    again = panel(train, poisoned).predictions["pert_mean"]
    np.testing.assert_array_equal(again.X[~sel], got.X[~sel])
    np.testing.assert_array_equal(again[sel].X, got[sel].X)


def test_context_transfer_is_absent_with_its_reason_without_another_context():
    a = screen({("A", "KD1"): 0.5, ("A", "KD2"): 0.5, ("B", "KD2"): 0.5})
    train, real = split(a, {("A", "KD1")})
    p = panel(train, real)
    assert "pert_mean" not in p.predictions and "pert_mean" not in p.partial
    assert p.notes["pert_mean"].startswith("absent:") and "A/KD1" in p.notes["pert_mean"]
    assert "trains in no other cell type" in p.notes["pert_mean"]


def test_context_transfer_for_some_groups_is_kept_for_those_groups():
    a = screen({("A", "KD1"): 0.5, ("A", "KD2"): 0.5, ("B", "KD2"): 0.5, ("B", "KD3"): 0.5})
    train, real = split(a, {("A", "KD1"), ("A", "KD2")})
    p = panel(train, real)
    assert "pert_mean" not in p.predictions
    sub, groups = p.partial["pert_mean"]
    assert groups == [("A", "KD2")] and set(sub.obs["condition"]) == {CTRL, "KD2"}
    hand = mean(real, "A", CTRL) + mean(train, "B", "KD2") - mean(train, "B", CTRL)
    np.testing.assert_allclose(mean(sub, "A", "KD2"), hand, atol=1e-5)
    assert p.notes["pert_mean"].startswith("partial:") and "1 of 2" in p.notes["pert_mean"]
    assert "A/KD1" in p.notes["pert_mean"]


def test_additive_is_the_sum_of_the_singles_measured_effects():
    a = screen({("k562", g): 0.5 for g in ("KLF1", "MAP2K6", "KLF1+MAP2K6", "SET+KLF1")})
    train, real = split(a, {("k562", "KLF1+MAP2K6")})
    p = panel(train, real)
    got = p.predictions["additive"]
    delta = lambda s: mean(train, "k562", s) - mean(train, "k562", CTRL)  # noqa: E731
    hand = mean(real, "k562", CTRL) + delta("KLF1") + delta("MAP2K6")
    np.testing.assert_allclose(mean(got, "k562", "KLF1+MAP2K6"), hand, atol=1e-5)
    assert "for all 1 held-out groups" in p.notes["additive"]
    # a single that does not train in the cell type (SET): absent, with the reason
    train, real = split(a, {("k562", "SET+KLF1")})
    p = panel(train, real)
    assert "additive" not in p.predictions and "additive" not in p.partial
    assert p.notes["additive"].startswith("absent:") and "k562/SET+KLF1 (lacks SET)" in p.notes["additive"]
    # a held-out single is no combination: absent for it, kept for the combination beside it
    train, real = split(a, {("k562", "MAP2K6"), ("k562", "SET+KLF1")})
    assert "not a combination" in panel(train, real).notes["additive"]


def _score(n_per_ct: dict[str, int], **kw) -> Score:
    metrics = {"mae": 0.1, "discrimination_score_l1": 1.0, "overlap_at_N": 0.2}
    parts = {
        ct: Score(avg_score=0.0, metrics=metrics, baseline=metrics, normalized=metrics, n_perts=n)
        for ct, n in n_per_ct.items()
    }
    return Score(
        avg_score=0.0, metrics=metrics, baseline=metrics, normalized=metrics, n_perts=sum(n_per_ct.values()),
        profile="vcc", per_celltype=parts, **kw,
    )  # fmt: skip


def test_the_discrimination_score_is_flagged_degenerate_with_one_held_out_perturbation_per_cell_type():
    d = design(_score({"A172": 1, "T98G": 1, "U87MG": 1}))["discrimination"]
    assert d["flag"] == "degenerate" and "every cell type" in d["note"] and "1.0" in d["note"]
    assert "degenerate" in score_table(_score({"A172": 1, "T98G": 1}))
    d = design(_score({"k562": 3}))["discrimination"]
    assert d["flag"] == "coarse" and d["step"] == pytest.approx(1 / 9) and "1/3 = 0.333" in d["note"]
    assert design(_score({"k562": 12}))["discrimination"]["flag"] is None


def test_the_table_lists_shuffle_collapse_partial_and_absent_baselines():
    diag = {
        "shuffle": {"avg_score": 0.111, "drop": -0.094},
        "collapse": {"pred_effect_corr": 0.79, "real_effect_corr": -0.10},
        "partial_baselines": {
            "pert_mean": {"n_groups": 2, "of": 3, "avg_score": 0.05, "metrics": {"mae": 0.01},
                          "round": {"avg_score": 0.02, "metrics": {"mae": 0.02}}},
        },
    }  # fmt: skip
    notes = {"pert_mean": "partial: ...", "additive": "absent: no held-out group has ... (not a combination)"}
    score = _score(
        {"k562": 3}, baselines={"control": {"avg_score": 0.0}}, baseline_notes=notes, diagnostics=diag
    )
    text = "\n".join(design_lines(score))
    assert "shuffle control" in text and "0.1110" in text
    assert "COLLAPSED" in text and "0.7900" in text
    assert (
        "pert_mean on 2 of 3 held-out groups: avg_score 0.0500" in text
        and "same groups: avg_score 0.0200" in text
    )
    assert "additive absent: no held-out group has ... (not a combination)" in text
    assert "cell_mean absent:" in text and "pert_mean absent" not in text
    assert design(score)["left_out"]["additive"].startswith("absent:")


def test_a_baseline_for_some_groups_is_scored_on_them_beside_the_round_on_the_same_groups(tmp_path):
    from tahoe_ft.evaluation.panel import score_on_groups, score_panel

    a = screen(
        {("A", p): 0.5 for p in ("KD1", "KD2", "KD3", "KD4", "KD5")} | {("B", "KD1"): 0.5, ("B", "KD2"): 0.5}
    )
    train, real = split(a, {("A", "KD1"), ("A", "KD4"), ("A", "KD5")})
    real = real[(real.obs["cell_type"] == "A").to_numpy()].copy()
    common = dict(labels=LABELS, de_cache_dir=tmp_path / ".de_cache")
    panel = score_panel(train, real, tmp_path / "eval", **common)
    assert "pert_mean" not in panel["baselines"] and "ceiling" in panel["baselines"]
    part = panel["partial"]["pert_mean"]
    assert part["groups"] == [["A", "KD1"]] and part["n_groups"] == 1 and part["of"] == 3
    assert (
        np.isfinite(part["metrics"]["mae"]) and (tmp_path / "eval" / "baselines" / "pert_mean.h5ad").is_file()
    )
    # the baseline's own prediction scored on the same groups by the round's function: the same numbers
    pred = ad.read_h5ad(tmp_path / "eval" / "baselines" / "pert_mean.h5ad")
    again = score_on_groups(pred, real, train, part["groups"], tmp_path / "again", **common)
    assert again.n_perts == 1 and again.metrics["mae"] == pytest.approx(part["metrics"]["mae"])
    # a perfect round on those groups (the real cells) has MAE 0 there
    perfect = score_on_groups(real, real, train, part["groups"], tmp_path / "perfect", **common)
    assert perfect.metrics["mae"] == pytest.approx(0.0, abs=1e-6) and perfect.n_perts == 1


def test_a_real_score_with_one_held_out_perturbation_per_cell_type_is_flagged_degenerate(tmp_path):
    from tahoe_ft.evaluation.score import score_predictions

    a = screen({(ct, p): 0.5 for ct in ("A", "B") for p in ("KD1", "KD2", "KD3")})
    train, real = split(a, {("A", "KD1"), ("B", "KD2")})
    score = score_predictions(real, real, train, tmp_path, labels=LABELS, de_cache_dir=tmp_path / ".de_cache")
    assert score.metrics["discrimination_score_l1"] == 1.0
    d = design(score)["discrimination"]
    assert d["flag"] == "degenerate" and d["n_per_cell_type"] == {"A": 1, "B": 1}
    assert (
        "flag: discrimination_score_l1 degenerate: one held-out perturbation in every cell type"
        in score_table(score)
    )
