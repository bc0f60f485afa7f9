"""The State Transition (ST) perturbation model, reimplemented without `transformers` or Lightning.

One file on purpose (~520 lines): like nanoGPT's model.py it reads top to bottom, from RMSNorm through the
backbone, the MLPs and the gene decoder to the model, with upstream's parameter names at every layer; splitting
it would scatter the one function the parity tests pin against upstream. What it is built from (the hparams
dict: every model option, its default and its checks) is `model/hparams.py`.

Computes the same function as upstream `state.tx.models.state_transition.StateTransitionPerturbationModel`
with the Llama backbone in bidirectional mode (0.9.x on transformers <= 4.52, or 0.11.x with
`bidirectional_attention: true`), and uses exactly upstream's parameter names and shapes, so an
upstream `state_dict` loads with `strict=True` after dropping `DROPPED_UPSTREAM_KEYS`.

One set ("cell sentence") of S cells goes through the model at a time, B sets per batch:

    pert  [B,S,P]    --pert_encoder-->  [B,S,H] --+
    basal [B,S,D_in] --basal_encoder--> [B,S,H] --+--(+ batch_encoder(idx))--> seq [B,S,H]
    h = transformer_backbone(seq)                                               h   [B,S,H]
    out = x + final_down_then_up(x), x = project_out(h) + basal   if head_skip (tahoe-ft only)
        = final_down_then_up(project_out(h) + basal)   elif predict_residual and output_space == "all"
        = project_out(h + basal_encoded)               elif predict_residual
        = project_out(h)                               otherwise                   [B,S,D_out]
    out = relu(out)   iff embed_key in (None, "X_hvg") or there is no gene_decoder

The backbone is a Llama decoder stack with no positional encoding (no RoPE, no token or position
embeddings) and full bidirectional attention, so the model is permutation-equivariant over the cells
of a set. Upstream also creates `transformer_backbone.embed_tokens.weight` ([32000, H], zeroed and
frozen, never used because the backbone is fed `inputs_embeds`); we do not create it, and the
checkpoint importer drops it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from tahoe_ft.model.hparams import (
    ACTIVATIONS,
    HparamsError,
    LlamaConfig,
    MissingHparamError,
    resolve_hparams,
)

# Top-level parameter groups, in upstream state_dict order.
MODULE_GROUPS = (
    "gene_decoder",
    "pert_encoder",
    "basal_encoder",
    "transformer_backbone",
    "project_out",
    "final_down_then_up",
    "batch_encoder",
    "aux_head",
    "feature_prior",
)

# Upstream keys that we deliberately do not create (zeroed, frozen, unused by the forward pass).
DROPPED_UPSTREAM_KEYS = ("transformer_backbone.embed_tokens.weight",)


def module_of(param_name: str) -> str:
    """The top-level module a parameter belongs to: `"pert_encoder.0.weight"` -> `"pert_encoder"`."""
    return param_name.split(".", 1)[0]


# -----------------------------------------------------------------------------------------------------
# bidirectional Llama backbone (HF Llama naming, no RoPE, no embeddings, no mask; sizes: `LlamaConfig`)


class RMSNorm(nn.Module):
    """Llama RMSNorm: normalise in float32, cast back, then scale."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class SelfAttention(nn.Module):
    """Bidirectional grouped-query attention without positional encoding and without a mask."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.dropout = cfg.attention_dropout
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)  # [B,nh,S,hd]
        k = self.k_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B,nkv,S,hd]
        v = self.v_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B,nkv,S,hd]
        rep = self.n_heads // self.n_kv_heads
        if rep > 1:  # query head i uses kv head i // rep (HF repeat_kv)
            k = k.repeat_interleave(rep, dim=1)  # [B,nh,S,hd]
            v = v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=False,
            scale=self.head_dim**-0.5,
        )  # [B,nh,S,hd]
        y = y.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim)  # [B,S,nh*hd]
        return self.o_proj(y)  # [B,S,H]


class GatedMLP(nn.Module):
    """Llama MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm residual block, as HF `LlamaDecoderLayer`."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.self_attn = SelfAttention(cfg)
        self.mlp = GatedMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class LlamaBidirectional(nn.Module):
    """HF `LlamaModel` fed with `inputs_embeds`, with RoPE removed and no causal mask.

    Parameter names match HF (`layers.{i}.self_attn.q_proj.weight`, ..., `norm.weight`), except that
    the unused `embed_tokens` table is not created.
    """

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        for m in self.modules():  # HF LlamaPreTrainedModel init for Linear layers
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0.0, std=cfg.initializer_range)

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """[B,S,H] -> final normed hidden states [B,S,H]."""
        x = inputs_embeds
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


# -----------------------------------------------------------------------------------------------------
# the encoders' and heads' MLP, and the gene decoder


def build_mlp(
    in_dim: int,
    out_dim: int,
    hidden_dim: int,
    n_layers: int,
    dropout: float = 0.1,
    activation: type[nn.Module] = nn.GELU,
) -> nn.Sequential:
    """Upstream's MLP: Linear layers at indices 0, 3, 6, ... separated by (activation, dropout).

    n_layers == 1: `Sequential(Linear(in, out))`; otherwise
    `[Linear(in,h), Act, Dropout] + (n-2) * [Linear(h,h), Act, Dropout] + [Linear(h,out)]`.
    """
    if n_layers == 1:
        return nn.Sequential(nn.Linear(in_dim, out_dim))
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), activation(), nn.Dropout(dropout)]
    for _ in range(n_layers - 2):
        layers += [nn.Linear(hidden_dim, hidden_dim), activation(), nn.Dropout(dropout)]
    layers.append(nn.Linear(hidden_dim, out_dim))
    return nn.Sequential(*layers)


class LatentToGeneDecoder(nn.Module):
    """Maps latent cells [..., latent_dim] to non-negative gene expression [..., gene_dim] (upstream layout).

    Non-residual: `decoder = Sequential(Linear, LayerNorm, GELU, Dropout, ..., Linear(->gene_dim), ReLU)`.
    Residual: `blocks[i] = Sequential(Linear, LayerNorm, GELU, Dropout)`, `final_layer = Sequential(Linear, ReLU)`;
    every odd block i adds the output of block i-1 (which is also its input) to its own output.
    """

    def __init__(
        self,
        latent_dim: int,
        gene_dim: int,
        hidden_dims: Sequence[int] = (512, 1024),
        dropout: float = 0.1,
        residual_decoder: bool = False,
    ):
        super().__init__()
        self.residual_decoder = bool(residual_decoder)
        if self.residual_decoder:
            self.blocks = nn.ModuleList()
            d = latent_dim
            for h in hidden_dims:
                self.blocks.append(
                    nn.Sequential(nn.Linear(d, h), nn.LayerNorm(h), nn.GELU(), nn.Dropout(dropout))
                )
                d = h
            self.final_layer = nn.Sequential(nn.Linear(d, gene_dim), nn.ReLU())
        else:
            layers: list[nn.Module] = []
            d = latent_dim
            for h in hidden_dims:
                layers += [nn.Linear(d, h), nn.LayerNorm(h), nn.GELU(), nn.Dropout(dropout)]
                d = h
            layers += [nn.Linear(d, gene_dim), nn.ReLU()]
            self.decoder = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., latent_dim] -> [..., gene_dim]."""
        if not self.residual_decoder:
            return self.decoder(x)
        outputs: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            y = block(x)
            if i % 2 == 1:  # blocks 1, 3, 5, ... get a residual from blocks 0, 2, 4, ...
                y = y + outputs[i - 1]
            outputs.append(y)
            x = y
        return self.final_layer(x)


# -----------------------------------------------------------------------------------------------------
# the model


class TargetKnockdown(nn.Module):
    """Scales the target gene of each cell's perturbation: out[t] = log1p(r * expm1(out[t])), r = exp(log_ratio)
    learned (initialised from the training screen's median knock-down), other genes untouched. A perturbation
    whose target is not a measured gene (index -1) passes unchanged. Outputs are log1p expression."""

    def __init__(self, ratio: float):
        super().__init__()
        if not ratio > 0:
            raise HparamsError(f"target_knockdown={ratio} must be a ratio > 0")
        self.log_ratio = nn.Parameter(torch.tensor(math.log(ratio)))

    def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """out `[B,S,G]` log1p expression, target `[B,S]` gene columns (-1: none) -> `[B,S,G]`."""
        idx = target.clamp(min=0).unsqueeze(-1).long()  # [B,S,1]
        cur = out.gather(-1, idx).float()  # [B,S,1]
        scaled = torch.log1p(self.log_ratio.float().exp() * torch.expm1(cur.clamp(min=0)))
        new = torch.where((target >= 0).unsqueeze(-1), scaled, cur).to(out.dtype)
        return out.scatter(-1, idx, new)


class FeaturePrior(nn.Module):
    """A fixed linear map from a set's perturbation features and cell type to a gene-space effect:

        prior(p, c) = p @ weight + cell_type_bias[c]      p [B,P], c [B] -> [B,G]

    the feature ridge of the baseline panel (`evaluation.feature_ridge`, fitted on the training groups'
    pseudobulk deltas) with its standardisation folded in. Buffers, not parameters: the prior does not train,
    the rest of the model learns the residual. Row C of `cell_type_bias` serves a cell type the ridge never
    saw (no cell-type term: the training mean of the cell-type part)."""

    def __init__(self, pert_dim: int, n_cell_types: int, out_dim: int):
        super().__init__()
        self.register_buffer("weight", torch.zeros(pert_dim, out_dim))
        self.register_buffer("cell_type_bias", torch.zeros(n_cell_types + 1, out_dim))

    def forward(self, pert: torch.Tensor, cell_type: torch.Tensor) -> torch.Tensor:
        unseen = self.cell_type_bias.shape[0] - 1
        idx = torch.where(cell_type < 0, torch.full_like(cell_type, unseen), cell_type).long()
        return pert.float() @ self.weight + self.cell_type_bias[idx]  # [B,G]

    @torch.no_grad()
    def set_ridge(self, ridge: Any, cell_types: Sequence[str]) -> None:
        """Take `ridge` (a fitted `FeatureRidge`), for the model's cell types in the model's order."""
        n_feat = self.weight.shape[0]
        coef = torch.as_tensor(ridge.coef / ridge.scale[:, None], dtype=torch.float64)  # [F + C_ridge, G]
        offset = torch.as_tensor(ridge.intercept - (ridge.center / ridge.scale) @ ridge.coef)  # [G]
        self.weight.copy_(coef[:n_feat])
        col = {ct: n_feat + i for i, ct in enumerate(ridge.cell_types)}
        # a cell type the ridge never saw: the training mean of the cell-type columns (no cell-type term)
        mean_ct = torch.as_tensor(ridge.center[n_feat:], dtype=torch.float64) @ coef[n_feat:]
        for i, ct in enumerate([*cell_types, None]):
            bias = offset + (coef[col[ct]] if ct in col else mean_ct)
            self.cell_type_bias[i].copy_(bias)


class StateTransitionModel(nn.Module):
    """Upstream's ST model (Llama, bidirectional) with upstream parameter names; see the module docstring."""

    def __init__(self, hparams: Mapping[str, Any]):
        """Build from a plain hparams dict (`model/hparams.py`); raises `HparamsError`."""
        super().__init__()
        hp = resolve_hparams(hparams)
        self.hparams = hp
        self.input_dim: int = hp["input_dim"]
        self.output_dim: int = hp["output_dim"]
        self.pert_dim: int = hp["pert_dim"]
        self.hidden_dim: int = hp["hidden_dim"]
        self.cell_set_len: int = hp["cell_set_len"]
        self.output_space: str = hp["output_space"]
        self.predict_residual = bool(hp["predict_residual"])
        act = getattr(nn, ACTIVATIONS[str(hp["activation"]).lower()])
        H, dropout = self.hidden_dim, float(hp["dropout"])

        # registered first: upstream builds it in the base class, so it leads the state_dict
        self.gene_decoder = (
            LatentToGeneDecoder(**hp["decoder_cfg"]) if hp["decoder_cfg"] is not None else None
        )
        self.pert_encoder = build_mlp(self.pert_dim, H, H, hp["n_encoder_layers"], dropout, act)
        if hp["use_basal_projection"]:
            self.basal_encoder: nn.Module = build_mlp(
                self.input_dim, H, H, hp["n_encoder_layers"], dropout, act
            )
        else:
            self.basal_encoder = nn.Linear(self.input_dim, H)
        self.transformer_backbone = LlamaBidirectional(
            LlamaConfig.from_kwargs(hp["transformer_backbone_kwargs"], hidden_dim=H)
        )
        self.project_out = build_mlp(H, self.output_dim, H, hp["n_decoder_layers"], dropout, act)
        if self.output_space == "all":
            D = self.output_dim
            self.final_down_then_up = nn.Sequential(nn.Linear(D, D // 8), nn.GELU(), nn.Linear(D // 8, D))
        self.head_skip = bool(hp["head_skip"]) and self.predict_residual and self.output_space == "all"
        # "no change" at step 0: out = x + f(x), f = 0 and x = basal + project_out(h) = basal
        if self.head_skip:
            self.zero_head_output()
        self.batch_dim: int | None = hp["batch_dim"] if hp["batch_encoder"] else None
        self.batch_encoder = nn.Embedding(self.batch_dim, H) if self.batch_dim is not None else None
        aux_dim = hp["aux_dim"]
        self.aux_head = build_mlp(H, int(aux_dim), H, 2, dropout, act) if aux_dim else None
        kd = hp["target_knockdown"]
        if kd is not None and (self.output_space != "all" or self.gene_decoder is not None):
            raise HparamsError(
                "target_knockdown needs a gene-space model (output_space 'all', no gene decoder): the target "
                "gene must be one of the outputs"
            )
        self.target_knockdown = TargetKnockdown(float(kd)) if kd is not None else None
        n_ct = hp["feature_prior"]
        if n_ct is not None and not self.head_skip:
            raise HparamsError(
                "feature_prior needs the head skip path of a gene-space model (model.head_skip=true, output_space "
                "'all'): the prior is added to the basal cells there"
            )
        self.feature_prior = (
            FeaturePrior(self.pert_dim, int(n_ct), self.output_dim) if n_ct is not None else None
        )

        embed_key = hp["embed_key"]
        self.apply_relu = embed_key in (None, "X_hvg") or self.gene_decoder is None

    @torch.no_grad()
    def zero_head_output(self) -> None:
        """Zero the last layers of `project_out` and `final_down_then_up`: with the head skip path the model then
        predicts the basal cells (plus the feature prior's effect, if any) unchanged."""
        for last in (
            [m for m in self.project_out if isinstance(m, nn.Linear)][-1],
            self.final_down_then_up[-1],
        ):
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    # -- forward ------------------------------------------------------------------------------------

    def forward_sets(
        self,
        pert: torch.Tensor,
        basal: torch.Tensor,
        batch_idx: torch.Tensor | None = None,
        *,
        target: torch.Tensor | None = None,
        cell_type: torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Predict perturbed cells for B sets: pert [B,S,P], basal [B,S,D_in], batch_idx [B,S] -> [B,S,D_out]
        (and the backbone's hidden states [B,S,H] with `return_hidden`, for the auxiliary head). `target`
        [B,S]: the perturbation's target-gene column per cell (-1: none), for the knock-down path; a model
        with that path needs it. `cell_type` [B]: each set's cell type (its index in the manifest's
        `cell_types`, -1: unseen), for a model with a feature prior."""
        if pert.dim() != 3 or basal.dim() != 3 or pert.shape[:2] != basal.shape[:2]:
            raise ValueError(
                f"forward_sets expects pert [B,S,P] and basal [B,S,D_in] with matching B,S; "
                f"got {tuple(pert.shape)} and {tuple(basal.shape)}"
            )
        self._check_width("pert_emb", pert, self.pert_dim)
        self._check_width("ctrl_cell_emb", basal, self.input_dim)
        pert_encoded = self.pert_encoder(pert)  # [B,S,H]
        basal_encoded = self.basal_encoder(basal)  # [B,S,H]
        seq = pert_encoded + basal_encoded  # [B,S,H]
        if self.batch_encoder is not None:
            if batch_idx is None:
                raise ValueError("this model has a batch_encoder: pass the batch index of every cell")
            seq = seq + self.batch_encoder(batch_idx.reshape(pert.shape[:2]).long())  # [B,S,H]
        h = self.transformer_backbone(seq)  # [B,S,H]
        if self.head_skip:
            x = self.project_out(h) + basal  # [B,S,D]
            if (
                self.feature_prior is not None
            ):  # the ridge's effect of the set's perturbation in its cell type
                if cell_type is None:
                    raise ValueError("this model has a feature prior: pass each set's cell type index")
                x = x + self.feature_prior(pert[:, 0], cell_type.reshape(-1))[:, None, :].to(x.dtype)
            out = x + self.final_down_then_up(x)  # a skip path around the D/8 bottleneck
        elif self.predict_residual and self.output_space == "all":
            out = self.final_down_then_up(self.project_out(h) + basal)  # residual in input space
        elif self.predict_residual:
            out = self.project_out(h + basal_encoded)  # residual in hidden space
        else:
            out = self.project_out(h)
        if self.apply_relu:
            out = F.relu(out)
        if self.target_knockdown is not None:
            if target is None:
                raise ValueError(
                    "this model has a target_knockdown path: pass each cell's target-gene column"
                )
            out = self.target_knockdown(out, target.reshape(pert.shape[:2]))
        return (out, h) if return_hidden else out  # [B,S,D_out]

    def forward(self, batch: Mapping[str, torch.Tensor], padded: bool = True) -> torch.Tensor:
        """Upstream's forward: flat [B*S,·] (or [B,S,·]) inputs -> flat predictions [B*S, D_out].

        `padded=True` groups cells into sets of `cell_set_len`; `padded=False` treats all cells as one
        variable-length set. A model with a feature prior reads `batch["cell_type_idx"]` [B] (each set's cell
        type, its index in the manifest's `cell_types`); without it the prior's cell-type-free row is used. `batch["batch"]` (only with a batch encoder) may be int indices or one-hot.
        """
        S = self.cell_set_len
        pert, basal = batch["pert_emb"], batch["ctrl_cell_emb"]
        self._check_width("pert_emb", pert, self.pert_dim)
        self._check_width("ctrl_cell_emb", basal, self.input_dim)
        if pert.shape[:-1] != basal.shape[:-1]:
            raise ValueError(
                f"pert_emb {tuple(pert.shape)} and ctrl_cell_emb {tuple(basal.shape)} have different cell counts"
            )
        if pert.dim() == 3 and padded and pert.shape[1] != S:
            raise ValueError(
                f"sets of {pert.shape[1]} cells with padded=True, but cell_set_len is {S}; "
                "use padded=False for one shorter set, or forward_sets"
            )
        if pert.dim() == 3 and not padded and pert.shape[0] != 1:
            raise ValueError(f"padded=False takes one set, got {pert.shape[0]} sets; use forward_sets")
        n_cells = pert.numel() // self.pert_dim
        if padded and n_cells % S != 0:
            raise ValueError(f"{n_cells} cells is not a multiple of cell_set_len={S}; use padded=False")
        shape = (-1, S) if padded else (1, -1)
        pert = pert.reshape(*shape, self.pert_dim)  # [B,S,P]
        basal = basal.reshape(*shape, self.input_dim)  # [B,S,D_in]

        batch_idx = None
        if self.batch_encoder is not None:
            if "batch" not in batch:
                raise ValueError("this model has a batch_encoder but the batch has no 'batch' key")
            batch_idx = batch["batch"]
            one_hot = (batch_idx.is_floating_point() or batch_idx.dtype == torch.bool) and batch_idx.dim() > 1
            if one_hot and batch_idx.shape[-1] == self.batch_dim:
                batch_idx = batch_idx.argmax(-1)
            batch_idx = batch_idx.reshape(shape)  # [B,S]
        target = batch.get("pert_target")
        target = target.reshape(shape) if target is not None else None  # [B,S]
        cell_type = batch.get("cell_type_idx")  # [B] (a model with a feature prior)
        if cell_type is None and self.feature_prior is not None:
            # upstream's keys name no cell type: the prior's cell-type-free row (its features part and the
            # training mean of the cell-type part); pass batch["cell_type_idx"] [B] for the cell type's own
            cell_type = torch.full((pert.shape[0],), -1, dtype=torch.int64, device=pert.device)
        out = self.forward_sets(pert, basal, batch_idx, target=target, cell_type=cell_type)  # [B,S,D_out]
        return out.reshape(-1, self.output_dim)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Gene decoder: [..., D_out] -> [..., G]. Raises if the model has no gene decoder."""
        if self.gene_decoder is None:
            raise ValueError("this model has no gene decoder (hparams decoder_cfg is None)")
        return self.gene_decoder(latent)

    @staticmethod
    def _check_width(name: str, x: torch.Tensor, width: int) -> None:
        if x.dim() < 2 or x.shape[-1] != width:
            raise ValueError(f"{name} has shape {tuple(x.shape)}; expected [..., {width}]")

    def num_params(self, trainable_only: bool = False) -> int:
        """Number of parameters (upstream counts 32000*H more for the dropped embed_tokens)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "DROPPED_UPSTREAM_KEYS",
    "MODULE_GROUPS",
    "HparamsError",
    "LatentToGeneDecoder",
    "LlamaBidirectional",
    "LlamaConfig",
    "MissingHparamError",
    "StateTransitionModel",
    "build_mlp",
    "module_of",
    "resolve_hparams",
]
