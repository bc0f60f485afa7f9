"""The model's options and hparams, each declared once; what `StateTransitionModel` (`model/st.py`) is built from.

`ModelConfig` is the `model.*` section of a training config (`tahoe_ft.config` re-exports it). Each of its
fields is declared with `option(...)`, which says, beside the option's default for a new round, what the option
is in the hparams dict that every checkpoint stores and the model is rebuilt from:

- `upstream=VALUE`: the hparam's value when a checkpoint does not record it (upstream's default; for a
  tahoe-ft-only path, off). Without it the hparam is required;
- `arch=True`: architecture, taken from the parent checkpoint when a round has one (a backbone only transfers
  to the same architecture; `training/recipe.py::build_hparams`);
- `copied=False`: the hparam is built from the option and the data, not copied from it (`build_hparams`).

The other hparams are widths of the data and the encoder's choices (`DATA_WIDTHS`, `ENCODER_HPARAMS`,
`DATA_HPARAMS_OPTIONAL`); `resolve_hparams` checks a hparams dict and fills in the defaults; `LlamaConfig`
holds the backbone's fields. No torch here: `tahoe_ft.config` imports this module to declare `model.*`, and the
CLI composes configs without torch.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tahoe_ft.errors import UserError


class HparamsError(UserError, ValueError):
    """The model hparams dict is invalid (bad value or type)."""


class MissingHparamError(HparamsError, KeyError):
    """A required model hparam is missing (a `KeyError` and a `ValueError`)."""

    __str__ = Exception.__str__  # KeyError would quote the message


_REQUIRED = object()  # `option(upstream=...)` not given: a required hparam


def option(default: Any, *, upstream: Any = _REQUIRED, arch: bool = False, copied: bool = True) -> Any:
    """A `ModelConfig` field: `default` for a new round; `upstream`, `arch`, `copied`: the module docstring."""
    return field(default=default, metadata={"hparam": {"upstream": upstream, "arch": arch, "copied": copied}})


@dataclass
class BackboneConfig:
    """`model.backbone`: the Llama backbone's sizes, the hparam `transformer_backbone_kwargs` (with
    `hidden_size` = `model.hidden_dim` and `bidirectional_attention: true`); architecture."""

    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    head_dim: int = 16
    intermediate_size: int = 192
    rms_norm_eps: float = 1e-6
    attention_dropout: float = 0.0


@dataclass
class ModelConfig:
    hidden_dim: int = option(64, arch=True)
    # cells per set ("cell sentence")
    cell_set_len: int = option(32)
    n_encoder_layers: int = option(4, arch=True)
    n_decoder_layers: int = option(4, arch=True)
    dropout: float = option(0.1, upstream=0.1)
    # gelu, relu, silu, leakyrelu, elu or selu (`ACTIVATIONS`)
    activation: str = option("gelu", upstream="gelu", arch=True)
    predict_residual: bool = option(True, arch=True)
    use_basal_projection: bool = option(True, upstream=True, arch=True)
    # a skip path around final_down_then_up, so a freshly initialised head starts at "no change" (its prediction
    # is the basal cells at step 0: the last layers of final_down_then_up and project_out start at zero, instead
    # of squeezing the basal cells through a D/8 bottleneck). tahoe-ft only: upstream's head has no skip (false
    # = upstream's function, needed to export a model to upstream state); a head loaded from a parent keeps the
    # parent's choice
    head_skip: bool = option(True, upstream=False, arch=True)
    # a learned knock-down of each perturbation's target gene (genetic screens whose perturbations are named
    # after measured genes): out[target] = log1p(r * expm1(out[target])), r starting at the training cells'
    # median knock-down. Gene-space rounds only (an embedding round has no target-gene output: ignored there);
    # tahoe-ft only (export-state refuses it). The hparam: the initial ratio r, or None (no such path)
    target_knockdown: bool = option(False, upstream=None, copied=False)
    # a fixed linear prior in gene space: the baseline panel's feature ridge (perturbation features + cell type
    # -> pseudobulk effect, fitted on the training groups) is added to the head's output, whose last layers
    # start at zero, so the model predicts the ridge at step 0 and fine-tunes its residual. Fitted by the first
    # gene-space round of a chain, kept by the rounds after it; gene-space rounds with the head skip path only;
    # tahoe-ft only (export-state refuses it). Chosen on the demo's validation perturbations (docs/results.md
    # "Fine-tuning against a ridge on its own inputs"); false = the study's head. The hparam: the number of cell
    # types of the prior (`FeaturePrior`), or None (no prior)
    feature_prior: bool = option(True, upstream=None, copied=False)
    # a learned embedding of each cell's batch added to the backbone's input (data with a batch_col only; the
    # hparam is true only then, with `batch_dim` the number of batches)
    batch_encoder: bool = option(False, upstream=False, copied=False)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)


def _hparam_options() -> dict[str, dict[str, Any]]:
    """`{name: option(...) metadata}` of the `ModelConfig` fields that are hparams, in declaration order."""
    return {f.name: f.metadata["hparam"] for f in dataclasses.fields(ModelConfig) if "hparam" in f.metadata}


# The hparams that are not model options: widths of the data, the encoder's choices and the tahoe-ft-only
# heads they ask for (set by training/recipe.py::build_hparams); the optional ones default to None (absent).
DATA_WIDTHS = ("input_dim", "output_dim", "pert_dim")
ENCODER_HPARAMS = (
    "output_space",
    "embed_key",
)  # what the model predicts in: encoder.output_space, .embed_key
DATA_HPARAMS_OPTIONAL: dict[str, Any] = {
    "decoder_cfg": None,  # the gene decoder's kwargs (`LatentToGeneDecoder`), embedding-space rounds
    "batch_dim": None,  # the number of batches (batch_encoder)
    "gene_dim": None,  # informational (decoder width); the decoder itself is built from decoder_cfg
    # tahoe-ft only: width of an auxiliary head that predicts each cell's embedding (e.g. SE600M X_state) from
    # the backbone's hidden state, for the auxiliary loss (loss.aux_key); None = no such head. Training only:
    # predictions never use it, and export-state drops it.
    "aux_dim": None,
}

# The backbone: which one (only "llama") and its kwargs (`model.backbone`, `LlamaConfig`); architecture.
BACKBONE_HPARAMS = ("transformer_backbone_key", "transformer_backbone_kwargs")

# Keys that must be present: they change the architecture or the function computed.
REQUIRED_HPARAMS = (
    *DATA_WIDTHS,
    *(name for name, o in _hparam_options().items() if o["upstream"] is _REQUIRED),
    *ENCODER_HPARAMS,
    *BACKBONE_HPARAMS,
)

# Required keys that are sizes: positive ints.
POSITIVE_INT_HPARAMS = (
    *DATA_WIDTHS,
    "hidden_dim",
    "n_encoder_layers",
    "n_decoder_layers",
    "cell_set_len",
)

# Keys with defaults (filled in, so the stored hparams are always complete).
OPTIONAL_HPARAMS: dict[str, Any] = {
    **{name: o["upstream"] for name, o in _hparam_options().items() if o["upstream"] is not _REQUIRED},
    **DATA_HPARAMS_OPTIONAL,
}

# Architecture keys taken from the parent checkpoint (a backbone only transfers to the same architecture).
ARCH_HPARAMS = (*(name for name, o in _hparam_options().items() if o["arch"]), *BACKBONE_HPARAMS)


def model_hparams(m: ModelConfig) -> dict[str, Any]:
    """The hparams a round's `model.*` options give as they are (`copied`), and the backbone's."""
    hp = {name: getattr(m, name) for name, o in _hparam_options().items() if o["copied"]}
    hp["transformer_backbone_key"] = "llama"
    hp["transformer_backbone_kwargs"] = {
        "hidden_size": m.hidden_dim,
        **dataclasses.asdict(m.backbone),
        "bidirectional_attention": True,
    }
    return hp


OUTPUT_SPACES = ("all", "gene", "embedding")

# activation name -> its torch.nn class's name
ACTIVATIONS: dict[str, str] = {
    "gelu": "GELU",
    "relu": "ReLU",
    "silu": "SiLU",
    "leakyrelu": "LeakyReLU",
    "elu": "ELU",
    "selu": "SELU",
}


def _to_plain(value: Any, where: str) -> Any:
    """Deep-copy `value` into plain python types (dict, list, str, int, float, bool, None)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _to_plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, Sequence):
        return [_to_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalar
        return value.item()
    raise HparamsError(f"model hparam {where} has unsupported type {type(value).__name__}; use plain values")


def resolve_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Validate `hparams` and return a complete plain-python copy with upstream defaults filled in."""
    hp = _to_plain(hparams, "hparams")
    if not isinstance(hp, dict):
        raise HparamsError("model hparams must be a mapping")
    for key in REQUIRED_HPARAMS:
        if key not in hp:
            raise MissingHparamError(f"model hparams are missing required key {key!r}")
    unknown = sorted(set(hp) - set(REQUIRED_HPARAMS) - set(OPTIONAL_HPARAMS))
    if unknown:
        raise HparamsError(
            f"unknown model hparams {unknown}; allowed: {sorted(REQUIRED_HPARAMS + tuple(OPTIONAL_HPARAMS))}"
        )
    for key, default in OPTIONAL_HPARAMS.items():
        hp.setdefault(key, copy.deepcopy(default))

    for key in POSITIVE_INT_HPARAMS:
        if not isinstance(hp[key], int) or isinstance(hp[key], bool) or hp[key] < 1:
            raise HparamsError(f"model hparam {key!r} must be a positive int, got {hp[key]!r}")
    if hp["output_space"] not in OUTPUT_SPACES:
        raise HparamsError(
            f"model hparam 'output_space' must be one of {OUTPUT_SPACES}, got {hp['output_space']!r}"
        )
    if str(hp["activation"]).lower() not in ACTIVATIONS:
        raise HparamsError(
            f"model hparam 'activation' must be one of {sorted(ACTIVATIONS)}, got {hp['activation']!r}"
        )
    if str(hp["transformer_backbone_key"]).lower() != "llama":
        raise HparamsError(
            f"transformer_backbone_key={hp['transformer_backbone_key']!r} is not supported; only 'llama' "
            "(bidirectional, no positional encoding) is implemented"
        )
    if hp["predict_residual"] and hp["output_space"] == "all" and hp["input_dim"] != hp["output_dim"]:
        raise HparamsError(
            f"output_space='all' with predict_residual adds the basal input to the output, so input_dim "
            f"({hp['input_dim']}) must equal output_dim ({hp['output_dim']})"
        )
    batch_dim = hp["batch_dim"]
    if batch_dim is not None and (
        not isinstance(batch_dim, int) or isinstance(batch_dim, bool) or batch_dim < 1
    ):
        raise HparamsError(
            f"model hparam 'batch_dim' must be a positive int or None, got {hp['batch_dim']!r}"
        )
    LlamaConfig.from_kwargs(hp["transformer_backbone_kwargs"], hidden_dim=hp["hidden_dim"])  # validates
    if hp["decoder_cfg"] is not None:
        hp["decoder_cfg"] = _resolve_decoder_cfg(hp["decoder_cfg"])
    return hp


def _resolve_decoder_cfg(cfg: Any) -> dict[str, Any]:
    """Validate a `decoder_cfg` (the kwargs of `LatentToGeneDecoder`) and fill upstream's defaults."""
    if not isinstance(cfg, dict):
        raise HparamsError(f"model hparam 'decoder_cfg' must be a mapping or None, got {cfg!r}")
    for key in ("latent_dim", "gene_dim", "hidden_dims"):
        if key not in cfg:
            raise MissingHparamError(f"model hparam 'decoder_cfg' is missing required key {key!r}")
    allowed = {"latent_dim", "gene_dim", "hidden_dims", "dropout", "residual_decoder"}
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise HparamsError(
            f"unknown keys {unknown} in model hparam 'decoder_cfg'; allowed: {sorted(allowed)}"
        )
    cfg = {"dropout": 0.1, "residual_decoder": False, **cfg}  # upstream LatentToGeneDecoder defaults
    dims = cfg["hidden_dims"]
    if cfg["residual_decoder"]:
        for i in range(1, len(dims), 2):
            if dims[i] != dims[i - 1]:
                raise HparamsError(
                    f"decoder_cfg.residual_decoder adds block {i - 1}'s output to block {i}'s, so "
                    f"hidden_dims[{i - 1}] ({dims[i - 1]}) must equal hidden_dims[{i}] ({dims[i]})"
                )
    return cfg


# LlamaConfig fields we implement, and the values of other LlamaConfig fields we can honour.
_LLAMA_FIXED = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False}


@dataclass
class LlamaConfig:
    """The Llama fields that matter for a bidirectional, position-free backbone."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    initializer_range: float = 0.02

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any], hidden_dim: int | None = None) -> LlamaConfig:
        """Build from upstream's `transformer_backbone_kwargs`; keys that are not Llama fields are ignored.

        Raises `HparamsError` for missing sizes, `bidirectional_attention: false` (we only implement the
        bidirectional semantics), Llama options we do not implement, or hidden_size != hidden_dim.
        """
        if not isinstance(kwargs, Mapping):
            raise HparamsError(
                f"model hparam 'transformer_backbone_kwargs' must be a mapping, got {kwargs!r}"
            )
        where = "transformer_backbone_kwargs"
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            if key not in kwargs:
                raise MissingHparamError(f"model hparam {where} is missing required key {key!r}")
        if "bidirectional_attention" in kwargs and not kwargs["bidirectional_attention"]:
            raise HparamsError(
                f"{where}.bidirectional_attention is false: upstream then runs a causal Llama with RoPE, "
                "which tahoe-ft does not implement; set bidirectional_attention: true"
            )
        for key, ok in _LLAMA_FIXED.items():
            if key in kwargs and kwargs[key] != ok:
                raise HparamsError(f"{where}.{key}={kwargs[key]!r} is not supported (only {ok!r})")
        heads = int(kwargs["num_attention_heads"])
        hidden = int(kwargs["hidden_size"])
        head_dim = kwargs.get("head_dim")
        kv_heads = kwargs.get("num_key_value_heads")
        cfg = cls(
            hidden_size=hidden,
            num_hidden_layers=int(kwargs["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=heads if kv_heads is None else int(kv_heads),
            head_dim=hidden // heads if head_dim is None else int(head_dim),
            intermediate_size=int(kwargs["intermediate_size"]),
            rms_norm_eps=float(kwargs.get("rms_norm_eps", 1e-6)),
            attention_dropout=float(kwargs.get("attention_dropout", 0.0)),
            initializer_range=float(kwargs.get("initializer_range", 0.02)),
        )
        if cfg.num_attention_heads % cfg.num_key_value_heads != 0:
            raise HparamsError(
                f"{where}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads "
                f"({cfg.num_key_value_heads})"
            )
        if hidden_dim is not None and hidden != hidden_dim:
            raise HparamsError(f"{where}.hidden_size ({hidden}) must equal hidden_dim ({hidden_dim})")
        return cfg
