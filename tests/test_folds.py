"""Folds and seeds: every perturbation held out once, the assignment saved and reproducible, and every round
and baseline reported as mean ± sd over the (fold, seed) splits."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

import tahoe_ft
from conftest_train import TINY_DEMO, TINY_MODEL
from tahoe_ft.config import DataConfig, compose
from tahoe_ft.data.split_file import parse_split_toml
from tahoe_ft.errors import UserError
from tahoe_ft.study.folds import make_folds


def test_folds_of_a_toml_less_screen_hold_each_perturbation_out_once(tmp_path):
    cfg = compose("train", ["+experiment=0905", f"paths.data_cache={tmp_path / 'cache'}", *TINY_DEMO])
    screen = cfg.data.path
    data = compose("check", ["data=custom", f"data.path={screen}", f"paths.data_cache={tmp_path}"]).data
    folds = make_folds(data, 3, tmp_path / "folds", seed=0)
    perts = json.loads((tmp_path / "folds" / "folds.json").read_text())["perturbations"]
    assert len(perts) == 8
    tests = [p for f in folds for p in f.test]
    assert sorted(tests) == sorted(perts)  # each exactly once
    for f in folds:
        assert not set(f.val) & set(f.test) and f.val
        # the fold's TOML is a real cell-load split: training opens it and holds out exactly these
        held = tahoe_ft.check(compose("check", ["data=custom", "data.path=null", f"data.split_toml={f.toml}",
                                                f"paths.data_cache={tmp_path}", "model.cell_set_len=8"]))  # fmt: skip
        assert held["splits"]["test"]["perturbations"] == sorted(f.test)
        assert held["splits"]["val"]["perturbations"] == sorted(f.val)
    again = make_folds(data, 3, tmp_path / "again", seed=0)
    assert [f.test for f in again] == [f.test for f in folds]  # reproducible
    assert [f.test for f in make_folds(data, 3, tmp_path / "other", seed=1)] != [f.test for f in folds]


def _two_cell_types(tmp_path):
    """A screen whose cell types have different perturbations (K: P1-P6, H: P1, P2, P7, P8), in a file whose
    stem (its dataset name) holds a dot and a space."""
    from test_split_file import write_screen

    screen = write_screen(
        tmp_path / "k562.v2 screen.h5ad",
        {"K": [f"P{i}" for i in range(1, 7)], "H": ["P1", "P2", "P7", "P8"]},
    )
    own = {"K": {f"P{i}" for i in range(1, 7)}, "H": {"P1", "P2", "P7", "P8"}}
    return DataConfig(path=str(screen)), own


def _held_out(toml: str) -> dict[str, dict[str, set[str]]]:
    """{cell type: {"val": .., "test": ..}} of a fold TOML, as training reads it (CellCatalog.open)."""
    from tahoe_ft.data import CellCatalog

    cat = CellCatalog.open(DataConfig(split_toml=toml))
    out: dict[str, dict[str, set[str]]] = {}
    for split in ("val", "test"):
        for key in cat.groups(split):
            assert key.dataset == "k562.v2 screen"
            out.setdefault(key.cell_type, {"val": set(), "test": set()})[split].add(key.pert)
    return out


def test_folds_list_each_cell_types_own_perturbations(tmp_path):
    """Issue #31: the dealer wrote every perturbation into every cell type's [fewshot] table (which the reader
    refuses) under a bare dataset key; now each table lists what its cell type has, and every perturbation is
    tested exactly once, in every cell type that has it."""
    data, own = _two_cell_types(tmp_path)
    folds = make_folds(data, 3, tmp_path / "folds", seed=0)
    tested: dict[str, list[str]] = {"K": [], "H": []}
    for f in folds:
        parsed = parse_split_toml(f.toml).fewshot
        assert set(parsed) == {("k562.v2 screen", "H"), ("k562.v2 screen", "K")}
        for (_, ct), table in parsed.items():
            assert table == {s: [p for p in getattr(f, s) if p in own[ct]] for s in ("val", "test")}
        held = _held_out(f.toml)  # training opens the fold and holds out exactly these
        for ct in ("K", "H"):
            assert held.get(ct, {"val": set(), "test": set()}) == {
                s: set(getattr(f, s)) & own[ct] for s in ("val", "test")
            }
            tested[ct] += sorted(set(f.test) & own[ct])
        assert f.val and not set(f.val) & set(f.test)
    assert sorted(p for f in folds for p in f.test) == [f"P{i}" for i in range(1, 9)]  # each exactly once
    assert {ct: sorted(t) for ct, t in tested.items()} == {ct: sorted(p) for ct, p in own.items()}
    assignment = json.loads((tmp_path / "folds" / "folds.json").read_text())
    assert assignment["n_test"] == 0 and assignment["final_test"] == []


def test_nested_folds_fix_the_final_test_set_first(tmp_path):
    """n_test > 0 (the sweep): the final test set is drawn before the folds, is every fold's test, never a
    validation perturbation, and the other perturbations are each validated exactly once."""
    data, own = _two_cell_types(tmp_path)
    folds = make_folds(data, 3, tmp_path / "nested", seed=0, n_test=2)
    assignment = json.loads((tmp_path / "nested" / "folds.json").read_text())
    final = assignment["final_test"]
    assert assignment["n_test"] == 2 and len(final) == 2 and final == sorted(final)
    perts = assignment["perturbations"]
    for f in folds:
        assert f.test == final and not set(f.val) & set(final)
        held = _held_out(f.toml)
        for ct in ("K", "H"):
            assert held.get(ct, {}).get("test", set()) == set(final) & own[ct]
    vals = sorted(p for f in folds for p in f.val)
    assert vals == sorted(set(perts) - set(final))  # each non-test perturbation validated exactly once
    # fixed before the dealing: the same seed gives the same final test set whatever the number of folds
    other_k = make_folds(data, 2, tmp_path / "k2", seed=0, n_test=2)
    assert all(f.test == final for f in other_k)


def test_folds_that_leave_a_fold_nothing_to_train_or_validate_are_one_line(tmp_path):
    data, _ = _two_cell_types(tmp_path)
    with pytest.raises(UserError, match="folds=7 with n_test=2: need 2 <= folds <= the 6 perturbations"):
        make_folds(data, 7, tmp_path / "a", n_test=2)
    with pytest.raises(UserError, match="n_test=8: give 0 <= n_test < the 8 perturbations"):
        make_folds(data, 2, tmp_path / "b", n_test=8)
    with pytest.raises(UserError, match="n_val=2: with a final test set"):
        make_folds(data, 2, tmp_path / "c", n_val=2, n_test=2)
    with pytest.raises(UserError, match="folds=2 with n_val=4 leaves fold 0 no training perturbation"):
        make_folds(data, 2, tmp_path / "d", n_val=4)
    with pytest.raises(UserError, match="folds=1: need 2 <= folds"):
        make_folds(data, 1, tmp_path / "e")
    assert not (tmp_path / "a").exists() and not (tmp_path / "d").exists()  # nothing written


def _tiny_reproduce(tmp_path, *keys: str, steps: int = 4, evaluate: str = "[0905]"):
    """`tahoe-ft reproduce` of pretrain -> 0905 over 2 folds on the tiny demo, tiny model, `steps` steps."""
    runs = tmp_path / "runs"
    data = [f"paths.data_cache={tmp_path / 'cache'}", *TINY_DEMO]
    cfg = compose("reproduce", [f"runs_dir={runs}", "experiments=[pretrain,0905]", f"evaluate={evaluate}",
                                "folds=2", *keys, *data])  # fmt: skip
    cfg.train_overrides = [a for a in TINY_MODEL if not a.startswith("encoder.")] + [
        "data.batch_size=4", f"trainer.max_steps={steps}", "trainer.val_check_interval=2",
        "trainer.enable_progress_bar=false", "trainer.accelerator=cpu", "logger=csv", f"sched.warmup_steps={steps // 2}",
    ]  # fmt: skip
    tahoe_ft.reproduce(cfg)
    return runs


def test_reproduce_over_folds_and_seeds_reports_mean_and_sd(tmp_path):
    runs = _tiny_reproduce(tmp_path, "seeds=[0,1]")
    assert sorted(p.name for p in (runs / "seed-0").iterdir()) == ["fold-0", "fold-1", "pretrain"]
    per_split = pd.read_csv(runs / "compare_splits.csv")
    summary = pd.read_csv(runs / "compare.csv")
    rounds = summary[summary["kind"] == "round"]
    assert list(rounds["experiment"].astype(str).str.zfill(4)) == ["0905"]  # one row per round ...
    assert set(summary.loc[summary["kind"] == "baseline", "experiment"]) >= {
        "control",
        "cell_mean",
        "ceiling",
    }
    assert summary["experiment"].is_unique  # ... and one per baseline
    assert (summary["n"] == 4).all()  # 2 folds x 2 seeds
    for col in ("avg_score_mean", "avg_score_sd", "mae_mean", "mae_sd", "overlap_at_N_mean"):
        assert col in summary.columns
    r = per_split[per_split["kind"] == "round"]["avg_score"]
    assert rounds["avg_score_mean"].iloc[0] == pytest.approx(r.mean())
    assert rounds["avg_score_sd"].iloc[0] == pytest.approx(r.std(ddof=1))
    c = per_split[per_split["experiment"] == "control"]
    assert sorted(zip(c["seed"], c["fold"].astype(str), strict=True)) == [
        (0, "0"),
        (0, "1"),
        (1, "0"),
        (1, "1"),
    ]
    # the two folds are different splits: their held-out perturbations differ, so their panels do
    assert c[c["seed"] == 0]["avg_score"].nunique() == 2
    assert (runs / "compare.png").stat().st_size > 5_000


def test_reproduce_over_folds_that_evaluates_nothing_trains_every_fold_and_compares_nothing(tmp_path):
    """`evaluate=[]` (train the chains only, e.g. to predict on validation perturbations afterwards) ends
    cleanly: every fold's rounds trained, reproduce.json written, no comparison attempted (it used to fail on
    the folds' missing evaluations after all the training)."""
    runs = _tiny_reproduce(tmp_path, steps=2, evaluate="[]")
    for fold in ("fold-0", "fold-1"):
        assert (runs / "seed-0" / fold / "0905" / "latest" / "checkpoints" / "best-val.pt").is_file()
        assert not list((runs / "seed-0" / fold).glob("*/*/eval"))
    summary = json.loads((runs / "reproduce.json").read_text())
    assert summary["compare_csv"] is None
    assert not (runs / "compare.csv").exists()
    assert [s["stage"] for s in summary["stages"]] == [
        "seed 0: train pretrain", "seed 0 fold-0: train 0905", "seed 0 fold-1: train 0905"
    ]  # fmt: skip


def test_reproduce_over_demo_generator_seeds_pools_every_data_set(tmp_path):
    runs = _tiny_reproduce(tmp_path, "data_seeds=[0,1]", steps=2)
    for d in (0, 1):  # each generator seed is its own data set, with its own folds and base model
        assert sorted(p.name for p in (runs / f"data-{d}").iterdir()) == ["folds", "seed-0"]
        assert sorted(p.name for p in (runs / f"data-{d}" / "seed-0").iterdir()) == [
            "fold-0",
            "fold-1",
            "pretrain",
        ]
    folds = [json.loads((runs / f"data-{d}" / "folds" / "folds.json").read_text()) for d in (0, 1)]
    assert folds[0]["perturbations"] != folds[1]["perturbations"]  # other biologies, other target genes
    per_split = pd.read_csv(runs / "compare_splits.csv")
    assert list(per_split.columns[:3]) == ["data_seed", "seed", "fold"]
    c = per_split[per_split["experiment"] == "control"]
    assert sorted(zip(c["data_seed"], c["fold"], strict=True)) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    summary = pd.read_csv(runs / "compare.csv")
    assert (summary["n"] == 4).all()  # 2 data sets x 2 folds, pooled


def test_data_seeds_on_a_non_demo_data_set_is_one_line(tmp_path):
    cfg = compose("reproduce", [f"runs_dir={tmp_path}", "data=papalexi", "data_seeds=[0,1]"])
    with pytest.raises(tahoe_ft.errors.UserError, match="data_seeds=.*data=papalexi"):
        tahoe_ft.reproduce(cfg)
    assert not any(tmp_path.iterdir())


def test_reproduce_trains_every_round_on_its_typed_data_set(tmp_path):
    """`tahoe_ft.reproduce(ReproduceConfig(data=DataConfig(...)))` trains every round on that data set, with no
    Hydra strings for the data (the demo is never generated)."""
    import shutil

    import anndata as ad

    from tahoe_ft.config import DataConfig, PathsConfig, ReproduceConfig
    from tahoe_ft.datasets.demo import tiny_spec
    from tahoe_ft.datasets.embedded import ensure_demo

    screen = tmp_path / "screen.h5ad"
    shutil.copy(ensure_demo(tmp_path / "gen", tiny_spec())["screen"], screen)
    perts = sorted(set(ad.read_h5ad(screen, backed="r").obs["target_gene"]) - {"non-targeting"})
    data = DataConfig(name="custom", path=str(screen), val_perts=perts[:1], test_perts=perts[1:3])
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    steps = [
        "pretrained=null", "data.batch_size=4", "trainer.max_steps=2", "trainer.val_check_interval=2",
        "trainer.enable_progress_bar=false", "trainer.accelerator=cpu", "logger=csv", "sched.warmup_steps=1",
        *[a for a in TINY_MODEL if not a.startswith("encoder.")],
    ]  # fmt: skip
    tahoe_ft.reproduce(
        ReproduceConfig(
            runs_dir=str(runs),
            experiments=["0905"],
            evaluate=[],
            train_overrides=steps,
            data=data,
            paths=PathsConfig(data_cache=str(cache)),
        )  # fmt: skip
    )
    run_dir = (runs / "0905" / "latest").resolve()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["data_paths"] == [str(screen.resolve())]
    assert manifest["splits"]["test"] == perts[1:3]
    assert not cache.exists() or not any(cache.glob("demo-*"))


def test_a_round_that_extends_another_keeps_its_data_block_in_reproduce_and_sweep(tmp_path):
    """`compose_round` (what reproduce and the sweep train) gives an experiment file that extends another — the
    sweep's best.yaml, shipped as `defaults-best` — the data keys of the round underneath (0905's batch size),
    as `tahoe-ft train +experiment=...` does; its own keys and explicit overrides still come last."""
    from tahoe_ft.config import DataConfig, PathsConfig, compose_round, config_dir

    data = DataConfig(name="custom", path=str(tmp_path / "screen.h5ad"), batch_size=7, pert_features="onehot")
    paths = PathsConfig(data_cache=str(tmp_path / "cache"))
    trained = compose("train", ["+experiment=defaults-best", "data=papalexi"])
    assert trained.data.batch_size == 32 and trained.data.pert_features == "pca"  # what train composes
    cfg = compose_round("defaults-best", [], data=data, paths=paths)
    assert cfg.data.batch_size == 32 and cfg.data.pert_features == "pca" and cfg.data.path == data.path
    assert cfg.model.target_knockdown is True and cfg.freeze.modules == ["transformer_backbone"]
    assert compose_round("defaults-best", ["data.batch_size=5"], data=data, paths=paths).data.batch_size == 5
    # a sibling entry (`- 0905`) with _self_ first: the parent's block wins over the file's own
    target = config_dir() / "experiment" / f"zz-extends-{os.getpid()}.yaml"
    target.write_text("# @package _global_\ndefaults:\n  - _self_\n  - 0905\ndata:\n  batch_size: 3\n")
    try:
        assert compose_round(target.stem, [], data=data, paths=paths).data.batch_size == 32
        assert compose("train", [f"+experiment={target.stem}"]).data.batch_size == 32
    finally:
        target.unlink()


def test_refit_trains_each_round_again_on_train_and_val_for_the_steps_validation_chose(tmp_path):
    """`reproduce refit=true`: after each fold's chain, its rounds train again into `<fold>/refit/` with the
    validation perturbations moved into training (the test ones still held out), each for its validation-chosen
    step count and from its parent's refit, then are predicted from final.pt and scored beside a panel fitted on
    the same perturbations; compare over splits in `runs/refit/`."""
    import tomllib

    runs = _tiny_reproduce(tmp_path, "refit=true", "experiments=[pretrain,0905,0906]", evaluate="[0905,0906]")
    summary = json.loads((runs / "reproduce.json").read_text())
    assert summary["refit_compare_csv"] == str(runs / "refit" / "compare.csv")
    for fold in (0, 1):
        chain = runs / "seed-0" / f"fold-{fold}"
        refit = chain / "refit"
        fold_toml = tomllib.loads((runs / "folds" / f"fold-{fold}.toml").read_text())
        refit_toml = tomllib.loads((refit / "split.toml").read_text())
        for key, table in fold_toml["fewshot"].items():
            assert table["val"] and refit_toml["fewshot"][key] == {"val": [], "test": table["test"]}
        parents = {}
        for exp in ("0905", "0906"):
            chosen = json.loads((chain / exp / "latest" / "run.json").read_text())
            again = json.loads((refit / exp / "latest" / "run.json").read_text())
            assert again["status"] == "finished" and again["steps"] == chosen["best_step"]
            assert again["best_val_loss"] is None  # no validation perturbations left
            assert (refit / exp / "latest" / "checkpoints" / "final.pt").is_file()
            parents[exp] = (chosen["parent"], again["parent"])
            manifest = json.loads((refit / exp / "latest" / "manifest.json").read_text())
            val = [g for g in manifest["held_out"] if g["split"] == "val"]
            test = {g["pert"] for g in manifest["held_out"] if g["split"] == "test"}
            assert val == [] and test == {p for t in fold_toml["fewshot"].values() for p in t["test"]}
            predicted = json.loads((refit / exp / "latest" / "predict.json").read_text())
            assert predicted["checkpoint"].endswith(f"refit/{exp}/{again['run_id']}/checkpoints/final.pt")
            assert (refit / exp / "latest" / "eval" / "score.json").is_file()
        assert parents["0905"][1] == parents["0905"][0]  # the same base model
        assert parents["0906"][1].endswith("checkpoints/final.pt") and "/refit/0905/" in parents["0906"][1]
    over = pd.read_csv(runs / "refit" / "compare.csv")
    assert {"0905", "0906", "feature_ridge", "ceiling"} <= set(
        over["experiment"].astype(str).str.zfill(4)
    ) | set(over["experiment"].astype(str))
