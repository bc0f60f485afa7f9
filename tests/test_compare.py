"""compare.py on fake run directories written exactly as the run-directory contract says."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from tahoe_ft.errors import UserError
from tahoe_ft.study.comparison import collect, compare

METRICS = ["mae", "discrimination_score_l1", "overlap_at_N"]
COLUMNS = (
    ["experiment", "run", "kind", "split", "regime", "avg_score", "leaderboard_score"]
    + METRICS
    + [f"norm_{m}" for m in METRICS]
    + [f"base_{m}" for m in METRICS]
    + ["best_val_loss", "best_step", "final_decoder_loss", "steps", "wall_time_s"]
    + [
        f"{name}_{what}"
        for name in ("val", "unbiased", "unbiased_mean")
        for what in ("first", "best", "change")
    ]
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(runs, experiment, run_id, *, avg=None, decoder=True, last_decoder_blank=False, status="finished"):
    d = runs / experiment / run_id
    d.mkdir(parents=True)
    steps = 40
    (d / "run.json").write_text(
        json.dumps(
            {
                "experiment": experiment,
                "run_id": run_id,
                "status": status,
                "started": "2026-07-01T10:00:00",
                "finished": "2026-07-01T10:05:00",
                "wall_time_s": 300.5,
                "steps": steps,
                "best_val_loss": 0.42,
                "best_step": 30,
                "parent": None,
                "description": f"round {experiment}",
            }
        )
    )
    rows = []
    for s in range(0, steps + 1, 5):  # train rows every 5 steps, a val row every 10 (blank cells elsewhere)
        row = {
            "step": s,
            "train/loss": 2.0 / (1 + s),
            "train/main_loss": 1.5 / (1 + s),
            "train/decoder_weight": 1.0,
            "lr": 3e-4 * min(1, (s + 1) / 10),
            "cells_per_s": 900.0,
            "trainable/model": 1000,
        }
        if decoder:
            row["train/decoder_loss"] = 0.5 / (1 + s)
        rows.append(row)
        if s % 10 == 0:
            rows.append({"step": s, "val_loss": 1.8 / (1 + s), "val/decoder_loss": 0.6 / (1 + s)})
    df = pd.DataFrame(rows)
    if last_decoder_blank and decoder:
        df.loc[df.index[-2], "train/decoder_loss"] = np.nan  # the last train row has no decoder loss
    df.to_csv(d / f"{experiment}_metrics.csv", index=False)
    if avg is not None:
        (d / "eval").mkdir()
        score = {
            "avg_score": avg,
            "leaderboard_score": 100 * avg,
            "metrics": {"mae": 0.2 - avg / 10, "discrimination_score_l1": 0.5 + avg / 2, "overlap_at_N": avg},
            "baseline": {"mae": 0.22, "discrimination_score_l1": 0.7, "overlap_at_N": 0.03},
            "normalized": {"mae": avg / 2, "discrimination_score_l1": avg, "overlap_at_N": avg * 1.5},
            "profile": "vcc",
            "n_perts": 6,
            "versions": {"cell-eval": "0.8.2", "pdex": "0.3.0", "tahoe-ft": "0.1.0"},
        }
        (d / "eval" / "score.json").write_text(json.dumps(score))
    latest = runs / experiment / "latest"
    if latest.is_symlink() or latest.exists():
        latest.unlink()
    latest.symlink_to(run_id)
    return d, df


@pytest.fixture
def runs(tmp_path):
    r = tmp_path / "runs"
    _run(r, "0826", "2026-07-01_10-00-00", avg=0.31)
    _, df_b = _run(r, "0901", "2026-07-02_10-00-00", avg=0.55, last_decoder_blank=True)
    _run(r, "0905", "2026-07-03_10-00-00", avg=0.12, decoder=False)
    _run(r, "0906", "2026-07-04_10-00-00", avg=None, status="running")  # not evaluated yet
    (r / ".de_cache").mkdir()  # hidden folders are not runs
    return r, df_b


def test_collect_table(runs, caplog):
    r, df_b = runs
    with caplog.at_level("INFO", logger="tahoe_ft.study.comparison"):
        df = collect(r)
    assert list(df.columns) == COLUMNS
    assert list(df["experiment"]) == ["0901", "0826", "0905"]  # sorted by avg_score, unevaluated left out
    assert df["avg_score"].is_monotonic_decreasing
    assert "0906/2026-07-04_10-00-00" in caplog.text
    top = df.iloc[0]
    assert top["run"] == "2026-07-02_10-00-00"
    assert top["leaderboard_score"] == pytest.approx(55.0)
    assert top["mae"] == pytest.approx(0.2 - 0.055) and top["base_overlap_at_N"] == pytest.approx(0.03)
    assert top["norm_overlap_at_N"] == pytest.approx(0.825)
    assert top["best_val_loss"] == 0.42 and top["best_step"] == 30 and top["steps"] == 40
    assert top["wall_time_s"] == 300.5
    # last non-empty train/decoder_loss: the final train row is blank, so the one before it
    expected = df_b["train/decoder_loss"].dropna().iloc[-1]
    assert expected == pytest.approx(0.5 / 36)
    assert top["final_decoder_loss"] == pytest.approx(expected)
    assert math.isnan(df.set_index("experiment").loc["0905", "final_decoder_loss"])  # no decoder at all


def test_compare_writes_csv_and_png(runs, tmp_path, capsys):
    r, _ = runs
    out = tmp_path / "report"
    df = compare(r, out)
    printed = capsys.readouterr().out
    assert "0901" in printed and "0826" in printed and "0906" not in printed
    csv = pd.read_csv(out / "compare.csv", dtype={"run": str, "experiment": str})
    assert list(csv.columns) == COLUMNS
    assert len(csv) == 3 and list(csv["experiment"]) == list(df["experiment"])
    assert csv["avg_score"].is_monotonic_decreasing
    png = (out / "compare.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 20_000
    from matplotlib.image import imread

    img = imread(out / "compare.png")
    assert img.shape[0] > 300 and img.shape[1] > 600
    assert not list(out.glob(".*.tmp"))


def test_compare_defaults_to_runs_dir(runs):
    r, _ = runs
    compare(r)
    assert (r / "compare.csv").is_file() and (r / "compare.png").is_file()


def test_missing_or_unevaluated_runs_dir(tmp_path):
    with pytest.raises(UserError, match="tahoe-ft eval first"):
        compare(tmp_path / "nope")
    r = tmp_path / "runs"
    _run(r, "0826", "2026-07-01_10-00-00", avg=None)
    with pytest.raises(UserError, match="no evaluated runs.*tahoe-ft eval first"):
        compare(r)
    assert collect(r).empty and list(collect(r).columns) == COLUMNS


def test_collect_reports_what_training_did_to_the_validation_loss(tmp_path):
    """val_change: best / first - 1 of val_loss; unbiased_*: val/unbiased_loss at the first and at the best
    val_loss (not at its own minimum); runs without the column get NaN."""
    r = tmp_path / "runs"
    d, _ = _run(r, "0905", "2026-07-03_10-00-00", avg=0.12, decoder=False)
    rows = [
        {"step": 0, "val_loss": 1.50, "val/unbiased_loss": 0.060, "val/unbiased_mean_loss": 0.004},
        {"step": 0, "train/loss": 2.0},
        {"step": 20, "val_loss": 1.47, "val/unbiased_loss": 0.030, "val/unbiased_mean_loss": 0.003},
        {"step": 30, "train/loss": 1.0},
        # the minima of the unbiased columns, not the best val_loss
        {"step": 40, "val_loss": 1.48, "val/unbiased_loss": 0.020, "val/unbiased_mean_loss": 0.001},
    ]
    pd.DataFrame(rows).to_csv(d / "0905_metrics.csv", index=False)
    _run(r, "0906", "2026-07-04_10-00-00", avg=0.10, decoder=False)  # the fixture's curve: no unbiased column
    df = collect(r).set_index("experiment")
    got = df.loc["0905"]
    assert got["val_first"] == pytest.approx(1.50)
    assert got["val_change"] == pytest.approx(1.47 / 1.50 - 1)
    assert got["unbiased_first"] == pytest.approx(0.060) and got["unbiased_best"] == pytest.approx(0.030)
    assert got["unbiased_change"] == pytest.approx(-0.030)  # absolute: best - first
    assert got["val_best"] == pytest.approx(1.47) and got["unbiased_mean_best"] == pytest.approx(0.003)
    assert got["unbiased_mean_change"] == pytest.approx(-0.001)
    other = df.loc["0906"]
    assert other["val_first"] == pytest.approx(1.8) and other["val_change"] == pytest.approx(
        1.8 / 41 / 1.8 - 1
    )
    assert math.isnan(other["unbiased_first"]) and math.isnan(other["unbiased_change"])


# -- baselines are keyed by the split they were scored on (issue #31) ----------------------------------------

PANEL = {  # the same panel numbers on two splits: only the split tells them apart
    "cell_mean": {
        "avg_score": 0.0,
        "leaderboard_score": 0.0,
        "metrics": {"mae": 0.22, "discrimination_score_l1": 0.7, "overlap_at_N": 0.03},
        "normalized": {"mae": 0.0, "discrimination_score_l1": 0.0, "overlap_at_N": 0.0},
    },
    "target_knockdown": {
        "avg_score": 0.05,
        "leaderboard_score": 5.0,
        "metrics": {"mae": 0.21, "discrimination_score_l1": 0.72, "overlap_at_N": 0.04},
        "normalized": {"mae": 0.01, "discrimination_score_l1": 0.1, "overlap_at_N": 0.04},
    },
}


def _scored_run(runs, experiment, run_id, *, avg, test, val, data="/data/screen.h5ad", ckpt_from=None):
    """A round trained, predicted and scored as the run-directory contract says: manifest.json with its
    held-out groups, predict.json naming the checkpoint it used and the split it predicted, score.json with
    the baseline panel."""
    d, _ = _run(runs, experiment, run_id, avg=avg)
    held = [
        {"dataset": "screen", "cell_type": ct, "pert": p, "split": part}
        for part, perts in (("val", val), ("test", test))
        for p in perts
        for ct in ("K562", "RPE1")
    ]
    manifest = {
        "data_paths": [data],
        "datasets": ["screen"],
        "splits": {"val": val, "test": test},
        "held_out": held,
    }
    (d / "manifest.json").write_text(json.dumps(manifest))
    ckpt = (ckpt_from or d) / "checkpoints" / "best-val.pt"
    record = {"checkpoint": str(ckpt), "split": "test", "data_paths": [data], "n_groups": 2 * len(test)}
    (d / "predict.json").write_text(json.dumps(record))
    score = json.loads((d / "eval" / "score.json").read_text())
    score["baselines"] = PANEL
    (d / "eval" / "score.json").write_text(json.dumps(score))
    return d


def _split_of(runs, run_id):
    df = collect(runs)
    return df[(df["kind"] == "round") & (df["run"] == run_id)]["split"].item()


def test_baselines_of_different_splits_are_never_pooled(tmp_path, capsys):
    """Two splits whose panels score the same: today one bare "(baseline)" row stands for both. Every row
    names its split; each split keeps its own panel rows (once, however many of its rounds were scored)."""
    r = tmp_path / "runs"
    a1 = _scored_run(r, "0905", "20260701-100000", avg=0.30, test=["HK2", "IER5L"], val=["KMT2A"])
    _scored_run(r, "0906", "20260701-110000", avg=0.35, test=["HK2", "IER5L"], val=["KMT2A"])
    b = _scored_run(r, "0905", "20260702-100000", avg=0.20, test=["HK2", "KMT2A"], val=["IER5L"])
    df = collect(r)
    rounds = df[df["kind"] == "round"].set_index("run")
    split_a, split_b = rounds.loc["20260701-100000", "split"], rounds.loc["20260702-100000", "split"]
    assert split_a.startswith("test@") and split_b.startswith("test@") and split_a != split_b
    assert rounds.loc["20260701-110000", "split"] == split_a  # the same split, the same label
    base = df[df["kind"] == "baseline"]
    assert sorted(zip(base["experiment"], base["split"], strict=True)) == sorted(
        (name, s) for name in PANEL for s in (split_a, split_b)
    )
    assert df.attrs["splits"][split_b].startswith("test perts HK2, KMT2A in 2 cell type(s) of screen.h5ad")
    # only the split decides: another data file with the same held-out groups is another split
    c = _scored_run(
        r, "0905", "20260703-100000", avg=0.1, test=["HK2", "IER5L"], val=["KMT2A"], data="/x/o.h5ad"
    )
    assert _split_of(r, c.name) not in (split_a, split_b)
    # a prediction made with another run's checkpoint was scored on that checkpoint's split
    (c / "predict.json").write_text(
        json.dumps({"checkpoint": str(b / "checkpoints" / "best-val.pt"), "split": "test", "data_paths": []})
    )
    (b / "manifest.json").rename(b / "manifest.moved")  # not found beside the checkpoint: the run's own
    assert _split_of(r, c.name) != split_b
    (b / "manifest.moved").rename(b / "manifest.json")
    assert _split_of(r, c.name) == split_b

    compare(r, tmp_path / "out")
    printed = capsys.readouterr().out
    csv_path = str(tmp_path / "out" / "compare.csv")
    lines = [ln for ln in printed.splitlines() if ln.strip() != csv_path]  # a path is as long as it is
    assert max(len(ln) for ln in lines) <= 100, max(lines, key=len)
    assert split_a in printed and split_b in printed and str(tmp_path / "out" / "compare.csv") in printed
    assert "2 splits" in printed
    csv = pd.read_csv(tmp_path / "out" / "compare.csv", dtype={"run": str, "experiment": str})
    assert list(csv.columns) == COLUMNS and set(csv["split"]) == set(df["split"]) | {
        collect(r)["split"].iloc[0]
    }
    assert a1.name in set(csv["run"])


def test_a_run_without_a_recorded_split_keeps_its_own_baselines(tmp_path):
    """Scored files from elsewhere (no predict.json): the split is unknown ("-"), so their baselines are not
    pooled with anyone's, not even each other's."""
    r = tmp_path / "runs"
    for run_id in ("20260701-100000", "20260702-100000"):
        d, _ = _run(r, "0905", run_id, avg=0.3)
        score = json.loads((d / "eval" / "score.json").read_text())
        (d / "eval" / "score.json").write_text(json.dumps({**score, "baselines": PANEL}))
    df = collect(r)
    assert set(df["split"]) == {"-"}
    assert (df["kind"] == "baseline").sum() == 2 * len(PANEL)


def test_compare_on_a_file_says_it_is_a_file(tmp_path):
    path = tmp_path / "runs.csv"
    path.write_text("not a folder\n")
    with pytest.raises(UserError, match=r"runs_dir '.*runs.csv' is a file, not a folder; .*runs_dir=<"):
        compare(path)
    with pytest.raises(UserError, match="is a file"):
        collect(path)
