"""A `PredictionPlan` run through the model: cells read, predicted and written in blocks.

The I/O runs beside the model (`_Background`): the next block's basal cells are read ahead on one thread,
real.h5ad is written on a second, and each predicted block is clipped, written and synced on a third, one
block behind. Each file is renamed into place only when every write to it is done (`fileio.atomic_path`).
While this runs, glibc keeps its large freed buffers for the next pass instead of unmapping them
(`_reuse_large_blocks`). Memory does not grow with the number of cells predicted.
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import torch
from rich.progress import Progress

from tahoe_ft.fileio import atomic_path
from tahoe_ft.prediction.forward import predict_batch
from tahoe_ft.prediction.plan import PlannedSet, PredictionPlan

# cell-eval refuses values >= 15 as "not log1p"; upstream (0.11.1) clips predictions to [0, 14] as well
PRED_MAX = 14.0


@contextmanager
def _dense_h5ad(path: Path, obs: pd.DataFrame, var: pd.DataFrame, uns: dict) -> Iterator[h5py.Dataset]:
    """An h5ad whose dense float32 X is filled by the caller in row blocks (yielded as an h5py dataset).

    obs, var and uns are written by anndata; X is then created as anndata writes a dense X (a contiguous
    float32 dataset, encoding "array" 0.2.0), so `anndata.read_h5ad` and cell-eval read the file as one
    written by `write_h5ad`. Written under a temp name and renamed when the block ends (`atomic_path`).
    """
    with atomic_path(path, suffix=".h5ad") as tmp:
        ad.AnnData(obs=obs, var=var, uns=uns).write_h5ad(tmp)
        with h5py.File(tmp, "r+") as f:
            x = f.create_dataset("X", shape=(len(obs), len(var)), dtype=np.float32)
            x.attrs["encoding-type"] = "array"
            x.attrs["encoding-version"] = "0.2.0"
            yield x


def _sync(out: h5py.Dataset) -> None:
    """Flush what was written to `out`'s file onto the disk now, on the writer thread, so the fsync that
    `atomic_path` does before renaming the file at the end has (almost) nothing left to wait for."""
    out.file.flush()
    with open(out.file.filename, "rb") as fh:
        os.fdatasync(fh.fileno())


def _clip_and_write(out: h5py.Dataset, first_rows: list[int], y: np.ndarray) -> int:
    """Predicted sets `y` `[B, s, G]` clipped to [0, PRED_MAX] into `out`, set i at rows first_rows[i]..,
    then synced to disk (`_sync`); returns how many values were clipped."""
    n_clip = int((y > PRED_MAX).sum() + (y < 0).sum())
    np.clip(y, 0.0, PRED_MAX, out=y)
    for first, rows in zip(first_rows, y, strict=True):
        out[first : first + rows.shape[0]] = rows
    _sync(out)
    return n_clip


def _write_rows(outs: list[h5py.Dataset], first: int, read, rows: np.ndarray, block: int) -> None:
    """Cells `rows` (read by `read` in blocks of `block` rows) into rows first.. of every dataset in `outs`."""
    for a in range(0, rows.size, block):
        x = read(rows[a : a + block])
        for out in outs:
            out[first + a : first + a + x.shape[0]] = x


class _Background:
    """predict's I/O threads, so that reads and writes overlap the forward passes: `read(...)` reads the
    next block ahead, `real(...)` jobs (real.h5ad) run in order on a second thread and `pred(...)` jobs (the
    predicted blocks) on a third.

    Memory stays bounded: one block is read ahead and at most one predicted block waits to be written
    while the model computes the next. A failed job's error is raised in the caller at its next `pred`
    call, or when the block ends; leaving the block (also on an error) waits for every started job first,
    so no thread writes to a file after the caller has closed or removed it. torch releases the GIL in its
    long calls, so on a machine with a spare core the I/O costs little wall time (BENCHMARKS.md).
    """

    def __init__(self) -> None:
        self._real = ThreadPoolExecutor(1, thread_name_prefix="tahoe-ft-real")
        self._pred = ThreadPoolExecutor(1, thread_name_prefix="tahoe-ft-pred")
        self._read = ThreadPoolExecutor(1, thread_name_prefix="tahoe-ft-read")
        self._jobs: list[Future] = []
        self._last_pred: Future | None = None

    def real(self, fn, *args) -> None:
        self._jobs.append(self._real.submit(fn, *args))

    def read(self, fn, *args) -> Future:
        """A read ahead: the caller takes its result (one block) before it asks for the next."""
        return self._read.submit(fn, *args)

    def pred(self, fn, *args) -> Future:
        for job in self._jobs:  # an error of any job so far stops the caller now
            if job.done() and job.exception() is not None:
                raise job.exception()
        if self._last_pred is not None:
            self._last_pred.result()  # wait for (and re-raise from) the block before
        self._last_pred = self._pred.submit(fn, *args)
        self._jobs.append(self._last_pred)
        return self._last_pred

    def __enter__(self) -> _Background:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for pool in (self._read, self._real, self._pred):
            pool.shutdown(wait=True, cancel_futures=exc_type is not None)
        if exc_type is None:
            for job in self._jobs:
                job.result()


# glibc's mallopt parameters (malloc.h) and their defaults
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_GLIBC_TRIM_THRESHOLD, _GLIBC_MMAP_MAX = 128 * 1024, 65536


@contextmanager
def _reuse_large_blocks() -> Iterator[None]:
    """While predict runs, glibc serves its large buffers from the heap and keeps freed ones for reuse.

    Every [1,024, 18,080] matrix of a pass (the basal cells read, each layer's output, the float32 copy
    written) is 37-74 MiB, above glibc's largest mmap threshold (32 MiB), so by default each one is a fresh
    mmap that the kernel zeroes page by page and unmaps when freed: a bf16 predict spent ~16 % of its
    samples in the kernel's page clearing (perf), 9.7 % with this. With mmap off and no trimming, the next
    pass reuses the same memory: bf16 on 20,000 cells, 14.7-17.3 s against 16.8-20.4 s (3 alternating runs
    each), peak RSS 1.20-1.24 against 1.11-1.12 GB (BENCHMARKS.md). Restored to glibc's defaults afterwards,
    and what was kept is given back (`malloc_trim`). A no-op on other C libraries."""
    libc = None
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        try:
            libc = ctypes.CDLL("libc.so.6")
        except OSError:
            libc = None
    if libc is None:
        yield
        return
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]  # an int: a larger value would wrap silently
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_MAX, _GLIBC_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_TRIM_THRESHOLD)
        libc.malloc_trim(0)


def _predict_block(
    plan: PredictionPlan,
    model,
    device: torch.device,
    bg: _Background,
    outs: list[tuple[h5py.Dataset, str]],
    batch: list[PlannedSet],
    basal: np.ndarray,
) -> list[Future]:
    """One block's forward passes (`sets_per_pass` sets each), every output file's prediction of them handed
    to the writer thread; returns the pred.h5ad writes (each returns how many values it clipped)."""
    clipped = []
    for a in range(0, len(batch), plan.sets_per_pass):
        chunk = batch[a : a + plan.sets_per_pass]
        # the basal cells' batches: the same for the prediction and its shuffle
        bidx = (
            torch.from_numpy(np.stack([plan.batch_of[st.basal] for st in chunk]))
            if plan.batch_of is not None
            else None
        )
        for i, (x, field) in enumerate(outs):
            which = [getattr(st, field) for st in chunk]
            target = plan.pert_target[which] if plan.pert_target is not None else None
            pert = plan.pert_matrix[which]
            ct = (
                plan.cell_type_index[[st.group for st in chunk]] if plan.cell_type_index is not None else None
            )
            y = predict_batch(
                model, pert, basal[a : a + len(chunk)], device, plan.precision, target, bidx, ct
            )
            job = bg.pred(_clip_and_write, x, [st.out_row for st in chunk], y)
            if i == 0:  # pred.h5ad
                clipped.append(job)
    return clipped


def write_predictions(plan: PredictionPlan, model, device: torch.device) -> int:
    """pred.h5ad, real.h5ad (and pred_shuffled.h5ad with a shuffle) of `plan` in `plan.out_dir`, predicted by
    `model` (on `device`, prepared); returns how many predicted values were clipped to [0, PRED_MAX]."""
    catalog, n_pred, ctrl, block = plan.catalog, plan.n_pred, plan.ctrl_rows, plan.block_cells
    batches = plan.batches
    clipped: list[Future] = []  # the pred.h5ad writes: each returns how many values it clipped
    with _reuse_large_blocks(), ExitStack() as files, Progress(transient=True) as bar, _Background() as bg:

        def open_x(name: str, tahoe_uns: dict) -> h5py.Dataset:
            return files.enter_context(
                _dense_h5ad(plan.out_dir / name, plan.obs.copy(), plan.var.copy(), {"tahoe_ft": tahoe_uns})
            )

        real_x = open_x("real.h5ad", {"kind": "observed", **plan.source})
        outs = [(open_x("pred.h5ad", {"kind": "prediction", **plan.source}), "pert")]
        if (
            plan.shuffle
        ):  # same basal cells, another held-out perturbation's features (the main draws are untouched)
            kind = "prediction, perturbation features shuffled"
            outs.append(
                (open_x("pred_shuffled.h5ad", {"kind": kind, "shuffle": plan.shuffle}), "shuffled_pert")
            )
        task = bar.add_task(f"predict {plan.split}", total=len(batches))
        # real.h5ad (observed + control cells) is written on one thread while the model runs, and each
        # predicted block on another, one block behind the model: reads and writes overlap the forward passes
        bg.real(_write_rows, [real_x], 0, catalog.read_expression, plan.real_rows, block)
        bg.real(_write_rows, [real_x], n_pred, catalog.read_expression, ctrl, block)
        bg.real(_sync, real_x)

        def read_basal(batch: list[PlannedSet]) -> np.ndarray:
            rows = np.concatenate([st.basal for st in batch])
            x = catalog.read_input(rows).reshape(len(batch), batch[0].basal.size, -1)
            if plan.basal_shift is not None:  # each set's group re-centred on its control mean
                x += plan.basal_shift[[st.group for st in batch]][:, None, :]
            return x

        upcoming = bg.read(read_basal, batches[0])  # the next block's basal cells, read ahead
        for i, batch in enumerate(batches):
            basal = upcoming.result()
            if i + 1 < len(batches):
                upcoming = bg.read(read_basal, batches[i + 1])
            clipped += _predict_block(plan, model, device, bg, outs, batch, basal)
            bar.advance(task)
        bg.pred(_write_rows, [x for x, _ in outs], n_pred, catalog.read_expression, ctrl, block)
    return sum(job.result() for job in clipped)
