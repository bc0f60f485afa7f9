"""The target knock-down path (model.target_knockdown): the target gene of each cell's perturbation scaled by
a learned ratio that starts at the training cells' median knock-down, in training and in predict."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import tahoe_ft
from conftest_train import train
from tahoe_ft.config import DataConfig, ExportStateConfig
from tahoe_ft.data import CellCatalog
from tahoe_ft.data.features import target_gene_index, training_knockdown_ratio
from tahoe_ft.errors import UserError
from tahoe_ft.model.st import HparamsError, StateTransitionModel

CTRL = "non-targeting"
RATIO = 0.3  # planted: each perturbation leaves 30 % of its target's expression (linear scale)
N_GENES = 40


def write_screen(path, poison=None, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.uniform(2.0, 20.0, N_GENES)  # linear-scale expression per gene
    perts = [f"G{i}" for i in range(0, 20, 2)] + ["NOTAGENE"]
    lin, obs = [rng.poisson(base, (300, N_GENES))], [CTRL] * 300
    for p in perts:
        mean = base.copy()
        if p.startswith("G"):
            mean[int(p[1:])] *= RATIO
        lin.append(rng.poisson(mean, (50, N_GENES)))
        obs += [p] * 50
    x = np.log1p(np.vstack(lin)).astype(np.float32)
    o = pd.DataFrame({"target_gene": obs, "cell_type": "A"}).astype("category")
    o.index = [f"c{i}" for i in range(len(o))]
    if poison is not None:
        x[o["target_gene"].isin(poison).to_numpy()] = 0.0  # every held-out cell fully knocked out
    ad.AnnData(x, obs=o, var=pd.DataFrame(index=[f"G{i}" for i in range(N_GENES)])).write_h5ad(path)
    return perts


def _catalog(path):
    return CellCatalog.open(DataConfig(path=str(path), test_perts=["G4"], val_perts=["G6"]), embed_key=None)


def test_target_columns_and_the_training_ratio(tmp_path):
    write_screen(tmp_path / "s.h5ad")
    cat = _catalog(tmp_path / "s.h5ad")
    idx = target_gene_index(cat.pert_names, cat.gene_names, cat.control_pert)
    by_name = dict(zip(cat.pert_names, idx.tolist(), strict=True))
    assert by_name[CTRL] == -1 and by_name["NOTAGENE"] == -1
    assert all(by_name[f"G{i}"] == i for i in range(0, 20, 2))
    ratio, n = training_knockdown_ratio(cat, seed=0)
    assert n == 8  # 10 gene-named perturbations, 2 held out
    assert ratio == pytest.approx(RATIO, abs=0.05)


def test_the_ratio_never_reads_a_held_out_cell(tmp_path):
    write_screen(tmp_path / "clean.h5ad")
    write_screen(tmp_path / "poisoned.h5ad", poison=["G4", "G6"])
    clean = training_knockdown_ratio(_catalog(tmp_path / "clean.h5ad"), seed=0)
    poisoned = training_knockdown_ratio(_catalog(tmp_path / "poisoned.h5ad"), seed=0)
    assert clean == poisoned


def _model(**extra):
    hp = {**dict(
        input_dim=12, output_dim=12, pert_dim=3, hidden_dim=16, cell_set_len=4, n_encoder_layers=1,
        n_decoder_layers=1, output_space="all", predict_residual=True, embed_key=None,
        transformer_backbone_key="llama",
        transformer_backbone_kwargs=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=2, head_dim=8, intermediate_size=24),
        head_skip=True,  # a fresh head predicts the basal cells (> 0), so the target gene has expression to scale
    ), **extra}  # fmt: skip
    torch.manual_seed(0)
    return StateTransitionModel(hp)


def test_the_path_scales_only_the_target_gene_by_the_ratio():
    plain, kd = _model(), _model(target_knockdown=0.25)
    kd.load_state_dict({**plain.state_dict(), "target_knockdown.log_ratio": kd.target_knockdown.log_ratio})
    pert, basal = torch.randn(2, 4, 3), torch.rand(2, 4, 12) * 3
    target = torch.tensor([[5] * 4, [-1] * 4])  # set 0 knocks out gene 5; set 1 targets no measured gene
    ref, out = plain.forward_sets(pert, basal), kd.forward_sets(pert, basal, target=target)
    expect = torch.log1p(0.25 * torch.expm1(ref[0, :, 5]))
    torch.testing.assert_close(out[0, :, 5], expect)
    others = [g for g in range(12) if g != 5]
    torch.testing.assert_close(out[0][:, others], ref[0][:, others])
    torch.testing.assert_close(out[1], ref[1])  # -1: unchanged
    out[0, :, 5].sum().backward()
    assert kd.target_knockdown.log_ratio.grad.abs() > 0  # the ratio is learned
    with pytest.raises(ValueError, match="target-gene column"):
        kd.forward_sets(pert, basal)  # a model with the path needs the targets


def test_the_path_needs_a_gene_space_output():
    with pytest.raises(HparamsError, match="gene-space"):
        _model(target_knockdown=0.5, output_space="gene", output_dim=8, predict_residual=False)


def test_a_round_learns_the_ratio_and_predict_applies_it(tmp_path):
    run = train(
        tmp_path, "0906", "init_from=null", "model.target_knockdown=true", "data.pert_features=pca", steps=6
    )
    ckpt = torch.load(run / "checkpoints" / "best-val.pt", map_location="cpu", weights_only=False)
    hp = ckpt["hparams"]
    state = ckpt["state_dict"]
    key = next(k for k in state if k.endswith("target_knockdown.log_ratio"))
    start = float(np.log(hp["target_knockdown"]))
    assert 0 < hp["target_knockdown"] < 1  # the demo's planted knock-down, read from its training cells
    assert float(state[key]) != start  # trained
    # the same checkpoint with the ratio set to ~0: predict must (nearly) zero every held-out target gene
    state[key] = torch.tensor(-30.0)
    torch.save(ckpt, run / "checkpoints" / "zero.pt")
    from tahoe_ft.config import PredictConfig

    out = tahoe_ft.predict(PredictConfig(ckpt="zero.pt", run_dir=str(run), shuffle=False))
    pred = ad.read_h5ad(out / "pred.h5ad")
    held = pred.obs["target_gene"].astype(str)
    measured = [p for p in held.unique() if p in set(pred.var_names)]
    assert measured, "the tiny demo's held-out perturbations target measured genes"
    for p in measured:
        rows = (held == p).to_numpy()
        assert np.asarray(pred[rows, p].X).max() < 1e-9, p  # r = e^-30
    genes = [g for g in pred.var_names if g not in measured]
    assert np.asarray(pred[held.isin(measured).to_numpy(), genes].X).max() > 0  # the rest is not zeroed


def test_embedding_rounds_ignore_it_and_export_refuses_it(tmp_path):
    run = train(tmp_path, "0826", "init_from=null", "model.target_knockdown=true", steps=2, val_every=2)
    hp = torch.load(run / "checkpoints" / "best-val.pt", map_location="cpu", weights_only=False)
    assert hp["hparams"]["target_knockdown"] is None  # SE600M round: no target-gene output
    kd = train(
        tmp_path,
        "0906",
        "init_from=null",
        "model.target_knockdown=true",
        "model.head_skip=false",
        steps=2,
        val_every=2,
    )
    with pytest.raises(UserError, match="target knock-down path"):
        tahoe_ft.export_state(ExportStateConfig(ckpt=str(kd / "checkpoints" / "best-val.pt")))
