"""Held-out groups done right, end to end on a real h5ad and a cell-load split TOML with per-cell-type sections:
a perturbation held out in one cell type (and trained in the two others) is the only group predicted and
scored, eval finishes with the baseline panel, and no baseline reads a held-out cell."""

from __future__ import annotations

import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

import tahoe_ft
from conftest_train import TINY_DEMO, TINY_MODEL
from tahoe_ft.config import EvalConfig, PredictConfig, compose
from tahoe_ft.datasets.demo import DemoSpec
from tahoe_ft.datasets.embedded import ensure_demo

CT_DEMO = [a for a in TINY_DEMO if not a.startswith("data.demo.n_cell_types")] + ["data.demo.n_cell_types=3"]


def _spec() -> DemoSpec:
    return DemoSpec.from_dict({a.split("=")[0].split(".")[-1]: int(a.split("=")[1]) for a in CT_DEMO})


@pytest.fixture(scope="module")
def fewshot(tmp_path_factory):
    root = tmp_path_factory.mktemp("fewshot")
    files = ensure_demo(root / "cache", _spec())
    screen = root / "screen.h5ad"
    shutil.copy(files["screen"], screen)
    obs = ad.read_h5ad(screen, backed="r").obs
    perts = sorted(set(obs["target_gene"]) - {"non-targeting"})
    cts = sorted(set(obs["cell_type"]))
    assert len(cts) == 3
    val, test = perts[0], perts[1]
    toml = root / "split.toml"
    toml.write_text(
        f'[datasets]\nscreen = "{screen}"\n\n[training]\nscreen = "train"\n\n'
        f'[fewshot."screen.{cts[0]}"]\nval = ["{val}"]\ntest = ["{test}"]\n'
    )
    runs = root / "runs"
    args = [a for a in TINY_MODEL if not a.startswith("encoder.")] + [
        "+experiment=0905", "init_from=null", "data=custom", "data.path=null", f"data.split_toml={toml}",
        f"runs_dir={runs}", f"paths.data_cache={root / 'cache'}", "trainer.max_steps=4",
        "trainer.val_check_interval=2", "trainer.enable_progress_bar=false", "logger=csv", "data.batch_size=4",
        "trainer.accelerator=cpu", "data.num_workers=0",
    ]  # fmt: skip
    run_dir = tahoe_ft.train(compose("train", args))
    tahoe_ft.predict(PredictConfig(run_dir=str(run_dir)))
    score = tahoe_ft.evaluate(EvalConfig(run_dir=str(run_dir), runs_dir=str(runs)))
    return {
        "root": root,
        "run": run_dir,
        "screen": screen,
        "cts": cts,
        "val": val,
        "test": test,
        "score": score,
    }


def test_only_the_held_out_group_is_predicted(fewshot):
    pred = ad.read_h5ad(fewshot["run"] / "pred.h5ad")
    real = ad.read_h5ad(fewshot["run"] / "real.h5ad")
    ct0 = fewshot["cts"][0]
    for a in (pred, real):
        groups = {
            (c, p)
            for c, p in zip(a.obs["cell_type"], a.obs["target_gene"], strict=True)
            if p != "non-targeting"
        }
        assert groups == {(ct0, fewshot["test"])}  # not the test perturbation's cells of the other cell types
        assert set(a.obs["cell_type"]) == {ct0}  # controls of the evaluated cell type only
    m = torch_manifest(fewshot["run"])
    assert {(g["cell_type"], g["pert"], g["split"]) for g in m["held_out"]} == {
        (ct0, fewshot["val"], "val"),
        (ct0, fewshot["test"], "test"),
    }


def torch_manifest(run_dir: Path) -> dict:
    import torch

    return torch.load(run_dir / "checkpoints" / "best-val.pt", weights_only=True)["manifest"]


def test_eval_finishes_with_the_panel_and_pert_mean_from_the_other_cell_types(fewshot):
    score = fewshot["score"]
    assert 0.0 <= score.avg_score <= 1.0
    assert set(score.per_celltype) == {fewshot["cts"][0]}
    assert {
        "control",
        "cell_mean",
        "pert_mean",
        "target_knockdown",
        "linear",
        "feature_ridge",
        "ceiling",
    } == set(score.baselines)
    assert score.baselines["cell_mean"]["avg_score"] == pytest.approx(0.0, abs=0.05)  # it is the normaliser
    # the test perturbation is training data in the two other cell types: pert_mean transfers its effect
    assert score.baselines["pert_mean"]["avg_score"] > score.baselines["control"]["avg_score"]
    files = sorted(p.name for p in (fewshot["run"] / "eval" / "baselines").glob("*.h5ad"))
    assert files == [
        "cell_mean.h5ad",
        "control.h5ad",
        "feature_ridge.h5ad",
        "linear.h5ad",
        "pert_mean.h5ad",
        "target_knockdown.h5ad",
    ]


def test_no_baseline_reads_a_held_out_cell(fewshot):
    """Poison every held-out cell in the data file: the training cells, and so every baseline, are unchanged."""
    run = fewshot["run"]
    before = {p.name: ad.read_h5ad(p).X for p in (run / "eval" / "baselines").glob("*.h5ad")}
    a = ad.read_h5ad(fewshot["screen"])
    held = (a.obs["cell_type"] == fewshot["cts"][0]) & a.obs["target_gene"].isin(
        [fewshot["val"], fewshot["test"]]
    )
    x = a.X.toarray() if sp.issparse(a.X) else np.array(a.X)
    x[held.to_numpy()] = 9.0
    a.X = sp.csr_matrix(x) if sp.issparse(a.X) else x
    tmp = fewshot["screen"].with_name("poisoned.h5ad")
    a.write_h5ad(tmp)
    tmp.replace(fewshot["screen"])  # a new file under the same name (readers still open keep the old one)
    shutil.rmtree(fewshot["root"] / "runs" / ".de_cache")  # nothing cached: the panel is built again
    tahoe_ft.evaluate(EvalConfig(run_dir=str(run), runs_dir=str(fewshot["root"] / "runs")))
    after = {p.name: ad.read_h5ad(p).X for p in (run / "eval" / "baselines").glob("*.h5ad")}
    assert before.keys() == after.keys() and len(before) == 6  # the panel with feature_ridge
    for name in before:
        np.testing.assert_array_equal(np.asarray(before[name]), np.asarray(after[name]), err_msg=name)
