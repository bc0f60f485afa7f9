"""`STLightningModule`: the ST model with its losses, optimizer and LR schedule.

Loss (SPEC §4.2): energy distance per set between predicted and observed cells, averaged over sets;
with embedding input, `total = main + decoder_weight * decoder` where the decoder loss is the same
distance in gene space. Every term and the weight in effect are logged.

Optimizer: AdamW with weight decay (not on biases and norm weights). Schedule: linear warmup from
`warmup_start_factor * lr`, then cosine down to `min_lr_factor * lr` (or one-cycle, or constant). Frozen
modules get their own parameter group whose LR is 0 until they are unfrozen, then warms up again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from tahoe_ft.config import (
    FreezeConfig,
    LossConfig,
    Monitor,
    OptimConfig,
    SchedConfig,
    TrainConfig,
    as_dict,
)
from tahoe_ft.errors import UserError
from tahoe_ft.model.loss import DistributionLoss, unbiased_energy_distance, unbiased_mean_error
from tahoe_ft.model.st import StateTransitionModel, module_of


class LRSchedule:
    """LR factor as a function of the global step (a picklable callable for LambdaLR)."""

    def __init__(
        self,
        name: str,
        max_steps: int,
        warmup_steps: int,
        warmup_start_factor: float,
        min_lr_factor: float,
        start_step: int = 0,
    ):
        self.name = name
        self.max_steps = max(int(max_steps), 1)
        self.warmup_steps = max(int(warmup_steps), 0)
        self.start = float(warmup_start_factor)
        self.floor = float(min_lr_factor)
        # parameters unfrozen mid-run: 0 before `start_step`, then a fresh warmup from it
        self.start_step = int(start_step)

    def __call__(self, step: int) -> float:
        if step < self.start_step:
            return 0.0
        s = step - self.start_step
        span = max(self.max_steps - self.start_step, 1)
        warm = min(self.warmup_steps, span)
        if self.name == "onecycle":
            # linear up to 1 over `warm`, then cosine down to `floor` (Smith's one-cycle, LR only)
            warm = warm or max(span // 10, 1)
        if warm > 0 and s < warm:
            return self.start + (1.0 - self.start) * s / warm
        if self.name == "constant":
            return 1.0
        progress = min((s - warm) / max(span - warm, 1), 1.0)
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class TrainingSettings:
    """What the LightningModule needs besides the architecture: the typed sections of the round's TrainConfig
    (no defaults here: every value comes from the config, `TrainingSettings.of(cfg)`)."""

    loss: LossConfig
    optim: OptimConfig
    sched: SchedConfig
    freeze: FreezeConfig
    max_steps: int  # trainer.max_steps: the schedule's horizon
    monitor: Monitor  # checkpoint.monitor
    # one fused AdamW kernel per group; not under mixed precision (Lightning's AMP refuses clipping with it)
    fused_optimizer: bool

    @classmethod
    def of(cls, cfg: TrainConfig) -> TrainingSettings:
        return cls(
            loss=cfg.loss,
            optim=cfg.optim,
            sched=cfg.sched,
            freeze=cfg.freeze,
            max_steps=cfg.trainer.max_steps,
            monitor=Monitor(cfg.checkpoint.monitor),
            fused_optimizer="mixed" not in str(cfg.trainer.precision),
        )


class STLightningModule(L.LightningModule):
    """Trains a `StateTransitionModel`. `self.model` holds the upstream-named parameters."""

    def __init__(self, hparams: dict[str, Any], settings: TrainingSettings):
        super().__init__()
        # plain containers (enums as strings) in last.ckpt's hyper_parameters
        self.save_hyperparameters({"model": hparams, "train": as_dict(settings)})
        self.model = StateTransitionModel(hparams)
        self.settings = settings
        # top-level modules that init_from re-initialised (`reinitialised_modules` of the init report): they get
        # optim.fresh_lr_factor x the LR; set by the recipe before fit (and again from init_report.json on resume)
        self.fresh_modules: set[str] = set()
        loss = settings.loss
        self.loss_fn = DistributionLoss(str(loss.name), blur=loss.blur)
        self.decoder_weight = float(loss.decoder_weight)
        # weight of the set-mean term: MSE between the predicted and the observed mean of each set, in gene
        # space (the pseudobulk that MAE and PDS score, on which the energy distance has little grip)
        self.mean_weight = float(loss.mean_weight)
        # the auxiliary target (loss.aux_key, e.g. SE600M X_state): the aux head's prediction from the
        # backbone's hidden state against the target cells' embedding, by the same set distance
        self.aux_weight = float(loss.aux_weight)
        self.has_decoder = getattr(self.model, "gene_decoder", None) is not None
        self.set_len = int(hparams["cell_set_len"])
        monitor = settings.monitor
        if monitor == "decoder" and not self.has_decoder:
            raise UserError(
                "checkpoint.monitor=decoder needs a gene decoder (encoder=se600m); use main or auto"
            )
        self._monitor = (
            "decoder_loss"
            if monitor == "decoder" or (monitor == "auto" and self.has_decoder)
            else "main_loss"
        )

    # -- forward -------------------------------------------------------------------------------
    def _predict_sets(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        pert = batch["pert_emb"]  # [B,S,P]
        basal = batch["ctrl_cell_emb"]  # [B,S,D_in]
        batch_idx = batch.get("batch") if self.model.hparams.get("batch_encoder") else None
        target = batch.get("pert_target") if self.model.target_knockdown is not None else None  # [B,S]
        cell_type = batch["cell_type_idx"] if self.model.feature_prior is not None else None  # [B]
        return self.model.forward_sets(
            pert, basal, batch_idx, target=target, cell_type=cell_type, return_hidden=True
        )

    def _distance(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean over sets of the set distance, always in float32: under bf16 autocast the energy distance's
        matmuls would otherwise run in bf16, and it subtracts large, nearly equal terms."""
        with torch.autocast(device_type=pred.device.type, enabled=False):
            return torch.nanmean(self.loss_fn(pred.float(), target.float()))

    def _unbiased(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean over sets of the unbiased energy distance (`unbiased_energy_distance`, float64)."""
        return torch.nanmean(unbiased_energy_distance(pred, target)).float()

    def _losses(self, batch: dict[str, Any], unbiased: bool = False) -> dict[str, torch.Tensor]:
        """The losses of one batch; with `unbiased` (validation) also `unbiased_mean_loss` (the set-mean MSE
        without the set means' sampling noise) and, for the energy loss, `unbiased_<main|decoder>_loss` (the
        same distance over pairs of distinct cells, for the monitored one only): each 0 on average for a
        perfect sampler."""
        energy_u = unbiased and self.loss_fn.name == "energy"
        pred, hidden = self._predict_sets(batch)
        target = batch["pert_cell_emb"].reshape_as(pred)
        main = self._distance(pred, target)
        out = {"main_loss": main, "loss": main}
        if energy_u and self._monitor == "main_loss":
            out["unbiased_main_loss"] = self._unbiased(pred, target)
        genes, observed = pred, target  # gene space: the raw-expression rounds' own output
        if self.has_decoder and "pert_cell_counts" in batch:
            genes = self.model.decode(pred)  # [B,S,G]
            observed = batch["pert_cell_counts"].reshape_as(genes)
            dec = self._distance(genes, observed)
            out["decoder_loss"] = dec
            if energy_u and self._monitor == "decoder_loss":
                out["unbiased_decoder_loss"] = self._unbiased(genes, observed)
            out["loss"] = main + self.decoder_weight * dec
        with torch.autocast(device_type=genes.device.type, enabled=False):  # logged whatever its weight
            out["mean_loss"] = F.mse_loss(genes.float().mean(dim=1), observed.float().mean(dim=1))
        if unbiased:  # the same without the two set means' sampling noise
            out["unbiased_mean_loss"] = torch.nanmean(unbiased_mean_error(genes, observed)).float()
        if self.mean_weight > 0:
            out["loss"] = out["loss"] + self.mean_weight * out["mean_loss"]
        if self.model.aux_head is not None and "pert_cell_aux" in batch:
            aux_pred = self.model.aux_head(hidden)  # [B,S,E]
            out["aux_loss"] = self._distance(aux_pred, batch["pert_cell_aux"].reshape_as(aux_pred))
            out["loss"] = out["loss"] + self.aux_weight * out["aux_loss"]
        return out

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self._losses(batch)
        n_sets = batch["pert_emb"].shape[0]
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=n_sets)
        self.log("train/main_loss", losses["main_loss"], batch_size=n_sets)
        if "decoder_loss" in losses:
            self.log("train/decoder_loss", losses["decoder_loss"], batch_size=n_sets)
            # the weight the loss really used (upstream silently ignored its config key)
            self.log("train/decoder_weight", self.decoder_weight, batch_size=n_sets)
        self.log("train/mean_loss", losses["mean_loss"], batch_size=n_sets)
        if "aux_loss" in losses:
            self.log("train/aux_loss", losses["aux_loss"], batch_size=n_sets)
        return losses["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        losses = self._losses(batch, unbiased=self.set_len >= 2)
        n_sets = batch["pert_emb"].shape[0]
        # val_loss: the value best-val.pt is chosen by (checkpoint.monitor): the main loss (the study's choice),
        # or the gene-space decoder loss that matches the evaluator (embedding rounds)
        self.log("val_loss", losses[self._monitor], prog_bar=True, batch_size=n_sets, sync_dist=True)
        self.log("val/main_loss", losses["main_loss"], batch_size=n_sets, sync_dist=True)
        if f"unbiased_{self._monitor}" in losses:
            # val_loss without its sampling floor: what fine-tuning can remove of it (compare's unbiased_change)
            self.log(
                "val/unbiased_loss", losses[f"unbiased_{self._monitor}"], batch_size=n_sets, sync_dist=True
            )
        if "decoder_loss" in losses:
            self.log("val/decoder_loss", losses["decoder_loss"], batch_size=n_sets, sync_dist=True)
        self.log("val/mean_loss", losses["mean_loss"], batch_size=n_sets, sync_dist=True)
        if "unbiased_mean_loss" in losses:
            self.log(
                "val/unbiased_mean_loss", losses["unbiased_mean_loss"], batch_size=n_sets, sync_dist=True
            )
        if "aux_loss" in losses:
            self.log("val/aux_loss", losses["aux_loss"], batch_size=n_sets, sync_dist=True)

    # -- optimizer -------------------------------------------------------------------------------
    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """Lightning's step, then the gradients freed at once. Lightning frees them only after the next
        forward pass (just before its backward), so every forward held a full set of stale gradients: at
        ST-Tahoe's size that made the run's peak (+0.25 GiB above the backward's; BENCHMARKS.md). The
        numbers are the same: each backward starts from no gradients either way."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        optimizer.zero_grad(set_to_none=True)

    def configure_optimizers(self):
        st = self.settings
        optim_cfg, sched_cfg, freeze_cfg = st.optim, st.sched, st.freeze
        frozen_modules = set(freeze_cfg.modules)
        unfreeze_at = freeze_cfg.until_step
        # modules init_from re-initialised (none without a parent) learn at optim.fresh_lr_factor x the LR
        factor = float(optim_cfg.fresh_lr_factor)
        groups: dict[tuple[bool, bool, bool], list[torch.nn.Parameter]] = {}
        for name, p in self.model.named_parameters():
            delayed = module_of(name) in frozen_modules and unfreeze_at is not None
            no_decay = p.ndim < 2  # biases and norm weights
            fresh = factor != 1.0 and module_of(name) in self.fresh_modules
            groups.setdefault((delayed, no_decay, fresh), []).append(p)
        param_groups, lambdas = [], []
        max_steps = int(st.max_steps)
        for (delayed, no_decay, fresh), params in sorted(groups.items()):
            param_groups.append(
                {
                    "params": params,
                    "weight_decay": 0.0 if no_decay else float(optim_cfg.weight_decay),
                    "lr": float(optim_cfg.lr) * (factor if fresh else 1.0),
                    "name": ("unfrozen_later" if delayed else "main")
                    + ("/no_decay" if no_decay else "")
                    + ("/fresh" if fresh else ""),
                }
            )
            if delayed:
                lambdas.append(
                    LRSchedule(
                        str(sched_cfg.name),
                        max_steps,
                        int(freeze_cfg.warmup_steps),
                        0.0,
                        sched_cfg.min_lr_factor,
                        start_step=int(unfreeze_at),
                    )
                )
            else:
                lambdas.append(
                    LRSchedule(
                        str(sched_cfg.name),
                        max_steps,
                        int(sched_cfg.warmup_steps),
                        float(sched_cfg.warmup_start_factor),
                        float(sched_cfg.min_lr_factor),
                    )
                )
        opt = torch.optim.AdamW(
            param_groups,
            lr=float(optim_cfg.lr),
            betas=tuple(optim_cfg.betas),
            eps=float(optim_cfg.eps),
            # one fused kernel per group instead of a per-tensor loop: at 18,080 genes on CPU no +0.45 GiB
            # spike of temporaries per step and ~5x faster (BENCHMARKS.md), equal to 4e-9 after 5 steps.
            # Not under mixed precision: Lightning's AMP plugin refuses gradient clipping with a fused optimizer
            fused=st.fused_optimizer,
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambdas)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}
