"""Upstream `state tx train` checkpoints (a Lightning `.ckpt` of `StateTransitionPerturbationModel`).

The architecture is rebuilt from the checkpoint's own `hyper_parameters`, never from our defaults; where a key
is absent, upstream's own default applies (e.g. `n_encoder_layers` 2, `cell_set_len` 256,
`use_basal_projection` True). Only the Llama backbone is supported, with upstream's intended semantics
(bidirectional attention, no positional encoding): a checkpoint that says `bidirectional_attention: false`
was trained as a causal model with RoPE, which this model does not compute, and is refused.
"""

from __future__ import annotations

import logging
from typing import Any

from tahoe_ft.errors import UserError

log = logging.getLogger(__name__)

# upstream's defaults for keys an older checkpoint may lack (state_transition.py / base.py, 0.9.12-0.11.1)
UPSTREAM_DEFAULTS: dict[str, Any] = {
    "n_encoder_layers": 2,
    "n_decoder_layers": 2,
    "cell_set_len": 256,
    "dropout": 0.1,
    "activation": "gelu",
    "predict_residual": True,
    "use_basal_projection": True,
    "output_space": "gene",
    "embed_key": None,
    "batch_encoder": False,
    "batch_dim": None,
    "gene_dim": None,
}
REQUIRED = (
    "input_dim",
    "output_dim",
    "pert_dim",
    "hidden_dim",
    "transformer_backbone_key",
    "transformer_backbone_kwargs",
)


def is_upstream(obj: dict[str, Any]) -> bool:
    """A Lightning checkpoint whose weights carry upstream's bare names (ours are prefixed `model.`)."""
    state = obj.get("state_dict")
    hp = obj.get("hyper_parameters") or {}
    return isinstance(state, dict) and not any(k.startswith("model.") for k in state) and "pert_dim" in hp


def translate_hparams(hp: dict[str, Any], source: str) -> dict[str, Any]:
    """tahoe-ft model hparams from an upstream checkpoint's `hyper_parameters`."""
    missing = [k for k in REQUIRED if k not in hp]
    if missing:
        raise UserError(
            f"{source}: upstream hyper_parameters lack {missing}; is it a state tx train checkpoint?"
        )
    key = str(hp["transformer_backbone_key"]).lower()
    if key != "llama":
        raise UserError(
            f"{source}: backbone '{hp['transformer_backbone_key']}' is not supported (only llama): GPT2 ST "
            "checkpoints computed causal attention by accident under sdpa and cannot be reproduced faithfully; "
            "fine-tune a Llama ST checkpoint (state model=state), or run this one with upstream state"
        )
    kwargs = dict(hp["transformer_backbone_kwargs"])
    if kwargs.get("bidirectional_attention") is False:
        raise UserError(
            f"{source}: Llama backbone trained with 'bidirectional_attention: false' (causal attention with RoPE); "
            "tahoe-ft computes the bidirectional, position-free ST only: use a checkpoint trained with "
            "'transformer_backbone_kwargs.bidirectional_attention: true', or run this one with upstream state"
        )
    if "bidirectional_attention" not in kwargs:
        log.warning(
            "%s has no bidirectional_attention flag (state <= 0.10): loading with the intended "
            "bidirectional semantics",
            source,
        )
    kwargs["bidirectional_attention"] = True
    out = {k: hp.get(k, UPSTREAM_DEFAULTS.get(k)) for k in (*REQUIRED, *UPSTREAM_DEFAULTS)}
    out["transformer_backbone_key"] = "llama"
    out["transformer_backbone_kwargs"] = kwargs
    decoder = hp.get("decoder_cfg")
    gene_decoder = hp.get("gene_decoder_bool", True)
    if out["output_space"] == "embedding" or not gene_decoder or not decoder:
        out["decoder_cfg"] = (
            None  # upstream builds no decoder here (0.11.1 drops decoder_cfg for "embedding")
        )
    else:
        out["decoder_cfg"] = {
            k: decoder[k]
            for k in ("latent_dim", "gene_dim", "hidden_dims", "dropout", "residual_decoder")
            if k in decoder
        }
    if out["decoder_cfg"] is None:
        out["gene_dim"] = None
    return out


# our loss name -> upstream's (model.kwargs.loss, distributional_loss)
_UPSTREAM_LOSS = {
    "energy": ("energy", "energy"),
    "sinkhorn": ("sinkhorn", "energy"),
    "mse": ("mse", "energy"),
}


def upstream_hparams(hp: dict[str, Any], manifest: Any, config: dict[str, Any] | None) -> dict[str, Any]:
    """`hyper_parameters` of an upstream checkpoint for tahoe-ft model hparams (the inverse of
    `translate_hparams`): what `StateTransitionPerturbationModel(**hyper_parameters)` needs to rebuild the
    same network, in plain python values. `config` (the run's resolved config) supplies the loss, optimiser
    and loader settings upstream also records; absent, upstream's defaults are written."""
    config = config or {}
    loss_cfg = config.get("loss") or {}
    loss, distributional = _UPSTREAM_LOSS.get(str(loss_cfg.get("name", "energy")), ("energy", "energy"))
    kwargs = dict(hp["transformer_backbone_kwargs"])
    kwargs["bidirectional_attention"] = True  # 0.11.x: without it upstream builds a causal Llama with RoPE
    kwargs.setdefault("hidden_size", int(hp["hidden_dim"]))
    kwargs.setdefault("max_position_embeddings", int(hp["cell_set_len"]))
    kwargs.setdefault("use_cache", False)
    decoder = hp.get("decoder_cfg")
    return {
        "input_dim": int(hp["input_dim"]),
        "hidden_dim": int(hp["hidden_dim"]),
        "output_dim": int(hp["output_dim"]),
        "pert_dim": int(hp["pert_dim"]),
        "batch_dim": hp.get("batch_dim"),
        "gene_dim": decoder["gene_dim"] if decoder else None,
        "hvg_dim": len(manifest.gene_names),
        "dropout": float(hp["dropout"]),
        "lr": float((config.get("optim") or {}).get("lr", 1e-4)),
        "control_pert": manifest.control_pert,
        "embed_key": hp.get("embed_key"),
        "output_space": hp["output_space"],
        "gene_names": [str(g) for g in manifest.gene_names],
        "batch_size": int((config.get("data") or {}).get("batch_size", 16)),
        "decoder_cfg": dict(decoder) if decoder else None,
        # with no decoder upstream must not rebuild one from decoder_cfg in on_load_checkpoint
        "gene_decoder_bool": decoder is not None,
        "predict_residual": bool(hp["predict_residual"]),
        "loss": loss,
        "distributional_loss": distributional,
        "blur": float(loss_cfg.get("blur", 0.05)),
        "decoder_weight": float(loss_cfg.get("decoder_weight", 1.0)),
        "transformer_backbone_key": "llama",
        "transformer_backbone_kwargs": kwargs,
        "n_encoder_layers": int(hp["n_encoder_layers"]),
        "n_decoder_layers": int(hp["n_decoder_layers"]),
        "activation": str(hp["activation"]),
        "cell_set_len": int(hp["cell_set_len"]),
        "use_basal_projection": bool(hp["use_basal_projection"]),
        "batch_encoder": bool(hp["batch_encoder"]),
        "basal_mapping_strategy": str((config.get("data") or {}).get("basal_mapping", "random")),
        "confidence_token": False,
        "use_batch_token": False,
        "batch_predictor": False,
        "mask_attn": False,
        "freeze_pert_backbone": False,
        "init_from": None,
    }
