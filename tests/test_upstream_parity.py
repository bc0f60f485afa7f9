"""Parity with upstream's real `StateTransitionPerturbationModel` (arc-state 0.11.1, Llama, bidirectional).

Skipped unless the `state` package (arc-state) is importable. It is not a tahoe-ft dependency; to run:

    python3 -m venv /tmp/up && /tmp/up/bin/pip install torch arc-state==0.11.1 pytest
    PYTHONPATH=src /tmp/up/bin/python -m pytest tests/test_upstream_parity.py
"""

from __future__ import annotations

import pytest
import torch

upstream = pytest.importorskip("state.tx.models.state_transition")

from tahoe_ft.model import DROPPED_UPSTREAM_KEYS, StateTransitionModel  # noqa: E402
from tahoe_ft.upstream import translate_hparams  # noqa: E402

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
    ours = tahoe_ft.load_checkpoint(path)  # weights-only load; OmegaConf hparams allow-listed
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
    from tahoe_ft.checkpoint import read_weights
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
def upstream_run(tmp_path_factory):
    from upstream_run import state_cli, state_tx_train

    if state_cli() is None:
        pytest.skip("the `state` CLI (arc-state) is not installed")
    return state_tx_train(tmp_path_factory.mktemp("state_tx_train"))


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
    ours = tahoe_ft.load_checkpoint(ckpt)
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
    from tahoe_ft.checkpoint import read_weights
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

    from tahoe_ft.checkpoint import safe_load
    from tahoe_ft.errors import UserError

    path = tmp_path / "obj.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": np.dtype("O"), "n": np.int64(1)}}, path)
    with pytest.raises(UserError, match="refused"):
        safe_load(path)
