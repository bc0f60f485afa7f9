"""tahoe_ft.evaluation against the real cell-eval on a tiny synthetic screen (no mocks of cell-eval; spies only)."""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import tarfile

import anndata as ad
import cell_eval
import cell_eval._evaluator as ce_evaluator
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from tahoe_ft.data.labels import ScreenLabels
from tahoe_ft.errors import UserError
from tahoe_ft.evaluation import Score, prep_submission, score_predictions

CTRL = "non-targeting"
PC = "target_gene"
N_GENES, N_PERTS, N_CELLS = 100, 6, 30
VCC = ["mae", "discrimination_score_l1", "overlap_at_N"]


def _screen(seed: int = 0) -> tuple[ad.AnnData, ad.AnnData, ad.AnnData]:
    """real / pred / train: log1p of NB counts; perts named after genes; pred = effects x 0.7 + noise."""
    rng = np.random.default_rng(seed)
    genes = [f"GENE{i:03d}" for i in range(N_GENES)]
    base = rng.lognormal(0, 1, N_GENES)
    base = base / base.sum() * 2000

    def effect(j: int | None) -> np.ndarray:
        e = np.zeros(N_GENES)
        if j is not None:
            e[j] = -2.5  # knock-down of the target gene
        idx = rng.choice(N_GENES, 15, replace=False)
        e[idx] += rng.normal(0, 1.2, 15)
        return e

    def cells(e: np.ndarray, n: int) -> np.ndarray:
        mu = base * 2**e * rng.lognormal(0, 0.3, n)[:, None]
        c = rng.negative_binomial(5, 5 / (5 + mu))
        return np.log1p(c / np.maximum(c.sum(1, keepdims=True), 1) * 1e4).astype(np.float32)

    def build(effects: dict[str, np.ndarray], ctrl: np.ndarray, tag: str) -> ad.AnnData:
        X = np.vstack([ctrl] + [cells(e, N_CELLS) for e in effects.values()])
        labels = [CTRL] * len(ctrl) + [p for p in effects for _ in range(N_CELLS)]
        obs = pd.DataFrame({PC: pd.Categorical(labels)}, index=[f"{tag}{i}" for i in range(len(labels))])
        return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=genes))

    eff = {genes[j]: effect(j) for j in range(N_PERTS)}
    real = build(eff, cells(np.zeros(N_GENES), N_CELLS), "r")
    real.X = sp.csr_matrix(real.X)
    pred_eff = {p: e * 0.7 + rng.normal(0, 0.2, N_GENES) for p, e in eff.items()}
    pred = build(pred_eff, real.X[:N_CELLS].toarray(), "p")  # the real control cells copied in
    train = build({f"TRAIN{i}": effect(None) * 0.5 for i in range(8)}, cells(np.zeros(N_GENES), 60), "t")
    return real, pred, train


def _snapshot(a: ad.AnnData) -> dict:
    X = a.X.toarray() if sp.issparse(a.X) else np.array(a.X)
    return {
        "X": X.copy(),
        "dtype": a.X.dtype,
        "sparse": sp.issparse(a.X),
        "obs": a.obs.copy(),
        "cats": list(a.obs[PC].cat.categories),
        "var": list(a.var_names),
    }


def _same(a: ad.AnnData, snap: dict) -> None:
    X = a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X)
    assert a.X.dtype == snap["dtype"] and sp.issparse(a.X) == snap["sparse"]
    np.testing.assert_array_equal(X, snap["X"])
    pd.testing.assert_frame_equal(a.obs, snap["obs"])
    assert list(a.obs[PC].cat.categories) == snap["cats"]
    assert list(a.var_names) == snap["var"]


class _Spy:
    """Counts pdex runs (by which AnnData) and records the de_real each MetricsEvaluator got."""

    def __init__(self, mp: pytest.MonkeyPatch):
        self.pdex_on: list[str] = []
        self.de_real: list[object] = []
        real_pdex = ce_evaluator.pdex
        real_cls = cell_eval.MetricsEvaluator
        spy = self

        def pdex(adata, *args, **kwargs):
            spy.pdex_on.append(str(adata.obs_names[-1])[0])  # r(eal), p(red), t(rain controls: baseline)
            return real_pdex(adata, *args, **kwargs)

        class Evaluator(real_cls):
            def __init__(self, *args, **kwargs):
                spy.de_real.append(kwargs.get("de_real"))
                super().__init__(*args, **kwargs)

        mp.setattr(ce_evaluator, "pdex", pdex)
        mp.setattr(cell_eval, "MetricsEvaluator", Evaluator)


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    d = tmp_path_factory.mktemp("screen")
    real, pred, train = _screen()
    real.write_h5ad(d / "real.h5ad")
    pred.write_h5ad(d / "pred.h5ad")
    return {"dir": d, "real": real, "pred": pred, "train": train}


@pytest.fixture(scope="module")
def first(screen):
    """Files in, fresh cache: real DE, pred DE and the baseline are all computed."""
    d = screen["dir"]
    with pytest.MonkeyPatch.context() as mp:
        spy = _Spy(mp)
        score = score_predictions(
            d / "pred.h5ad",
            d / "real.h5ad",
            screen["train"],
            d / "out1",
            de_cache_dir=d / "cache",
            num_threads=2,
        )
    return score, spy


@pytest.fixture(scope="module")
def second(screen, first):
    """Same real file again (pred in memory with an unused category, no train): nothing real is recomputed."""
    d = screen["dir"]
    pred = screen["pred"].copy()
    pred.obs[PC] = pred.obs[PC].cat.add_categories(["UNUSED_PERT"])
    with pytest.MonkeyPatch.context() as mp:
        spy = _Spy(mp)
        score = score_predictions(pred, str(d / "real.h5ad"), None, d / "out2", de_cache_dir=d / "cache")
    return score, spy


def test_score_json_keys_and_types(screen, first):
    score, _ = first
    on_disk = json.loads((screen["dir"] / "out1" / "score.json").read_text())
    assert on_disk == json.loads(score.to_json())
    for key, typ in [
        ("avg_score", float),
        ("leaderboard_score", float),
        ("metrics", dict),
        ("baseline", dict),
        ("normalized", dict),
        ("profile", str),
        ("n_perts", int),
        ("versions", dict),
    ]:
        assert isinstance(on_disk[key], typ), key
    assert 0.0 <= on_disk["avg_score"] <= 1.0
    assert on_disk["profile"] == "vcc" and on_disk["n_perts"] == N_PERTS
    for block in ("metrics", "baseline", "normalized"):
        assert set(on_disk[block]) == set(VCC), block
        assert all(isinstance(v, float) for v in on_disk[block].values())
    assert on_disk["leaderboard_score"] == 100 * on_disk["avg_score"]
    assert on_disk["versions"]["cell-eval"] == cell_eval_version()
    assert on_disk["versions"]["pdex"] and on_disk["versions"]["tahoe-ft"]
    out = screen["dir"] / "out1"
    for f in [
        "results.csv",
        "agg_results.csv",
        "real_de.csv",
        "pred_de.csv",
        "baseline/agg_results.csv",
        "baseline/results.csv",
        "baseline/pred_de.csv",
    ]:
        assert (out / f).is_file(), f
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))


def test_score_from_json_round_trips(screen, first, second):
    """Score.from_json reads score.json back exactly: to_json() gives the file's text again."""
    for out, returned in (("out1", first[0]), ("out2", second[0])):
        path = screen["dir"] / out / "score.json"
        loaded = Score.from_json(path)
        assert loaded.to_json() == path.read_text() == returned.to_json(), out
        assert json.loads(loaded.to_json()) == json.loads(path.read_text())
        assert loaded.leaderboard_score == 100 * loaded.avg_score
        assert returned.leaderboard_score == 100 * returned.avg_score
        assert json.loads(path.read_text())["leaderboard_score"] == loaded.leaderboard_score


def cell_eval_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("cell-eval")


def test_avg_score_by_hand_from_cell_eval_tables(screen, first):
    score, _ = first
    out = screen["dir"] / "out1"

    def means(path):
        agg = pd.read_csv(path).set_index("statistic")
        return agg.loc["mean"].astype(float).to_dict()

    u, b = means(out / "agg_results.csv"), means(out / "baseline" / "agg_results.csv")
    assert set(u) == set(VCC)
    norm = {}
    for m in VCC:
        v = 1 - u[m] / b[m] if m == "mae" else (u[m] - b[m]) / (1 - b[m])
        norm[m] = max(0.0, 0.0 if math.isnan(v) else v)
    avg = float(np.mean(list(norm.values())))
    assert score.avg_score == pytest.approx(avg, abs=1e-9)
    assert score.leaderboard_score == pytest.approx(100 * avg, abs=1e-7)
    for m in VCC:
        assert score.normalized[m] == pytest.approx(norm[m], abs=1e-9)
        assert score.metrics[m] == pytest.approx(u[m], abs=1e-12)
        assert score.baseline[m] == pytest.approx(b[m], abs=1e-12)
    # a usable prediction: PDS above the cell-mean baseline, DE overlap well above it
    assert score.normalized["discrimination_score_l1"] > 0.5 and score.normalized["overlap_at_N"] > 0.3


def test_first_evaluation_computes_real_de_once_and_caches_it(screen, first):
    _, spy = first
    assert sorted(spy.pdex_on) == ["p", "r", "t"]  # pred, real, baseline (train controls + mean cells)
    cached = screen["dir"] / "cache" / "real_de"
    assert len(list(cached.glob("*.csv"))) == 1
    assert spy.de_real == [None, str(next(cached.glob("*.csv")))]  # the baseline already reused it


def test_second_evaluation_reuses_real_de_and_baseline(screen, first, second):
    s1, _ = first
    s2, spy = second
    assert spy.pdex_on == ["p"]  # only the new prediction's DE
    assert spy.de_real == [str(next((screen["dir"] / "cache" / "real_de").glob("*.csv")))]
    for key in ("avg_score", "leaderboard_score", "metrics", "baseline", "normalized", "n_perts"):
        assert getattr(s2, key) == getattr(s1, key), key
    assert s2.baseline_source.startswith("cache:")
    out2 = screen["dir"] / "out2"
    assert (out2 / "real_de.csv").is_file() and (out2 / "baseline" / "agg_results.csv").is_file()


def test_reevaluating_into_same_outdir_keeps_cache_intact(screen, first, second):
    """out2/real_de.csv is a hard link into the cache; a new real evaluated there must not write through it."""
    d = screen["dir"]
    cached = next((d / "cache" / "real_de").glob("*.csv"))
    before = cached.read_bytes()
    real = screen["real"].copy()
    real.X = real.X.multiply(1.01).tocsr()  # other data: its real DE is computed into out2/real_de.csv
    score_predictions(screen["pred"], real, screen["train"], d / "out2", de_cache_dir=d / "cache")
    assert cached.read_bytes() == before
    assert len(list((d / "cache" / "real_de").glob("*.csv"))) == 2


def test_inputs_not_mutated_and_negatives_clipped(tmp_path, screen, first):
    real, pred, train = screen["real"].copy(), screen["pred"].copy(), screen["train"].copy()
    pred.X = pred.X.astype(np.float64)
    pred.X[N_CELLS : N_CELLS + 5, :3] = -0.25  # raw model output below zero
    real.obs[PC] = real.obs[PC].cat.add_categories(["UNUSED_PERT"])  # unused category on the real side
    snaps = {n: _snapshot(a) for n, a in (("real", real), ("pred", pred), ("train", train))}
    score = score_predictions(pred, real, train, tmp_path / "eval")
    assert 0.0 <= score.avg_score <= 1.0 and score.n_perts == N_PERTS
    assert (tmp_path / ".de_cache" / "real_de").is_dir()  # the default cache dir: outdir.parent/.de_cache
    for n, a in (("real", real), ("pred", pred), ("train", train)):
        _same(a, snaps[n])


def test_celltype_col_scores_each_cell_type(tmp_path, screen, first):
    def two(a: ad.AnnData) -> ad.AnnData:
        parts = []
        for ct in ("A", "B"):
            b = a.copy()
            b.obs["cell_type"] = ct
            b.obs_names = [f"{n}-{ct}" for n in b.obs_names]
            parts.append(b)
        return ad.concat(parts)

    real, pred, train = (two(screen[k]) for k in ("real", "pred", "train"))
    score = score_predictions(
        pred, real, train, tmp_path / "eval", labels=ScreenLabels(cell_type_col="cell_type")
    )
    assert set(score.per_celltype) == {"A", "B"}
    assert score.avg_score == pytest.approx(np.mean([v.avg_score for v in score.per_celltype.values()]))
    assert (tmp_path / "eval" / "A_agg_results.csv").is_file()
    assert (tmp_path / "eval" / "baseline" / "B_agg_results.csv").is_file()
    path = tmp_path / "eval" / "score.json"
    assert Score.from_json(path).to_json() == path.read_text() == score.to_json()
    assert Score.from_json(path).per_celltype["A"].avg_score == score.per_celltype["A"].avg_score


# ---- bad input: one clear UserError, before anything is written


def _bad(tmp_path, pred, real, train=None, match="", **kw):
    out = tmp_path / "out"
    with pytest.raises(UserError, match=match) as e:
        score_predictions(pred, real, train, out, de_cache_dir=tmp_path / "cache", **kw)
    assert "\n" not in str(e.value)
    assert not out.exists()
    return str(e.value)


def test_var_order_mismatch(tmp_path, screen):
    pred = screen["pred"][:, screen["pred"].var_names[::-1]].copy()
    msg = _bad(tmp_path, pred, screen["real"], match="gene names of pred")
    assert "different order" in msg and "GENE099" in msg


def test_gene_set_mismatch(tmp_path, screen):
    pred = screen["pred"].copy()
    pred.var_names = [*pred.var_names[:-1], "OTHER"]
    msg = _bad(tmp_path, pred, screen["real"], match="gene names of pred")
    assert "GENE099" in msg and "OTHER" in msg


def test_missing_control_in_pred(tmp_path, screen):
    pred = screen["pred"]
    pred = pred[pred.obs[PC] != CTRL].copy()
    _bad(tmp_path, pred, screen["real"], match="control 'non-targeting' not found .* pred")


def test_pert_set_mismatch(tmp_path, screen):
    pred = screen["pred"]
    pred = pred[pred.obs[PC] != "GENE000"].copy()
    _bad(tmp_path, pred, screen["real"], match="perturbations differ.*GENE000")


def test_integer_x_refused(tmp_path, screen):
    pred = screen["pred"].copy()
    pred.X = np.round(np.expm1(pred.X))  # counts
    _bad(tmp_path, pred, screen["real"], match="integer-valued")


def test_counts_above_log1p_range_refused(tmp_path, screen):
    real = screen["real"].copy()
    real.X = real.X.expm1()  # normalised but not logged: fractional values far above 15
    _bad(tmp_path, screen["pred"], real, match="log1p range")


def test_nan_refused_naming_the_file(tmp_path, screen):
    pred = screen["pred"].copy()
    pred.X[3, 7] = np.nan
    path = tmp_path / "bad_pred.h5ad"
    pred.write_h5ad(path)
    msg = _bad(tmp_path, path, screen["real"], match="NaN")
    assert str(path) in msg


def test_negative_real_refused(tmp_path, screen):
    real = screen["real"].copy()
    real.X = real.X.toarray() - 0.5
    _bad(tmp_path, screen["pred"], real, match="negative")


def test_missing_file_and_bad_profile(tmp_path, screen):
    _bad(tmp_path, tmp_path / "nope.h5ad", screen["real"], match="pred file not found")
    (tmp_path / "junk.h5ad").write_text("not an h5ad")
    _bad(tmp_path, tmp_path / "junk.h5ad", screen["real"], match="not a readable AnnData")
    _bad(
        tmp_path,
        screen["pred"],
        screen["real"],
        screen["train"],
        match="unknown cell-eval profile",
        profile="bogus",
    )
    _bad(
        tmp_path,
        screen["pred"],
        screen["real"],
        match="column 'perturbation' not found",
        labels=ScreenLabels(pert_col="perturbation"),
    )


def test_no_train_and_no_cached_baseline(tmp_path, screen, first):
    real = screen["real"].copy()
    real.obs_names = [f"x{n}" for n in real.obs_names]  # new content: no cache entry
    pred = screen["pred"]
    with pytest.raises(UserError, match="no cached baseline"):
        score_predictions(pred, real, None, tmp_path / "out", de_cache_dir=tmp_path / "cache")


# ---- submission packing


def test_prep_submission(tmp_path, screen, monkeypatch):
    genes = tmp_path / "genes.csv"
    genes.write_text("\n".join(screen["real"].var_names[::-1]) + "\n")  # prep reorders to this list
    pred_path = screen["dir"] / "pred.h5ad"
    if shutil.which("zstd") and shutil.which("tar"):
        out = prep_submission(pred_path, genes, tmp_path / "sub" / "pred.prep.vcc")
        assert out.is_file()
        with tarfile.open(out) as tf:
            assert set(tf.getnames()) == {"pred.h5ad.zst", "watermark.txt"}
    # the error path, whatever this machine has: PATH with tar but no zstd
    bindir = tmp_path / "bin"
    bindir.mkdir()
    if shutil.which("tar"):
        (bindir / "tar").symlink_to(shutil.which("tar"))
    monkeypatch.setenv("PATH", str(bindir))
    with pytest.raises(UserError, match="install (zstd|tar)") as e:
        prep_submission(pred_path, genes, tmp_path / "sub2.vcc")
    if shutil.which("tar"):
        assert "apt-get install zstd" in str(e.value) and "brew install zstd" in str(e.value)
        assert "conda install zstd" in str(e.value)
    assert not (tmp_path / "sub2.vcc").exists()


# ---- `tahoe-ft eval` on a trained and predicted tiny run


def test_cli_eval_prints_a_short_table_and_logs_to_a_file(tmp_path, capsys, monkeypatch, request):
    """The console gets the round beside its panel and the ceiling; cell-eval's output goes to eval.log;
    the manifest is read from the checkpoint without its weights, and equals the full load's."""
    import torch

    import tahoe_ft
    from conftest_train import train
    from tahoe_ft import cli
    from tahoe_ft.checkpoints.io import safe_load
    from tahoe_ft.config import PredictConfig
    from tahoe_ft.evaluation.run import read_manifest

    monkeypatch.delenv("TAHOE_FT_VERBOSE", raising=False)
    run_dir = train(tmp_path, "0905", "init_from=null")
    runs = tmp_path / "runs"
    tahoe_ft.predict(PredictConfig(exp="0905", runs_dir=str(runs)))
    ckpt = run_dir / "checkpoints" / "best-val.pt"
    full, lazy = safe_load(ckpt)["manifest"], read_manifest(ckpt)
    assert lazy.keys() == full.keys()
    assert torch.equal(lazy["pert_matrix"], full["pert_matrix"])
    assert {k: v for k, v in lazy.items() if k != "pert_matrix"} == {
        k: v for k, v in full.items() if k != "pert_matrix"
    }
    capsys.readouterr()
    # the CLI's console handler (under pytest, root already has handlers, so the CLI's basicConfig adds none)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logging.getLogger().addHandler(console)
    request.addfinalizer(lambda: logging.getLogger().removeHandler(console))
    cli.main(["eval", f"runs_dir={runs}", "exp=0905", "num_threads=1"])
    out, err = capsys.readouterr()
    assert not [line for line in err.splitlines() if line.startswith("cell_eval")], err[-2000:]
    lines = out.strip().splitlines()
    assert len(lines) < 30, out
    on_disk = json.loads((run_dir / "eval" / "score.json").read_text())
    assert f"{on_disk['avg_score']:.4f}" in lines[1]
    assert set(on_disk["baselines"]) >= {"ceiling", "cell_mean"} and "diagnostics" in on_disk
    for name in on_disk["baselines"]:
        assert any(line.split()[0] == name for line in lines[2:]), (name, out)
    assert lines[-2 if lines[-1].startswith("log:") else -1].endswith(str(run_dir / "eval" / "score.json"))
    log_file = run_dir / "eval" / "eval.log"
    assert log_file.is_file()
    text = log_file.read_text()
    assert "cell_eval" in text and "Writing aggregate metrics" in text
    # the records name eval/, where the tables end up, never the staging folder they were written in (a path
    # that is gone), and cell-eval's "already exists, potential overwrite" about that fresh folder is dropped
    assert f"Writing aggregate metrics to {run_dir / 'eval'}/" in text, text[-3000:]
    assert ".staging-" not in text and "potential overwrite" not in text, text[-3000:]

    # verbose=true: the libraries' records reach the console too (and still the log file)
    cli.main(["eval", f"runs_dir={runs}", "exp=0905", "num_threads=1", "verbose=true"])
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("cell_eval")], err[-2000:]
    assert "cell_eval" in log_file.read_text()
