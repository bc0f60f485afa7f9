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
            f"{source}: backbone '{hp['transformer_backbone_key']}' is not supported (only llama); GPT2 ST "
            "checkpoints computed causal attention by accident under sdpa and cannot be reproduced faithfully"
        )
    kwargs = dict(hp["transformer_backbone_kwargs"])
    if kwargs.get("bidirectional_attention") is False:
        raise UserError(
            f"{source}: trained with bidirectional_attention=false (causal attention with RoPE); tahoe-ft computes "
            "the bidirectional, position-free ST only"
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
