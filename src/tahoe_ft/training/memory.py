"""The memory floor of a training run: what one process must hold whatever the screen's size.

floor = weights + gradients + optimizer state + batches in flight. Gradients and AdamW's two moments (exp_avg,
exp_avg_sq, fp32 like the weights) exist only for parameters that train at some point; modules frozen for the
whole run (`freeze.modules` with no `until_step`) have neither. Batches in flight are the loader's worst case
as the data module estimates it (`PerturbationDataModule._check_memory`): float32 pert + basal + target
(+ gene counts with a decoder, + the auxiliary target) rows of `batch_size` x `cell_set_len` cells, `num_workers` x `prefetch_factor`
prefetched plus the one being built and the one in the step. Activations, the interpreter and the libraries
come on top; `scripts/bench_memory.py` measures how far above the floor a run's peak is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from tahoe_ft.config import TrainConfig
from tahoe_ft.model.st import module_of

# AdamW keeps two moments per trained parameter
ADAMW_STATES = 2
FLOAT32_BYTES = 4
GIB = 1 << 30
MIB = 1 << 20


@dataclass(frozen=True)
class MemoryFloor:
    """Bytes a training process holds at least, by part."""

    weights: int
    gradients: int
    optimizer: int
    batch: int  # one collated batch
    batches_in_flight: int  # how many the loader may hold at once

    @property
    def batches(self) -> int:
        return self.batch * self.batches_in_flight

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.batches

    def describe(self) -> str:
        """One log line: the total and its parts."""
        return (
            f"memory floor {self.total / GIB:.2f} GiB = weights {self.weights / GIB:.2f} + gradients "
            f"{self.gradients / GIB:.2f} + AdamW state {self.optimizer / GIB:.2f} + batches in flight "
            f"{self.batches / GIB:.2f} ({self.batches_in_flight} x {self.batch / MIB:.1f} MiB)"
        )


def training_floor(model: nn.Module, cfg: TrainConfig, dims: Mapping[str, int | None]) -> MemoryFloor:
    """The floor of training `model` as `cfg` says, on data of widths `dims` (the data module's `dims`)."""
    frozen_for_good = set(cfg.freeze.modules) if cfg.freeze.until_step is None else set()
    weights = trained = 0
    for name, p in model.named_parameters():
        weights += p.numel() * p.element_size()
        if p.requires_grad and module_of(name) not in frozen_for_good:
            trained += p.numel() * p.element_size()
    d = cfg.data
    need_counts = cfg.encoder.decoder is not None
    per_cell = int(dims["input_dim"] or 0) + int(dims["output_dim"] or 0) + int(dims["pert_dim"] or 0)
    per_cell += int(dims.get("gene_dim") or 0) if need_counts else 0
    per_cell += int(dims.get("aux_dim") or 0)  # the auxiliary target (loss.aux_key), when on
    batch = d.batch_size * cfg.model.cell_set_len * per_cell * FLOAT32_BYTES
    in_flight = (d.num_workers * d.prefetch_factor if d.num_workers > 0 else 0) + 2
    return MemoryFloor(weights, trained, ADAMW_STATES * trained, batch, in_flight)


def floor_line(model: nn.Module, cfg: TrainConfig, dims: Mapping[str, int | None]) -> str:
    """The start-up log line of `tahoe-ft train` (`training_floor(...).describe()`)."""
    return training_floor(model, cfg, dims).describe()
