from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

from tahoe_ft.errors import UserError
from tahoe_ft.model.st import (
    DROPPED_UPSTREAM_KEYS,
    MODULE_GROUPS,
    HparamsError,
    LatentToGeneDecoder,
    StateTransitionModel,
    build_mlp,
    module_of,
)

D, P, H, G, S = 40, 12, 48, 30, 8  # input/output dim, pert dim, hidden, genes, cell_set_len


def tiny_hparams(**overrides) -> dict:
    """A tahoe_best-like config (4/4 MLP layers, llama, X_state + gene decoder), scaled down."""
    hp = {
        "input_dim": D,
        "output_dim": D,
        "pert_dim": P,
        "hidden_dim": H,
        "gene_dim": G,
        "batch_dim": None,
        "n_encoder_layers": 4,
        "n_decoder_layers": 4,
        "dropout": 0.1,
        "activation": "gelu",
        "predict_residual": True,
        "use_basal_projection": True,
        "output_space": "all",
        "embed_key": "X_state",
        "cell_set_len": S,
        "transformer_backbone_key": "llama",
        "transformer_backbone_kwargs": {
            "hidden_size": H,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "head_dim": 12,
            "intermediate_size": 96,
            "rms_norm_eps": 1e-6,
            "attention_dropout": 0.0,
            "bidirectional_attention": True,
            # upstream yaml keys that are not Llama fields: ignored
            "rotary_dim": 0,
            "use_rotary_embeddings": False,
            "layer_norm_eps": 1e-6,
            "n_positions": S,
            "max_position_embeddings": S,
            "use_cache": False,
            "hidden_dropout": 0.0,
        },
        "decoder_cfg": {
            "latent_dim": D,
            "gene_dim": G,
            "hidden_dims": [32, 32, 16],
            "dropout": 0.1,
            "residual_decoder": False,
        },
        "batch_encoder": False,
    }
    hp.update(overrides)
    return hp


def make_model(seed: int = 0, **overrides) -> StateTransitionModel:
    torch.manual_seed(seed)
    return StateTransitionModel(tiny_hparams(**overrides)).eval()


def inputs(B: int = 2, n: int = S, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pert = torch.zeros(B, n, P)
    pert[:, :, 3] = 1.0
    basal = torch.randn(B, n, D, generator=g)
    return pert, basal


def mlp_keys(prefix: str, n_layers: int) -> list[str]:
    return [f"{prefix}.{3 * i}.{w}" for i in range(n_layers) for w in ("weight", "bias")]


def llama_layer_keys(i: int) -> list[str]:
    p = f"transformer_backbone.layers.{i}"
    return [
        f"{p}.self_attn.q_proj.weight",
        f"{p}.self_attn.k_proj.weight",
        f"{p}.self_attn.v_proj.weight",
        f"{p}.self_attn.o_proj.weight",
        f"{p}.mlp.gate_proj.weight",
        f"{p}.mlp.up_proj.weight",
        f"{p}.mlp.down_proj.weight",
        f"{p}.input_layernorm.weight",
        f"{p}.post_attention_layernorm.weight",
    ]


# Upstream state_dict keys (reference §1.3 / §10), in upstream order, minus the dropped embed_tokens.
EXPECTED_KEYS = (
    [f"gene_decoder.decoder.{i}.{w}" for i in (0, 1, 4, 5, 8, 9, 12) for w in ("weight", "bias")]
    + mlp_keys("pert_encoder", 4)
    + mlp_keys("basal_encoder", 4)
    + llama_layer_keys(0)
    + llama_layer_keys(1)
    + ["transformer_backbone.norm.weight"]
    + mlp_keys("project_out", 4)
    + [
        "final_down_then_up.0.weight",
        "final_down_then_up.0.bias",
        "final_down_then_up.2.weight",
        "final_down_then_up.2.bias",
    ]
)


# ---------------------------------------------------------------------------------------------------
# parameter names and shapes


def test_state_dict_keys_match_upstream_names_and_order():
    sd = make_model().state_dict()
    assert list(sd) == EXPECTED_KEYS
    assert DROPPED_UPSTREAM_KEYS == ("transformer_backbone.embed_tokens.weight",)
    assert not any(k.startswith("transformer_backbone.embed_tokens") for k in sd)


def test_state_dict_shapes():
    sd = make_model().state_dict()
    heads, kv, hd, ffn = 4, 4, 12, 96
    expected = {
        "gene_decoder.decoder.0.weight": (32, D),
        "gene_decoder.decoder.1.weight": (32,),  # LayerNorm
        "gene_decoder.decoder.8.weight": (16, 32),
        "gene_decoder.decoder.12.weight": (G, 16),
        "gene_decoder.decoder.12.bias": (G,),
        "pert_encoder.0.weight": (H, P),
        "pert_encoder.3.weight": (H, H),
        "pert_encoder.9.weight": (H, H),
        "basal_encoder.0.weight": (H, D),
        "transformer_backbone.layers.0.self_attn.q_proj.weight": (heads * hd, H),
        "transformer_backbone.layers.0.self_attn.k_proj.weight": (kv * hd, H),
        "transformer_backbone.layers.0.self_attn.v_proj.weight": (kv * hd, H),
        "transformer_backbone.layers.0.self_attn.o_proj.weight": (H, heads * hd),
        "transformer_backbone.layers.1.mlp.gate_proj.weight": (ffn, H),
        "transformer_backbone.layers.1.mlp.up_proj.weight": (ffn, H),
        "transformer_backbone.layers.1.mlp.down_proj.weight": (H, ffn),
        "transformer_backbone.layers.1.input_layernorm.weight": (H,),
        "transformer_backbone.norm.weight": (H,),
        "project_out.0.weight": (H, H),
        "project_out.9.weight": (D, H),
        "project_out.9.bias": (D,),
        "final_down_then_up.0.weight": (D // 8, D),
        "final_down_then_up.2.weight": (D, D // 8),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    # no biases in the backbone, RMSNorm weights start at one
    assert not any(k.startswith("transformer_backbone") and k.endswith(".bias") for k in sd)
    assert torch.equal(sd["transformer_backbone.norm.weight"], torch.ones(H))


def test_tahoe_best_parameter_count_matches_upstream():
    """Upstream tahoe_best: 146,193,114 trainable parameters (= all but the frozen 32000x1440 embed_tokens)."""
    hp = tiny_hparams(
        input_dim=2058,
        output_dim=2058,
        pert_dim=5120,
        hidden_dim=1440,
        gene_dim=2000,
        cell_set_len=512,
        output_space="embedding",
        transformer_backbone_kwargs={
            "hidden_size": 1440,
            "num_hidden_layers": 4,
            "num_attention_heads": 12,
            "head_dim": 120,
            "intermediate_size": 4416,
            "bidirectional_attention": True,
        },
        decoder_cfg={
            "latent_dim": 2058,
            "gene_dim": 2000,
            "hidden_dims": [1024, 1024, 512],
            "dropout": 0.1,
            "residual_decoder": False,
        },
    )
    with torch.device("meta"):
        model = StateTransitionModel(hp)
    assert model.num_params() == 146_193_114
    assert model.num_params() + 32000 * 1440 == 192_273_114


def test_optional_modules_and_variants():
    sd = make_model(
        use_basal_projection=False, output_space="gene", decoder_cfg=None, batch_encoder=True, batch_dim=5
    ).state_dict()
    assert "basal_encoder.weight" in sd and tuple(sd["basal_encoder.weight"].shape) == (H, D)
    assert not any(k.startswith(("final_down_then_up", "gene_decoder")) for k in sd)
    assert tuple(sd["batch_encoder.weight"].shape) == (5, H)
    assert list(sd)[-1] == "batch_encoder.weight"
    # batch_encoder without batch_dim: no encoder (as upstream)
    assert "batch_encoder.weight" not in make_model(batch_encoder=True, batch_dim=None).state_dict()
    # residual decoder layout
    res = make_model(
        decoder_cfg={"latent_dim": D, "gene_dim": G, "hidden_dims": [32, 32, 16], "residual_decoder": True}
    ).state_dict()
    dec = [k for k in res if k.startswith("gene_decoder")]
    assert dec == [
        f"gene_decoder.blocks.{i}.{j}.{w}" for i in range(3) for j in (0, 1) for w in ("weight", "bias")
    ] + ["gene_decoder.final_layer.0.weight", "gene_decoder.final_layer.0.bias"]
    # one-layer MLPs: Sequential(Linear)
    one = make_model(n_encoder_layers=1, n_decoder_layers=1).state_dict()
    assert [k for k in one if k.startswith("pert_encoder")] == [
        "pert_encoder.0.weight",
        "pert_encoder.0.bias",
    ]
    # grouped-query attention shapes
    gqa = make_model(
        transformer_backbone_kwargs={
            "hidden_size": H,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 64,
        }
    ).state_dict()
    assert tuple(gqa["transformer_backbone.layers.0.self_attn.q_proj.weight"].shape) == (48, H)  # head_dim 12
    assert tuple(gqa["transformer_backbone.layers.0.self_attn.k_proj.weight"].shape) == (24, H)


def test_build_mlp_layout():
    mlp = build_mlp(5, 7, 11, 3, dropout=0.2, activation=nn.ReLU)
    kinds = [type(m).__name__ for m in mlp]
    assert kinds == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert (mlp[0].in_features, mlp[0].out_features, mlp[6].out_features) == (5, 11, 7)
    assert mlp[2].p == 0.2
    assert [type(m).__name__ for m in build_mlp(5, 7, 11, 1)] == ["Linear"]


def test_module_groups():
    # every optional group present
    model = make_model(batch_encoder=True, batch_dim=3, aux_dim=4, head_skip=True, feature_prior=2)
    groups = {module_of(k) for k in model.state_dict()}
    assert groups == set(MODULE_GROUPS)
    assert module_of("transformer_backbone.layers.0.mlp.up_proj.weight") == "transformer_backbone"


# ---------------------------------------------------------------------------------------------------
# hparams


def test_hparams_stored_complete_and_plain():
    hp = tiny_hparams()
    del hp["use_basal_projection"], hp["dropout"], hp["activation"], hp["batch_encoder"], hp["batch_dim"]
    model = StateTransitionModel(hp)
    assert model.hparams["use_basal_projection"] is True  # upstream default when absent
    assert model.hparams["dropout"] == 0.1 and model.hparams["activation"] == "gelu"
    assert model.hparams["decoder_cfg"]["residual_decoder"] is False
    hp["transformer_backbone_kwargs"]["hidden_size"] = 999  # the model holds a deep copy
    assert model.hparams["transformer_backbone_kwargs"]["hidden_size"] == H
    rebuilt = StateTransitionModel(copy.deepcopy(model.hparams))
    assert list(rebuilt.state_dict()) == list(model.state_dict())
    assert rebuilt.load_state_dict(model.state_dict(), strict=True)


def test_hparams_errors():
    hp = tiny_hparams()
    del hp["cell_set_len"]
    with pytest.raises(KeyError, match="cell_set_len") as exc:
        StateTransitionModel(hp)
    assert isinstance(exc.value, ValueError) and isinstance(exc.value, UserError)
    assert str(exc.value).startswith("model hparams are missing")
    with pytest.raises(ValueError, match="only 'llama'"):
        StateTransitionModel(tiny_hparams(transformer_backbone_key="GPT2"))
    assert StateTransitionModel(tiny_hparams(transformer_backbone_key="Llama")) is not None
    kw = dict(tiny_hparams()["transformer_backbone_kwargs"], bidirectional_attention=False)
    with pytest.raises(ValueError, match="bidirectional_attention"):
        StateTransitionModel(tiny_hparams(transformer_backbone_kwargs=kw))
    kw = dict(tiny_hparams()["transformer_backbone_kwargs"], hidden_size=64)
    with pytest.raises(HparamsError, match="hidden_size"):
        StateTransitionModel(tiny_hparams(transformer_backbone_kwargs=kw))
    kw = dict(tiny_hparams()["transformer_backbone_kwargs"])
    del kw["intermediate_size"]
    with pytest.raises(KeyError, match="intermediate_size"):
        StateTransitionModel(tiny_hparams(transformer_backbone_kwargs=kw))
    with pytest.raises(HparamsError, match="unknown model hparams"):
        StateTransitionModel(tiny_hparams(n_encoder_layer=3))
    with pytest.raises(HparamsError, match="output_space"):
        StateTransitionModel(tiny_hparams(output_space="latent"))
    with pytest.raises(HparamsError, match="input_dim"):
        StateTransitionModel(tiny_hparams(output_dim=D + 1))  # 'all' + residual adds basal to the output
    with pytest.raises(HparamsError, match="hidden_dims"):
        StateTransitionModel(
            tiny_hparams(
                decoder_cfg={
                    "latent_dim": D,
                    "gene_dim": G,
                    "hidden_dims": [32, 16],
                    "residual_decoder": True,
                }
            )
        )


# ---------------------------------------------------------------------------------------------------
# forward semantics


def test_attention_is_bidirectional():
    model = make_model().double()  # float64: a causal model would give a difference of exactly 0
    pert, basal = inputs(B=1)
    pert, basal = pert.double(), basal.double()
    with torch.no_grad():
        out = model.forward_sets(pert, basal)
        basal2 = basal.clone()
        basal2[0, -1] += 3.0  # change the LAST cell
        out2 = model.forward_sets(pert, basal2)
    assert out.shape == (1, S, D)
    assert (out[0, 0] - out2[0, 0]).abs().max() > 1e-8  # cell 0 sees the last cell
    assert (out[0, 1:-1] - out2[0, 1:-1]).abs().amax(-1).min() > 1e-8  # and so does every other cell


def test_permutation_equivariance():
    model = make_model()
    pert, basal = inputs(B=2)
    pert[:, :, 5] = torch.rand(2, S)  # make pert rows differ per cell too
    perm = torch.randperm(S, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model.forward_sets(pert, basal)
        out_p = model.forward_sets(pert[:, perm], basal[:, perm])
    torch.testing.assert_close(out_p, out[:, perm], rtol=1e-5, atol=1e-5)
    # sets do not interact
    with torch.no_grad():
        alone = model.forward_sets(pert[1:], basal[1:])
    torch.testing.assert_close(alone, out[1:], rtol=1e-5, atol=1e-5)


def test_flat_and_set_inputs_agree_and_unpadded_sets():
    model = make_model()
    pert, basal = inputs(B=3)
    with torch.no_grad():
        sets = model.forward_sets(pert, basal)
        flat = model({"pert_emb": pert.reshape(-1, P), "ctrl_cell_emb": basal.reshape(-1, D)})
        shaped = model({"pert_emb": pert, "ctrl_cell_emb": basal})
    assert flat.shape == (3 * S, D)
    torch.testing.assert_close(flat, sets.reshape(-1, D))
    torch.testing.assert_close(shaped, flat)
    # one variable-length set, shorter than cell_set_len
    n = 5
    with torch.no_grad():
        short = model({"pert_emb": pert[0, :n], "ctrl_cell_emb": basal[0, :n]}, padded=False)
        ref = model.forward_sets(pert[:1, :n], basal[:1, :n])
    assert short.shape == (n, D)
    torch.testing.assert_close(short, ref.reshape(n, D))
    with pytest.raises(ValueError, match="multiple of cell_set_len"):
        model({"pert_emb": pert[0, :n], "ctrl_cell_emb": basal[0, :n]})
    with pytest.raises(ValueError, match=r"expected \[\.\.\., 12\]"):
        model({"pert_emb": pert[..., :6], "ctrl_cell_emb": basal})


def test_batch_encoder_accepts_indices_and_one_hot():
    model = make_model(batch_encoder=True, batch_dim=S)  # batch_dim == S: int [B,S] must not look one-hot
    pert, basal = inputs(B=2)
    idx = torch.randint(0, S, (2, S), generator=torch.Generator().manual_seed(5))
    one_hot = torch.nn.functional.one_hot(idx, S).float()
    with torch.no_grad():
        a = model({"pert_emb": pert, "ctrl_cell_emb": basal, "batch": idx})
        b = model(
            {
                "pert_emb": pert.reshape(-1, P),
                "ctrl_cell_emb": basal.reshape(-1, D),
                "batch": one_hot.reshape(-1, S),
            }
        )
        c = model({"pert_emb": pert, "ctrl_cell_emb": basal, "batch": idx.reshape(-1)})
        d = model({"pert_emb": pert, "ctrl_cell_emb": basal, "batch": (idx + 1) % S})
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    assert (a - d).abs().max() > 1e-4
    with pytest.raises(ValueError, match="batch_encoder"):
        model({"pert_emb": pert, "ctrl_cell_emb": basal})


def test_relu_rule():
    pert, basal = inputs(B=2)
    basal = basal - 2.0  # push outputs negative
    cases = [
        (dict(output_space="all", embed_key=None), True),
        (dict(output_space="gene", embed_key="X_hvg"), True),
        (dict(output_space="embedding", embed_key="X_state", decoder_cfg=None), True),  # no decoder -> ReLU
        (dict(output_space="embedding", embed_key="X_state"), False),
        (dict(output_space="all", embed_key="X_state"), False),
    ]
    for overrides, relu in cases:
        model = make_model(**overrides)
        with torch.no_grad():
            out = model({"pert_emb": pert, "ctrl_cell_emb": basal})
        assert model.apply_relu is relu, overrides
        if relu:
            assert out.min() >= 0, overrides
        else:
            assert out.min() < 0, overrides


def test_residual_paths():
    """predict_residual False: project_out(h) only, so zeroing project_out gives zero (then ReLU) output."""
    model = make_model(output_space="embedding", predict_residual=False)
    pert, basal = inputs(B=1)
    with torch.no_grad():
        model.project_out[9].weight.zero_()
        model.project_out[9].bias.fill_(-0.5)
        out = model.forward_sets(pert, basal)
    torch.testing.assert_close(out, torch.full_like(out, -0.5))
    # output_space 'all': final_down_then_up(project_out(h) + basal)
    model = make_model()
    with torch.no_grad():
        for p in model.project_out[9].parameters():
            p.zero_()
        out = model.forward_sets(pert, basal)
        torch.testing.assert_close(out, model.final_down_then_up(basal))


def test_decode():
    model = make_model()
    latent = torch.randn(2, S, D)
    with torch.no_grad():
        genes = model.decode(latent)
    assert genes.shape == (2, S, G) and genes.min() >= 0
    with pytest.raises(ValueError, match="no gene decoder"):
        make_model(decoder_cfg=None).decode(latent)


def test_residual_decoder_semantics():
    torch.manual_seed(0)
    dec = LatentToGeneDecoder(6, 4, hidden_dims=[5, 5, 3, 3], dropout=0.0, residual_decoder=True).eval()
    x = torch.randn(7, 6)
    b = dec.blocks
    o0 = b[0](x)
    o1 = b[1](o0) + o0
    o2 = b[2](o1)
    o3 = b[3](o2) + o2
    torch.testing.assert_close(dec(x), dec.final_layer(o3))


def _naive_backbone(
    backbone: nn.Module, x: torch.Tensor, heads: int, kv_heads: int, head_dim: int, eps: float
) -> torch.Tensor:
    """Reference Llama stack: explicit softmax(QK^T / sqrt(d)) V, no mask, no RoPE, float64."""

    def rms(v, w):  # computed in float32 and cast back, as HF LlamaRMSNorm
        v32 = v.float()
        return w * (v32 * torch.rsqrt(v32.pow(2).mean(-1, keepdim=True) + eps)).to(v.dtype)

    B, n, _ = x.shape
    for layer in backbone.layers:
        a, m = layer.self_attn, layer.mlp
        hx = rms(x, layer.input_layernorm.weight)
        q = (hx @ a.q_proj.weight.T).view(B, n, heads, head_dim)
        k = (hx @ a.k_proj.weight.T).view(B, n, kv_heads, head_dim)
        v = (hx @ a.v_proj.weight.T).view(B, n, kv_heads, head_dim)
        outs = []
        for h in range(heads):
            kh = h // (heads // kv_heads)
            scores = q[:, :, h] @ k[:, :, kh].transpose(1, 2) / math.sqrt(head_dim)  # [B,n,n]
            outs.append(torch.softmax(scores, -1) @ v[:, :, kh])
        x = x + torch.cat(outs, -1) @ a.o_proj.weight.T
        hx = rms(x, layer.post_attention_layernorm.weight)
        gate = hx @ m.gate_proj.weight.T
        x = x + (gate * torch.sigmoid(gate) * (hx @ m.up_proj.weight.T)) @ m.down_proj.weight.T
    return rms(x, backbone.norm.weight)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 12), (4, 2, 12), (6, 3, 10)])
def test_attention_matches_naive_reference(heads, kv_heads, head_dim):
    kw = {
        "hidden_size": H,
        "num_hidden_layers": 2,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "intermediate_size": 64,
        "rms_norm_eps": 1e-5,
    }
    model = make_model(transformer_backbone_kwargs=kw).double()
    with torch.no_grad():  # non-trivial norm weights
        for name, p in model.transformer_backbone.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    x = torch.randn(2, 7, H, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ours = model.transformer_backbone(x)
        ref = _naive_backbone(model.transformer_backbone, x, heads, kv_heads, head_dim, 1e-5)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_matches_hf_llama_without_rope():
    """If `transformers` is installed: our backbone == HF LlamaModel with RoPE disabled and no causal mask."""
    transformers = pytest.importorskip("transformers")
    kw = {
        "hidden_size": H,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 12,
        "intermediate_size": 64,
    }
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**kw, vocab_size=16)
    cfg._attn_implementation = "eager"
    hf = transformers.LlamaModel(cfg).eval()

    class NoRoPE(nn.Module):
        def forward(self, x, position_ids=None, *args, **kwargs):
            B, n = x.shape[:2]
            return x.new_ones(B, n, cfg.head_dim), x.new_zeros(B, n, cfg.head_dim)

    hf.rotary_emb = NoRoPE()
    for layer in hf.layers:
        layer.self_attn.is_causal = False
    ours = make_model(transformer_backbone_kwargs=kw).transformer_backbone
    sd = {k: v for k, v in hf.state_dict().items() if not k.startswith("embed_tokens")}
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(2, 7, H, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = hf(inputs_embeds=x, attention_mask=torch.ones(2, 1, 7, 7)).last_hidden_state
        got = ours(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fresh_head_with_skip_predicts_the_basal_cells_at_step_0():
    """head_skip: a freshly initialised gene-space head is "no change"; without it, upstream's D/8 bottleneck
    head is far from it. One optimizer step moves the prediction off the basal cells (it still learns)."""
    hp = {"input_dim": 80, "output_dim": 80, "pert_dim": 5, "hidden_dim": 16, "n_encoder_layers": 2,
          "n_decoder_layers": 2, "predict_residual": True, "output_space": "all", "embed_key": None,
          "cell_set_len": 4, "transformer_backbone_key": "llama",
          "transformer_backbone_kwargs": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                                          "head_dim": 8, "intermediate_size": 32}}  # fmt: skip
    torch.manual_seed(0)
    pert = torch.eye(5)[torch.randint(0, 5, (3,))][:, None].expand(3, 4, 5)
    basal = torch.rand(3, 4, 80) * 3
    skip = StateTransitionModel({**hp, "head_skip": True}).eval()
    torch.testing.assert_close(skip.forward_sets(pert, basal), basal, rtol=0, atol=0)
    plain = StateTransitionModel(hp).eval()
    assert (plain.forward_sets(pert, basal) - basal).abs().mean() > 0.5
    opt = torch.optim.SGD(skip.parameters(), lr=0.1)
    skip.train()
    ((skip.forward_sets(pert, basal) - basal - 1.0) ** 2).mean().backward()
    opt.step()
    assert (skip.eval().forward_sets(pert, basal) - basal).abs().mean() > 1e-3


def _energy_from_differences(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The textbook formula: every distance from the explicit difference x_i - y_j (geomloss's 1e-8 clamp)."""

    def mean_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a[:, :, None, :] - b[:, None, :, :]).pow(2).sum(-1).clamp_min(1e-8).sqrt().mean((1, 2))

    return mean_dist(x, y) - 0.5 * mean_dist(x, x) - 0.5 * mean_dist(y, y)


@pytest.mark.parametrize("seed", [0, 1])
def test_energy_loss_matches_the_straightforward_formula_at_gene_width(seed):
    """The training loss (squared norms summed once, the self terms' doubled gradient taken on the set means)
    at a gene-space width with log1p-like sparse cells. Tolerances: float64 agrees with the explicit-difference
    formula to 1e-10; float32 agrees with it to 1e-4 relative in the loss and in the gradients' norm (float32
    round-off of |a|^2 - 2<a,b> + |b|^2, geomloss's too), and with geomloss in float32 to 1e-5 (its own
    arithmetic, summed in another order) and 5e-5 in the gradients."""
    from tahoe_ft.model.loss import energy_distance

    geomloss = pytest.importorskip("geomloss")
    g = torch.Generator().manual_seed(seed)

    def cells(*shape: int) -> torch.Tensor:
        counts = torch.poisson(torch.full(shape, 2.0), generator=g)
        return torch.log1p(1 + counts) * (torch.rand(shape, generator=g) < 0.1)

    x0, y0 = cells(3, 24, 2000), cells(3, 20, 2000)

    def loss_and_grads(fn, dtype):
        x = x0.to(dtype, copy=True).requires_grad_()  # a fresh leaf per call: no gradient accumulates
        y = y0.to(dtype, copy=True).requires_grad_()
        loss = fn(x, y)
        loss.sum().backward()
        return loss.detach().double(), x.grad.double(), y.grad.double()

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    exact = loss_and_grads(_energy_from_differences, torch.float64)
    ours64 = loss_and_grads(energy_distance, torch.float64)
    for got, want in zip(ours64, exact, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    ours = loss_and_grads(energy_distance, torch.float32)
    torch.testing.assert_close(ours[0], exact[0], rtol=1e-4, atol=0.0)
    assert rel(ours[1], exact[1]) < 1e-4 and rel(ours[2], exact[2]) < 1e-4
    theirs = loss_and_grads(geomloss.SamplesLoss("energy"), torch.float32)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=0.0)
    assert rel(ours[1], theirs[1]) < 5e-5 and rel(ours[2], theirs[2]) < 5e-5
    assert ours[1].abs().sum() > 0 and ours[2].abs().sum() > 0
