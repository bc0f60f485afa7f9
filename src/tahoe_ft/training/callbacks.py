"""Run logging and checkpoint policy: the local metrics CSV, LR and throughput, best-val.pt / last.ckpt / step-N.pt."""

from __future__ import annotations

import csv
import logging
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers.logger import Logger, rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from tahoe_ft.checkpoints.io import atomic_torch_save, weights_payload
from tahoe_ft.fileio import atomic_path
from tahoe_ft.runs import update_run_info

log = logging.getLogger(__name__)


def checked_val_loss(trainer: L.Trainer) -> float | None:
    """The `val_loss` of the validation check that just ended; None in the sanity check or when none was
    logged. What every callback that acts on a validation check reads (checkpoints, the sweep's pruner)."""
    if trainer.sanity_checking:
        return None
    val = trainer.callback_metrics.get("val_loss")
    return None if val is None else float(val)


class MetricsCSVLogger(Logger):
    """`<experiment>_metrics.csv`: one row per logging event, one column per metric, blank where absent.

    Rows are appended as they come; when a new metric appears the file is rewritten once (atomically) with
    the wider header. An existing file (a resumed run) is kept and extended; with `resume_step` (the step of
    the last.ckpt the run continues from) the rows logged after that checkpoint — which the resumed run logs
    again — and a line cut short by a kill are dropped first, so every step appears once.
    """

    def __init__(self, path: Path, resume_step: int | None = None):
        super().__init__()
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        self.columns: list[str] = ["step"]
        # set by LRAndThroughput.on_fit_start: rows are labelled with the optimizer steps done so far
        self.trainer = None
        if self.path.exists():
            with open(self.path, newline="") as fh:
                reader = csv.DictReader(fh)
                self.columns = list(reader.fieldnames or ["step"])
                self.rows = [dict(r) for r in reader]
            if resume_step is not None:
                kept = [r for r in self.rows if _row_step(r, len(self.columns)) <= resume_step]
                if len(kept) != len(self.rows):
                    self.rows = kept
                    self._rewrite()

    @property
    def name(self) -> str:
        return "csv"

    @property
    def version(self) -> str:
        return "0"

    @property
    @rank_zero_experiment
    def experiment(self) -> MetricsCSVLogger:
        return self

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.trainer is not None:
            step = self.trainer.global_step
        row = {"step": step, **{k: _num(v) for k, v in metrics.items() if k != "epoch"}}
        new_cols = [k for k in row if k not in self.columns]
        self.rows.append(row)
        if new_cols or not self.path.exists():
            self.columns += new_cols
            self._rewrite()
        else:
            with open(self.path, "a", newline="") as fh:
                csv.DictWriter(fh, fieldnames=self.columns).writerow(row)

    def _rewrite(self) -> None:
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=self.columns)
            w.writeheader()
            w.writerows(self.rows)


def _row_step(row: dict[str, Any], n_columns: int) -> float:
    """A row's step; inf for a row cut short (a kill during an append), so resuming drops it."""
    if None in row or len(row) != n_columns or any(v is None for v in row.values()):
        return math.inf
    try:
        return float(row["step"])
    except (TypeError, ValueError):
        return math.inf


def _num(v: Any) -> float:
    try:
        return float(v.item()) if hasattr(v, "item") else float(v)
    except (TypeError, ValueError):
        return math.nan


class LRAndThroughput(L.Callback):
    """Logs the LR of every parameter group (first at step 0) and training throughput in cells/s."""

    def __init__(self) -> None:
        self._t0: float | None = None
        self._first = True

    def on_fit_start(self, trainer, pl_module) -> None:
        for lg in trainer.loggers:
            if isinstance(lg, MetricsCSVLogger):
                lg.trainer = trainer

    def _lrs(self, trainer) -> dict[str, float]:
        out = {}
        for opt in trainer.optimizers:
            for i, g in enumerate(opt.param_groups):
                name = g.get("name", str(i))
                key = "lr" if name == "main" else f"lr/{name}"
                out.setdefault(key, float(g["lr"]))
        return out

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._first and trainer.global_step == 0:
            # the first LR of this run, before any step: the schedule's warmup start after init_from (a resumed
            # run logged it when it started)
            for lg in trainer.loggers:
                lg.log_metrics(self._lrs(trainer), step=trainer.global_step)
        self._first = False
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._t0 is None:
            return
        dt = max(time.perf_counter() - self._t0, 1e-9)
        n_cells = batch["pert_emb"].shape[0] * batch["pert_emb"].shape[1]
        pl_module.log("cells_per_s", n_cells / dt, on_step=True, on_epoch=False)
        for k, v in self._lrs(trainer).items():
            pl_module.log(k, v, on_step=True, on_epoch=False)


class StopOnNonFinite(L.Callback):
    """A NaN/Inf training loss stops the run at once with one clear line, before any checkpoint is written from
    the broken step: last.ckpt and best-val.pt stay those of the last good validation. (First in the callback
    list, so it runs before the checkpoint policy's hooks of the same step.)"""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not torch.isfinite(loss.detach()).all():
            from tahoe_ft.errors import UserError

            raise UserError(
                f"the training loss is {float(loss.detach()):g} at step {trainer.global_step} "
                f"({trainer.default_root_dir}); the run stopped and keeps its last good checkpoints "
                "(checkpoints/last.ckpt, best-val.pt): lower optim.lr or check the data, then resume=true"
            )


class RNGState(L.Callback):
    """Saves torch's RNG state (dropout masks) in last.ckpt and puts it back just before the first step of a
    resumed run, so a resumed run draws the same dropout masks as an uninterrupted one (the set sampler has
    its own seeded generators). Tensors only: last.ckpt still loads with weights_only=True."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = state

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._pending is None:
            return
        torch.set_rng_state(self._pending["torch"])
        if "cuda" in self._pending and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self._pending["cuda"])
        self._pending = None


class CheckpointPolicy(L.Callback):
    """best-val.pt at the minimum val_loss, last.ckpt (full state) at every validation and at the end,
    optional step-N.pt every N steps. All writes are atomic; run.json tracks the best so far. A run that
    never had a finite validation loss (no validation perturbations: train on everything, predict the test
    ones) gets final.pt instead of best-val.pt: the end weights, with the data manifest predict needs."""

    def __init__(
        self,
        run_dir: Path,
        experiment: str,
        manifest: dict,
        config: dict,
        every_n_steps: int | None = None,
        save_last: bool = True,
    ):
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        self.experiment = experiment
        self.manifest = manifest
        self.config = config
        self.every_n_steps = every_n_steps
        self.save_last = save_last
        self.best_val: float = math.inf
        self.best_step: int = -1
        self.last_val_step: int = -1

    def state_dict(self) -> dict[str, Any]:
        return {"best_val": self.best_val, "best_step": self.best_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_val = float(state.get("best_val", math.inf))
        self.best_step = int(state.get("best_step", -1))

    def _payload(self, pl_module, step: int, val_loss: float | None) -> dict:
        return weights_payload(
            pl_module.model,
            manifest=self.manifest,
            step=step,
            val_loss=val_loss,
            experiment=self.experiment,
            config=self.config,
        )

    def _save_last(self, trainer) -> None:
        if not self.save_last or trainer.state.fn != "fit":
            return
        final = self.ckpt_dir / "last.ckpt"
        if not trainer.is_global_zero:  # a collective call under DDP; only rank 0 writes the file
            trainer.save_checkpoint(final, weights_only=False)
            return
        with atomic_path(final, suffix=".ckpt") as tmp:
            trainer.save_checkpoint(tmp, weights_only=False)  # full state: optimizer, schedule, loops

    def on_validation_end(self, trainer, pl_module) -> None:
        val = checked_val_loss(trainer)
        if val is None:
            return
        step = trainer.global_step
        self.last_val_step = step
        if trainer.is_global_zero and math.isfinite(val) and val < self.best_val:
            self.best_val, self.best_step = val, step
            atomic_torch_save(self._payload(pl_module, step, val), self.ckpt_dir / "best-val.pt")
            update_run_info(self.run_dir, best_val_loss=val, best_step=step)
            log.info("best-val.pt <- step %d (val_loss %.5f)", step, val)
        self._save_last(trainer)
        if trainer.is_global_zero:
            update_run_info(self.run_dir, steps=step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = self.every_n_steps
        step = trainer.global_step
        if n and step > 0 and step % n == 0 and trainer.is_global_zero:
            atomic_torch_save(self._payload(pl_module, step, None), self.ckpt_dir / f"step-{step}.pt")

    def on_train_end(self, trainer, pl_module) -> None:
        self._save_last(trainer)

    def save_final(self, trainer, pl_module) -> None:
        """final.pt (the end weights, with the data manifest) when the run has no best-val.pt: called once
        training and its last validation are over (also after `trainer.max_steps=0`, where Lightning calls no
        training hook)."""
        if self.best_step >= 0 or not trainer.is_global_zero:
            return
        step = trainer.global_step
        atomic_torch_save(self._payload(pl_module, step, None), self.ckpt_dir / "final.pt")
        log.info("no validation loss in this run: final.pt <- step %d (predict it with ckpt=final.pt)", step)
