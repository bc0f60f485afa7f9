"""The set sampler: groups of target cells, control pools, and `SetPlan`, the batch sampler over sets.

Every random choice (set contents, top-ups, basal controls, set order) is drawn in the main process from
`numpy.random.Generator(seed, stream, epoch)`; DataLoader workers only read rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Sampler


@dataclass
class Groups:
    """Target cells grouped by (file, cell type, pert[, batch]); `rows[start[g]:start[g]+size[g]]` is group g."""

    rows: np.ndarray  # int64 global rows
    start: np.ndarray
    size: np.ndarray
    file: np.ndarray
    cell_type: np.ndarray
    pert: np.ndarray
    pool: np.ndarray  # control pool of each group

    def subset(self, keep: np.ndarray) -> Groups:
        keep = np.flatnonzero(keep)
        size = self.size[keep]
        start_new = np.cumsum(size) - size
        rows = (
            np.concatenate([self.rows[s : s + n] for s, n in zip(self.start[keep], size, strict=True)])
            if keep.size
            else np.zeros(0, np.int64)
        )
        return Groups(
            rows, start_new, size, self.file[keep], self.cell_type[keep], self.pert[keep], self.pool[keep]
        )


@dataclass
class Pools:
    """Control cells: pool p is `rows[start[p]:start[p]+size[p]]` (global rows)."""

    rows: np.ndarray
    start: np.ndarray
    size: np.ndarray


def _runs(*keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, size) of the runs of equal consecutive key tuples."""
    if keys[0].size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    change = np.zeros(keys[0].size, bool)
    change[0] = True
    for k in keys:
        change[1:] |= k[1:] != k[:-1]
    start = np.flatnonzero(change)
    size = np.diff(np.r_[start, keys[0].size])
    return start, size


def group_cells(
    file_of: np.ndarray,
    cell_type_of: np.ndarray,
    pert_of: np.ndarray,
    batch_of: np.ndarray | None,
    split_bits: np.ndarray,
    control: int,
) -> tuple[Groups, Pools, np.ndarray]:
    """(target groups, control pools, split bits of each group) from per-row labels (global rows).

    Targets are the cells with split bits; a group is one (file, cell type, pert[, batch]). Pools: one per
    (file, cell type) and, when `batch_of` is given (basal_mapping=batch), one per (file, cell type, batch),
    which a group of that batch uses. Every target's (file, cell type) must have controls (`CellCatalog`
    checks it on open).
    """
    bkey = batch_of if batch_of is not None else np.zeros_like(pert_of, dtype=np.int64)

    # control pools: (file, ct) and, for batch mapping, (file, ct, batch)
    crow = np.flatnonzero(pert_of == control)
    corder = np.lexsort((bkey[crow], cell_type_of[crow], file_of[crow]))
    crow = crow[corder]
    cf, cc, cb = file_of[crow], cell_type_of[crow], bkey[crow]
    ct_start, ct_size = _runs(cf, cc)
    ct_pool_of = {(int(cf[s]), int(cc[s])): i for i, s in enumerate(ct_start)}
    pool_start, pool_size = [ct_start], [ct_size]
    b_pool_of: dict[tuple[int, int, int], int] = {}
    if batch_of is not None:
        b_start, b_size = _runs(cf, cc, cb)
        b_pool_of = {(int(cf[s]), int(cc[s]), int(cb[s])): len(ct_start) + i for i, s in enumerate(b_start)}
        pool_start.append(b_start)
        pool_size.append(b_size)
    pools = Pools(crow.astype(np.int64), np.concatenate(pool_start), np.concatenate(pool_size))

    # target groups: (file, ct, pert[, batch]) over cells that are targets in some split
    rows = np.flatnonzero(split_bits > 0)
    order = np.lexsort((bkey[rows], pert_of[rows], cell_type_of[rows], file_of[rows]))
    rows = rows[order]
    gf, gc, gp, gb = file_of[rows], cell_type_of[rows], pert_of[rows], bkey[rows]
    start, size = _runs(gf, gc, gp, gb)
    pool = np.empty(start.size, dtype=np.int64)
    for i, s in enumerate(start.tolist()):
        key = (int(gf[s]), int(gc[s]))
        pool[i] = (
            b_pool_of.get((*key, int(gb[s])), ct_pool_of[key]) if batch_of is not None else ct_pool_of[key]
        )
    groups = Groups(rows.astype(np.int64), start, size, gf[start], gc[start], gp[start], pool)
    group_bits = split_bits[rows[start]] if start.size else np.zeros(0, np.int8)
    return groups, pools, group_bits


class SetDescriptor(NamedTuple):
    """One set: S target rows of one (file, cell type, pert) and S basal control rows (global row ids)."""

    file: int
    pert: int
    cell_type: int
    pert_rows: np.ndarray
    ctrl_rows: np.ndarray
    pool: int = -1  # the control pool the basal rows were drawn from (`Pools`)


class _EpochHook:
    """Lightning calls `set_epoch` on `dataloader.batch_sampler.sampler`; forward it to the plan."""

    def __init__(self, plan: SetPlan) -> None:
        self._plan = plan

    def set_epoch(self, epoch: int) -> None:
        self._plan.set_epoch(epoch)


class SetPlan(Sampler):
    """Batch sampler over sets of `cell_set_len` cells; yields lists of `SetDescriptor`.

    Training (`train=True`), for epoch e, from `numpy.random.Generator(SeedSequence([seed, stream, e]))`:
    each group's rows are shuffled and cut into sets of `cell_set_len`; a short last set is topped up by
    sampling the group *with replacement* (as cell-load does), so a group smaller than `cell_set_len` still
    gives one full set. Each set gets `cell_set_len` basal controls drawn with replacement from its pool
    (same file and cell type, and batch under `basal_mapping=batch`). Set order is shuffled, then
    `batch_size` sets make a batch (the last batch may be smaller). Different epochs give different sets.

    Evaluation (`train=False`): a fixed plan (epoch 0 whatever `set_epoch` says), at most
    `sets_per_group` sets per group, groups in order.

    Everything is decided here, in the main process; workers only read rows, so the batches do not
    depend on `num_workers`. Under DDP (torch.distributed initialised, or `rank`/`world_size` given)
    rank r takes batches r, r+W, r+2W, ... of the same global plan, after dropping the ragged tail, so
    every rank sees the same number of batches.

    If an epoch is iterated twice without `set_epoch` in between, the next epoch is used, so epochs
    differ even when nothing calls `set_epoch`.
    """

    def __init__(
        self,
        groups: Groups,
        pools: Pools,
        *,
        cell_set_len: int,
        batch_size: int,
        seed: int,
        train: bool,
        sets_per_group: int = 1,
        stream: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        self.groups, self.pools = groups, pools
        self.cell_set_len, self.batch_size = int(cell_set_len), int(batch_size)
        self.seed, self.train, self.stream = int(seed), bool(train), int(stream)
        self.sets_per_group = int(sets_per_group)
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._iterated = False
        self._skip = 0
        self.sampler = _EpochHook(self)
        n_sets = -(-groups.size // self.cell_set_len)
        if not train:
            n_sets = np.minimum(n_sets, self.sets_per_group)
        self._n_sets = n_sets

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._iterated = False

    def resume_from(self, epoch: int, batches_done: int) -> None:
        """Continue an interrupted epoch: the next iteration is `epoch`'s plan without its first
        `batches_done` batches (the ones trained before the checkpoint). Exact, because the plan is a pure
        function of (seed, epoch); a DataLoader with workers creates its iterator before Lightning calls
        `set_epoch`, so the epoch is set here too."""
        self.epoch = int(epoch)
        self._skip = int(batches_done)
        self._iterated = False

    def _dist(self) -> tuple[int, int]:
        if not self.train:
            # evaluation plans are small: every rank evaluates all of them, so no rank is left without a
            # batch (a DDP collective would hang) and the synced val_loss is the same on every rank
            return 0, 1
        if self.rank is not None and self.world_size is not None:
            return self.rank, self.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    @property
    def n_sets(self) -> int:
        return int(self._n_sets.sum())

    def __len__(self) -> int:
        n_batches = -(-self.n_sets // self.batch_size)
        return n_batches // self._dist()[1]

    def plan(self, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(group of each set [n], pert rows [n, S], ctrl rows [n, S]) in batch order, before sharding."""
        epoch = (self.epoch if epoch is None else epoch) if self.train else 0
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.stream, epoch]))
        g, S = self.groups, self.cell_set_len
        n_sets = self._n_sets
        n_groups = g.size.size
        # shuffle within groups: sort rows by (group, random key)
        gid = np.repeat(np.arange(n_groups), g.size)
        order = np.lexsort((rng.random(gid.size), gid))
        shuffled = g.rows[order]
        # slots of every set; a slot past the group's size is a top-up drawn with replacement
        slots = n_sets * S
        set_group = np.repeat(np.arange(n_groups), n_sets)
        slot_group = np.repeat(np.arange(n_groups), slots)
        slot = np.arange(int(slots.sum())) - np.repeat(np.cumsum(slots) - slots, slots)
        size = g.size[slot_group]
        topup = np.floor(rng.random(slot.size) * size).astype(np.int64)
        src = g.start[slot_group] + np.where(slot < size, slot, topup)
        pert_rows = shuffled[src].reshape(-1, S)
        # basal controls: S draws with replacement from the set's pool
        pool = g.pool[set_group]
        pick = np.floor(rng.random((set_group.size, S)) * self.pools.size[pool][:, None]).astype(np.int64)
        ctrl_rows = self.pools.rows[self.pools.start[pool][:, None] + pick]
        if self.train:
            perm = rng.permutation(set_group.size)
            set_group, pert_rows, ctrl_rows = set_group[perm], pert_rows[perm], ctrl_rows[perm]
        return set_group, pert_rows, ctrl_rows

    def batches(self, epoch: int | None = None) -> list[list[SetDescriptor]]:
        """This rank's batches for `epoch` (default: the current one)."""
        set_group, pert_rows, ctrl_rows = self.plan(epoch)
        g = self.groups
        n_batches = -(-set_group.size // self.batch_size)
        rank, world = self._dist()
        keep = range(rank, (n_batches // world) * world, world)
        out = []
        for b in keep:
            sl = range(b * self.batch_size, min((b + 1) * self.batch_size, set_group.size))
            out.append(
                [
                    SetDescriptor(
                        int(g.file[set_group[i]]),
                        int(g.pert[set_group[i]]),
                        int(g.cell_type[set_group[i]]),
                        pert_rows[i],
                        ctrl_rows[i],
                        int(g.pool[set_group[i]]),
                    )
                    for i in sl
                ]
            )
        return out

    def __iter__(self) -> Iterator[list[SetDescriptor]]:
        if self._iterated and self.train:
            self.epoch += 1  # nobody called set_epoch: still give a new epoch
        self._iterated = True
        skip, self._skip = self._skip, 0
        yield from self.batches()[skip:]
