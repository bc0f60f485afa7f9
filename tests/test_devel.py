"""`data=devel`: PerturBench's four-cell-line screen ships xz'd and unpacks byte for byte into the data cache."""

from __future__ import annotations

import hashlib
import json

import anndata as ad
import numpy as np
import pytest

from conftest_train import cli
from tahoe_ft.datasets import embedded

# the packaged copy, unpacked (what `data=devel` reads): sha256 of its bytes (DEVEL.md)
DEVEL_UNPACKED_SHA256 = "6ef14808c1c4194487e9ce4c596048153d32f108d2585e241db14677c7b8cec9"


def test_the_packaged_devel_copy_unpacks_once_to_the_same_screen(tmp_path):
    packed = embedded.PACKAGE_DATA / embedded.DEVEL_PACKED
    assert packed.stat().st_size < 600_000
    assert (embedded.PACKAGE_DATA / "DEVEL.md").read_text().count("BSD 3-Clause License") == 1
    path = embedded.devel_path(tmp_path / "cache")
    assert path == tmp_path / "cache" / "devel" / embedded.DEVEL_FILE
    assert hashlib.sha256(path.read_bytes()).hexdigest() == DEVEL_UNPACKED_SHA256
    a = ad.read_h5ad(path)
    assert a.shape == (5961, 500) and a.X.dtype == np.float64
    assert sorted(a.obs["cell_type"].unique()) == ["A172", "T98G", "U87MG", "k562"]
    assert (a.obs["condition"] == "control").sum() == 400
    assert a.obs.loc[a.obs["cell_type"] == "k562", "condition"].str.contains(r"\+").any()
    mtime = path.stat().st_mtime_ns
    assert embedded.devel_path(tmp_path / "cache") == path and path.stat().st_mtime_ns == mtime  # not again


def test_check_reads_the_devel_screen(tmp_path):
    out = cli("check", "data=devel", f"paths.data_cache={tmp_path / 'cache'}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["files"] == [str((tmp_path / "cache" / "devel" / embedded.DEVEL_FILE).resolve())]
    assert (
        summary["genes"] == 500 and summary["input_transform"] == "log1p" and summary["control"] == "control"
    )
    assert sorted(summary["cell_types"]) == ["A172", "T98G", "U87MG", "k562"]
    # 33 perturbations besides the control (18 K562 singles, 15 doubles; the 9 kinase genes in every line)
    assert len(summary["splits"]["train"]["perturbations"]) == 33
    assert summary["splits"]["train"]["cells"] + 400 == 5961  # every perturbed cell trains; 400 controls


def test_reproduce_over_folds_of_the_devel_screen_runs_to_the_end(tmp_path):
    """Issue #31: cross-validation on a screen whose cell lines have different perturbations (K562's 33 against
    the glioblastoma lines' 9) used to fail. `reproduce folds=2 data=devel` runs train, predict, eval and compare
    on both folds, and each fold's `[fewshot]` table lists only perturbations measured in its cell type."""
    import pandas as pd

    from tahoe_ft.data.split_file import parse_split_toml

    out = cli(
        "reproduce", "data=devel", "folds=2", "num_threads=1", "step_scale=0.01", "experiments=[0905]",
        "evaluate=[0905]", "train_overrides=['pretrained=null','logger=csv']",
        f"paths.data_cache={tmp_path / 'cache'}", cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    screen = ad.read_h5ad(embedded.devel_path(tmp_path / "cache"))
    measured = {
        ct: set(g["condition"]) - {"control"} for ct, g in screen.obs.astype(str).groupby("cell_type")
    }
    tested: dict[str, list[str]] = {ct: [] for ct in measured}
    for fold in range(2):
        split = parse_split_toml(tmp_path / "runs" / "folds" / f"fold-{fold}.toml")
        assert {ct for _, ct in split.fewshot} == set(measured)
        assert any(table["val"] for table in split.fewshot.values()), fold
        for (_, ct), table in split.fewshot.items():
            val, test = set(table["val"]), set(table["test"])
            assert test and not val & test, (fold, ct)  # a line may have no validation perturbation
            assert val | test <= measured[ct], (fold, ct, sorted((val | test) - measured[ct]))
            tested[ct] += table["test"]
    for ct, perts in tested.items():  # every measured perturbation of a line is tested once over the folds
        assert sorted(perts) == sorted(measured[ct]), ct
    per_split = pd.read_csv(tmp_path / "runs" / "compare_splits.csv")
    rounds = per_split[per_split["experiment"] == "0905"]
    assert sorted(rounds["fold"]) == [0, 1] and rounds["avg_score"].notna().all()
    assert {"cell_mean", "ceiling", "feature_ridge"} <= set(per_split["experiment"])
    row = pd.read_csv(tmp_path / "runs" / "compare.csv").set_index("experiment").loc["0905"]
    assert row["n"] == 2 and row["vs_cell_mean_n_splits"] == 2
    # the pooled verdict is over every tested group of both folds, and its figures agree with each other
    assert row["vs_cell_mean_n_groups"] == sum(len(p) for p in tested.values())
    assert row["vs_cell_mean_diff"] == pytest.approx(
        row["vs_cell_mean_round_mean"] - row["vs_cell_mean_base_mean"]
    )
    assert row["vs_cell_mean_ci_low"] <= row["vs_cell_mean_diff"] <= row["vs_cell_mean_ci_high"]
    expected = (
        "better"
        if row["vs_cell_mean_ci_low"] > 0
        else "worse"
        if row["vs_cell_mean_ci_high"] < 0
        else "indistinguishable"
    )
    assert row["vs_cell_mean"] == expected
