"""model.feature_prior: the baseline panel's feature ridge inside the gene-space head, so a round starts from the
ridge's prediction and fine-tunes its residual (issue 20's lever 'the ridge as a prior')."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tahoe_ft.data.labels import ScreenLabels
from tahoe_ft.errors import UserError
from tahoe_ft.evaluation.feature_ridge import fit_feature_ridge
from tahoe_ft.model.st import HparamsError, StateTransitionModel

G, P = 12, 5


def _hparams(**kw) -> dict:
    hp = {
        "input_dim": G, "output_dim": G, "pert_dim": P, "hidden_dim": 16, "n_encoder_layers": 2,
        "n_decoder_layers": 2, "predict_residual": True, "output_space": "all", "embed_key": None,
        "cell_set_len": 4, "transformer_backbone_key": "llama", "head_skip": True, "feature_prior": 3,
        "transformer_backbone_kwargs": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                                        "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 32},
    }  # fmt: skip
    return {**hp, **kw}


def _ridge(seed=0):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(30, P))
    cts = [["a", "b"][i % 2] for i in range(30)]
    y = feats @ rng.normal(size=(P, G)) + np.array([[0.3] * G if c == "a" else [-0.2] * G for c in cts])
    return fit_feature_ridge(y + rng.normal(0, 0.1, size=y.shape), feats, cts)


def test_a_fresh_model_predicts_the_basal_cells_plus_the_ridges_effect():
    torch.manual_seed(0)
    model = StateTransitionModel(_hparams()).eval()
    ridge = _ridge()
    model.feature_prior.set_ridge(ridge, ["b", "a", "c"])  # the model's cell types, in its own order
    rng = np.random.default_rng(1)
    pert = rng.normal(size=(3, P))
    basal = torch.as_tensor(rng.uniform(2.0, 3.0, size=(3, 4, G)), dtype=torch.float32)
    cell_type = torch.tensor([1, 0, 2])  # "a", "b", and "c" (a cell type the ridge never saw)
    with torch.no_grad():
        out = model.forward_sets(
            torch.as_tensor(pert, dtype=torch.float32)[:, None, :].expand(-1, 4, -1),
            basal,
            cell_type=cell_type,
        )
    for i, ct in enumerate(["a", "b", "c"]):
        want = basal[i].double().numpy() + ridge.predict(pert[i], ct)
        np.testing.assert_allclose(out[i].double().numpy(), np.maximum(want, 0.0), atol=1e-5)
    with pytest.raises(ValueError, match="cell type"):
        model.forward_sets(torch.zeros(1, 4, P), torch.zeros(1, 4, G))


def test_the_prior_needs_the_head_skip_path():
    with pytest.raises(HparamsError, match="head_skip"):
        StateTransitionModel(_hparams(head_skip=False))


def test_a_round_with_the_prior_starts_at_the_panels_feature_ridge_and_keeps_it_in_the_next_round(tmp_path):
    """Trained with lr 0, best-val.pt is the model at step 0: its prior is the ridge that eval's panel fits
    (same training cells, same features), and its prediction is basal + that ridge's effect. The next round
    keeps the parent's prior (not refitted) and export-state refuses the path."""
    import tahoe_ft
    from conftest_train import train
    from tahoe_ft.checkpoints.io import load_checkpoint
    from tahoe_ft.config import EvalConfig, ExportStateConfig
    from tahoe_ft.data import CellCatalog, Manifest
    from tahoe_ft.evaluation.baselines import fit_feature_ridge_on_cells
    from tahoe_ft.evaluation.run import pert_features, read_manifest

    run = train(
        tmp_path, "0905", "init_from=null", "model.feature_prior=true", "optim.lr=0.0", steps=2, val_every=2
    )
    ckpt = run / "checkpoints" / "best-val.pt"
    loaded = load_checkpoint(ckpt)
    m = Manifest.from_dict(loaded.manifest)
    # the ridge exactly as eval fits the panel's feature_ridge
    manifest = read_manifest(ckpt)
    train_cells = CellCatalog.from_manifest(manifest).training_cells(
        EvalConfig.max_train_cells_per_group, seed=0
    )
    feats = pert_features(manifest)
    ridge = fit_feature_ridge_on_cells(
        train_cells,
        labels=ScreenLabels.of(m),
        features=feats,
    )
    model = loaded.model
    rng = np.random.default_rng(0)
    for p in m.splits["test"]:
        for i, ct in enumerate(m.cell_types):
            with torch.no_grad():
                prior = model.feature_prior(
                    torch.as_tensor(feats[p], dtype=torch.float32)[None], torch.tensor([i])
                )
            np.testing.assert_allclose(prior[0].double().numpy(), ridge.predict(feats[p], ct), atol=1e-4)
            basal = torch.as_tensor(
                rng.uniform(1.0, 2.0, size=(1, 8, len(m.gene_names))), dtype=torch.float32
            )
            pert = torch.as_tensor(feats[p], dtype=torch.float32).expand(1, 8, -1)
            with torch.no_grad():
                out = model.forward_sets(pert, basal, cell_type=torch.tensor([i]))
            want = np.maximum(basal[0].double().numpy() + ridge.predict(feats[p], ct), 0.0)
            np.testing.assert_allclose(out[0].double().numpy(), want, atol=1e-4)
    # the next round keeps the parent's prior
    child = train(tmp_path, "0906", f"init_from={ckpt}", "model.feature_prior=true", steps=2, val_every=2)
    kept = load_checkpoint(child / "checkpoints" / "best-val.pt").model.feature_prior
    torch.testing.assert_close(kept.weight, model.feature_prior.weight)
    torch.testing.assert_close(kept.cell_type_bias, model.feature_prior.cell_type_bias)
    with pytest.raises(UserError, match="feature prior"):
        tahoe_ft.export_state(ExportStateConfig(ckpt=str(ckpt), out=str(tmp_path / "export")))
    assert not (tmp_path / "export").exists()


# -- optim.fresh_lr_factor: re-initialised modules learn faster than the transferred ones -------------------


def _module(factor: float):
    from tahoe_ft.config import OptimConfig, TrainConfig, TrainerConfig
    from tahoe_ft.training.module import STLightningModule, TrainingSettings

    cfg = TrainConfig(optim=OptimConfig(lr=1e-3, fresh_lr_factor=factor), trainer=TrainerConfig(max_steps=10))
    return STLightningModule(_hparams(feature_prior=None), TrainingSettings.of(cfg))


def test_fresh_modules_get_their_own_lr_and_nothing_else_changes():
    m = _module(10.0)
    m.fresh_modules = {"pert_encoder", "project_out"}
    opt = m.configure_optimizers()["optimizer"]
    lr_of = {id(p): g["initial_lr"] for g in opt.param_groups for p in g["params"]}  # before the schedule
    for name, p in m.model.named_parameters():
        fresh = name.split(".")[0] in m.fresh_modules
        assert lr_of[id(p)] == pytest.approx(1e-2 if fresh else 1e-3), name
    assert any(g["name"].endswith("/fresh") for g in opt.param_groups)
    # factor 1: the groups (and so the optimizer state of older runs) are exactly as before
    one = _module(1.0)
    one.fresh_modules = {"pert_encoder"}
    assert [g["name"] for g in one.configure_optimizers()["optimizer"].param_groups] == [
        "main",
        "main/no_decay",
    ]


def test_a_round_from_a_parent_trains_its_reinitialised_modules_at_the_factor(tmp_path):
    """0905 from the demo pretrain re-initialises the perturbation encoder (drug features -> gene features):
    its LR in the metrics is 5x the backbone's, and a resumed run rebuilds the same groups."""
    import json

    from conftest_train import metrics, train

    parent = train(tmp_path, "pretrain", "init_from=null", steps=2, val_every=2)
    run = train(
        tmp_path, "0905", f"init_from={parent / 'checkpoints' / 'best-val.pt'}", "optim.fresh_lr_factor=5.0",
        "freeze.modules=[]", steps=2, val_every=2,
    )  # fmt: skip
    fresh = set(json.loads((run / "init_report.json").read_text())["reinitialised_modules"])
    assert "pert_encoder" in fresh and "transformer_backbone" not in fresh
    from tahoe_ft.training.recipe import _fresh_modules

    assert _fresh_modules(run) == fresh
    rows = [r for r in metrics(run) if r.get("lr") and r.get("lr/main/fresh")]
    assert rows, "the fresh modules' LR is not logged"
    for r in rows:  # the same schedule, 5x the LR
        assert float(r["lr/main/fresh"]) == pytest.approx(5.0 * float(r["lr"]))


# -- checkpoint.validate_at_start: the starting weights are measured and are a candidate for best-val.pt -----


def test_the_val_loss_curve_starts_at_step_0_and_the_start_can_be_the_best(tmp_path):
    import json

    from conftest_train import metrics, train

    # lr 0: nothing changes, so the step-0 validation is the best (first) minimum and best-val.pt is from it
    run = train(tmp_path, "0905", "init_from=null", "optim.lr=0.0", steps=2, val_every=2)
    vals = [(int(r["step"]), float(r["val_loss"])) for r in metrics(run) if r.get("val_loss")]
    assert vals[0][0] == 0 and len(vals) >= 2
    info = json.loads((run / "run.json").read_text())
    assert info["best_step"] == 0 and info["best_val_loss"] == pytest.approx(vals[0][1])
    off = train(
        tmp_path, "0905", "init_from=null", "checkpoint.validate_at_start=false", steps=2, val_every=2
    )
    assert all(int(r["step"]) > 0 for r in metrics(off) if r.get("val_loss"))


def test_the_prior_is_fitted_group_by_group_to_the_same_bits_as_the_panels_fit(tmp_path):
    """`CellCatalog.training_group_means` (what a round's prior is fitted on, one group read at a time, so the
    training cells are never all in memory) gives exactly the group means of `training_cells`, and the ridge on
    them is the panel's `fit_feature_ridge_on_cells` to the bit: the prior did not move when it stopped
    densifying every training cell (2.9 GB in float64 at 20,000 x 18,080)."""
    from conftest_train import TINY_DEMO
    from tahoe_ft.config import EvalConfig, compose
    from tahoe_ft.data import CellCatalog, ScreenLabels
    from tahoe_ft.datasets import ensure_files
    from tahoe_ft.evaluation.baselines import (
        _Training,
        fit_feature_ridge_on_cells,
        fit_feature_ridge_on_means,
    )

    data = compose("train", ["+experiment=0905", f"paths.data_cache={tmp_path}", *TINY_DEMO]).data
    ensure_files(data)
    cat = CellCatalog.open(data, embed_key=None)
    n = 5  # fewer than most groups have: the draw matters
    cells = cat.training_cells(n, seed=3)
    means = cat.training_group_means(n, seed=3)
    tr = _Training(cells, ScreenLabels(cat.pert_col, cat.control_pert, cat.cell_type_col), cat.gene_names)
    assert sorted(means) == sorted(tr.mean) and len(means) > len(cat.cell_types)
    for key, m in means.items():
        assert m.dtype == np.float64 and np.array_equal(m, tr.mean[key]), key
    rng = np.random.default_rng(0)
    feats = {p: rng.normal(size=6) for p in cat.pert_names}
    want = fit_feature_ridge_on_cells(
        cells, labels=cat.labels, features=feats,
    )  # fmt: skip
    got = fit_feature_ridge_on_means(means, cat.control_pert, feats)
    assert np.array_equal(got.coef, want.coef) and np.array_equal(got.intercept, want.intercept)
    assert got.penalty == want.penalty
    # and with eval's default draw, as the datamodule fits it
    full = cat.training_group_means(EvalConfig.max_train_cells_per_group, seed=0)
    assert sorted(full) == sorted(means)
