"""Parity with upstream's real `StateTransitionPerturbationModel` (arc-state 0.11.1, Llama, bidirectional).

Hand-built upstream modules first; then the differential suite on run folders that the real `state tx train`
writes (tests/upstream_run.py: four configurations, a few steps each), the run-folder import (load, predict,
init_from with perturbations mapped by name), the export back (`export-state` -> `load_from_checkpoint` and
`state tx infer`), and crafted folder files that must be refused without running anything.

Skipped unless the `state` package (arc-state, a test extra) is importable; `pytest -s` prints the largest
differences measured.
"""

from __future__ import annotations

import pytest
import torch

upstream = pytest.importorskip("state.tx.models.state_transition")

from tahoe_ft.checkpoints.upstream_hparams import translate_hparams  # noqa: E402
from tahoe_ft.model.st import DROPPED_UPSTREAM_KEYS, StateTransitionModel  # noqa: E402

D, P, H, G, S = 40, 12, 48, 30, 8

LLAMA = {
    "hidden_size": H,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 12,
    "intermediate_size": 96,
    "bidirectional_attention": True,
    "rotary_dim": 0,
    "use_rotary_embeddings": False,
    "max_position_embeddings": S,
    "attention_dropout": 0.0,
    "use_cache": False,
    "vocab_size": 32,
}


def build_upstream(**kwargs):
    args = dict(
        input_dim=D,
        hidden_dim=H,
        output_dim=D,
        pert_dim=P,
        batch_dim=None,
        predict_residual=True,
        transformer_backbone_key="llama",
        transformer_backbone_kwargs=dict(LLAMA),
        output_space="all",
        gene_dim=G,
        embed_key=None,
        cell_set_len=S,
        n_encoder_layers=4,
        n_decoder_layers=4,
        decoder_cfg=None,
    )
    args.update(kwargs)
    torch.manual_seed(0)
    return upstream.StateTransitionPerturbationModel(**args).eval()


def ours_from(up) -> StateTransitionModel:
    model = StateTransitionModel(translate_hparams(dict(up.hparams), "upstream")).eval()
    sd = {k: v for k, v in up.state_dict().items() if k not in DROPPED_UPSTREAM_KEYS}
    assert set(up.state_dict()) - set(model.state_dict()) == set(DROPPED_UPSTREAM_KEYS)
    assert set(model.state_dict()) <= set(up.state_dict())
    assert list(model.state_dict()) == list(sd)  # same order too
    model.load_state_dict(sd, strict=True)
    return model


def batch_for(n_sets: int, seed: int = 0, batch_dim: int | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = n_sets * S
    pert = torch.zeros(n, P)
    pert[torch.arange(n), torch.randint(0, P, (n_sets,), generator=g).repeat_interleave(S)] = 1.0
    out = {"pert_emb": pert, "ctrl_cell_emb": torch.randn(n, D, generator=g)}
    if batch_dim:
        out["batch"] = torch.nn.functional.one_hot(
            torch.randint(0, batch_dim, (n,), generator=g), batch_dim
        ).float()
    return out


def _randomize(up) -> None:
    """Upstream inits the backbone with std 0.02, which makes attention nearly uniform; perturb everything."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in up.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))


def _compare(up, ours, batch) -> None:
    with torch.no_grad():
        want = up(batch)
        got = ours(batch)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        one = {k: v[:5] for k, v in batch.items()}  # one short set, unpadded
        torch.testing.assert_close(ours(one, padded=False), up(one, padded=False), rtol=1e-5, atol=1e-5)
        if up.gene_decoder is not None:
            torch.testing.assert_close(ours.decode(got), up.gene_decoder(want), rtol=1e-5, atol=1e-5)


def test_parity_output_space_all_embed_key_none():
    up = build_upstream()
    _randomize(up)
    ours = ours_from(up)
    assert ours.apply_relu
    _compare(up, ours, batch_for(3))


def test_parity_x_state_with_gene_decoder():
    up = build_upstream(
        output_space="gene",
        embed_key="X_state",
        decoder_cfg={
            "latent_dim": D,
            "gene_dim": G,
            "hidden_dims": [32, 32, 16],
            "dropout": 0.1,
            "residual_decoder": False,
        },
    )
    _randomize(up)
    ours = ours_from(up)
    assert not ours.apply_relu
    batch = batch_for(2, seed=3)
    _compare(up, ours, batch)
    with torch.no_grad():
        assert ours(batch).min() < 0  # no ReLU in embedding space with a decoder


def test_parity_embedding_output_space_drops_decoder_in_0_11():
    """0.11.1: output_space 'embedding' discards decoder_cfg (hparams too), so the ReLU applies."""
    up = build_upstream(
        output_space="embedding",
        embed_key="X_state",
        decoder_cfg={"latent_dim": D, "gene_dim": G, "hidden_dims": [32], "dropout": 0.1},
    )
    assert up.gene_decoder is None and up.hparams["decoder_cfg"] is None
    _randomize(up)
    ours = ours_from(up)
    assert ours.gene_decoder is None and ours.apply_relu
    _compare(up, ours, batch_for(2, seed=6))


def test_parity_all_x_state_batch_encoder_residual_decoder_no_basal_projection():
    up = build_upstream(
        embed_key="X_state",
        batch_dim=5,
        batch_encoder=True,
        use_basal_projection=False,
        decoder_cfg={
            "latent_dim": D,
            "gene_dim": G,
            "hidden_dims": [32, 32, 16, 16],
            "dropout": 0.0,
            "residual_decoder": True,
        },
    )
    _randomize(up)
    ours = ours_from(up)
    assert ours.batch_encoder is not None
    _compare(up, ours, batch_for(2, seed=4, batch_dim=5))


def test_parity_no_residual_gene_space():
    up = build_upstream(
        output_space="gene",
        embed_key="X_hvg",
        predict_residual=False,
        n_encoder_layers=1,
        n_decoder_layers=2,
        activation="relu",
    )
    _randomize(up)
    _compare(up, ours_from(up), batch_for(2, seed=5))


def _save_lightning_ckpt(up, path, *, omegaconf_kwargs: bool = True) -> None:
    """An upstream `state tx train` checkpoint as Lightning writes it (hparams as Hydra/OmegaConf values)."""
    from omegaconf import OmegaConf

    hp = dict(up.hparams)
    if omegaconf_kwargs:
        hp["transformer_backbone_kwargs"] = OmegaConf.create(dict(hp["transformer_backbone_kwargs"]))
        if hp.get("decoder_cfg"):
            hp["decoder_cfg"] = OmegaConf.create(dict(hp["decoder_cfg"]))
    torch.save(
        {
            "state_dict": up.state_dict(),
            "hyper_parameters": hp,
            "global_step": 123,
            "epoch": 1,
            "pytorch-lightning_version": "2.6.6",
            "optimizer_states": [],
            "lr_schedulers": [],
        },
        path,
    )


def test_upstream_lightning_checkpoint_loads_with_its_own_architecture(tmp_path):
    import tahoe_ft

    decoder = {
        "latent_dim": D,
        "gene_dim": G,
        "hidden_dims": [32, 32],
        "dropout": 0.1,
        "residual_decoder": False,
    }
    up = build_upstream(embed_key="X_state", output_space="gene", decoder_cfg=decoder, gene_dim=G)
    _randomize(up)
    path = tmp_path / "best.ckpt"
    _save_lightning_ckpt(up, path)
    ours = tahoe_ft.load_checkpoint(path).model  # weights-only load; OmegaConf hparams allow-listed
    assert not ours.training and ours.gene_decoder is not None
    assert ours.hparams["transformer_backbone_kwargs"]["num_key_value_heads"] == 2
    _compare(up, ours, batch_for(3))


def test_finetune_from_upstream_checkpoint(tmp_path):
    """`pretrained=<state tx train .ckpt>`: 0905 keeps its backbone bit for bit (frozen), re-initialises the rest."""
    import json

    from conftest_train import train

    # an ST-SE-like base on the tiny demo's X_state width (16); its own architecture (hidden 48, 2 layers)
    decoder = {
        "latent_dim": 16,
        "gene_dim": 60,
        "hidden_dims": [32],
        "dropout": 0.1,
        "residual_decoder": False,
    }
    up = build_upstream(
        input_dim=16, output_dim=16, embed_key="X_state", output_space="all", decoder_cfg=decoder, gene_dim=60
    )
    path = tmp_path / "st_tahoe_like.ckpt"
    _save_lightning_ckpt(up, path)
    run_dir = train(tmp_path, "0905", f"pretrained={path}")
    report = json.loads((run_dir / "init_report.json").read_text())
    assert report["dropped"] == ["transformer_backbone.embed_tokens.weight"]
    assert "transformer_backbone" not in report["reinitialised_modules"]
    assert {"basal_encoder", "project_out", "final_down_then_up"} <= set(report["reinitialised_modules"])
    child = torch.load(run_dir / "checkpoints" / "best-val.pt", weights_only=True)
    assert child["hparams"]["hidden_dim"] == H  # the parent's architecture, not configs/model
    up_sd = up.state_dict()
    backbone = [k for k in child["state_dict"] if k.startswith("transformer_backbone.")]
    assert backbone
    for k in backbone:
        assert torch.equal(child["state_dict"][k], up_sd[k]), k


def test_gpt2_and_causal_upstream_checkpoints_are_refused(tmp_path):
    from tahoe_ft.checkpoints.io import read_weights
    from tahoe_ft.errors import UserError

    up = build_upstream()
    hp = dict(up.hparams)
    for change, needle in (
        ({"transformer_backbone_key": "GPT2"}, "not supported"),
        ({"transformer_backbone_kwargs": {**LLAMA, "bidirectional_attention": False}}, "causal"),
    ):
        path = tmp_path / "x.ckpt"
        torch.save({"state_dict": up.state_dict(), "hyper_parameters": {**hp, **change}}, path)
        with pytest.raises(UserError, match=needle):
            read_weights(path)


# -- checkpoints as `state tx train` really writes them (numpy scalars in hyper_parameters) ---------------


@pytest.fixture(scope="module")
def upstream_root(tmp_path_factory):
    return tmp_path_factory.mktemp("state_tx_train")


@pytest.fixture(scope="module")
def upstream_runs(upstream_root):
    """One real `state tx train` run folder per configuration of `upstream_run.CONFIGS` (4 steps each)."""
    from upstream_run import CONFIGS, state_cli, state_tx_train_many

    if state_cli() is None:
        pytest.skip("the `state` CLI (arc-state) is not installed")
    return state_tx_train_many(upstream_root, CONFIGS)


@pytest.fixture(scope="module")
def upstream_run(upstream_runs):
    return upstream_runs["raw_all"]


@pytest.fixture(scope="module")
def screen(upstream_root):
    from upstream_run import demo_files

    return demo_files(upstream_root)["screen"]


def test_state_tx_train_checkpoint_loads_and_matches_upstream(upstream_run):
    """final.ckpt of a real `state tx train` run: numpy.int64 dims in hyper_parameters, loaded weights-only."""
    import numpy as np

    import tahoe_ft

    ckpt = upstream_run / "checkpoints" / "final.ckpt"
    raw = torch.load(
        ckpt, map_location="cpu", weights_only=False
    )  # the test may unpickle; the product may not
    assert isinstance(raw["hyper_parameters"]["input_dim"], np.integer)  # what made every real ckpt fail
    assert "numpy._core.multiarray.scalar" in torch.serialization.get_unsafe_globals_in_checkpoint(ckpt)
    ours = tahoe_ft.load_checkpoint(ckpt).model
    assert type(ours.hparams["input_dim"]) is int and ours.hparams["input_dim"] == 60
    up = upstream.StateTransitionPerturbationModel.load_from_checkpoint(ckpt, weights_only=False).eval()
    g = torch.Generator().manual_seed(0)
    n_sets, s = 3, int(ours.hparams["cell_set_len"])
    p = int(ours.hparams["pert_dim"])
    pert = torch.zeros(n_sets * s, p)
    pert[torch.arange(n_sets * s), torch.randint(0, p, (n_sets,), generator=g).repeat_interleave(s)] = 1.0
    batch = {"pert_emb": pert, "ctrl_cell_emb": torch.rand(n_sets * s, 60, generator=g)}
    with torch.no_grad():
        torch.testing.assert_close(ours(batch), up(batch), rtol=1e-5, atol=1e-5)


def test_pretrained_state_tx_train_checkpoint_fine_tunes(upstream_run, tmp_path):
    """`pretrained=<final.ckpt>` of a real upstream run: 0905 trains and keeps the upstream backbone."""
    import json

    from conftest_train import train

    ckpt = upstream_run / "checkpoints" / "final.ckpt"
    run_dir = train(tmp_path, "0905", f"pretrained={ckpt}")
    report = json.loads((run_dir / "init_report.json").read_text())
    assert "transformer_backbone" not in report["reinitialised_modules"]
    child = torch.load(run_dir / "checkpoints" / "best-val.pt", weights_only=True)  # plain ints, loads safely
    assert type(child["hparams"]["input_dim"]) is int
    up_sd = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    for k in (k for k in child["state_dict"] if k.startswith("transformer_backbone.")):
        assert torch.equal(child["state_dict"][k], up_sd[k]), k


def _evil_checkpoint(path, marker, payload_in: str) -> None:
    """A Lightning-like checkpoint whose unpickling would create `marker` (the file must never appear)."""
    import numpy as np

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    hp = {"input_dim": np.int64(4), "pert_dim": np.int64(3)}
    state = {"w": torch.zeros(2)}
    if payload_in == "hyper_parameters":
        hp["loss_fn"] = Evil()
    else:
        state = {"w": torch.zeros(2), "extra": Evil()}
    torch.save({"state_dict": state, "hyper_parameters": hp}, path)


@pytest.mark.parametrize("payload_in", ["hyper_parameters", "state_dict"])
def test_checkpoint_whose_unpickling_runs_code_is_refused(tmp_path, payload_in):
    from tahoe_ft.checkpoints.io import read_weights
    from tahoe_ft.errors import UserError

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    _evil_checkpoint(path, marker, payload_in)
    with pytest.raises(UserError, match="arbitrary unpickling.*refused"):
        read_weights(path)
    assert not marker.exists()


def test_numpy_object_dtype_is_refused(tmp_path):
    """Only numeric/bool dtypes are allow-listed: an object-dtype scalar (which could carry anything) is not."""
    import numpy as np

    from tahoe_ft.checkpoints.io import safe_load
    from tahoe_ft.errors import UserError

    path = tmp_path / "obj.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": np.dtype("O"), "n": np.int64(1)}}, path)
    with pytest.raises(UserError, match="refused"):
        safe_load(path)


# -- the differential suite: real `state tx train` run folders, four configurations ----------------------

FIGURES: dict[str, float] = {}  # max abs differences, printed at the end of the module (pytest -s)


@pytest.fixture(scope="module", autouse=True)
def _print_figures():
    yield
    if FIGURES:
        print("\nmax abs differences vs arc-state 0.11.1:")
        for k, v in sorted(FIGURES.items()):
            print(f"- {k}: {v:.3g}")


def _maxdiff(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape, name
    d = float((got - want).abs().max()) if got.numel() else 0.0
    FIGURES[name] = max(FIGURES.get(name, 0.0), d)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)


def _dense(x):
    import numpy as np

    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float32)


def screen_batch(folder, screen, *, n_sets: int = 3, seed: int = 0) -> dict:
    """A batch as cell-load serves it, from the real screen: `n_sets` sets of S cells of one (cell type,
    perturbation) each, basal cells drawn from that cell type's controls, the folder's own one-hot maps; the
    embedding configuration also gets the gene-space targets (`pert_cell_counts`). Flat [n_sets*S, .]."""
    import anndata as ad
    import numpy as np

    from tahoe_ft.checkpoints.safe_pickle import read_torch_data
    from tahoe_ft.checkpoints.upstream_folder import RunFolder

    rf = RunFolder.open(folder)
    kw = rf.data_kwargs
    s = int(rf.config["model"]["kwargs"]["cell_set_len"])
    a = ad.read_h5ad(screen)
    x = _dense(a.X)
    feats = x if kw["embed_key"] is None else np.asarray(a.obsm[kw["embed_key"]], dtype=np.float32)
    pert, ct = a.obs["target_gene"].astype(str).values, a.obs["cell_type"].astype(str).values
    batch = a.obs["batch"].astype(str).values
    rng = np.random.default_rng(seed)
    groups = sorted({(c, p) for c, p in zip(ct, pert, strict=True) if p != "non-targeting"})
    target, basal = [], []
    for i in rng.choice(len(groups), n_sets, replace=False):
        c, p = groups[i]
        target.append(rng.choice(np.flatnonzero((ct == c) & (pert == p)), s))
        basal.append(rng.choice(np.flatnonzero((ct == c) & (pert == "non-targeting")), s))
    t, b = np.concatenate(target), np.concatenate(basal)
    onehot = dict(zip(rf.pert_names, rf.pert_matrix, strict=True))
    batch_map = read_torch_data(folder / "batch_onehot_map.torch")
    out = {
        "pert_emb": torch.stack([onehot[pert[r]] for r in t]),
        "ctrl_cell_emb": torch.from_numpy(feats[b]),
        "pert_cell_emb": torch.from_numpy(feats[t]),
        "batch": torch.stack([batch_map[batch[r]] for r in t]),
    }
    if kw["embed_key"] is not None:  # cell-load loads counts only for embedding input
        out["pert_cell_counts"] = torch.from_numpy(x[t])
    return out


@pytest.mark.parametrize("config", ["raw_all", "x_state_decoder", "no_basal_projection", "batch_encoder"])
def test_differential_state_tx_train_folder(upstream_runs, screen, config):
    """A real `state tx train` run folder (numpy scalars in hyper_parameters, the folder beside it) loads
    through `load_checkpoint(<folder>)`, and forward outputs, decoder outputs and the energy losses agree with
    upstream's own module on the same real batches to 1e-5 (fp32)."""
    import numpy as np

    import tahoe_ft
    from tahoe_ft.model.loss import DistributionLoss

    folder = upstream_runs[config]
    ckpt = folder / "checkpoints" / "best.ckpt"
    raw = torch.load(
        ckpt, map_location="cpu", weights_only=False
    )  # the test may unpickle; the product may not
    assert isinstance(raw["hyper_parameters"]["pert_dim"], int | np.integer)
    ours = tahoe_ft.load_checkpoint(folder)
    assert ours.checkpoint_path == ckpt  # best.ckpt preferred
    ours = ours.model  # the model itself from here on
    up = upstream.StateTransitionPerturbationModel.load_from_checkpoint(ckpt, weights_only=False).eval()
    checks = {
        "raw_all": lambda: hasattr(ours, "final_down_then_up") and ours.hparams["embed_key"] is None,
        "x_state_decoder": lambda: ours.gene_decoder is not None and ours.hparams["embed_key"] == "X_state",
        "no_basal_projection": lambda: isinstance(ours.basal_encoder, torch.nn.Linear),
        "batch_encoder": lambda: ours.batch_encoder is not None and up.batch_encoder is not None,
    }
    assert checks[config](), config
    s, energy = int(ours.hparams["cell_set_len"]), DistributionLoss("energy")
    for seed in (0, 1):
        batch = screen_batch(folder, screen, seed=seed)
        with torch.no_grad():
            got, want = ours(batch), up(batch)
            _maxdiff(f"{config} forward", got, want)
            one = {k: v[:5] for k, v in batch.items()}  # one short set, unpadded (as infer/predict run)
            _maxdiff(f"{config} forward unpadded", ours(one, padded=False), up(one, padded=False))
            pred = got.reshape(-1, s, got.shape[-1])
            target = batch["pert_cell_emb"].reshape_as(pred)
            main = energy(pred, target).nanmean()
            _maxdiff(
                f"{config} energy loss",
                main,
                up._compute_distribution_loss(want.reshape_as(pred), target).nanmean(),
            )
            total = main
            if "pert_cell_counts" in batch:
                genes = ours.decode(pred)
                _maxdiff(f"{config} decoder", genes, up.gene_decoder(want.reshape_as(pred)))
                total = main + 1.0 * energy(genes, batch["pert_cell_counts"].reshape_as(genes)).mean()
            # upstream's own training loss on the batch: main + decoder_weight (1.0) x decoder loss
            _maxdiff(f"{config} training loss", total, up.training_step(batch, 0))


def test_predict_from_upstream_run_folder_matches_upstream(upstream_runs, screen, tmp_path):
    """`tahoe-ft predict ckpt=<run folder> data_path=<screen>`: genes and perturbations from the folder, the
    held-out groups from its split TOML; every predicted cell equals upstream's module on the same basal cells."""
    import anndata as ad
    import numpy as np

    import tahoe_ft
    from tahoe_ft.config import PredictConfig
    from tahoe_ft.data import CellCatalog
    from tahoe_ft.prediction import PRED_MAX, decodes, draw_basal
    from tahoe_ft.prediction.plan import _prediction_order

    for config in ("raw_all", "x_state_decoder"):
        folder = upstream_runs[config]
        cfg = PredictConfig(  # upstream's raw basal draws (state tx infer does not re-centre them)
            ckpt=str(folder),
            data_path=str(screen),
            run_dir=str(tmp_path / config),
            device="cpu",
            recentre_basal=False,
        )
        out = tahoe_ft.predict(cfg)
        pred = ad.read_h5ad(out / "pred.h5ad")
        ours = tahoe_ft.load_checkpoint(folder)
        up = upstream.StateTransitionPerturbationModel.load_from_checkpoint(
            folder / "checkpoints" / "best.ckpt", weights_only=False
        ).eval()
        m = ours.run_folder.manifest(ours.model.hparams, data_paths=str(screen), decoded=decodes(ours.model))
        assert list(pred.var_names) == ours.run_folder.gene_names
        assert {e["pert"] for e in m.held_out if e["split"] == "test"} == {
            "GENE00021",
            "GENE00028",
        }  # the TOML's
        cat = CellCatalog.from_manifest(m)
        cells = cat.groups("test")
        rng = np.random.default_rng(0)  # predict's seed: the same draws in the same order
        index = {p: i for i, p in enumerate(m.pert_names)}
        want, s = [], int(ours.model.hparams["cell_set_len"])
        for key in _prediction_order(cells):
            basal = torch.from_numpy(
                cat.read_input(draw_basal(rng, cat.controls(key.dataset, key.cell_type), cells[key].size))
            )
            for a in range(0, basal.shape[0], s):
                b = basal[a : a + s]
                batch = {
                    "pert_emb": m.pert_matrix[index[key.pert]].expand(b.shape[0], -1),
                    "ctrl_cell_emb": b,
                }
                with torch.no_grad():
                    y = up.predict_step(batch, 0, padded=False)
                y = y["pert_cell_counts_preds"] if decodes(ours.model) else y["preds"]
                want.append(y.reshape(b.shape[0], -1))
        want = torch.cat(want).clamp(0, PRED_MAX)
        _maxdiff(f"{config} predict from folder", torch.from_numpy(np.asarray(pred.X[: want.shape[0]])), want)


def test_predict_from_run_folder_without_split_toml_is_one_line(upstream_runs, screen, tmp_path):
    import shutil

    import tahoe_ft
    from tahoe_ft.config import PredictConfig
    from tahoe_ft.errors import UserError

    folder = tmp_path / "run"
    shutil.copytree(upstream_runs["raw_all"], folder)
    cfg = (folder / "config.yaml").read_text()
    (folder / "config.yaml").write_text(
        cfg.replace("toml_config_path:", "toml_config_path: /gone/split.toml #")
    )
    with pytest.raises(UserError, match=r"toml_config_path /gone/split.toml is not readable.*split_toml="):
        tahoe_ft.predict(
            PredictConfig(ckpt=str(folder), data_path=str(screen), run_dir=str(tmp_path / "p"), device="cpu")
        )


# -- fine-tuning from an upstream folder whose perturbations differ --------------------------------------


def _initial_weights():
    """A Lightning callback that keeps the child's weights when fit starts (= right after init_from)."""
    import lightning as L

    class InitialWeights(L.Callback):
        state: dict = {}

        def on_fit_start(self, trainer, pl_module):
            self.state = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}

    return InitialWeights()


@pytest.fixture(scope="module")
def finetuned(upstream_runs, tmp_path_factory):
    """0905 from the raw_all folder on a screen with other genes (50) and other perturbations (10, one-hot)."""
    import tahoe_ft
    from conftest_train import train_args

    root = tmp_path_factory.mktemp("finetune")
    snap = _initial_weights()
    args = train_args(
        root, "0905", f"pretrained={upstream_runs['raw_all']}", "data.demo.n_perts=10", "data.demo.n_genes=50",
        "data.pert_features=null", "model.head_skip=false",  # exported to upstream below: upstream's head
    )  # fmt: skip
    run_dir = tahoe_ft.train(tahoe_ft.compose("train", args), callbacks=[snap])
    return run_dir, snap.state


def test_finetune_from_upstream_folder_maps_perturbations_by_name(upstream_runs, finetuned):
    """init_from an upstream folder: shared perturbations keep their pert_encoder column, the others are fresh;
    the init report lists exactly the tensors that were re-initialised (checked against the weights at fit
    start), names the checkpoint it chose, and the run trains."""
    import json

    from conftest_train import column, metrics
    from tahoe_ft.checkpoints.io import PERT_LAYER, read_weights
    from tahoe_ft.checkpoints.upstream_folder import RunFolder

    folder = upstream_runs["raw_all"]
    run_dir, initial = finetuned
    report = json.loads((run_dir / "init_report.json").read_text())
    assert report["checkpoint"] == str(folder / "checkpoints" / "best.ckpt")
    parent_state = read_weights(folder).state_dict
    parent_perts = RunFolder.open(folder).pert_names
    child = torch.load(run_dir / "checkpoints" / "best-val.pt", weights_only=True)
    child_perts = child["manifest"]["pert_names"]
    shared = [p for p in child_perts if p in parent_perts]
    new = [p for p in child_perts if p not in parent_perts]
    assert shared and new and "non-targeting" in shared
    assert report["pert_columns"] == {
        "mapped": shared,
        "new": new,
        "parent_only": [p for p in parent_perts if p not in child_perts],
    }
    assert report["partially_loaded"] == [
        {"name": PERT_LAYER, "mapped_columns": len(shared), "new_columns": len(new)}
    ]
    w, pw = initial[PERT_LAYER], parent_state[PERT_LAYER]
    for j, p in enumerate(child_perts):
        same = [torch.equal(w[:, j], pw[:, i]) for i in range(pw.shape[1])]
        assert same[parent_perts.index(p)] if p in parent_perts else not any(same), p

    def equal(k):
        return (
            k in parent_state
            and parent_state[k].shape == initial[k].shape
            and torch.equal(parent_state[k], initial[k])
        )

    fresh = {k for k in initial if k != PERT_LAYER and not equal(k)}
    assert set(report["reinitialised"]) == fresh
    assert set(report["loaded"]) == {k for k in initial if k != PERT_LAYER and equal(k)}
    assert "basal_encoder.0.weight" in fresh and not any(k.startswith("transformer_backbone.") for k in fresh)
    assert len(column(metrics(run_dir), "train/loss")) >= 3  # it trains


# -- export: tahoe-ft checkpoint -> upstream run folder -> arc-state -------------------------------------


@pytest.fixture(scope="module")
def se600m_child(upstream_root):
    """A tahoe-ft SE600M-encoder round (X_state in, gene decoder, batch encoder, linear basal encoder)."""
    from conftest_train import train

    return train(
        upstream_root / "se600m", "0826", "pretrained=null", "model.batch_encoder=true", "data.batch_col=batch",
        "model.use_basal_projection=false", "model.head_skip=false",
    )  # fmt: skip


def _random_batch(model, n_sets: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    s, p, d = int(model.hparams["cell_set_len"]), model.pert_dim, model.input_dim
    pert = torch.zeros(n_sets * s, p)
    pert[torch.arange(n_sets * s), torch.randint(0, p, (n_sets,), generator=g).repeat_interleave(s)] = 1.0
    out = {"pert_emb": pert, "ctrl_cell_emb": torch.rand(n_sets * s, d, generator=g) * 3}
    if model.batch_encoder is not None:
        out["batch"] = torch.randint(0, model.batch_dim, (n_sets * s,), generator=g)
    return out


def test_export_state_round_trips_through_upstream(finetuned, se600m_child, tmp_path):
    """`tahoe-ft export-state` writes a run folder that arc-state loads (weights_only=True: plain values) and
    that computes our model's function; tahoe-ft reads it back to the same weights."""
    import pickle

    import yaml

    import tahoe_ft
    from tahoe_ft import cli

    for name, run_dir in (("raw", finetuned[0]), ("se600m", se600m_child)):
        best = run_dir / "checkpoints" / "best-val.pt"
        out = tmp_path / name
        cli.main(["export-state", f"ckpt={best}", f"out={out}"])
        ours = tahoe_ft.load_checkpoint(best)
        up = upstream.StateTransitionPerturbationModel.load_from_checkpoint(
            out / "checkpoints" / "final.ckpt", weights_only=True
        ).eval()
        model = ours.model
        assert up.transformer_backbone.embed_tokens.weight.abs().sum() == 0
        for seed in (0, 1):
            batch = _random_batch(model, seed=seed)
            with torch.no_grad():
                got, want = model(batch), up(batch)
                _maxdiff(f"export {name} forward", got, want)
                if model.gene_decoder is not None:
                    _maxdiff(f"export {name} decoder", model.decode(got), up.gene_decoder(want))
        back = tahoe_ft.load_checkpoint(out).model
        for k, v in model.state_dict().items():
            assert torch.equal(back.state_dict()[k], v), k
        var_dims = pickle.loads((out / "var_dims.pkl").read_bytes())
        assert {type(var_dims[k]) for k in ("input_dim", "output_dim", "pert_dim")} == {int}
        assert var_dims["gene_names"] == ours.manifest["gene_names"]
        kw = yaml.safe_load((out / "config.yaml").read_text())["data"]["kwargs"]
        assert (
            kw["pert_col"] == ours.manifest["pert_col"]
            and kw["control_pert"] == ours.manifest["control_pert"]
        )
    if ours.model.batch_encoder is not None:
        assert (out / "batch_onehot_map.torch").is_file()


def test_export_state_never_overwrites(finetuned, tmp_path, upstream_runs):
    from tahoe_ft.checkpoints.upstream_export import export_state
    from tahoe_ft.errors import UserError

    best = finetuned[0] / "checkpoints" / "best-val.pt"
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists.*never overwrites"):
        export_state(best, tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    with pytest.raises(UserError, match="tahoe-ft checkpoint"):
        export_state(upstream_runs["raw_all"] / "checkpoints" / "best.ckpt", tmp_path / "new")
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".new.tmp-*"))


def _infer_draws(adata, control: str, cell_type_col: str, pert_col: str, seed: int, s: int):
    """The windows and basal rows `state tx infer` (0.11.1, _infer.py) uses: cell types in sorted order, then
    perturbations in sorted order, windows of `s` cells in row order, basal cells drawn with replacement from
    the cell type's controls by one RandomState(seed)."""
    import numpy as np

    rng = np.random.RandomState(seed)
    pert = adata.obs[pert_col].astype(str).values
    group = adata.obs[cell_type_col].astype(str).values
    ctl = pert == control
    for g in np.unique(group):
        idx = np.flatnonzero(group == g)
        pool = np.flatnonzero((group == g) & ctl)
        pool = pool if len(pool) else np.flatnonzero(ctl)
        for p in np.unique(pert[idx]):
            rows = idx[pert[idx] == p]
            for a in range(0, len(rows), s):
                window = rows[a : a + s]
                yield p, window, rng.choice(pool, size=len(window), replace=True)


def test_state_tx_infer_on_exported_folder_matches_tahoe_ft_predict(finetuned, tmp_path):
    """`state tx infer --model-dir <exported>` and tahoe-ft's prediction agree on the same cells and basal
    draws to 1e-5; `tahoe-ft predict` on the exported folder equals it on the original checkpoint."""
    import subprocess

    import anndata as ad
    import numpy as np

    import tahoe_ft
    from tahoe_ft.checkpoints.upstream_export import export_state
    from tahoe_ft.config import PredictConfig
    from tahoe_ft.prediction import PRED_MAX, predict_sets
    from upstream_run import state_cli

    run_dir = finetuned[0]
    best = run_dir / "checkpoints" / "best-val.pt"
    folder = export_state(best, tmp_path / "exported")
    loaded = tahoe_ft.load_checkpoint(best)
    ours, m = loaded.model, loaded.manifest

    # tahoe-ft predict: the exported folder (split from its split.toml) == the original checkpoint
    cfg = PredictConfig(ckpt=str(best), run_dir=str(tmp_path / "a"), device="cpu")
    a = ad.read_h5ad(tahoe_ft.predict(cfg) / "pred.h5ad")
    cfg = PredictConfig(ckpt=str(folder), run_dir=str(tmp_path / "b"), device="cpu")
    b = ad.read_h5ad(tahoe_ft.predict(cfg) / "pred.h5ad")
    assert a.obs.equals(b.obs) and list(a.var_names) == list(b.var_names)
    _maxdiff("predict exported folder vs tahoe-ft checkpoint", torch.from_numpy(b.X), torch.from_numpy(a.X))

    # state tx infer on the held-out test cells and the controls of the screen
    screen = ad.read_h5ad(m["data_paths"][0])
    test_perts = {e["pert"] for e in m["held_out"] if e["split"] == "test"}
    keep = screen.obs[m["pert_col"]].astype(str).isin(test_perts | {m["control_pert"]}).values
    cells = screen[keep].copy()
    cells.X = _dense(cells.X)
    cells.write_h5ad(tmp_path / "cells.h5ad")
    cmd = [
        str(state_cli()), "tx", "infer", "--model-dir", str(folder), "--adata", str(tmp_path / "cells.h5ad"),
        "--pert-col", m["pert_col"], "--seed", "7", "--output", str(tmp_path / "inferred.h5ad"), "--quiet",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    inferred = _dense(ad.read_h5ad(tmp_path / "inferred.h5ad").X)

    index = {p: i for i, p in enumerate(m["pert_names"])}
    s = int(ours.hparams["cell_set_len"])
    got = np.full_like(inferred, np.nan)
    n_test = 0
    for p, window, basal in _infer_draws(cells, m["control_pert"], m["cell_type_col"], m["pert_col"], 7, s):
        y = predict_sets(ours, m["pert_matrix"][index[p]], cells.X[basal], torch.device("cpu"))
        got[window] = np.clip(y, 0.0, PRED_MAX)
        n_test += len(window) if p != m["control_pert"] else 0
    assert n_test == int((cells.obs[m["pert_col"]].astype(str) != m["control_pert"]).sum()) > 0
    _maxdiff(
        "state tx infer vs tahoe-ft on the same draws", torch.from_numpy(got), torch.from_numpy(inferred)
    )


# -- crafted run-folder files: refused, and nothing they would do happens --------------------------------


class _Evil:
    """Unpickling this calls open(marker, "w"): creating the marker file is the proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _folder_copy(src, dst):
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("last.ckpt", "final.ckpt", "version_0"))
    return dst


@pytest.mark.parametrize("crafted", ["var_dims.pkl", "pert_onehot_map.pt", "checkpoints/best.ckpt"])
def test_crafted_run_folder_file_is_refused_and_runs_nothing(upstream_runs, tmp_path, crafted):
    import pickle

    import tahoe_ft
    from tahoe_ft.config import PredictConfig
    from tahoe_ft.errors import UserError

    folder = _folder_copy(upstream_runs["raw_all"], tmp_path / "run")
    marker = tmp_path / "pwned"
    evil = _Evil(marker)
    if crafted == "var_dims.pkl":
        (folder / crafted).write_bytes(pickle.dumps({"pert_dim": 9, "gene_names": evil}))
    elif crafted == "pert_onehot_map.pt":
        torch.save({"non-targeting": torch.ones(1), "x": evil}, folder / crafted)
    else:
        torch.save(
            {"state_dict": {"w": torch.zeros(1)}, "hyper_parameters": {"pert_dim": evil}}, folder / crafted
        )

    def predict(p):
        return tahoe_ft.predict(PredictConfig(ckpt=str(p), run_dir=str(tmp_path / "p")))

    for load in (tahoe_ft.load_checkpoint, predict):
        with pytest.raises(UserError, match="refused") as err:
            load(folder)
        assert "\n" not in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "target",
    [("os", "system"), ("posix", "system"), ("builtins", "open"), ("builtins", "eval"), ("builtins", "exec"),
     ("builtins", "getattr"), ("builtins", "__import__"), ("subprocess", "Popen"), ("numpy", "load"),
     ("numpy.testing._private.utils", "runstring"), ("torch", "load"), ("pickle", "loads")],
)  # fmt: skip
def test_safe_unpickler_refuses_callables(tmp_path, target):
    """A pickle that names any callable global is refused before the call (hand-written GLOBAL + REDUCE)."""
    import pickle

    from tahoe_ft.checkpoints.safe_pickle import read_pickle
    from tahoe_ft.errors import UserError

    module, name = target
    marker = tmp_path / "pwned"
    payload = (
        b"c" + f"{module}\n{name}\n".encode() + b"(" + pickle.dumps(str(marker), protocol=0)[:-1] + b"tR."
    )
    (tmp_path / "v.pkl").write_bytes(payload)
    with pytest.raises(UserError, match=f"needs {module}.{name} to unpickle, which is refused"):
        read_pickle(tmp_path / "v.pkl")
    assert not marker.exists()


def test_safe_unpickler_reads_plain_data_and_refuses_object_arrays(tmp_path):
    import pickle

    import numpy as np

    from tahoe_ft.checkpoints.safe_pickle import read_pickle
    from tahoe_ft.errors import UserError

    good = {
        "input_dim": np.int64(60), "x": np.float32(0.5), "flag": np.bool_(True), "name": np.str_("GENE1"),
        "arr": np.arange(6, dtype=">i4").reshape(2, 3), "f": np.asfortranarray(np.ones((2, 2))), "l": [1, "a", None],
    }  # fmt: skip
    for protocol in (2, 4, 5):
        (tmp_path / "g.pkl").write_bytes(pickle.dumps(good, protocol=protocol))
        got = read_pickle(tmp_path / "g.pkl")
        assert got["input_dim"] == 60 and type(got["input_dim"]) is int and got["name"] == "GENE1"
        assert np.array_equal(got["arr"], good["arr"]) and np.array_equal(got["f"], good["f"])
        assert got["l"] == [1, "a", None] and got["flag"] is True
    for bad in (
        np.array([1, "a"], dtype=object),
        np.zeros(2, dtype=[("a", "O")]),
        np.zeros(2, dtype=[("a", "i4")]),
    ):
        (tmp_path / "b.pkl").write_bytes(pickle.dumps({"x": bad}))
        with pytest.raises(UserError, match="refused"):
            read_pickle(tmp_path / "b.pkl")
    # a string dtype whose pickled state adds fields and flags (numpy's own unpickling applies them)
    (tmp_path / "d.pkl").write_bytes(pickle.dumps({"x": _CraftedDtype()}))
    with pytest.raises(UserError, match="numpy dtype with fields"):
        read_pickle(tmp_path / "d.pkl")


class _CraftedDtype:
    def __reduce__(self):
        import numpy as np

        return (np.dtype, ("U2", False, True), (3, "<", None, ("a",), {"a": (np.dtype("i4"), 0)}, 8, 4, 0x3F))


def test_safe_unpickler_build_cannot_change_shared_objects(tmp_path):
    """BUILD with a slot state setattr()s on what GLOBAL returned: it only reaches a throwaway copy."""
    from tahoe_ft.checkpoints import safe_pickle as uf
    from tahoe_ft.errors import UserError

    before = (uf._Dtype.__setstate__, uf._scalar.__defaults__)
    payload = (
        b"\x80\x02cnumpy\ndtype\nN}U\x0c__setstate__U\x01xs\x86b0"  # setattr(dtype class, "__setstate__", "x")
        b"cnumpy._core.multiarray\nscalar\nN}U\x0c__defaults__K\x01\x85s\x86b0"  # scalar.__defaults__ = (1,)
        b"}."
    )
    (tmp_path / "v.pkl").write_bytes(payload)
    # BUILD on a class calls its own __setstate__ unbound: an error, and nothing shared changed
    with pytest.raises(UserError, match="not a pickle"):
        uf.read_pickle(tmp_path / "v.pkl")
    (tmp_path / "w.pkl").write_bytes(payload[payload.index(b"cnumpy._core") :])
    assert uf.read_pickle(tmp_path / "w.pkl") == {}
    assert (uf._Dtype.__setstate__, uf._scalar.__defaults__) == before


def test_tahoe_ft_eval_scores_state_tx_infer_output_with_the_panel(upstream_runs, screen, tmp_path):
    """`state tx infer` on a real `state tx train` folder's test cells, scored by `tahoe-ft eval` as files from
    elsewhere: the training cells are the screen minus the folder's split TOML's val/test perturbations
    (`train=<screen> split_toml=<its TOML>`), so the panel and the ceiling stand beside the prediction."""
    import json
    import math
    import os
    import subprocess
    import sys
    from pathlib import Path

    import anndata as ad
    from omegaconf import OmegaConf

    from tahoe_ft.data.inputs import parse_split_toml
    from upstream_run import state_cli

    folder = upstream_runs["raw_all"]
    kwargs = OmegaConf.load(folder / "config.yaml").data.kwargs
    toml, pert_col, control = str(kwargs.toml_config_path), str(kwargs.pert_col), str(kwargs.control_pert)
    cell_type_col = str(kwargs.cell_type_key)
    test = {p for table in parse_split_toml(toml).fewshot.values() for p in table["test"]}
    cells = ad.read_h5ad(screen)
    cells = cells[cells.obs[pert_col].astype(str).isin(test | {control}).to_numpy()].copy()
    cells.X = _dense(cells.X)
    cells.write_h5ad(tmp_path / "cells.h5ad")
    cmd = [
        str(state_cli()), "tx", "infer", "--model-dir", str(folder), "--adata", str(tmp_path / "cells.h5ad"),
        "--pert-col", pert_col, "--output", str(tmp_path / "inferred.h5ad"), "--quiet",
    ]  # fmt: skip
    # infer loads the folder's checkpoint with torch.load's default weights_only=True (torch >= 2.6), which
    # refuses the numpy scalars `state tx train` itself wrote into it: this test's own file, so let it load
    infer_env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=infer_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    env.pop("TAHOE_FT_DEBUG", None)
    args = [
        f"pred={tmp_path / 'inferred.h5ad'}", f"real={tmp_path / 'cells.h5ad'}", f"train={screen}",
        f"split_toml={toml}", f"pert_col={pert_col}", f"control_pert={control}", f"cell_type_col={cell_type_col}",
        f"runs_dir={tmp_path / 'runs'}", "num_threads=1",
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "tahoe_ft.cli", "eval", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    score = json.loads((tmp_path / "eval" / "score.json").read_text())
    assert {"control", "cell_mean", "linear", "ceiling"} <= set(score["baselines"]), score["baselines"].keys()
    assert math.isfinite(score["avg_score"]) and math.isfinite(score["baselines"]["ceiling"]["avg_score"])
    assert "split_toml=" in score["baseline_notes"]["training_cells"]
    assert proc.stdout.splitlines()[1].split()[0] == "inferred.h5ad"
