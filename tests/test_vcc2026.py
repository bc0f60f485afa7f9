"""The VCC 2026 scorer beside cell-eval (issue #33): cell-eval2's vcc2026 preset on integer counts, the files it
keeps (evaluation_results.json, replayed with --settings-from), the one-line refusals, the generator null and the
amplitude audit, and `tahoe-ft eval vcc2026=true`. Real data: six Papalexi perturbations (THP-1 CRISPR-KO, raw
UMI counts), each perturbation's and the controls' cells split in halves: real is one half, the "prediction" the
other (an honest prediction, a replicate). The real scorer runs (pdex DE); skipped only without cell-eval2.
"""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import polars as pl
import pytest
import scipy.sparse as sp

from tahoe_ft.data.labels import ScreenLabels
from tahoe_ft.datasets.embedded import PAPALEXI_CONTROL, papalexi_path
from tahoe_ft.errors import UserError
from tahoe_ft.evaluation import vcc2026 as v26
from tahoe_ft.evaluation.counts import renormalise

pytestmark = pytest.mark.skipif(
    v26.version() is None,
    reason="cell-eval2 (the vcc2026 extra) is not installed: pip install -e '.[vcc2026]'",
)

PC = "target_gene"
PERTS = ["IFNGR1", "IFNGR2", "IRF1", "JAK2", "STAT1", "CD86"]
LABELS = {"labels": ScreenLabels(PC, PAPALEXI_CONTROL, None)}


def _log1p(raw: ad.AnnData, rows: np.ndarray) -> ad.AnnData:
    """Cells of Papalexi as tahoe-ft reads them (normalised to 1e4, log1p), raw counts in layers['counts']."""
    counts = sp.csr_matrix(raw.X[rows], dtype=np.float32)
    obs = pd.DataFrame({PC: pd.Categorical(raw.obs[PC].astype(str).to_numpy()[rows])})
    obs.index = raw.obs_names[rows].astype(str)
    a = ad.AnnData(X=sp.csr_matrix(renormalise(counts, np.asarray(counts.sum(1)).ravel()).astype(np.float32)))
    a.obs, a.var = obs, pd.DataFrame(index=raw.var_names.astype(str))
    a.layers["counts"] = counts
    return a


@pytest.fixture(scope="module")
def halves() -> dict[str, ad.AnnData]:
    """real: half of each perturbation's (and the controls') cells; pred: the other half; train: the other
    Papalexi perturbations (at most 80 cells each) with real's control cells."""
    raw = ad.read_h5ad(papalexi_path())
    rng = np.random.default_rng(0)
    labels = raw.obs[PC].astype(str).to_numpy()
    real_rows, pred_rows, train_rows = [], [], []
    for p in PERTS + [PAPALEXI_CONTROL]:
        idx = rng.permutation(np.flatnonzero(labels == p))
        real_rows += list(idx[: idx.size // 2])
        pred_rows += list(idx[idx.size // 2 : 2 * (idx.size // 2)])
    train_rows += [r for r in real_rows if labels[r] == PAPALEXI_CONTROL]
    for p in sorted(set(labels) - set(PERTS) - {PAPALEXI_CONTROL}):
        train_rows += list(rng.permutation(np.flatnonzero(labels == p))[:80])
    real, pred, train = (_log1p(raw, np.array(r)) for r in (real_rows, pred_rows, train_rows))
    return {"real": real, "pred": pred, "train": train}


def _counts(a: ad.AnnData) -> ad.AnnData:
    return ad.AnnData(X=a.layers["counts"].copy(), obs=a.obs.copy(), var=a.var.copy())


@pytest.fixture(scope="module")
def scorer(halves, tmp_path_factory) -> v26.Vcc2026:
    return v26.Vcc2026(
        _counts(halves["real"]), tmp_path_factory.mktemp("v26") / "vcc2026", splits=2, **LABELS
    )


def test_scores_integer_counts_and_keeps_a_replayable_evaluation_results(scorer, halves, tmp_path):
    from cell_eval2.cli import main

    s = scorer.score(_counts(halves["pred"]), "round")
    assert set(s["scores"]) == set(v26.MEMBERS) and all(np.isfinite(list(s["scores"].values())))
    # the six members' mean is the score, as cell-eval2's score.csv reports it (from_replicate)
    assert s["avg_score"] == pytest.approx(np.mean(list(s["scores"].values())))
    out = scorer.outdir / "round" / "all"
    table = pl.read_csv(out / "score.csv")
    assert table.filter(pl.col("metric") == "avg_score")["from_replicate"][0] == pytest.approx(s["avg_score"])
    # a replicate of the measurement scores near the replicate anchor (1), far above the mean baseline (0)
    assert s["avg_score"] > 0.5
    doc = json.loads((out / "evaluation_results.json").read_text())
    settings = doc["suite"]["settings"]
    assert doc["suite"]["version"] == v26.PINNED
    assert (settings["input_type_real"], settings["input_type_pred"]) == ("counts", "counts")
    assert settings["control_source"] == "real" and settings["max_counts_per_cell"] == 1e6
    assert s["evaluation_results"] == "vcc2026/round/all/evaluation_results.json"
    # the DE calls: a replicate calls about as many genes as real does
    assert (
        s["de_calls"]["real"]["total"] > 50
        and s["de_calls"]["pred"]["total"] > 0.5 * s["de_calls"]["real"]["total"]
    )
    # replay: the document's settings, the same two files, the same aggregate (to float summation order: the
    # thread count is not part of the document)
    ref = scorer.outdir / "reference" / "all" / "real.h5ad"
    main(
        ["run", "--settings-from", str(out / "evaluation_results.json"), "--set", "num_threads=1"]
        + ["-ap", str(out / "pred_counts.h5ad"), "-ar", str(ref), "-o", str(tmp_path / "replay")]
    )
    again, first = (pl.read_csv(d / "agg_results.csv") for d in (tmp_path / "replay", out))
    assert again.columns == first.columns and again["statistic"].to_list() == first["statistic"].to_list()
    for col in first.columns[1:]:
        np.testing.assert_allclose(again[col].to_numpy(), first[col].to_numpy(), rtol=1e-9, equal_nan=True)


def test_fractional_or_negative_counts_are_refused_in_one_line(scorer, halves):
    frac = _counts(halves["pred"])
    frac.X = frac.X * 1.5
    with pytest.raises(UserError, match="fractional values") as exc:
        scorer.score(frac, "fractional")
    assert "\n" not in str(exc.value)
    neg = _counts(halves["pred"])
    neg.X.data[0] = -1
    with pytest.raises(UserError, match="negative") as exc:
        scorer.score(neg, "negative")
    assert "\n" not in str(exc.value)
    assert not (scorer.outdir / "fractional").exists()  # refused before cell-eval2 ran


def test_null_and_amplitude_audit_through_the_generator(halves, tmp_path):
    """The round emitted by the count generator (library sizes drawn from real's controls), the null (real's
    controls as every perturbation) and the audit (x0.5, x1, x2); a damped prediction (its effect x0.3) raises
    its score when doubled: the flag fires."""
    real, pred = halves["real"], halves["pred"]
    pred = ad.AnnData(X=pred.X.copy(), obs=pred.obs.copy(), var=pred.var.copy())  # log1p only: emitted
    block = v26.evaluate(pred, real, tmp_path / "vcc2026", panel={}, splits=2, **LABELS)
    rnd, null, audit = block["round"], block["null"], block["amplitude_audit"]
    assert block["real_counts"] == "real's layers['counts']"
    assert block["generator"]["seed"] == 0 and block["generator"]["input_transform"] == "log1p"
    # the null: no effect, so (nearly) no DE calls, and a score far below the round's
    assert null["de_calls"]["pred"]["per_pert"] < 0.1 * rnd["de_calls"]["real"]["per_pert"]
    assert null["avg_score"] < 0 < rnd["avg_score"]
    assert set(audit["scales"]) == {"0.5", "1", "2"}
    assert audit["scales"]["1"]["avg_score"] == rnd["avg_score"]
    assert audit["scales"]["0.5"]["achieved"] == pytest.approx(0.5, abs=1e-3)
    assert 1.0 < audit["scales"]["2"]["achieved"] <= 2.0
    assert all(np.isfinite(b["avg_score"]) for b in audit["scales"].values())
    assert isinstance(audit["flag"], bool) and audit["gain_x2_over_x1"] == pytest.approx(
        audit["scales"]["2"]["avg_score"] - audit["scales"]["1"]["avg_score"]
    )
    # a replicate's own effect doubled overshoots: not flagged
    assert audit["flag"] is False
    damped = v26.scaled_prediction(pred, 0.3, **LABELS)
    block = v26.evaluate(damped, real, tmp_path / "damped", panel={}, splits=2, **LABELS)
    audit = block["amplitude_audit"]
    assert audit["flag"] is True and audit["gain_x2_over_x1"] > 0 and audit["members_rising"]


def test_scaled_prediction_scales_each_effect(halves):
    """Each group's mean moves to the control mean plus k x its effect, gene by gene, with log1p's floor at 0
    kept: exact for x0.5 and for raised genes at x2; a lowered gene at x2 stops at 0 (`achieved` says so)."""
    pred = halves["pred"]
    eff = v26.effects(pred, **LABELS)
    twice_pred = v26.scaled_prediction(pred, 2.0, **LABELS)
    twice, half = (
        v26.effects(twice_pred, **LABELS),
        v26.effects(v26.scaled_prediction(pred, 0.5, **LABELS), **LABELS),
    )
    assert np.asarray(twice_pred.X).min() >= 0
    for key, d in eff.items():
        up = d > 0
        np.testing.assert_allclose(half[key], 0.5 * d, atol=1e-4)
        np.testing.assert_allclose(twice[key][up], 2 * d[up], atol=1e-4)
        assert np.all(np.abs(twice[key][~up]) <= 2 * np.abs(d[~up]) + 1e-4)
        assert np.all(np.abs(twice[key][~up]) >= np.abs(d[~up]) - 1e-4)
    assert 1.0 < v26.achieved(pred, twice_pred, **LABELS) <= 2.0


def test_eval_vcc2026_true_puts_both_scorers_in_score_json_and_the_table(halves, tmp_path, capsys):
    from tahoe_ft.cli import main

    paths = {}
    for name in ("real", "train"):
        paths[name] = tmp_path / f"{name}.h5ad"
        halves[name].write_h5ad(paths[name])
    pred = halves["pred"]
    (tmp_path / "outside").mkdir()
    paths["pred"] = tmp_path / "outside" / "pred.h5ad"
    ad.AnnData(X=pred.X.copy(), obs=pred.obs.copy(), var=pred.var.copy()).write_h5ad(paths["pred"])
    args = [f"{k}={p}" for k, p in paths.items()]
    args += [f"control_pert={PAPALEXI_CONTROL}", f"runs_dir={tmp_path / 'runs'}", "num_threads=1"]
    main(["eval", *args, "vcc2026=true", "vcc2026_splits=2", "max_train_cells_per_group=80"])
    out = capsys.readouterr().out
    score = json.loads((tmp_path / "outside" / "eval" / "score.json").read_text())
    v = score["vcc2026"]
    assert v["scorer"] == "cell-eval2" and v["version"] == v26.PINNED and v["preset"] == "vcc2026"
    assert np.isfinite(v["round"]["avg_score"]) and np.isfinite(score["avg_score"])
    eval_dir = tmp_path / "outside" / "eval"
    assert (eval_dir / v["round"]["evaluation_results"]).is_file()
    # every baseline of the panel and the ceiling scored by both
    assert set(v["baselines"]) == set(score["baselines"])
    for name, entry in score["baselines"].items():
        assert np.isfinite(entry["vcc2026"]["avg_score"]), name
    assert score["baselines"]["ceiling"]["vcc2026"]["avg_score"] == 1.0
    null, audit = score["diagnostics"]["vcc2026_null"], score["diagnostics"]["amplitude_audit"]
    assert np.isfinite(null["avg_score"]) and null["de_calls"]["pred"]["total"] >= 0
    assert set(audit["scales"]) == {"0.5", "1", "2"} and isinstance(audit["flag"], bool)
    header = next(line for line in out.splitlines() if "avg_score" in line).split()
    assert header[:2] == ["avg_score", "vcc2026"]
    assert "generator null" in out and "amplitude audit" in out


def test_eval_vcc2026_without_the_scorer_is_one_line_exit_2(halves, tmp_path, capsys, monkeypatch):
    from tahoe_ft.cli import main

    monkeypatch.setattr(
        v26, "DIST", "cell-eval2-absent"
    )  # the installed-package lookup misses, as uninstalled
    for name in ("real", "pred", "train"):
        halves[name].write_h5ad(tmp_path / f"{name}.h5ad")
    args = [f"{k}={tmp_path / k}.h5ad" for k in ("pred", "real", "train")] + [
        f"control_pert={PAPALEXI_CONTROL}"
    ]
    with pytest.raises(SystemExit) as exc:
        main(["eval", *args, f"runs_dir={tmp_path / 'runs'}", "vcc2026=true"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cell-eval2" in err[0] and "tahoe-ft[vcc2026]" in err[0]
    assert not (tmp_path / "eval").exists()
