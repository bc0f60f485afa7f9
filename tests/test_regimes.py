"""Regimes (issue #32 part 3): the folds of `reproduce`/`sweep` hold out what their regime says, read back as
training reads them (CellCatalog on the fold's split TOML), and designs that cannot hold are one line."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from tahoe_ft.config import DataConfig, Regime, ReproduceConfig, SweepConfig, compose
from tahoe_ft.errors import UserError
from tahoe_ft.study.folds import combination_parts, default_target, make_folds
from tahoe_ft.study.reproduce import check_regime, fold_data

CTRL = "non-targeting"
# three contexts: A has the most perturbations another cell type also has (P1-P4); 'P5+X' lacks its single X
SCREEN = {
    "A": ["P1", "P2", "P3", "P4", "P5", "P6", "P1+P2", "P3+P4", "P1+P3", "P5+X"],
    "B": ["P1", "P2", "P3", "P4", "P1+P2", "P8"],
    "C": ["P1", "P2", "P7"],
}
DEVEL = Path("/work/shared/data/perturbench_devel_norman19_mcfaline23.h5ad")


def write_screen(path: Path, perts_of: dict[str, list[str]], *, n: int = 4) -> DataConfig:
    """A tiny log1p screen: `n` cells of each listed perturbation and 2n controls per cell type."""
    rng = np.random.default_rng(0)
    rows = [
        (p, ct)
        for ct, perts in perts_of.items()
        for p in [CTRL] * (2 * n) + [q for q in perts for _ in range(n)]
    ]
    obs = pd.DataFrame(rows, columns=["target_gene", "cell_type"], index=[f"c{i}" for i in range(len(rows))])
    x = np.log1p(rng.poisson(3.0, (len(rows), 10))).astype(np.float32)
    ad.AnnData(x, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(10)])).write_h5ad(path)
    return DataConfig(path=str(path))


def split_of(toml: str, data: DataConfig | None = None) -> tuple[dict[str, set[tuple[str, str]]], object]:
    """{split: {(cell type, perturbation)}} of a fold's TOML as training reads it (with `data`'s columns), and
    the catalog."""
    from tahoe_ft.data import CellCatalog

    cat = CellCatalog.open(dataclasses.replace(data or DataConfig(), path=None, split_toml=toml))
    return {s: {(k.cell_type, k.pert) for k in cat.groups(s)} for s in ("train", "val", "test")}, cat


@pytest.fixture
def screen(tmp_path):
    return write_screen(tmp_path / "screen.h5ad", SCREEN)


def test_default_target_and_combination_parts():
    by_ct = {ct: set(p) for ct, p in SCREEN.items()}
    assert default_target(by_ct) == "A"  # 5 shared (P1-P4, P1+P2) against B's 5 (fewer perturbations), C's 2
    assert combination_parts("P1+P2", CTRL) == ["P1", "P2"]
    assert combination_parts(f"P1+{CTRL}", CTRL) is None and combination_parts("P1", CTRL) is None


def test_unseen_perturbation_is_the_default_and_recorded(screen, tmp_path):
    plain = make_folds(screen, 2, tmp_path / "plain")
    named = make_folds(screen, 2, tmp_path / "named", regime=Regime.unseen_perturbation)
    assert [Path(f.toml).read_bytes() for f in plain] == [Path(f.toml).read_bytes() for f in named]
    assert json.loads((tmp_path / "plain" / "folds.json").read_text())["regime"] == "unseen_perturbation"
    assert fold_data(screen, plain[0].toml, plain[0].regime).regime == "unseen_perturbation"


@pytest.mark.parametrize("n_test", [0, None])
def test_few_shot_context_holds_out_part_of_the_target_only(screen, tmp_path, n_test):
    folds = make_folds(screen, 2, tmp_path / "f", regime="few_shot_context", n_test=n_test)
    record = json.loads((tmp_path / "f" / "folds.json").read_text())
    assert record["regime"] == "few_shot_context" and record["target_context"] == "A"
    assert record["perturbations"] == ["P1", "P1+P2", "P2", "P3", "P4"]  # A's that another cell type has
    tested = set()
    for fold in folds:
        assert fold.regime == "few_shot_context"
        split, _ = split_of(fold.toml)
        held = split["val"] | split["test"]
        assert held and not split["val"] & split["test"]
        assert {ct for ct, _ in held} == {"A"}  # held out in the target only
        for _, p in held:
            assert ("A", p) not in split["train"]
            assert any((ct, p) in split["train"] for ct in ("B", "C"))  # trains in another context
        assert {p for ct, p in split["train"] if ct == "A"}  # a fraction trains in the target
        assert {("A", "P5"), ("A", "P6")} <= split["train"]  # A's own perturbations always train
        tested |= {p for _, p in split["test"]}
    if n_test == 0:
        assert tested == set(record["perturbations"])  # rotation: each tested once
    else:
        assert len(record["final_test"]) == 1 and tested == set(record["final_test"])


def test_zero_shot_context_target_contributes_only_controls(screen, tmp_path):
    from tahoe_ft.data.splits import TRAIN

    folds = make_folds(screen, 2, tmp_path / "z", regime="zero_shot_context", target_context="B")
    record = json.loads((tmp_path / "z" / "folds.json").read_text())
    assert record["measured_elsewhere"] == ["P1", "P1+P2", "P2", "P3", "P4"]  # not P8: B's alone
    assert record["target_context"] == "B" and [f["val_contexts"] for f in record["folds"]] in (
        [["A"], ["C"]],
        [["C"], ["A"]],
    )
    for fold in folds:
        split, cat = split_of(fold.toml)
        assert not {ct for ct, _ in split["train"]} & {"B"}  # no perturbed training cell of the target
        assert split["test"] == {("B", p) for p in SCREEN["B"]}  # the whole target, every fold
        (val_ct,) = {ct for ct, _ in split["val"]}  # a whole other context validates
        assert val_ct != "B" and split["val"] == {(val_ct, p) for p in SCREEN[val_ct]}
        assert not split["val"] & split["test"]
        b_controls = (cat.pert_of == cat.control_idx) & (cat.cell_type_of == list(cat.cell_types).index("B"))
        assert b_controls.any() and (cat.split_bits[b_controls] & TRAIN).all()  # its controls are seen
    with pytest.raises(UserError, match=r"2 <= folds <= the 2 cell types other than B") as e:
        make_folds(screen, 3, tmp_path / "z3", regime="zero_shot_context", target_context="B")
    assert "\n" not in str(e.value)


def test_zero_shot_context_with_two_cell_types_validates_on_perturbations(tmp_path):
    data = write_screen(tmp_path / "two.h5ad", {"A": SCREEN["A"][:4], "B": ["P1", "P2", "P3", "P9"]})
    folds = make_folds(data, 2, tmp_path / "z", regime="zero_shot_context")
    assert json.loads((tmp_path / "z" / "folds.json").read_text())["target_context"] == "A"
    vals = set()
    for fold in folds:
        split, _ = split_of(fold.toml)
        assert not {p for ct, p in split["train"] if ct == "A"}
        assert split["test"] == {("A", p) for p in SCREEN["A"][:4]}
        assert split["val"] and {ct for ct, _ in split["val"]} == {"B"} and split["train"]
        vals |= split["val"]
    assert vals == {("B", p) for p in ["P1", "P2", "P3", "P9"]}  # each validates once


def test_unseen_combination_holds_out_combinations_whose_singles_train(screen, tmp_path):
    folds = make_folds(screen, 2, tmp_path / "c", regime="unseen_combination")
    record = json.loads((tmp_path / "c" / "folds.json").read_text())
    assert record["perturbations"] == ["P1+P2", "P1+P3", "P3+P4"]  # not P5+X: X is never measured
    tested = set()
    for fold in folds:
        split, _ = split_of(fold.toml)
        held = split["val"] | split["test"]
        assert held and not split["val"] & split["test"]
        for ct, p in held:
            assert "+" in p
            assert all((ct, q) in split["train"] for q in p.split("+"))  # its singles train beside it
            assert not any(q == p for _, q in split["train"])  # held out wherever it has cells
        assert ("A", "P5+X") in split["train"]
        tested |= {p for _, p in split["test"]}
    assert tested == set(record["perturbations"])


@pytest.mark.skipif(not DEVEL.is_file(), reason="the four-cell-line screen is not here")
def test_regimes_on_the_four_cell_line_screen(tmp_path):
    data = DataConfig(
        path=str(DEVEL), pert_col="condition", control_pert="control", cell_type_col="cell_type"
    )
    combos = make_folds(data, 2, tmp_path / "c", regime="unseen_combination")
    dealt = json.loads((tmp_path / "c" / "folds.json").read_text())["perturbations"]
    assert dealt == ["KLF1+MAP2K6", "KLF1+TGFBR2", "MAP2K3+MAP2K6", "MAP2K3+SLC38A2", "MAPK1+TGFBR2"]
    assert sorted(p for f in combos for p in f.test) == dealt
    few = make_folds(data, 3, tmp_path / "f", regime="few_shot_context", target_context="U87MG")
    for fold in few:
        split, _ = split_of(fold.toml, data)
        assert {ct for ct, _ in split["test"]} == {"U87MG"}
        assert all(("A172", p) in split["train"] for _, p in split["test"])


def test_designs_that_cannot_hold_are_one_line(tmp_path):
    one = write_screen(tmp_path / "one.h5ad", {"K": ["P1", "P2", "P3"]})
    lacking = write_screen(tmp_path / "lacking.h5ad", {"K": ["P1", "P2", "P1+P9"], "H": ["P1", "P2"]})
    cases = [
        (one, "few_shot_context", None, r"has one cell type \('K'\); use regime=unseen_perturbation"),
        (one, "zero_shot_context", None, r"has one cell type"),
        (one, "unseen_combination", None, r"no combination \('A\+B'"),
        (lacking, "unseen_combination", None, r"'P1\+P9' in K lacks 'P9'"),
        (
            lacking,
            "few_shot_context",
            "Z",
            r"target_context=Z has no perturbed cells .*\(cell types: 'H', 'K'\); fix the name",
        ),
        (lacking, "unseen_perturbation", "K", r"target_context=K goes with regime=few_shot_context"),
        (lacking, "bogus", None, r"regime=bogus: choose one of"),
    ]
    for data, regime, target, message in cases:
        with pytest.raises(UserError, match=message) as e:
            make_folds(data, 2, tmp_path / "x", regime=regime, target_context=target)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "x").exists()  # nothing written by a refused design
    with pytest.raises(UserError, match=r"regime=few_shot_context is dealt into folds, but folds=0"):
        check_regime("few_shot_context", None, 0)
    with pytest.raises(UserError, match=r"target_context=K goes with"):
        check_regime(Regime.unseen_perturbation, "K", 4)


def test_regime_keys_compose_and_are_validated():
    cfg = compose("reproduce", ["regime=zero_shot_context", "target_context=K562", "folds=2"])
    assert isinstance(cfg, ReproduceConfig) and cfg.regime == Regime.zero_shot_context
    assert cfg.target_context == "K562"
    assert compose("reproduce", []).regime == Regime.unseen_perturbation
    sweep = compose("sweep", ["regime=unseen_combination"])
    assert isinstance(sweep, SweepConfig) and sweep.regime == Regime.unseen_combination
    with pytest.raises(UserError, match="regime") as e:
        compose("reproduce", ["regime=few_shot"])
    assert "\n" not in str(e.value)


def test_the_regime_is_in_the_manifest(screen, tmp_path):
    """A two-step training run on a few-shot fold records the regime in manifest.json (and compare reads it)."""
    import tahoe_ft
    from conftest_train import TINY_MODEL
    from tahoe_ft.study.comparison import scored_split

    (fold, *_) = make_folds(screen, 2, tmp_path / "f", regime="few_shot_context")
    run = tahoe_ft.train(
        compose(
            "train",
            [
                "+experiment=0905",
                "init_from=null",
                "data=custom",
                "data.path=null",
                f"data.split_toml={fold.toml}",
                "data.regime=few_shot_context",
                *[a for a in TINY_MODEL if not a.startswith("encoder.")],
                "data.batch_size=2",
                "model.cell_set_len=4",
                "trainer.max_steps=2",
                "trainer.val_check_interval=2",
                "trainer.accelerator=cpu",
                "trainer.enable_progress_bar=false",
                "logger=csv",
                "sched.warmup_steps=1",
                f"runs_dir={tmp_path / 'runs'}",
                f"paths.data_cache={tmp_path / 'cache'}",
            ],
        )  # fmt: skip
    )
    manifest = json.loads((Path(run) / "manifest.json").read_text())
    assert manifest["regime"] == "few_shot_context"
    (Path(run) / "predict.json").write_text(
        json.dumps({"split": "test", "data_paths": manifest["data_paths"]})
    )
    assert scored_split(run).regime == "few_shot_context"


def test_a_sweep_deals_its_regime_and_pins_it(screen, tmp_path):
    """One two-step trial on few-shot folds: the folds, the trial's runs and the study carry the regime; the same
    study continued under another regime is refused in one line."""
    import optuna

    from conftest_train import TINY_MODEL
    from tahoe_ft import api
    from tahoe_ft.config import SweepSpace

    train = [
        *[a for a in TINY_MODEL if not a.startswith("encoder.")], "model.cell_set_len=4", "data.batch_size=2",
        "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.accelerator=cpu", "logger=csv",
        "trainer.enable_progress_bar=false", "sched.warmup_steps=0", "checkpoint.validate_at_start=false",
    ]  # fmt: skip
    args = ["+sweep=genespace", "folds=2", "pretrained=null", f"runs_dir={tmp_path / 'runs'}", "n_trials=1"]
    args += ["data=custom", f"data.path={screen.path}", "regime=few_shot_context", "pruner=none"]
    cfg = compose("sweep", [*args, f"paths.data_cache={tmp_path / 'cache'}"])
    space = SweepSpace(name="fs", rounds=["0905"], params={"optim.lr": "logfloat(1e-4, 1e-2)"})
    cfg = dataclasses.replace(cfg, sweep=space, train_overrides=train)
    summary = api.sweep(cfg)
    sweep_dir = Path(summary["sweep_dir"])
    record = json.loads((sweep_dir / "folds" / "folds.json").read_text())
    assert record["regime"] == "few_shot_context" and record["target_context"] == "A"
    assert len(record["final_test"]) == 1  # n_test=null: one fold's share of the 5 dealt perturbations
    manifests = sorted(sweep_dir.glob("trial-*/fold-*/0905/*/manifest.json"))
    assert manifests and {json.loads(m.read_text())["regime"] for m in manifests} == {"few_shot_context"}
    study = optuna.load_study(study_name=summary["study"], storage=summary["storage"])
    assert study.user_attrs["tahoe_ft_recipe"]["regime"] == "few_shot_context"
    with pytest.raises(
        UserError, match=r"started with regime='few_shot_context', now 'unseen_combination'"
    ) as e:
        api.sweep(dataclasses.replace(cfg, regime=Regime.unseen_combination, n_trials=2))
    assert "\n" not in str(e.value)
