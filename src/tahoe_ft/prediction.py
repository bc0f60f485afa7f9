"""`tahoe-ft predict` (`tahoe_ft.predict`): predict the held-out perturbations with a checkpoint (SPEC §7).

For each held-out (dataset, cell type, perturbation) group: draw basal control cells of that cell type in that
dataset, predict a set the size of the observed one (sets of at most `cell_set_len` cells, unpadded, as upstream), and write
`pred.h5ad` / `real.h5ad` in cell-eval's format: the evaluator's genes as `var_names` (same order in both),
the perturbation and cell-type columns, and the same real control cells in both files. Embedding-input
rounds predict through their gene decoder, so every round is scored in gene space.

Everything comes from the checkpoint: the architecture from its hparams and the data settings (genes,
perturbation features, held-out groups, columns, transform) from its manifest; only the cells are read, through
`CellCatalog.from_manifest`, from the data file(s) recorded there (or `data_path=`). An upstream `state tx train`
run folder has no manifest: genes and perturbations come from its `var_dims.pkl` / `pert_onehot_map.pt`, columns
from its `config.yaml`, the held-out groups from its split TOML (or `split_toml=`), the cells from `data_path=`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import NamedTuple

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import torch
from rich.progress import Progress

from tahoe_ft.checkpoints.io import load_checkpoint
from tahoe_ft.data import CellCatalog, GroupKey, Manifest
from tahoe_ft.data.features import target_gene_index
from tahoe_ft.errors import UserError
from tahoe_ft.evaluation.diagnostics import derangement
from tahoe_ft.fileio import atomic_path
from tahoe_ft.runs import RUN_REF, list_runs, resolve_ref, write_json_atomic

log = logging.getLogger(__name__)

# cell-eval refuses values >= 15 as "not log1p"; upstream (0.11.1) clips predictions to [0, 14] as well
PRED_MAX = 14.0
# cells read, predicted and written per block (basal cells of several sets in one read; real and control
# cells copied this many rows at a time): ~37 MiB per [block, 18,080] float32 matrix, whatever the screen size
BLOCK_CELLS = 512


def newest_training_run(runs_dir: str | Path, experiment: str | None = None, need: str | None = None) -> Path:
    """The most recent run directory under runs_dir (of `experiment`, if given) that holds `need`."""
    root = Path(runs_dir)
    exps = (
        [experiment]
        if experiment
        else sorted(p.name for p in root.iterdir() if p.is_dir())
        if root.is_dir()
        else []
    )
    runs = [r for e in exps for r in list_runs(root, e) if need is None or (r / need).exists()]
    if not runs:
        what = f"of experiment '{experiment}' " if experiment else ""
        has = f"with {need} " if need else ""
        raise UserError(
            f"no training run {what}{has}under {root.resolve()}; train one first (tahoe-ft train +experiment=...)"
        )
    return max(runs, key=lambda r: r.name)


def resolve_checkpoint(
    ckpt: str, *, run_dir: str | Path | None = None, exp: str | None = None, runs_dir: str | Path = "runs"
) -> tuple[Path, Path]:
    """(checkpoint path, run directory that receives the predictions).

    `ckpt`: a path or `run:EXP/FILE` (used as is; run directory default: two levels above it, or the folder
    itself for an upstream run folder), or a bare file name looked up in `<run_dir>/checkpoints/` (default: the
    newest run of `exp` holding it, under `runs_dir`).
    """
    ckpt = str(ckpt)
    if RUN_REF.match(ckpt) or "/" in ckpt or os.sep in ckpt:
        path = resolve_ref(ckpt, runs_dir)
        return path, Path(run_dir) if run_dir else path if path.is_dir() else path.parent.parent
    run = Path(run_dir) if run_dir else newest_training_run(runs_dir, exp, need=f"checkpoints/{ckpt}")
    path = run / "checkpoints" / ckpt
    if not path.is_file():
        raise UserError(f"{path} does not exist; choose a checkpoint in {run / 'checkpoints'}")
    return path, run


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()
def predict_sets(
    model, pert_vec: torch.Tensor, basal: np.ndarray, device: torch.device, target: int | None = None
) -> np.ndarray:
    """Predict one group: basal `[n, D_in]` in sets of <= cell_set_len cells -> genes `[n, G]` (`target`: the
    perturbation's target-gene column, -1 for none, for a model with the knock-down path)."""
    s = int(model.hparams["cell_set_len"])
    out = []
    for start in range(0, basal.shape[0], s):
        b = torch.from_numpy(basal[start : start + s]).to(device)[None]  # [1, s, D_in]
        p = pert_vec.to(device).expand(1, b.shape[1], -1)  # [1, s, P]
        t = torch.full(b.shape[:2], target, dtype=torch.long, device=device) if target is not None else None
        y = model.forward_sets(p, b, target=t)  # [1, s, D_out]
        if decodes(model):
            y = model.decode(y)  # [1, s, G]: embedding rounds are scored in gene space
        out.append(y[0].float().cpu().numpy())
    return np.concatenate(out, axis=0)


class _PackedLinear(torch.nn.Module):
    """A bf16 `nn.Linear` for CPU inference whose weight is reordered into oneDNN's blocked layout once
    (`torch.ops.mkldnn._reorder_linear_weight`, what torch.compile's CPU freezing pass does); a bf16
    `nn.Linear` re-lays its weight out inside every call. The same bits as the bf16 `nn.Linear`
    (tests/test_prediction.py); measured 1.3-1.4x faster on one 18,080-wide layer alone, 8 % on a whole forward
    pass of 16 x 64 cells of the issue's model and 20 % on short tail sets (BENCHMARKS.md)."""

    def __init__(self, linear: torch.nn.Linear, rows: int):
        super().__init__()
        weight = linear.weight.detach().to(torch.bfloat16)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)  # rows: the expected batch height
        self.bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.bfloat16).contiguous()
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def _packs_bf16(device: torch.device) -> bool:
    """Whether this CPU runs oneDNN's bf16 kernels (AVX512-BF16 / AMX), where prepacked weights pay."""
    return (
        device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )


def _bf16_linears(model: torch.nn.Module, device: torch.device, rows: int) -> None:
    """bf16 predict: every `nn.Linear` in bfloat16, converted once, so autocast does not cast each 18,080-wide
    weight again on every forward pass (measured: ~0.13 s per such cast on one core); on a CPU with oneDNN's
    bf16 kernels also prepacked once (`_PackedLinear`, `rows` per pass). Norms, embeddings and the knock-down
    ratio stay float32, and autocast still picks the precision of every other op."""
    pack = _packs_bf16(device)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(parent, name, _PackedLinear(child, rows) if pack else child.to(torch.bfloat16))


def _training_batches(model, m: Manifest, catalog: CellCatalog) -> np.ndarray | None:
    """For a model with a batch encoder: every cell's batch as the index the model trained with (the
    manifest's `batches`), int64 `[n_cells]`; the basal cells carry their own batch into the prediction."""
    if getattr(model, "batch_encoder", None) is None:
        return None
    if catalog.batch_of is None or not m.batches:
        raise UserError(
            "this model has a batch encoder, but the checkpoint's manifest names no batch column; "
            "predict needs each basal cell's batch (train with data.batch_col set)"
        )
    index = {b: i for i, b in enumerate(m.batches)}
    unseen = [b for b in catalog.batches or [] if b not in index]
    if unseen:
        raise UserError(
            f"batches {unseen[:5]} of the cells to predict were not in training ({len(m.batches)} batches); "
            "the batch encoder has no embedding for them: predict from a file with the training batches"
        )
    lut = np.array([index[b] for b in catalog.batches or []], dtype=np.int64)
    return lut[catalog.batch_of]


def decodes(model) -> bool:
    """Whether predictions go through the gene decoder: with embedding input, as `state tx infer` decides.
    An HVG-mode upstream checkpoint (embed_key None, or X_hvg with output_space gene) carries a decoder that
    was never trained (its batches have no counts), which must not be used."""
    hp = model.hparams
    key, space = hp.get("embed_key"), hp.get("output_space")
    trained = key is not None and not (key == "X_hvg" and space == "gene")
    return getattr(model, "gene_decoder", None) is not None and trained


def draw_basal(rng: np.random.Generator, pool: np.ndarray, n: int) -> np.ndarray:
    """`n` basal control rows in the order they form sets: random draws of the pool (without replacement
    when it is large enough), never re-sorted, so a file stored by replicate (or batch) does not give sets
    of one replicate each, unlike training sets."""
    return rng.choice(pool, size=n, replace=n > pool.size)


def _prediction_order(keys: Iterable[GroupKey]) -> list[GroupKey]:
    # by cell type, perturbation, then dataset: the order predict has always drawn basal cells in, so a seed
    # draws the same cells (a dataset-first order would change the draws of multi-dataset runs)
    return sorted(keys, key=lambda k: (k.cell_type, k.pert, k.dataset))


@torch.no_grad()
def predict_batch(
    model,
    pert: torch.Tensor,
    basal: np.ndarray,
    device: torch.device,
    precision: str = "32",
    target: torch.Tensor | None = None,
    batch_idx: torch.Tensor | None = None,
) -> np.ndarray:
    """Predict B sets of one length in one forward pass: pert `[B, P]` (one vector per set), basal
    `[B, s, D_in]` -> genes `[B, s, G]` float32. Attention stays within a set, so this is `predict_sets` of
    each set up to float32 rounding: BLAS sums in an order that depends on the matrix height (B*s rows), so
    B > 1 differs from B = 1 in the last bits (~4e-7 at 18,080 genes, MKL); B = 1 gives the same numbers.
    `precision="bf16"`: under bfloat16 autocast (PRECISIONS; `predict` converts the Linear weights once,
    `_bf16_linears`). `target` `[B]`: each set's
    target-gene column (-1: none), for a model with the knock-down path; `batch_idx` `[B, s]`: each basal
    cell's batch, for a model with a batch encoder."""
    b = torch.from_numpy(basal).to(device)  # [B, s, D_in]
    p = pert.to(device)[:, None, :].expand(-1, b.shape[1], -1)  # [B, s, P]
    t = target.to(device)[:, None].expand(-1, b.shape[1]) if target is not None else None  # [B, s]
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        bi = batch_idx.to(device) if batch_idx is not None else None
        y = model.forward_sets(p, b, bi, target=t)  # [B, s, D_out]
        if decodes(model):
            y = model.decode(y)  # [B, s, G]
    return y.float().cpu().numpy()


# "32": float32 (the reference numbers); "bf16": bfloat16 Linear weights under autocast, faster on CPUs with AMX and
# on GPUs; at 18,080 genes max 6.7e-3, mean 5.2e-4 from float32 in log1p expression (BENCHMARKS.md)
PRECISIONS = ("32", "bf16")


class _Set(NamedTuple):
    """One predicted set: its first row in pred.h5ad, its basal rows, its perturbation (and the shuffle's)."""

    out_row: int
    basal: np.ndarray
    pert: int
    shuffled_pert: int


def _sets(basal_rows: list[np.ndarray], perts: list[int], shuffled: list[int], s: int) -> list[_Set]:
    """Each group's basal draws cut into sets of <= s cells in draw order, at their rows of the output."""
    out, row = [], 0
    for rows, p, q in zip(basal_rows, perts, shuffled, strict=True):
        for a in range(0, rows.size, s):
            out.append(_Set(row + a, rows[a : a + s], p, q))
        row += rows.size
    return out


def _batches(sets: list[_Set], max_sets: int) -> Iterator[list[_Set]]:
    """Blocks of at most `max_sets` sets of equal length: the full-length sets of every group together, then
    each shorter length (group tails) together."""
    by_len: dict[int, list[_Set]] = {}
    for st in sets:
        by_len.setdefault(st.basal.size, []).append(st)
    for n in sorted(by_len, reverse=True):
        same = by_len[n]
        for a in range(0, len(same), max_sets):
            yield same[a : a + max_sets]


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


def _write_rows(outs: list[h5py.Dataset], first: int, read, rows: np.ndarray, block: int) -> None:
    """Cells `rows` (read by `read` in blocks of `block` rows) into rows first.. of every dataset in `outs`."""
    for a in range(0, rows.size, block):
        x = read(rows[a : a + block])
        for out in outs:
            out[first + a : first + a + x.shape[0]] = x


def predict(
    ckpt: str | Path,
    *,
    out_dir: str | Path | None = None,
    split: str = "test",
    data_path: str | Path | Sequence[str | Path] | None = None,
    split_toml: str | Path | None = None,
    max_controls: int = 2000,
    seed: int = 0,
    device: str = "auto",
    shuffle: bool = True,
    sets_per_pass: int = 1,
    precision: str = "32",
) -> Path:
    """Predict the held-out groups of `split` with the checkpoint `ckpt`; return the output directory.

    Writes `pred.h5ad`, `real.h5ad` and `predict.json` into `out_dir` (default: the run directory, two levels
    above the checkpoint). Cells are read from the files in the checkpoint's manifest, or `data_path`.
    `max_controls` real control cells per (dataset, cell type) go into both files; `seed` fixes every draw.
    `split_toml`: the held-out groups of an upstream run folder (default: its config's toml_config_path).
    `shuffle`: also write `pred_shuffled.h5ad`, every group predicted from the same basal cells with the
    features of another held-out perturbation (`evaluation.diagnostics.derangement`), for eval's shuffle test.

    Streams: the draws (row numbers only) are made first, then cells are read, predicted and written in
    blocks of `BLOCK_CELLS`, so memory does not grow with the number of cells predicted.
    `sets_per_pass`: sets per forward pass. 1 (default) gives exactly the numbers of predicting one set at a
    time; more is faster on CPU (fewer passes over the 18,080-wide weights) but differs in the last float32
    bits (`predict_batch`).
    """
    ckpt_path = Path(ckpt)
    run_dir = Path(out_dir) if out_dir is not None else ckpt_path.parent.parent
    model = load_checkpoint(ckpt_path)
    manifest = model.manifest
    if not manifest and model.run_folder is not None:  # an upstream run folder: its vocabulary and split
        m = model.run_folder.manifest(
            model.hparams, data_paths=data_path, split_toml=split_toml, decoded=decodes(model)
        )
    elif not manifest:
        raise UserError(
            f"{ckpt_path} has no data manifest; predict needs a tahoe-ft checkpoint or an upstream run folder"
        )
    else:
        m = Manifest.from_dict(manifest)
    dev = _device(device)
    model.to(dev)
    catalog = CellCatalog.from_manifest(m, data_paths=data_path)
    cells = catalog.groups(split)
    groups = _prediction_order(cells)
    if not groups:
        raise UserError(f"the checkpoint's manifest has no '{split}' perturbations to predict; use split=val")
    pert_index = {p: i for i, p in enumerate(m.pert_names)}
    for key in groups:
        if key.pert not in pert_index:
            raise UserError(
                f"perturbation '{key.pert}' is not in the checkpoint's manifest; it cannot be predicted"
            )

    # every draw first, in the order predict has always made them: basal cells group by group, then controls
    rng = np.random.default_rng(seed)
    basal_rows = [draw_basal(rng, catalog.controls(k.dataset, k.cell_type), cells[k].size) for k in groups]
    real_rows = np.concatenate([cells[k] for k in groups])
    labels = [(k.pert, k.cell_type) for k in groups for _ in range(cells[k].size)]
    # the same real control cells in both files (cell-eval computes deltas against each file's controls)
    ctrl_rows, ctrl_labels = [], []
    for ct, ds in sorted({(k.cell_type, k.dataset) for k in groups}):
        pool = catalog.controls(ds, ct)
        pick = np.sort(rng.choice(pool, size=min(pool.size, max_controls), replace=False))
        ctrl_rows.append(pick)
        ctrl_labels += [(m.control_pert, ct)] * pick.size
    ctrl = np.concatenate(ctrl_rows)
    derange = derangement(sorted({k.pert for k in groups})) if shuffle else {}

    var = pd.DataFrame(index=pd.Index(m.gene_names, name=None))
    obs = pd.DataFrame(labels + ctrl_labels, columns=[m.pert_col, m.cell_type_col])
    obs.index = [f"cell{i}" for i in range(len(obs))]
    for col in obs.columns:
        obs[col] = obs[col].astype("category")
    n_pred = real_rows.size
    uns = {"checkpoint": str(ckpt_path), "split": split}
    s = int(model.hparams["cell_set_len"])
    perts = [pert_index[k.pert] for k in groups]
    shuffled = [pert_index[derange.get(k.pert, k.pert)] for k in groups]
    if sets_per_pass < 1:
        raise UserError(f"sets_per_pass={sets_per_pass} must be >= 1")
    if str(precision) not in PRECISIONS:
        raise UserError(f"precision={precision!r} is not valid; use one of {', '.join(PRECISIONS)}")
    # sets per block: BLOCK_CELLS cells, or one pass's worth when that is more
    block_sets = max(1, BLOCK_CELLS // s, sets_per_pass)
    if str(precision) == "bf16":
        _bf16_linears(model, dev, rows=min(block_sets, sets_per_pass) * s)
    batches = list(_batches(_sets(basal_rows, perts, shuffled, s), block_sets))
    pert_matrix = torch.as_tensor(m.pert_matrix)
    # the knock-down path's target gene follows the perturbation (the shuffle swaps it with the features)
    pert_target = (
        torch.from_numpy(target_gene_index(m.pert_names, m.gene_names, m.control_pert))
        if getattr(model, "target_knockdown", None) is not None
        else None
    )
    batch_of = _training_batches(model, m, catalog)  # None without a batch encoder
    clipped: list[Future] = []  # the pred.h5ad writes: each returns how many values it clipped
    with _reuse_large_blocks(), ExitStack() as files, Progress(transient=True) as bar, _Background() as bg:

        def open_x(name: str, tahoe_uns: dict) -> h5py.Dataset:
            return files.enter_context(
                _dense_h5ad(run_dir / name, obs.copy(), var.copy(), {"tahoe_ft": tahoe_uns})
            )

        real_x = open_x("real.h5ad", {"kind": "observed", **uns})
        pred_x = open_x("pred.h5ad", {"kind": "prediction", **uns})
        outs = [(pred_x, "pert")]
        if (
            derange
        ):  # same basal cells, another held-out perturbation's features (the main draws are untouched)
            kind = "prediction, perturbation features shuffled"
            outs.append((open_x("pred_shuffled.h5ad", {"kind": kind, "shuffle": derange}), "shuffled_pert"))
        task = bar.add_task(f"predict {split}", total=len(batches))
        # real.h5ad (observed + control cells) is written on one thread while the model runs, and each
        # predicted block on another, one block behind the model: reads and writes overlap the forward passes
        bg.real(_write_rows, [real_x], 0, catalog.read_expression, real_rows, BLOCK_CELLS)
        bg.real(_write_rows, [real_x], n_pred, catalog.read_expression, ctrl, BLOCK_CELLS)
        bg.real(_sync, real_x)

        def read_basal(batch: list[_Set]) -> np.ndarray:
            rows = np.concatenate([st.basal for st in batch])
            return catalog.read_input(rows).reshape(len(batch), batch[0].basal.size, -1)

        upcoming = bg.read(read_basal, batches[0])  # the next block's basal cells, read ahead
        for i, batch in enumerate(batches):
            basal = upcoming.result()
            if i + 1 < len(batches):
                upcoming = bg.read(read_basal, batches[i + 1])
            for a in range(0, len(batch), sets_per_pass):
                chunk = batch[a : a + sets_per_pass]
                # the basal cells' batches: the same for the prediction and its shuffle
                bidx = (
                    torch.from_numpy(np.stack([batch_of[st.basal] for st in chunk]))
                    if batch_of is not None
                    else None
                )
                for x, field in outs:
                    which = [getattr(st, field) for st in chunk]
                    target = pert_target[which] if pert_target is not None else None
                    y = predict_batch(
                        model,
                        pert_matrix[which],
                        basal[a : a + len(chunk)],
                        dev,
                        str(precision),
                        target,
                        bidx,
                    )
                    job = bg.pred(_clip_and_write, x, [st.out_row for st in chunk], y)
                    if x is pred_x:
                        clipped.append(job)
            bar.advance(task)
        bg.pred(_write_rows, [x for x, _ in outs], n_pred, catalog.read_expression, ctrl, BLOCK_CELLS)
    n_clip = sum(job.result() for job in clipped)
    if n_clip:
        log.info("clipped %d predicted values to [0, %g]", n_clip, PRED_MAX)
    write_json_atomic(
        run_dir / "predict.json",
        {
            "checkpoint": str(Path(model.checkpoint_path).resolve()),
            "checkpoint_step": model.checkpoint_info.get("step"),
            "split": split,
            "n_groups": len(groups),
            "n_pred_cells": int(n_pred),
            "n_control_cells": int(ctrl.size),
            "n_genes": len(m.gene_names),
            "pert_col": m.pert_col,
            "control_pert": m.control_pert,
            "cell_type_col": m.cell_type_col,
            "data_paths": list(catalog.data_paths),
            "seed": seed,
            "shuffle": derange,
        },
    )
    log.info(
        "wrote %s and %s (%d groups, %d cells)",
        run_dir / "pred.h5ad",
        run_dir / "real.h5ad",
        len(groups),
        len(obs),
    )
    return run_dir
