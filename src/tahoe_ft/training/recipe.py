"""`tahoe-ft train`: one round of fine-tuning, read top to bottom (`train`).

data -> model (architecture from the parent checkpoint when there is one) -> weights-only init with a
report -> loggers and callbacks -> Lightning `fit` -> best-val.pt / last.ckpt in a fresh run directory.
`resume=true` is the only way to continue a run, and it refuses a changed optimizer or schedule; where the run
lives (new, resumed, or a DDP worker joining rank 0) is `training.session`'s business.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar

from tahoe_ft.checkpoints.io import format_report, init_from_weights, read_weights
from tahoe_ft.config import TrainConfig, as_dict
from tahoe_ft.data import PerturbationDataModule
from tahoe_ft.errors import UserError
from tahoe_ft.fileio import data_fingerprint
from tahoe_ft.lineage import (
    check_no_leak,
    lineage_of,
    pick_parent,
    read_manifest_json,
    split_id,
    trained_groups,
)
from tahoe_ft.model.hparams import ARCH_HPARAMS, model_hparams
from tahoe_ft.runs import RUN_REF, list_runs, newest_run, read_run_info, resolve_ref
from tahoe_ft.training.callbacks import (
    CheckpointPolicy,
    LRAndThroughput,
    MetricsCSVLogger,
    RNGState,
    StopOnNonFinite,
)
from tahoe_ft.training.freeze import FreezeCallback
from tahoe_ft.training.memory import floor_line
from tahoe_ft.training.module import STLightningModule, TrainingSettings
from tahoe_ft.training.session import RunSession, epoch_position

log = logging.getLogger(__name__)

# Sanity bounds on step counts: past them a run never ends (`trainer.max_steps=1e23`) or, through `step_scale`,
# never leaves its LR warmup and never validates again. The study's longest round is 50,000 steps.
MAX_STEPS = 10_000_000
MAX_STEP_SCALE = 1000.0


def train(cfg: TrainConfig, callbacks: list | None = None) -> Path:
    """Train one round as configured; return its run directory. `callbacks` are extra Lightning callbacks."""
    check_steps(cfg)
    L.seed_everything(cfg.seed, workers=True)
    resolved = as_dict(cfg)
    session = RunSession.plan(cfg, resolved)  # new run, resumed run, or a DDP worker joining rank 0's

    dm = training_data(cfg)
    position = epoch_position(session.last_ckpt) if session.last_ckpt else None  # (epoch, batches, step)
    if position is not None:
        dm.resume_at(*position[:2])
    manifest = _manifest(dm, cfg)

    # parent weights: weights only, never its optimizer, schedule or step; never one that saw our held-out groups
    parent_path = _parent_path(cfg, manifest) if cfg.init_from and not cfg.resume else None
    parent = read_weights(parent_path) if parent_path else None
    if parent is not None:
        _check_lineage(manifest, parent, parent_path)
    elif session.last_ckpt is not None:  # resumed: the lineage the run started with
        manifest["lineage"] = read_manifest_json(session.run_dir).get("lineage") or []

    parent_hp = parent.hparams if parent is not None else None
    hparams = build_hparams(cfg, dm.dims, parent_hp)
    if _feature_prior(cfg, hparams):
        hparams["feature_prior"] = len(dm.cell_types)
    module = STLightningModule(hparams, TrainingSettings.of(cfg))
    freezer = FreezeCallback(list(cfg.freeze.modules), cfg.freeze.until_step)
    freezer.check(module.model)
    if parent is None and not session.last_ckpt:
        _warn_frozen_from_scratch(cfg)
    log.info(floor_line(module.model, cfg, dm.dims))  # weights + gradients + AdamW state + batches in flight

    run_dir = session.start(manifest, parent_path)  # the first write: a refused command leaves nothing
    with session.failing():  # a run that dies before fit is marked failed, not left running
        if parent is not None:
            # one-hot perturbation columns are mapped by name when both vocabularies are known
            report = init_from_weights(
                module.model, parent.state_dict, str(parent_path), parent=parent, manifest=manifest
            )
            session.write_init_report(report)
            log.info(format_report(report))
            module.fresh_modules = set(report["reinitialised_modules"])
        elif session.last_ckpt is not None:  # resume: the groups the run's optimizer state was saved with
            module.fresh_modules = _fresh_modules(run_dir)
        if module.model.feature_prior is not None and not _prior_loaded(parent, module.model):
            fit_feature_prior(module.model, dm)

        policy = CheckpointPolicy(
            run_dir,
            cfg.experiment,
            manifest,
            resolved,
            every_n_steps=cfg.checkpoint.every_n_steps,
            save_last=cfg.checkpoint.save_last,
        )
        trainer = _trainer(
            cfg,
            run_dir,
            [StopOnNonFinite(), freezer, policy, LRAndThroughput(), RNGState(), *(callbacks or [])],
            position[2] if position else None,
        )
    # the set sampler resumes mid-epoch itself (SetPlan.resume_from); Lightning cannot see that
    warnings.filterwarnings("ignore", message=".*dataloader is not resumable.*")
    with session.running(trainer, policy):
        ckpt = str(session.last_ckpt) if session.last_ckpt else None
        if ckpt is None and cfg.checkpoint.validate_at_start:  # step 0 is a candidate for best-val.pt
            trainer.validate(module, datamodule=dm, verbose=False, weights_only=True)
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt, weights_only=True)
        if policy.last_val_step != trainer.global_step:  # best-val.pt also sees the final weights
            trainer.validate(module, datamodule=dm, verbose=False, weights_only=True)
        policy.save_final(trainer, module)  # final.pt, in a run without a validation loss
    return run_dir


def check_steps(cfg: TrainConfig) -> None:
    """The step counts, before a run directory is made (Lightning would refuse them mid-setup)."""
    # composition has already scaled the steps (each to at least 1): a step_scale <= 0 is refused here
    if not cfg.step_scale > 0:
        raise UserError(f"step_scale={cfg.step_scale} must be > 0; it multiplies the study's step counts")
    if not cfg.step_scale <= MAX_STEP_SCALE:  # e.g. 1e30: every step count and the warmup far past any run
        raise UserError(
            f"step_scale={cfg.step_scale} is above {MAX_STEP_SCALE:g}; it multiplies the study's step counts "
            "(1 = the study's own), give a smaller one"
        )
    if cfg.trainer.max_steps < 0:  # 0: no training, the starting weights are the run's result
        raise UserError(f"trainer.max_steps={cfg.trainer.max_steps} must be >= 0")
    if cfg.trainer.max_steps > MAX_STEPS:
        raise UserError(
            f"trainer.max_steps={cfg.trainer.max_steps} is above {MAX_STEPS:,} (the study's longest round is "
            "50,000); give a step count a run can reach"
        )
    for key in ("val_check_interval", "log_every_n_steps"):
        if getattr(cfg.trainer, key) < 1:
            raise UserError(f"trainer.{key}={getattr(cfg.trainer, key)} must be >= 1")


def _warn_frozen_from_scratch(cfg: TrainConfig) -> None:
    """A round that freezes modules but starts from no weights (`pretrained=null`) keeps them at their random
    initialisation for as long as they stay frozen: say so, it is rarely what the user means."""
    if not cfg.freeze.modules or (cfg.freeze.until_step is not None and cfg.freeze.until_step <= 0):
        return
    until = "the whole run" if cfg.freeze.until_step is None else f"step {cfg.freeze.until_step}"
    log.warning(
        "no parent weights (init_from is null): freeze.modules=%s stay at their random initialisation until "
        "%s; give pretrained=<checkpoint> for a fine-tune, or freeze.modules=[] to train them from scratch",
        list(cfg.freeze.modules),
        until,
    )


def training_data(cfg: TrainConfig) -> PerturbationDataModule:
    """The data module `train` uses (also `tahoe-ft check`), opened and validated; the embedded data sets it
    names are generated or prepared first, where missing (`datasets.ensure_files`)."""
    from tahoe_ft.datasets import ensure_files

    ensure_files(cfg.data)
    dm = PerturbationDataModule(
        cfg.data,
        embed_key=cfg.encoder.embed_key,
        need_counts=cfg.encoder.decoder is not None,
        cell_set_len=cfg.model.cell_set_len,
        seed=cfg.seed,
        aux_key=_aux_key(cfg),
        target_knockdown=_target_knockdown(cfg),
    )
    dm.setup("fit")
    return dm


def _target_knockdown(cfg: TrainConfig) -> bool:
    """model.target_knockdown in a gene-space round; an embedding round has no target-gene output."""
    wanted = bool(getattr(cfg.model, "target_knockdown", False))
    if wanted and cfg.encoder.embed_key is not None:
        log.info(
            "model.target_knockdown ignored: %s predicts embeddings, not the target gene", cfg.encoder.name
        )
        return False
    return wanted


def _fresh_modules(run_dir: Path) -> set[str]:
    """The re-initialised modules of a run's init report (empty when it trained from scratch)."""
    import json

    path = run_dir / "init_report.json"
    report = json.loads(path.read_text()) if path.is_file() else {}
    return set(report.get("reinitialised_modules") or [])


def _feature_prior(cfg: TrainConfig, hparams: dict[str, Any]) -> bool:
    """model.feature_prior in a gene-space round whose head has the skip path (an embedding round's output is
    not genes; a head without the skip path, e.g. one loaded from an upstream checkpoint, has nowhere to add
    it): ignored otherwise, with a log line."""
    if not cfg.model.feature_prior:
        return False
    if cfg.encoder.embed_key is not None:
        log.info("model.feature_prior ignored: %s predicts embeddings, not genes", cfg.encoder.name)
        return False
    if not (hparams["head_skip"] and hparams["predict_residual"] and hparams["output_space"] == "all"):
        log.info(
            "model.feature_prior ignored: the head has no skip path (model.head_skip, or the parent's head)"
        )
        return False
    return True


def _prior_loaded(parent, model) -> bool:
    """Whether the parent checkpoint carried a feature prior that init_from loaded (same shapes): the chain's
    first prior round fits it, the rounds after it keep the parent's."""
    if parent is None:
        return False
    own = model.state_dict()
    keys = [k for k in own if k.startswith("feature_prior.")]
    return all(k in parent.state_dict and parent.state_dict[k].shape == own[k].shape for k in keys)


def fit_feature_prior(model, dm: PerturbationDataModule) -> None:
    """Fit the feature ridge on the training groups (what the baseline panel's `feature_ridge` fits), make it
    the model's prior, and zero the last layers of the head so that the model predicts `basal + ridge effect`
    at step 0 and fine-tuning learns the residual."""
    ridge = dm.feature_ridge()
    model.feature_prior.set_ridge(ridge, dm.cell_types)
    model.zero_head_output()
    log.info(
        "feature prior: the feature ridge of %d training groups (penalty %.4g by leave-one-out); the head's "
        "last layers start at zero, so step 0 predicts basal cells + the ridge's effect",
        ridge.n_groups,
        ridge.penalty,
    )


def _aux_key(cfg: TrainConfig) -> str | None:
    """The auxiliary target's obsm key when the auxiliary loss is on (loss.aux_key with aux_weight > 0)."""
    if not hasattr(cfg, "loss"):  # `tahoe-ft check` opens the data as train would, without a loss
        return None
    if cfg.loss.aux_weight < 0:
        raise UserError(f"loss.aux_weight={cfg.loss.aux_weight} must be >= 0")
    if cfg.loss.aux_weight > 0 and not cfg.loss.aux_key:
        raise UserError("loss.aux_weight > 0 needs loss.aux_key (e.g. loss.aux_key=X_state)")
    return cfg.loss.aux_key if cfg.loss.aux_weight > 0 else None


def _manifest(dm: PerturbationDataModule, cfg: TrainConfig) -> dict[str, Any]:
    """The data manifest every checkpoint of the run carries (as a plain dict), with the encoder's name and the
    run's own lineage facts (data fingerprint, split id, training groups; the ancestors come with the parent)."""
    manifest = dm.manifest()
    if dataclasses.is_dataclass(manifest):
        manifest = dataclasses.replace(manifest, encoder=cfg.encoder.name).to_dict()
    else:
        manifest["encoder"] = cfg.encoder.name
    manifest["data_fingerprint"] = data_fingerprint(manifest["data_paths"])
    manifest["split_id"] = split_id(manifest["held_out"])
    manifest["trained"] = trained_groups(dm.catalog.groups("train"))
    manifest["regime"] = str(cfg.data.regime) if cfg.data.regime else None  # what the split holds out
    manifest["lineage"] = []
    return manifest


def _parent_path(cfg: TrainConfig, manifest: dict[str, Any]) -> Path:
    """`init_from` as a file: `run:EXP/FILE` is the newest run of EXP on this data and split, or on other data
    (a base model); see `tahoe_ft.lineage`."""
    m = RUN_REF.match(str(cfg.init_from))
    if m is None:
        return resolve_ref(cfg.init_from, cfg.runs_dir)
    exp, file = m.group("exp"), m.group("file") or "best-val.pt"
    rel = file if "/" in file else f"checkpoints/{file}"
    runs = [r for r in list_runs(cfg.runs_dir, exp) if (r / rel).exists()]
    if not runs:
        newest_run(cfg.runs_dir, exp, need=rel)  # raises: no run of EXP with that file
    return pick_parent(
        runs,
        rel,
        data_fingerprint=manifest["data_fingerprint"],
        split=manifest["split_id"],
        exp=exp,
        runs_dir=Path(cfg.runs_dir).resolve(),
    )


def _check_lineage(manifest: dict[str, Any], parent: Any, parent_path: Path) -> None:
    """Refuse a parent (or ancestor) that trained on a held-out group; record the lineage in the manifest."""
    run_info = read_run_info(_run_folder_of(parent_path)) if parent.manifest else {}
    lineage = lineage_of(parent.manifest, checkpoint=str(parent_path), run_info=run_info)
    unchecked = check_no_leak(lineage, manifest["held_out"])
    if unchecked:
        log.warning(
            "lineage: %s record no training groups (an upstream or older checkpoint): not checked for "
            "held-out perturbations",
            ", ".join(unchecked),
        )
    manifest["lineage"] = lineage


def _run_folder_of(checkpoint: Path) -> Path:
    """The tahoe-ft run folder of `<run>/checkpoints/<file>` (run.json beside `checkpoints/`)."""
    return checkpoint.resolve().parent.parent


def build_hparams(cfg: TrainConfig, dims: dict[str, Any], parent: dict[str, Any] | None) -> dict[str, Any]:
    """Model hparams: data-dependent widths from the data, architecture from the parent (or cfg.model)."""
    m = cfg.model
    hp = model_hparams(m)  # the options copied as they are, and the backbone's (model/hparams.py)
    if parent is not None:
        differs = [k for k in ARCH_HPARAMS if k in parent and parent[k] != hp[k]]
        if differs:
            log.info(
                "architecture from the parent checkpoint, not configs/model (differs in: %s)",
                ", ".join(differs),
            )
        hp.update({k: parent[k] for k in ARCH_HPARAMS if k in parent})
        hp["head_skip"] = _head_skip(m.head_skip, parent, dims)
    enc = cfg.encoder
    decoder_cfg = None
    if enc.decoder is not None:
        hidden = list(enc.decoder.hidden_dims)
        if parent is not None and parent.get("decoder_cfg"):
            hidden = list(parent["decoder_cfg"]["hidden_dims"])  # so a parent's decoder can load
        decoder_cfg = {
            "latent_dim": dims["output_dim"],
            "gene_dim": dims["gene_dim"],
            "hidden_dims": hidden,
            "dropout": enc.decoder.dropout,
            "residual_decoder": enc.decoder.residual_decoder,
        }
    hp.update(
        input_dim=dims["input_dim"],
        output_dim=dims["output_dim"],
        pert_dim=dims["pert_dim"],
        gene_dim=dims["gene_dim"] if decoder_cfg else None,
        batch_dim=dims.get("batch_dim"),
        aux_dim=dims.get("aux_dim"),
        target_knockdown=dims.get("target_knockdown"),
        batch_encoder=bool(m.batch_encoder and dims.get("batch_dim")),
        embed_key=enc.embed_key,
        output_space=enc.output_space,
        decoder_cfg=decoder_cfg,
    )
    return hp


def _head_skip(wanted: bool, parent: dict[str, Any], dims: dict[str, Any]) -> bool:
    """The skip path changes what a head computes (out = x + f(x) instead of f(x)), so it follows the parent
    whenever the parent's output head loads (same input and output widths); a re-initialised head (the
    raw-expression rounds from an embedding-space parent) takes `model.head_skip`. A parent that does not
    record it (an upstream `state tx train` checkpoint) has no skip path."""
    same_widths = (
        parent.get("input_dim") == dims["input_dim"] and parent.get("output_dim") == dims["output_dim"]
    )
    if same_widths:
        return bool(parent.get("head_skip", False))
    return bool(wanted)


def _loggers(cfg: TrainConfig, run_dir: Path, resume_step: int | None) -> list:
    loggers: list = [MetricsCSVLogger(run_dir / f"{cfg.experiment}_metrics.csv", resume_step)]
    if cfg.logger.wandb and cfg.logger.wandb_mode != "disabled":
        from lightning.pytorch.loggers import WandbLogger

        os.environ.setdefault("WANDB_SILENT", "true")
        loggers.append(
            WandbLogger(
                save_dir=str(run_dir),
                project=cfg.logger.wandb_project,
                entity=cfg.logger.wandb_entity,
                name=f"{cfg.experiment}/{run_dir.name}",
                id=f"{cfg.experiment}-{run_dir.name}".replace("/", "-"),
                resume="allow",
                mode=cfg.logger.wandb_mode,
                tags=list(cfg.logger.wandb_tags),
                group=cfg.logger.wandb_group,
                config=as_dict(cfg),
            )
        )
    return loggers


def _trainer(cfg: TrainConfig, run_dir: Path, callbacks: list, resume_step: int | None) -> L.Trainer:
    t = cfg.trainer
    if t.enable_progress_bar:
        callbacks = [*callbacks, RichProgressBar(leave=False)]
    return L.Trainer(
        max_steps=t.max_steps,
        val_check_interval=min(t.val_check_interval, t.max_steps),
        check_val_every_n_epoch=None,
        log_every_n_steps=t.log_every_n_steps,
        gradient_clip_val=t.gradient_clip_val,
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=t.strategy,
        num_nodes=t.num_nodes,
        precision=t.precision,
        enable_progress_bar=t.enable_progress_bar,
        deterministic=t.deterministic,
        logger=_loggers(cfg, run_dir, resume_step),
        callbacks=callbacks,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # the set sampler shards sets per DDP rank itself
        default_root_dir=str(run_dir),
    )
