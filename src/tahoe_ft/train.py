"""`tahoe-ft train`: one round of fine-tuning, read top to bottom.

data -> model (architecture from the parent checkpoint when there is one) -> weights-only init with a
report -> loggers and callbacks -> Lightning `fit` -> best-val.pt / last.ckpt in a fresh run directory.
`resume=true` is the only way to continue a run, and it refuses a changed optimizer or schedule.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from omegaconf import DictConfig, OmegaConf

from tahoe_ft.callbacks import CheckpointPolicy, LRAndThroughput, MetricsCSVLogger
from tahoe_ft.checkpoint import format_report, init_from_weights, read_weights, safe_load
from tahoe_ft.data import PerturbationDataModule
from tahoe_ft.errors import UserError
from tahoe_ft.freeze import FreezeCallback
from tahoe_ft.module import STLightningModule
from tahoe_ft.runs import (
    new_run_dir,
    newest_run,
    now_iso,
    read_run_info,
    resolve_ref,
    set_latest,
    update_run_info,
    write_json_atomic,
)

log = logging.getLogger(__name__)

# Architecture keys taken from the parent checkpoint (a backbone only transfers to the same architecture).
ARCH_KEYS = (
    "hidden_dim",
    "n_encoder_layers",
    "n_decoder_layers",
    "activation",
    "predict_residual",
    "use_basal_projection",
    "transformer_backbone_key",
    "transformer_backbone_kwargs",
)
# Settings that a resumed run must keep: changing them mid-run would be silently ignored or inconsistent.
RESUME_FIXED = ("optim", "sched", "loss", "freeze", "trainer.max_steps", "model", "encoder", "seed")


def build_hparams(cfg: DictConfig, dims: dict[str, Any], parent: dict[str, Any] | None) -> dict[str, Any]:
    """Model hparams: data-dependent widths from the data, architecture from the parent (or cfg.model)."""
    m = cfg.model
    hp: dict[str, Any] = {
        "hidden_dim": m.hidden_dim,
        "n_encoder_layers": m.n_encoder_layers,
        "n_decoder_layers": m.n_decoder_layers,
        "activation": m.activation,
        "predict_residual": m.predict_residual,
        "use_basal_projection": m.use_basal_projection,
        "transformer_backbone_key": "llama",
        "transformer_backbone_kwargs": {
            "hidden_size": m.hidden_dim,
            **OmegaConf.to_container(m.backbone),
            "bidirectional_attention": True,
        },
    }
    if parent is not None:
        differs = [k for k in ARCH_KEYS if k in parent and parent[k] != hp[k]]
        if differs:
            log.info(
                "architecture from the parent checkpoint, not configs/model (differs in: %s)",
                ", ".join(differs),
            )
        hp.update({k: parent[k] for k in ARCH_KEYS if k in parent})
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
        batch_encoder=bool(m.batch_encoder and dims.get("batch_dim")),
        embed_key=enc.embed_key,
        output_space=enc.output_space,
        decoder_cfg=decoder_cfg,
        dropout=m.dropout,
        cell_set_len=m.cell_set_len,
    )
    return hp


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _check_resume_compatible(saved: dict[str, Any], now: dict[str, Any], run_dir: Path) -> None:
    a, b = _flat(saved), _flat(now)
    changed = sorted(
        k
        for k in set(a) | set(b)
        if any(k == f or k.startswith(f + ".") for f in RESUME_FIXED) and a.get(k) != b.get(k)
    )
    if changed:
        k = changed[0]
        raise UserError(
            f"resume=true refuses changed settings in {run_dir}: {k} was {a.get(k)!r}, now {b.get(k)!r}"
            + (f" (+{len(changed) - 1} more)" if len(changed) > 1 else "")
            + "; resume with the run's own config, or start a new run with init_from=<its checkpoint>"
        )


def _resume_target(cfg: DictConfig) -> tuple[Path, Path]:
    run_dir = (
        Path(cfg.run_dir)
        if cfg.run_dir
        else newest_run(cfg.runs_dir, cfg.experiment, need="checkpoints/last.ckpt")
    )
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise UserError(f"resume=true: {last} does not exist; start a new run without resume=true")
    return run_dir, last


# Lightning's DDP launcher re-runs the command in one process per extra device; those processes must use the
# run directory of the process the user started, not create their own.
RUN_DIR_ENV = "TAHOE_FT_RUN_DIR"


def _is_launcher_child() -> bool:
    return os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0"


def _child_run_dir() -> Path:
    shared = os.environ.get(RUN_DIR_ENV)
    if not shared:
        raise UserError(
            "this is a DDP worker process but the run directory of rank 0 is unknown; on several nodes set "
            f"{RUN_DIR_ENV}=<a run directory on a shared file system> on every node"
        )
    return Path(shared)


def training_data(cfg: DictConfig) -> PerturbationDataModule:
    """The data module `train` uses (also `tahoe-ft check`), opened and validated."""
    dm = PerturbationDataModule(
        cfg.data,
        embed_key=cfg.encoder.embed_key,
        need_counts=cfg.encoder.decoder is not None,
        cell_set_len=cfg.model.cell_set_len,
        seed=cfg.seed,
    )
    dm.setup("fit")
    return dm


def _epoch_position(last_ckpt: Path) -> tuple[int, int]:
    """(epoch, batches of it already trained) of a last.ckpt, from Lightning's own loop state."""
    ck = safe_load(last_ckpt)
    progress = ck["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]
    return int(ck["epoch"]), int(progress["completed"])


def _loggers(cfg: DictConfig, run_dir: Path) -> list:
    loggers: list = [MetricsCSVLogger(run_dir / f"{cfg.experiment}_metrics.csv")]
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
                config=OmegaConf.to_container(cfg, resolve=True),
            )
        )
    return loggers


def train(cfg: DictConfig, callbacks: list | None = None) -> Path:
    """Train one round as configured; return its run directory. `callbacks` are extra Lightning callbacks."""
    L.seed_everything(cfg.seed, workers=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)

    # -- run directory: a new one, or the run being resumed ----------------------------------------
    child = _is_launcher_child()
    if cfg.resume:
        run_dir, last_ckpt = _resume_target(cfg) if not child else (_child_run_dir(), None)
        last_ckpt = last_ckpt or run_dir / "checkpoints" / "last.ckpt"
        saved = OmegaConf.to_container(OmegaConf.load(run_dir / f"{cfg.experiment}_config.yaml"))
        _check_resume_compatible(saved, resolved, run_dir)
    else:
        last_ckpt = None

    # -- parent weights (weights only: never its optimizer, schedule or step) ----------------------
    parent_state, parent_hp, parent_path = None, None, None
    if cfg.init_from and not cfg.resume:
        parent_path = resolve_ref(str(cfg.init_from), cfg.runs_dir)
        parent_state, parent_hp, _ = read_weights(parent_path)

    # -- data ----------------------------------------------------------------------------------------
    dm = training_data(cfg)
    if last_ckpt is not None:
        dm.resume_at(*_epoch_position(last_ckpt))
    manifest = dm.manifest()
    manifest["encoder"] = cfg.encoder.name

    # -- model ----------------------------------------------------------------------------------------
    hparams = build_hparams(cfg, dm.dims, parent_hp)
    train_cfg = {
        "loss": OmegaConf.to_container(cfg.loss),
        "optim": OmegaConf.to_container(cfg.optim),
        "sched": OmegaConf.to_container(cfg.sched),
        "freeze": OmegaConf.to_container(cfg.freeze),
        "max_steps": cfg.trainer.max_steps,
    }
    module = STLightningModule(hparams, train_cfg)
    freezer = FreezeCallback(list(cfg.freeze.modules), cfg.freeze.until_step)
    freezer.check(module.model)

    if child:
        run_dir = _child_run_dir()
    elif not cfg.resume:
        run_dir = new_run_dir(cfg.runs_dir, cfg.experiment)
        (run_dir / f"{cfg.experiment}_config.yaml").write_text(OmegaConf.to_yaml(resolved))
        write_json_atomic(
            run_dir / "manifest.json", {k: v for k, v in manifest.items() if k != "pert_matrix"}
        )
        update_run_info(
            run_dir,
            experiment=cfg.experiment,
            run_id=run_dir.name,
            status="running",
            started=now_iso(),
            parent=str(parent_path) if parent_path else None,
            description=cfg.description,
            wall_time_s=0.0,
            steps=0,
            best_val_loss=None,
            best_step=None,
        )
        set_latest(run_dir)
    os.environ[RUN_DIR_ENV] = str(run_dir)  # inherited by DDP worker processes
    if parent_state is not None:
        report = init_from_weights(module.model, parent_state, str(parent_path))
        if not child:
            write_json_atomic(run_dir / "init_report.json", report)
            log.info(format_report(report))
    elif not cfg.resume and not child:
        write_json_atomic(run_dir / "init_report.json", {"source": None, "note": "trained from scratch"})

    # -- trainer -------------------------------------------------------------------------------------
    policy = CheckpointPolicy(
        run_dir,
        cfg.experiment,
        manifest,
        resolved,
        every_n_steps=cfg.checkpoint.every_n_steps,
        save_last=cfg.checkpoint.save_last,
    )
    callbacks = [
        freezer,
        policy,
        LRAndThroughput(),
        *(callbacks or []),
    ]
    if cfg.trainer.enable_progress_bar:
        callbacks.append(RichProgressBar(leave=False))
    t = cfg.trainer
    trainer = L.Trainer(
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
        logger=_loggers(cfg, run_dir),
        callbacks=callbacks,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        # the set sampler shards sets per DDP rank itself
        use_distributed_sampler=False,
        default_root_dir=str(run_dir),
    )

    # the set sampler resumes mid-epoch itself (SetPlan.resume_from); Lightning cannot see that
    warnings.filterwarnings("ignore", message=".*dataloader is not resumable.*")
    start = time.perf_counter()
    info = read_run_info(run_dir)
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=str(last_ckpt) if last_ckpt else None, weights_only=True)
        if policy.last_val_step != trainer.global_step:
            trainer.validate(
                module, datamodule=dm, verbose=False, weights_only=True
            )  # best-val.pt also sees the final weights
    except BaseException:
        if not child:
            update_run_info(
                run_dir,
                status="failed",
                wall_time_s=info.get("wall_time_s", 0.0) + time.perf_counter() - start,
            )
        raise
    if not trainer.is_global_zero:
        return run_dir
    wall = float(info.get("wall_time_s") or 0.0) + time.perf_counter() - start
    update_run_info(
        run_dir,
        status="finished",
        finished=now_iso(),
        wall_time_s=wall,
        steps=trainer.global_step,
        best_val_loss=policy.best_val,
        best_step=policy.best_step,
        resumed=(info.get("resumed", 0) + 1) if cfg.resume else info.get("resumed", 0),
    )
    log.info("run finished: %s (best val_loss %.5f at step %d)", run_dir, policy.best_val, policy.best_step)
    print(
        json.dumps({"run_dir": str(run_dir), "best_val_loss": policy.best_val, "best_step": policy.best_step})
    )
    return run_dir
