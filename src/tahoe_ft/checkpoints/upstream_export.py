"""Write a tahoe-ft checkpoint as an upstream `state tx train` run folder (`tahoe-ft export-state`).

The folder is what arc-state's `StateTransitionPerturbationModel.load_from_checkpoint` and `state tx infer
--model-dir` accept: plain python values only (no numpy scalars, no OmegaConf), upstream parameter names, and
the zeroed `embed_tokens` table that upstream's Llama backbone creates (its strict load needs it). Its layout
is the one `tahoe_ft.checkpoints.upstream_folder` reads. Imports `checkpoints.io` and `upstream_folder`; neither
imports this module.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch

from tahoe_ft.checkpoints.io import model_from_weights, read_weights
from tahoe_ft.checkpoints.upstream_hparams import upstream_hparams
from tahoe_ft.data.split_file import format_split_toml
from tahoe_ft.errors import UserError
from tahoe_ft.fileio import atomic_path, atomic_write_text
from tahoe_ft.model.st import DROPPED_UPSTREAM_KEYS, module_of

log = logging.getLogger(__name__)

EXPORT_CHECKPOINT = "final.ckpt"  # what `state tx infer` reads when no --checkpoint is given
# transformers' LlamaConfig.vocab_size: the rows of upstream's unused, zeroed embed_tokens table
LLAMA_VOCAB_DEFAULT = 32000


def split_toml_of(manifest: Any) -> str:
    """The manifest's held-out groups as a cell-load split TOML (one [fewshot] section per dataset.cell type)."""
    datasets: dict[str, list[str]] = {}
    for ds, p in zip(
        manifest.datasets or [Path(x).stem for x in manifest.data_paths], manifest.data_paths, strict=True
    ):
        datasets.setdefault(ds, []).append(str(Path(p).resolve()))
    fewshot: dict[tuple[str, str], dict[str, list[str]]] = {}
    if manifest.held_out is not None:
        for e in manifest.held_out:
            table = fewshot.setdefault((e["dataset"], e["cell_type"]), {"val": [], "test": []})
            table[e["split"]].append(e["pert"])
    else:  # older manifests: the perturbations are out in every cell type
        for ds in datasets:
            for ct in manifest.cell_types:
                fewshot[(ds, ct)] = {s: list(manifest.splits.get(s, [])) for s in ("val", "test")}
    return format_split_toml(
        {k: v[0] if len(v) == 1 else v for k, v in datasets.items()},
        fewshot={k: {s: sorted(v[s]) for s in ("val", "test")} for k, v in sorted(fewshot.items())},
        header="cell-load style split, written by tahoe-ft export-state from the checkpoint's held-out groups",
    )


def export_state(ckpt: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the tahoe-ft checkpoint `ckpt` as an upstream run folder `out_dir` (which must not exist).

    Files: `config.yaml`, `var_dims.pkl`, `pert_onehot_map.pt`, `cell_type_onehot_map.torch`,
    `batch_onehot_map.torch` (with a batch column), `split.toml` (the held-out groups), `tahoe_ft_export.json`
    and `checkpoints/final.ckpt` (a Lightning checkpoint of `StateTransitionPerturbationModel`). The folder
    is built under a temporary name beside `out_dir` and renamed into place when complete.
    """
    from tahoe_ft.data import Manifest

    out = Path(out_dir)
    if out.exists() or out.is_symlink():
        raise UserError(f"{out} already exists; export-state never overwrites a folder: choose another out=")
    src = Path(ckpt)
    if src.is_dir():
        raise UserError(
            f"{src} is a folder; export-state takes a tahoe-ft checkpoint file (e.g. best-val.pt)"
        )
    weights = read_weights(src)
    _check_exportable(src, weights.hparams, weights.manifest)
    model = model_from_weights(weights.state_dict, weights.hparams, src)
    m = Manifest.from_dict(weights.manifest)
    hp = model.hparams
    config = weights.file.get("config") or {}
    up_hp = upstream_hparams(hp, m, config)
    obj = weights.file
    info = {
        "source": str(src.resolve()),
        "experiment": obj.get("experiment"),
        "step": obj.get("step"),
        "val_loss": obj.get("val_loss"),
        "manifest": m.to_dict(include_pert_matrix=False),
    }
    final_path = out.resolve()
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        _write_folder(
            tmp,
            checkpoint=_lightning_checkpoint(model, up_hp, int(obj.get("step") or 0)),
            config=_upstream_config(hp, m, config, up_hp, final_path),
            var_dims=_var_dims(hp, m),
            manifest=m,
            info=info,
        )
        os.rename(tmp, out)  # fails if out appeared meanwhile (a non-empty folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote upstream run folder %s (checkpoints/%s)", out, EXPORT_CHECKPOINT)
    return out


def _check_exportable(src: Path, hparams: dict[str, Any] | None, manifest: dict[str, Any] | None) -> None:
    """Refuse what upstream cannot hold: no tahoe-ft hparams or manifest, or a tahoe-ft-only path."""
    if hparams is None or not manifest:
        raise UserError(
            f"{src} is not a tahoe-ft checkpoint with a data manifest (best-val.pt, step-N.pt or last.ckpt); "
            "an upstream checkpoint already is a state tx train file"
        )
    if hparams.get("feature_prior") is not None:
        raise UserError(
            f"{src} has the tahoe-ft-only feature prior (model.feature_prior=true), which upstream's ST does not "
            "compute; export a model trained with model.feature_prior=false"
        )
    if hparams.get("head_skip") and hparams.get("predict_residual") and hparams.get("output_space") == "all":
        raise UserError(
            f"{src} has the tahoe-ft-only head skip path (model.head_skip=true), which upstream's ST does not "
            "compute; export a model trained with model.head_skip=false"
        )
    if hparams.get("target_knockdown") is not None:
        raise UserError(
            f"{src} has the tahoe-ft-only target knock-down path (model.target_knockdown=true), which upstream's "
            "ST does not compute; export a model trained with model.target_knockdown=false"
        )


def _lightning_checkpoint(model: Any, up_hp: dict[str, Any], step: int) -> dict[str, Any]:
    """A Lightning checkpoint of upstream's module: upstream names, no aux head, the zeroed embed_tokens."""
    hp = model.hparams
    # the auxiliary head (loss.aux_key) only served training: upstream has no such module, predictions skip it
    sd = {
        k: v.detach().cpu().clone().contiguous()
        for k, v in model.state_dict().items()
        if module_of(k) != "aux_head"
    }
    (table,) = DROPPED_UPSTREAM_KEYS
    vocab = int(hp["transformer_backbone_kwargs"].get("vocab_size", LLAMA_VOCAB_DEFAULT))
    sd = {table: torch.zeros(vocab, int(hp["hidden_dim"])), **sd}  # upstream: zeroed, frozen, never used
    return {
        "epoch": 0,
        "global_step": step,
        "pytorch-lightning_version": _lightning_version(),
        "state_dict": sd,
        "loops": {},
        "callbacks": {},
        "optimizer_states": [],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": up_hp,
    }


def _var_dims(hp: dict[str, Any], m: Any) -> dict[str, Any]:
    """cell-load's var_dims dict (plain python values)."""
    return {
        "input_dim": int(hp["input_dim"]),
        "gene_dim": len(m.gene_names),
        "hvg_dim": len(m.gene_names),
        "output_dim": int(hp["output_dim"]),
        "pert_dim": int(hp["pert_dim"]),
        "gene_names": [str(g) for g in m.gene_names],
        "batch_dim": hp.get("batch_dim") or (len(m.batches) if m.batches else None),
        "pert_names": [str(p) for p in m.pert_names],
    }


def _onehot(names: list[str]) -> dict[str, torch.Tensor]:
    eye = torch.eye(len(names))
    return {str(n): eye[i].clone() for i, n in enumerate(names)}


def _write_folder(
    tmp: Path,
    *,
    checkpoint: dict[str, Any],
    config: dict[str, Any],
    var_dims: dict[str, Any],
    manifest: Any,
    info: dict[str, Any],
) -> None:
    """Every file of the run folder, under `tmp` (created here)."""
    import yaml

    m = manifest
    (tmp / "checkpoints").mkdir(parents=True)
    atomic_write_text(tmp / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    with atomic_path(tmp / "var_dims.pkl", suffix=".pkl") as p, open(p, "wb") as fh:
        pickle.dump(var_dims, fh)
    with atomic_path(tmp / "pert_onehot_map.pt", suffix=".pt") as p:
        torch.save({str(name): m.pert_matrix[i].clone() for i, name in enumerate(m.pert_names)}, p)
    with atomic_path(tmp / "cell_type_onehot_map.torch", suffix=".torch") as p:
        torch.save(_onehot(m.cell_types), p)
    if m.batches:
        with atomic_path(tmp / "batch_onehot_map.torch", suffix=".torch") as p:
            torch.save(_onehot(m.batches), p)
    atomic_write_text(tmp / "split.toml", split_toml_of(m))
    atomic_write_text(tmp / "tahoe_ft_export.json", json.dumps(info, indent=2, default=str))
    with atomic_path(tmp / "checkpoints" / EXPORT_CHECKPOINT, suffix=".ckpt") as p:
        torch.save(checkpoint, p)


def _lightning_version() -> str:
    try:
        import lightning

        return str(lightning.__version__)
    except ImportError:  # pragma: no cover - lightning is a dependency
        return "2.0.0"


def _upstream_config(
    hp: dict[str, Any], m: Any, config: dict[str, Any], up_hp: dict[str, Any], folder: Path
) -> dict[str, Any]:
    """config.yaml in the shape `state tx train` writes (the keys `state tx infer` and readers use)."""
    data_cfg = config.get("data") or {}
    dec = hp.get("decoder_cfg") or {}
    return {
        "data": {
            "name": "PerturbationDataModule",
            "kwargs": {
                "toml_config_path": str(folder / "split.toml"),
                "embed_key": hp.get("embed_key"),
                "output_space": hp["output_space"],
                "pert_rep": "onehot",
                "basal_mapping_strategy": up_hp["basal_mapping_strategy"],
                "should_yield_control_cells": True,
                "batch_col": m.batch_col,
                "pert_col": m.pert_col,
                "cell_type_key": m.cell_type_col,
                "control_pert": m.control_pert,
                "perturbation_features_file": (
                    None if m.pert_features.get("source") == "onehot" else str(m.pert_features.get("source"))
                ),
                "num_workers": int(data_cfg.get("num_workers", 0) or 0),
            },
        },
        "model": {
            "name": "state",
            "checkpoint": None,
            "kwargs": {
                "cell_set_len": int(hp["cell_set_len"]),
                "hidden_dim": int(hp["hidden_dim"]),
                "n_encoder_layers": int(hp["n_encoder_layers"]),
                "n_decoder_layers": int(hp["n_decoder_layers"]),
                "predict_residual": bool(hp["predict_residual"]),
                "use_basal_projection": bool(hp["use_basal_projection"]),
                "batch_encoder": bool(hp["batch_encoder"]),
                "activation": hp["activation"],
                "dropout": float(hp["dropout"]),
                "loss": up_hp["loss"],
                "distributional_loss": up_hp["distributional_loss"],
                "blur": up_hp["blur"],
                "decoder_weight": up_hp["decoder_weight"],
                "decoder_hidden_dims": list(dec.get("hidden_dims", [])) or None,
                "decoder_dropout": dec.get("dropout"),
                "residual_decoder": bool(dec.get("residual_decoder", False)),
                "gene_decoder_bool": up_hp["gene_decoder_bool"],
                "transformer_backbone_key": "llama",
                "transformer_backbone_kwargs": dict(up_hp["transformer_backbone_kwargs"]),
                "init_from": None,
            },
        },
        "training": {"batch_size": up_hp["batch_size"], "lr": up_hp["lr"]},
        "name": folder.name,
        "output_dir": str(folder.parent),
        "use_wandb": False,
    }
