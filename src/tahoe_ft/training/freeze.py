"""Freeze / unfreeze (SPEC §4.4): keep named modules frozen until a step, then train them with an LR warmup.

Frozen parameters get `requires_grad=False`, so they receive no gradient and AdamW leaves them untouched
(bit for bit). Their LR warmup after unfreezing lives in the schedule (`module.LRSchedule(start_step=...)`).
Trainable parameter counts per module are logged at the start and at every change.
"""

from __future__ import annotations

import logging
from collections import Counter

import lightning as L

from tahoe_ft.errors import UserError
from tahoe_ft.model.st import module_of

log = logging.getLogger(__name__)


def trainable_counts(model) -> dict[str, int]:
    """Trainable parameters per top-level module (0 for a frozen one)."""
    counts: Counter[str] = Counter()
    for name, p in model.named_parameters():
        counts[module_of(name)] += p.numel() if p.requires_grad else 0
    return dict(counts)


def total_counts(model) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for name, p in model.named_parameters():
        counts[module_of(name)] += p.numel()
    return dict(counts)


class FreezeCallback(L.Callback):
    """Freeze `modules` of `pl_module.model` until global step `until_step` (None = the whole run)."""

    def __init__(self, modules: list[str], until_step: int | None = None):
        self.modules = list(modules)
        self.until_step = until_step
        self.frozen = False

    def check(self, model) -> None:
        """Every name in freeze.modules must be a module of `model` (checked before a run dir exists)."""
        known = {module_of(n) for n, _ in model.named_parameters()}
        for m in self.modules:
            if m not in known:
                raise UserError(
                    f"freeze.modules names '{m}', which the model does not have; use some of {sorted(known)}"
                )

    def _set(self, pl_module, trainable: bool) -> None:
        for name, p in pl_module.model.named_parameters():
            if module_of(name) in self.modules:
                p.requires_grad_(trainable)
        self.frozen = not trainable

    def _report(self, trainer, pl_module, why: str) -> None:
        counts = trainable_counts(pl_module.model)
        totals = total_counts(pl_module.model)
        parts = ", ".join(f"{m} {counts[m]:,}/{totals[m]:,}" for m in totals)
        log.info("trainable parameters (%s, step %d): %s", why, trainer.global_step, parts)
        if why == "start" and trainer.global_step > 0:
            return  # a resumed run: its start (and any change since) is already in the metrics
        metrics = {f"trainable/{m}": float(c) for m, c in counts.items()}
        metrics["trainable/total"] = float(sum(counts.values()))
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=trainer.global_step)

    def on_train_start(self, trainer, pl_module) -> None:
        still_frozen = self.modules and (self.until_step is None or trainer.global_step < self.until_step)
        if still_frozen:
            self._set(pl_module, trainable=False)
        self._report(trainer, pl_module, "start")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.frozen and self.until_step is not None and trainer.global_step >= self.until_step:
            self._set(pl_module, trainable=True)
            self._report(trainer, pl_module, "unfrozen")
