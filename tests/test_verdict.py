"""Paired verdicts (`evaluation.verdict`, issue #32): the round against a baseline, held-out group by group, with
a seeded percentile bootstrap interval; over splits, a hierarchical bootstrap (splits, then groups within).
The unit tests plant per-group tables; the end-to-end test runs the real `tahoe-ft eval` (real cell-eval) on
the tiny demo screen with 8 held-out groups."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import tahoe_ft
from tahoe_ft.config import EvalConfig
from tahoe_ft.evaluation.verdict import (
    BETTER,
    MIN_GROUPS,
    SAME,
    WORSE,
    Verdict,
    bootstrap_ci,
    paired_verdict,
    per_group_table,
    read_per_group,
    split_verdict,
    verdict_of,
)

BEST = {"mae": 0.0, "discrimination_score_l1": 1.0, "overlap_at_N": 1.0}
NORMALISER = {"CT0": {"mae": 0.2, "discrimination_score_l1": 0.5, "overlap_at_N": 0.3}}


def _groups(
    n: int, *, mae: float, ds: float, overlap: float, noise: float = 0.0, seed: int = 0
) -> pd.DataFrame:
    """A per-group table of `n` groups in cell type CT0: the given metric values plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    raw = pd.DataFrame(
        {
            "celltype": "CT0",
            "perturbation": [f"G{i:03d}" for i in range(n)],
            "overlap_at_N": overlap + noise * rng.normal(size=n),
            "mae": mae + noise * rng.normal(size=n),
            "discrimination_score_l1": ds + noise * rng.normal(size=n),
        }
    )
    return per_group_table(raw, NORMALISER, BEST)


def test_per_group_avg_score_is_cell_evals_normalisation_group_by_group():
    g = _groups(3, mae=0.1, ds=0.75, overlap=0.3)
    # MAE best at 0: 1 - 0.1 / 0.2; DS best at 1: (0.75 - 0.5) / 0.5; overlap equal to the normaliser: 0
    assert g["norm_mae"].tolist() == pytest.approx([0.5] * 3)
    assert g["norm_discrimination_score_l1"].tolist() == pytest.approx([0.5] * 3)
    assert g["norm_overlap_at_N"].tolist() == pytest.approx([0.0] * 3)
    assert g["avg_score"].tolist() == pytest.approx([1 / 3] * 3)
    # a degenerate normaliser (the cell mean's DS is already 1) counts 0 for every group, as cell-eval's NaN -> 0
    flat = per_group_table(
        g[["celltype", "perturbation", "discrimination_score_l1"]],
        {"CT0": {"discrimination_score_l1": 1.0}},
        BEST,
    )
    assert flat["norm_discrimination_score_l1"].tolist() == [0.0] * 3


def test_a_planted_better_predictor_is_better_and_the_baseline_worse():
    base = _groups(20, mae=0.2, ds=0.5, overlap=0.3, noise=0.05, seed=1)
    better = _groups(20, mae=0.15, ds=0.6, overlap=0.35, noise=0.05, seed=2)
    v = paired_verdict(better, base)
    assert v.n_groups == 20 and v.diff > 0 and v.ci_low > 0 and v.verdict == BETTER
    assert v.mae_diff < 0 and v.mae_ci_high < 0 and v.mae_verdict == BETTER  # lower MAE: better
    # the other way round: worse, the interval mirrored exactly (the same resamples)
    w = paired_verdict(base, better)
    assert w.verdict == WORSE and w.mae_verdict == WORSE
    assert (w.ci_low, w.ci_high) == pytest.approx((-v.ci_high, -v.ci_low))
    assert v.short() == f"better [{v.ci_low:+.3f},{v.ci_high:+.3f}]"
    assert v.short(flip=True).startswith("worse [-")  # in the baseline's row: the baseline is worse


def test_a_copy_of_the_baseline_is_indistinguishable_with_the_interval_0_0():
    base = _groups(12, mae=0.2, ds=0.5, overlap=0.3, noise=0.05, seed=3)
    v = paired_verdict(base.copy(), base)
    assert (v.diff, v.ci_low, v.ci_high, v.mae_diff, v.mae_ci_low, v.mae_ci_high) == (0, 0, 0, 0, 0, 0)
    assert v.verdict == v.mae_verdict == SAME and v.n_groups == 12


def test_the_interval_narrows_as_groups_are_added():
    widths = []
    for n in (8, 32, 128, 512):
        base = _groups(n, mae=0.2, ds=0.5, overlap=0.3, noise=0.05, seed=4)
        round_ = _groups(n, mae=0.19, ds=0.52, overlap=0.31, noise=0.05, seed=5)
        v = paired_verdict(round_, base)
        widths.append(v.ci_high - v.ci_low)
    assert all(a > b for a, b in zip(widths, widths[1:], strict=False)), widths
    assert widths[-1] < widths[0] / 4  # ~ 1 / sqrt(n): 64x the groups, ~8x narrower


def test_the_bootstrap_is_seeded_and_pairs_only_the_common_groups():
    d = np.random.default_rng(0).normal(0.1, 0.2, 40)
    assert bootstrap_ci(d) == bootstrap_ci(d)  # the same seed: the same interval to the digit
    assert bootstrap_ci(d, seed=1) != bootstrap_ci(d)
    base = _groups(10, mae=0.2, ds=0.5, overlap=0.3, noise=0.05, seed=6)
    round_ = _groups(10, mae=0.1, ds=0.9, overlap=0.9, noise=0.05, seed=7)
    assert paired_verdict(round_, base.iloc[:7]).n_groups == 7  # a baseline of 7 of the 10 groups


def test_fewer_than_min_groups_is_indistinguishable_whatever_the_interval():
    base = _groups(MIN_GROUPS - 1, mae=0.2, ds=0.5, overlap=0.3, noise=0.01, seed=8)
    round_ = _groups(MIN_GROUPS - 1, mae=0.1, ds=0.9, overlap=0.9, noise=0.01, seed=9)
    v = paired_verdict(round_, base)
    assert v.ci_low > 0 and v.verdict == SAME and "fewer than" in v.to_dict()["note"]
    assert verdict_of(0.01, 0.02, MIN_GROUPS) == BETTER and verdict_of(-0.02, -0.01, MIN_GROUPS) == WORSE
    assert verdict_of(-0.02, 0.01, MIN_GROUPS) == SAME
    assert verdict_of(0.01, 0.02, MIN_GROUPS, lower_is_better=True) == WORSE


def test_over_splits_the_hierarchical_interval_counts_the_spread_between_splits():
    """Four splits whose mean differences disagree (two favour the round, two the baseline): pooled as one
    split the many groups give a narrow interval that excludes 0; resampling the splits does not."""
    pairs = []
    for s, shift in enumerate((0.05, 0.06, -0.03, -0.02)):
        base = _groups(40, mae=0.2, ds=0.5, overlap=0.3, noise=0.02, seed=10 + s)
        rnd = base.copy()
        rnd["norm_mae"] += shift
        rnd["perturbation"] = base["perturbation"]
        pairs.append(
            (
                rnd.assign(perturbation=lambda d, s=s: d["perturbation"] + f"/{s}"),
                base.assign(perturbation=lambda d, s=s: d["perturbation"] + f"/{s}"),
            )
        )
    pooled = paired_verdict(pd.concat([p[0] for p in pairs]), pd.concat([p[1] for p in pairs]))
    hier = split_verdict(pairs)
    assert hier.n_splits == 4 and hier.n_groups == 160
    assert hier.diff == pytest.approx(pooled.diff)
    assert pooled.verdict == BETTER and hier.verdict == SAME
    assert hier.ci_high - hier.ci_low > 3 * (pooled.ci_high - pooled.ci_low)


def test_to_dict_writes_nan_as_none():
    v = Verdict(7, 0.1, 0.0, 0.2, SAME, math.nan, math.nan, math.nan, SAME)
    d = v.to_dict()
    assert d["mae_diff"] is None and d["n_groups"] == 7 and "note" not in d and "round minus" in d["what"]
    json.dumps(d)


# -- end to end: tahoe-ft eval writes the verdict block --------------------------------------------------------


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    """The tiny demo screen: real = its 4 validation and test perturbations in both cell types (8 held-out
    groups) and the controls, train = the rest; the prediction = the real cells themselves (a planted better
    predictor: no baseline comes near it)."""
    from tahoe_ft.data.inputs import parse_split_toml
    from upstream_run import demo_files

    root = tmp_path_factory.mktemp("verdict")
    demo = demo_files(root)
    screen = ad.read_h5ad(demo["screen"])
    screen.X = np.asarray(screen.X.toarray(), dtype=np.float32)
    del screen.layers["counts"], screen.obsm["X_state"]
    split = parse_split_toml(demo["split"])
    held = {p for t in split.fewshot.values() for p in (*t["test"], *t["val"])}
    perts = screen.obs["target_gene"].astype(str)
    out = {"root": root, "runs": root / "runs", "real": root / "real.h5ad", "train": root / "train.h5ad"}
    screen[perts.isin(held | {"non-targeting"}).to_numpy()].copy().write_h5ad(out["real"])
    screen[~perts.isin(held).to_numpy()].copy().write_h5ad(out["train"])
    return out


def _eval(screen, pred: Path) -> dict:
    tahoe_ft.evaluate(
        EvalConfig(
            pred=str(pred),
            real=str(screen["real"]),
            train=str(screen["train"]),
            cell_type_col="cell_type",
            runs_dir=str(screen["runs"]),
            num_threads=1,
        )
    )
    return json.loads((pred.parent / "eval" / "score.json").read_text())


def test_eval_writes_a_verdict_per_baseline_and_the_table_shows_it(screen):
    from tahoe_ft.evaluation.report import VS_ROUND_NOTE, score_table
    from tahoe_ft.evaluation.score import Score

    perfect = screen["root"] / "perfect" / "pred.h5ad"
    perfect.parent.mkdir()
    shutil.copy(screen["real"], perfect)
    score = _eval(screen, perfect)
    panel = {k: b for k, b in score["baselines"].items() if k != "ceiling"}
    assert {"cell_mean", "control", "linear"} <= set(panel) and "verdict" not in score["baselines"]["ceiling"]
    for name, b in panel.items():
        v = b["verdict"]
        assert v["n_groups"] == 8 and v["verdict"] == BETTER and v["ci_low"] > 0, (name, v)
        assert v["mae_verdict"] == BETTER and v["mae_diff"] < 0 and v["mae_ci_high"] < 0
    per_group = read_per_group(perfect.parent / "eval" / "per_group.csv")
    assert set(per_group) == {"round", *panel} and len(per_group["round"]) == 8
    assert (per_group["round"]["mae"] == 0).all()
    # per group, cell-eval's normalisation: its mean over a cell type's groups is score.json's (unclipped here)
    for ct, part in score["per_celltype"].items():
        groups = per_group["round"][per_group["round"]["celltype"] == ct]
        for m, norm in part["normalized"].items():
            assert groups[f"norm_{m}"].mean() == pytest.approx(norm, abs=1e-9), (ct, m)
    # the mean paired difference: the round's per-group avg_score minus the baseline's (unclipped)
    for name in panel:
        diff = per_group["round"]["avg_score"].mean() - per_group[name]["avg_score"].mean()
        assert panel[name]["verdict"]["diff"] == pytest.approx(diff, abs=1e-12)
    table = score_table(Score.from_dict(score), label="pred.h5ad")
    lines = table.splitlines()
    rows = lines[: 1 + 1 + len(score["baselines"])]  # the header, the round, the panel and the ceiling
    assert "vs round" in rows[0] and rows[-1].startswith("ceiling") and rows[-1].endswith(" -")
    assert max(len(line) for line in rows + VS_ROUND_NOTE) <= 100 and set(VS_ROUND_NOTE) <= set(lines)
    row = next(line for line in table.splitlines() if line.startswith("control "))
    assert "worse [-" in row  # the control baseline against the round: worse


def test_a_copy_of_a_baseline_is_indistinguishable_from_it_end_to_end(screen):
    """The panel's `control` baseline, evaluated as the prediction: against itself the difference is exactly 0
    for every group, so the interval is [0, 0]."""
    first = screen["root"] / "perfect" / "eval" / "baselines" / "control.h5ad"
    if not first.is_file():
        pytest.skip("needs the first test's panel")
    copy = screen["root"] / "copy" / "pred.h5ad"
    copy.parent.mkdir()
    shutil.copy(first, copy)
    v = _eval(screen, copy)["baselines"]["control"]["verdict"]
    assert (v["diff"], v["ci_low"], v["ci_high"], v["mae_diff"]) == (0, 0, 0, 0)
    assert v["verdict"] == v["mae_verdict"] == SAME and v["n_groups"] == 8


# -- compare over folds x seeds ---------------------------------------------------------------------------------


def _split_run(runs: Path, groups: dict[str, pd.DataFrame]) -> None:
    """A split's runs dir as eval leaves it, with one round `0905`: score.json (its verdicts) and
    per_group.csv (the round's and each baseline's groups)."""
    eval_dir = runs / "0905" / "r1" / "eval"
    eval_dir.mkdir(parents=True)
    means = {
        name: g[["mae", "discrimination_score_l1", "overlap_at_N"]].mean().to_dict()
        for name, g in groups.items()
    }
    baselines = {
        name: {"avg_score": float(g["avg_score"].mean()), "metrics": means[name],
               "verdict": paired_verdict(groups["round"], g).to_dict()}
        for name, g in groups.items() if name != "round"
    }  # fmt: skip
    score = {
        "avg_score": float(groups["round"]["avg_score"].mean()),
        "metrics": means["round"],
        "baselines": baselines,
    }
    (eval_dir / "score.json").write_text(json.dumps(score))
    pd.concat([g.assign(entry=name) for name, g in groups.items()]).to_csv(
        eval_dir / "per_group.csv", index=False
    )


def test_compare_over_splits_gives_each_round_a_verdict_per_baseline(tmp_path, capsys):
    """Four splits (2 folds x 2 seeds) of 6 groups each: the round planted better than `control` and equal to
    `linear` (a copy); compare.csv's round row and the console say so, pooled over the splits."""
    from tahoe_ft.study.comparison import compare_splits

    splits = []
    for seed in (0, 1):
        for fold in (0, 1):
            control = _groups(6, mae=0.2, ds=0.5, overlap=0.3, noise=0.03, seed=20 + 2 * seed + fold)
            rnd = _groups(6, mae=0.15, ds=0.6, overlap=0.35, noise=0.03, seed=30 + 2 * seed + fold)
            for g in (control, rnd):  # the folds hold out different perturbations
                g["perturbation"] = g["perturbation"] + f"/f{fold}"
            runs = tmp_path / f"seed-{seed}" / f"fold-{fold}"
            _split_run(runs, {"round": rnd, "control": control, "linear": rnd.copy()})
            splits.append(({"seed": seed, "fold": fold}, runs))
    summary = compare_splits(splits, tmp_path)
    out = capsys.readouterr().out
    on_disk = pd.read_csv(tmp_path / "compare.csv")
    r = on_disk[on_disk["kind"] == "round"].iloc[0]
    assert r["vs_control"] == BETTER and r["vs_control_ci_low"] > 0 and r["vs_control_mae_verdict"] == BETTER
    assert r["vs_control_n_splits"] == 4 and r["vs_control_n_groups"] == 24
    assert r["vs_linear"] == SAME and (
        r["vs_linear_ci_low"],
        r["vs_linear_ci_high"],
        r["vs_linear_diff"],
    ) == (0, 0, 0)
    assert summary.loc[summary["kind"] == "round", "vs_control"].item() == BETTER
    assert on_disk.loc[on_disk["kind"] == "baseline", "vs_control"].isna().all()  # rounds only
    # the console: one line per (round, baseline) with the verdict, in 100 columns
    lines = out.splitlines()
    assert any("control" in line and "better" in line for line in lines)
    assert any("linear" in line and "indist." in line for line in lines)
    start = next(i for i, line in enumerate(lines) if "each round against each baseline" in line)
    assert max(len(line) for line in lines[start:]) <= 100
    # compare_splits.csv: each split's own verdict (from its score.json)
    per_split = pd.read_csv(tmp_path / "compare_splits.csv")
    assert (per_split.loc[per_split["kind"] == "round", "vs_linear"] == SAME).all()


def test_eval_verdicts_reads_cell_evals_tables_and_pairs_a_partial_baseline_on_its_groups(tmp_path):
    """cell-eval's files as eval leaves them (per cell type): the round's results and its cell-mean baseline's
    aggregate table in the eval folder; a baseline scored on CT0's groups only (a partial one) is paired on
    those; "NA" stays a perturbation's name."""
    from tahoe_ft.evaluation.verdict import PER_GROUP_CSV, eval_verdicts

    rng = np.random.default_rng(0)
    perts = ["NA", *(f"G{i}" for i in range(7))]
    (tmp_path / "baseline").mkdir()
    (tmp_path / "partial").mkdir()
    for ct in ("CT0", "CT1"):
        res = pd.DataFrame(
            {"perturbation": perts, "overlap_at_N": rng.uniform(0.4, 0.6, 8), "mae": rng.uniform(0.1, 0.2, 8)}
        )
        res.to_csv(tmp_path / f"{ct}_results.csv", index=False)
        agg = pd.DataFrame({"statistic": ["count", "mean"], "overlap_at_N": [8.0, 0.3], "mae": [8.0, 0.3]})
        agg.to_csv(tmp_path / "baseline" / f"{ct}_agg_results.csv", index=False)
        if ct == "CT0":  # worse everywhere: a lower overlap, a higher MAE
            res.assign(overlap_at_N=res["overlap_at_N"] - 0.2, mae=res["mae"] + 0.1).to_csv(
                tmp_path / "partial" / f"{ct}_results.csv", index=False
            )
    verdicts = eval_verdicts(
        tmp_path, ["CT0", "CT1"], {"partial": tmp_path / "partial", "gone": tmp_path / "gone"}
    )
    assert set(verdicts) == {"partial"}  # an entry without tables is left out
    v = verdicts["partial"]
    assert v.n_groups == 8 and v.verdict == BETTER and v.mae_verdict == BETTER
    # per group: overlap (x - 0.3) / 0.7 and MAE 1 - x / 0.3, so the difference is (0.2 / 0.7 + 0.1 / 0.3) / 2
    assert v.diff == pytest.approx((0.2 / 0.7 + 0.1 / 0.3) / 2) and v.mae_diff == pytest.approx(-0.1)
    groups = read_per_group(tmp_path / PER_GROUP_CSV)
    assert (
        len(groups["round"]) == 16
        and len(groups["partial"]) == 8
        and "NA" in set(groups["round"]["perturbation"])
    )


def test_each_sides_unclipped_mean_is_reported_where_clipping_ranks_the_other_way():
    """avg_score clips each cell type's normalised score at 0; the verdict does not. Planted: in CT0 both sides
    are below the cell mean (round -0.5, baseline -1.0 per group), in CT1 both above (round +0.1, baseline
    +0.2). Clipped per cell type the baseline leads (0.1 against 0.05); per group the round is ahead by
    +0.2 on average. The verdict carries each side's unclipped mean, so the two readings can be reconciled."""

    def table(ct0: float, ct1: float) -> pd.DataFrame:
        rows = [("CT0", f"G{i}", ct0) for i in range(8)] + [("CT1", f"H{i}", ct1) for i in range(8)]
        return pd.DataFrame(
            {
                "celltype": [r[0] for r in rows],
                "perturbation": [r[1] for r in rows],
                "avg_score": [r[2] for r in rows],
                "norm_mae": [r[2] for r in rows],
                "mae": [0.1] * len(rows),
            }
        )

    rnd, base = table(-0.5, 0.1), table(-1.0, 0.2)
    clipped = {
        name: np.mean([max(g["avg_score"].mean(), 0.0) for _, g in t.groupby("celltype")])
        for name, t in (("round", rnd), ("base", base))
    }
    assert clipped["base"] > clipped["round"]  # the planted disagreement
    v = paired_verdict(rnd, base)
    assert v.verdict == BETTER and v.diff == pytest.approx(0.2)
    assert v.round_mean == pytest.approx(-0.2) and v.base_mean == pytest.approx(-0.4)
    assert v.round_mean - v.base_mean == pytest.approx(v.diff)
    assert v.to_dict()["round_mean"] == pytest.approx(-0.2)
    over = split_verdict([(rnd, base), (table(-0.3, 0.1), table(-0.3, 0.1))])
    assert over.round_mean == pytest.approx((-0.2 + -0.1) / 2) and over.base_mean == pytest.approx(
        (-0.4 - 0.1) / 2
    )
