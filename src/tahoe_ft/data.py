"""Perturbation screens on disk -> `[B, S, ·]` training batches.

What is here, top to bottom:

- `H5Screen`: one `.h5ad` file read with h5py (never a full load): obs columns, gene names, and rows of
  `X` (CSR group or dense dataset) or of `obsm/<key>`. Requested rows are sorted and coalesced into
  contiguous runs (small gaps read through), the runs read as unions of hyperslabs (one HDF5 call per
  128 runs and array), then densified in the caller's order. `indptr` lives in RAM; no row caches.
- validation on open (`UserError` with one line: what, where, how to fix).
- splits: `val_perts`/`test_perts`/`val_cell_types`/`test_cell_types`, or a cell-load style TOML.
- `SetPlan`: the set sampler. Every random choice (set contents, top-ups, basal controls, set order) is
  drawn in the main process from `numpy.random.Generator(seed, epoch)`; DataLoader workers only read rows.
- `SetDataset`: reads one batch of sets in one sorted pass per file.
- `PerturbationDataModule`: the Lightning data module, the data manifest, and row access for `predict`.

Row ids that leave this module (`split_cells`, `read_expression`, debug keys) are *global*: the files in
`data_paths` order, concatenated.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import lightning as L
import numpy as np
import scipy.sparse as sp
import torch
from h5py import h5s
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch.utils.data import DataLoader, Dataset, Sampler

from tahoe_ft.config import DataConfig
from tahoe_ft.errors import UserError

log = logging.getLogger(__name__)

# normalize_total target, as scanpy's default for log1p-normalised screens
TARGET_SUM = 1e4
# merge two row runs when the elements in between are fewer than this: reading ~8 KiB more costs about
# what one more hyperslab block does (scripts/bench_loader.py)
GAP_ELEMENTS = 1024
# runs per HDF5 read call (a union of hyperslabs; HDF5's union cost grows quadratically with its size)
RUNS_PER_READ = 128
# validation on open: rows sampled (evenly spaced) from X, and the size under which all of X is checked
VALIDATE_ROWS = 2000
FULL_CHECK_ELEMENTS = 1 << 24
# elements per block when scanning all of X (library sizes, full validation): 16 MiB of float32
SCAN_BLOCK_ELEMENTS = 1 << 22
# "integer counts" heuristic for log1p-declared data: log1p-normalised values stay far below this
COUNTS_MAX_THRESHOLD = 20.0
# HDF5 chunk cache (per open file): none for uncompressed data (HDF5 then reads just the selected bytes
# of a chunk, not whole chunks: faster for random rows, and a row read touches only that row's bytes);
# 16 MiB when X is compressed, where a chunk must be decompressed whole anyway
H5_CHUNK_CACHE_BYTES = 16 << 20

TRAIN, VAL, TEST = 1, 2, 4
_SPLIT_BITS = {"train": TRAIN, "val": VAL, "test": TEST}


# ----------------------------------------------------------------------------------------------------------
# one file


@dataclass
class _MatrixInfo:
    name: str  # path inside the file: "X" or "obsm/<key>"
    sparse: bool
    shape: tuple[int, int]
    indptr: np.ndarray | None  # int64 [n_obs + 1], CSR only


def _decode(values: np.ndarray) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values.tolist()]


class H5Screen:
    """One AnnData `.h5ad` file, read with h5py.

    Keeps the gene names and CSR `indptr` (8 bytes/cell) in RAM, plus library sizes (4 bytes/cell) once
    `library_sizes()` ran; obs columns are read on request; rows are read on demand, never cached.
    The HDF5 handle is reopened lazily in a new process (the pid is tracked), so the object can be used
    in forked DataLoader workers, and pickling drops the handle.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise UserError(f"data file not found: {self.path}; check data.path (or the TOML [datasets])")
        if not self.path.is_file() or not h5py.is_hdf5(self.path):
            raise UserError(
                f"{self.path} is not an HDF5/.h5ad file; give an AnnData file written by write_h5ad"
            )
        self._file: h5py.File | None = None
        self._pid = -1
        self._datasets: dict[str, h5py.Dataset] = {}
        self._libsize: np.ndarray | None = None
        self._scale: np.ndarray | None = None  # TARGET_SUM / library size, for input_transform=counts
        self._matrices: dict[str, _MatrixInfo] = {}
        self._rdcc_nbytes = 0
        f = self._h5()
        for key in ("X", "obs", "var"):
            if key not in f:
                raise UserError(
                    f"{self.path} is not an AnnData file (no '{key}' in it); write it with anndata's write_h5ad"
                )
        self.x = self._matrix_info("X")
        x_values = f["X/data"] if self.x.sparse else f["X"]
        if x_values.id.get_create_plist().get_nfilters() > 0:  # compressed: cache decompressed chunks
            self._rdcc_nbytes = H5_CHUNK_CACHE_BYTES
            self.close()
            f = self._h5()
        self.n_obs, self.n_vars = self.x.shape
        self.var_names = self._index("var")
        if len(self.var_names) != self.n_vars:
            raise UserError(
                f"{self.path}: var has {len(self.var_names)} names but X has {self.n_vars} columns; "
                "rewrite the file with anndata"
            )
        self.obsm_keys = sorted(f["obsm"].keys()) if "obsm" in f else []

    # -- handles ------------------------------------------------------------------------------------------

    def _h5(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            # a forked worker must not share the parent's HDF5 handle: open its own
            fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
            fapl.set_cache(0, 521, self._rdcc_nbytes, 0.75)
            # no data sieving: HDF5 would read 64 KiB around every small run of a contiguous dataset
            fapl.set_sieve_buf_size(0)
            try:
                fid = h5py.h5f.open(os.fsencode(self.path), h5py.h5f.ACC_RDONLY, fapl=fapl)
            except OSError as exc:
                raise UserError(
                    f"cannot open {self.path} ({exc}); check that it is a readable .h5ad file"
                ) from None
            self._file = h5py.File(fid)
            self._pid = os.getpid()
            self._datasets = {}
        return self._file

    def _dataset(self, name: str) -> h5py.Dataset:
        f = self._h5()
        ds = self._datasets.get(name)
        if ds is None:
            ds = self._datasets[name] = f[name]
        return ds

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None
        self._datasets = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_file"] = None
        state["_datasets"] = {}
        state["_pid"] = -1
        return state

    def __repr__(self) -> str:
        kind = "CSR" if self.x.sparse else "dense"
        return f"H5Screen({self.path}, {self.n_obs} cells x {self.n_vars} genes, {kind} X)"

    # -- metadata -----------------------------------------------------------------------------------------

    def _matrix_info(self, name: str) -> _MatrixInfo:
        if name in self._matrices:
            return self._matrices[name]
        obj = self._h5()[name]
        if isinstance(obj, h5py.Group):
            enc = obj.attrs.get("encoding-type", "")
            enc = enc.decode() if isinstance(enc, bytes) else str(enc)
            if enc == "csc_matrix":
                raise UserError(
                    f"{self.path}: '{name}' is a CSC matrix, which cannot be read by rows; "
                    "convert it with adata.X = adata.X.tocsr() and write the file again"
                )
            if not all(k in obj for k in ("data", "indices", "indptr")) or "shape" not in obj.attrs:
                raise UserError(
                    f"{self.path}: '{name}' is neither a CSR matrix nor a dense array; "
                    "write the file with anndata (CSR or dense X)"
                )
            shape = tuple(int(s) for s in obj.attrs["shape"])
            indptr = np.asarray(obj["indptr"][()], dtype=np.int64)
            if len(indptr) != shape[0] + 1:
                raise UserError(f"{self.path}: '{name}/indptr' does not match its shape; the file is corrupt")
            info = _MatrixInfo(name, True, (shape[0], shape[1]), indptr)
        elif isinstance(obj, h5py.Dataset) and obj.ndim == 2:
            info = _MatrixInfo(name, False, (int(obj.shape[0]), int(obj.shape[1])), None)
        else:
            raise UserError(f"{self.path}: '{name}' is not a 2-D matrix; write the file with anndata")
        self._matrices[name] = info
        return info

    def _index(self, group: str) -> np.ndarray:
        g = self._h5()[group]
        key = g.attrs.get("_index", "_index")
        key = key.decode() if isinstance(key, bytes) else str(key)
        if key not in g:
            raise UserError(f"{self.path}: {group} has no index ('{key}'); write the file with anndata")
        return np.asarray(_decode(g[key][()]), dtype=object)

    def has_obs(self, column: str) -> bool:
        return column in self._h5()["obs"]

    def obs_columns(self) -> list[str]:
        g = self._h5()["obs"]
        idx = g.attrs.get("_index", "_index")
        return [k for k in g.keys() if k != idx]

    def obs_codes(self, column: str) -> tuple[np.ndarray, list[str]]:
        """(codes int32 [n_obs], categories): categorical or plain obs column; -1 marks a missing value."""
        g = self._h5()["obs"]
        if column not in g:
            raise UserError(
                f"obs column '{column}' not found in {self.path} (columns: {', '.join(self.obs_columns())}); "
                "set the matching data.*_col"
            )
        obj = g[column]
        if isinstance(obj, h5py.Group) and "categories" in obj and "codes" in obj:
            cats = _decode(obj["categories"][()])
            codes = np.asarray(obj["codes"][()], dtype=np.int32)
            return codes, cats
        if isinstance(obj, h5py.Group) and "values" in obj:  # nullable integer/boolean/string arrays
            values = obj["values"][()]
            mask = np.asarray(obj["mask"][()], dtype=bool) if "mask" in obj else np.zeros(len(values), bool)
        elif isinstance(obj, h5py.Dataset) and obj.ndim == 1:
            values = obj[()]
            mask = np.zeros(len(values), bool)
        else:
            raise UserError(
                f"{self.path}: obs column '{column}' has an unsupported encoding; make it categorical"
            )
        labels = np.asarray(_decode(values), dtype=object)
        cats, codes = np.unique(labels, return_inverse=True)
        codes = codes.astype(np.int32)
        codes[mask] = -1
        return codes, [str(c) for c in cats]

    def obsm_dim(self, key: str) -> int:
        return self._matrix_info(f"obsm/{key}").shape[1]

    # -- rows ---------------------------------------------------------------------------------------------

    def read_rows(self, rows: np.ndarray, cols: np.ndarray | None = None) -> np.ndarray:
        """X rows as float32 `[len(rows), n_cols]`, in the caller's order (rows may repeat).

        `cols` selects and reorders genes (positions in var); None keeps all genes in file order.
        """
        return self._read(self.x, rows, cols, None)

    def read_obsm_rows(self, key: str, rows: np.ndarray) -> np.ndarray:
        """`obsm[key]` rows as float32 `[len(rows), dim]`, in the caller's order."""
        if f"obsm/{key}" not in self._h5():
            raise UserError(
                f"obsm['{key}'] not found in {self.path} (obsm keys: {', '.join(self.obsm_keys) or 'none'}); "
                "compute the embedding first or use the raw_expression encoder"
            )
        return self._read(self._matrix_info(f"obsm/{key}"), rows, None, None)

    def read_log1p(self, rows: np.ndarray, cols: np.ndarray | None, input_transform: str) -> np.ndarray:
        """log1p-normalised expression: X as is for "log1p"; normalize_total(1e4) + log1p for "counts"."""
        if input_transform == "log1p":
            return self._read(self.x, rows, cols, None)
        if self._scale is None:
            lib = self.library_sizes()
            self._scale = np.divide(TARGET_SUM, lib, out=np.zeros_like(lib), where=lib > 0)
        return self._read(self.x, rows, cols, self._scale)

    def library_sizes(self) -> np.ndarray:
        """Per-cell sum over all genes of X (float32, 4 bytes/cell), computed once in blocks."""
        if self._libsize is None:
            self.scan(want_libsize=True)
        assert self._libsize is not None
        return self._libsize

    def _read(
        self, info: _MatrixInfo, rows: np.ndarray, cols: np.ndarray | None, scale: np.ndarray | None
    ) -> np.ndarray:
        """Rows of X or an obsm matrix; `scale` (per file row) turns on normalize_total + log1p."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        n_file_rows, n_file_cols = info.shape
        n_cols = n_file_cols if cols is None else len(cols)
        if rows.size == 0:
            return np.zeros((0, n_cols), dtype=np.float32)
        if rows.min() < 0 or rows.max() >= n_file_rows:
            raise IndexError(f"row out of range for {self.path} ({n_file_rows} rows)")
        urows = np.unique(rows)
        if info.sparse:
            assert info.indptr is not None
            gap_cost = info.indptr[urows[1:]] - info.indptr[urows[:-1] + 1]
        else:
            gap_cost = (urows[1:] - urows[:-1] - 1) * n_file_cols
        # sorted runs of rows; a small gap is read through rather than costing another block
        brk = np.flatnonzero(gap_cost > GAP_ELEMENTS)
        first = urows[np.r_[0, brk + 1]]
        last = urows[np.r_[brk, urows.size - 1]]
        run_len = last - first + 1
        span = np.arange(int(run_len.sum()), dtype=np.int64) + np.repeat(
            first - (np.cumsum(run_len) - run_len), run_len
        )  # every file row read, in file order
        pos = np.searchsorted(span, rows)  # where each requested row (caller's order, repeats) sits in `span`
        if info.sparse:
            return self._read_csr(info, first, last, span, pos, rows, cols, n_cols, scale)
        block = np.empty((span.size, n_file_cols), dtype=np.float32)
        self._read_runs(self._dataset(info.name), first, last + 1, block)
        out = block[pos] if cols is None else block[np.ix_(pos, np.asarray(cols, dtype=np.int64))]
        if scale is not None:
            out *= scale[rows][:, None]
            np.log1p(out, out=out)
        return out

    def _read_csr(
        self,
        info: _MatrixInfo,
        first: np.ndarray,
        last: np.ndarray,
        span: np.ndarray,
        pos: np.ndarray,
        rows: np.ndarray,
        cols: np.ndarray | None,
        n_cols: int,
        scale: np.ndarray | None,
    ) -> np.ndarray:
        indptr = info.indptr
        assert indptr is not None
        ind_ds = self._dataset(f"{info.name}/indices")
        data = np.empty(int(indptr[last + 1].sum() - indptr[first].sum()), dtype=np.float32)
        ind = np.empty(data.size, dtype=ind_ds.dtype if ind_ds.dtype.kind in "iu" else np.int64)
        self._read_runs(self._dataset(f"{info.name}/data"), indptr[first], indptr[last + 1], data)
        self._read_runs(ind_ds, indptr[first], indptr[last + 1], ind)
        span_indptr = np.concatenate([[0], np.cumsum(indptr[span + 1] - indptr[span])])
        if cols is not None:  # select and reorder genes before densifying
            colmap = np.full(info.shape[1], -1, dtype=np.int64)
            colmap[np.asarray(cols, dtype=np.int64)] = np.arange(n_cols)
            mapped = colmap[ind]
            keep = mapped >= 0
            if not keep.all():
                kept_before = np.concatenate([[0], np.cumsum(keep)])
                span_indptr, data, mapped = kept_before[span_indptr], data[keep], mapped[keep]
            ind = mapped
        block = sp.csr_matrix((data, ind, span_indptr), shape=(span.size, n_cols))
        picked = block[pos]  # caller's order, repeats allowed (scipy, in C)
        if scale is not None:
            picked.data *= np.repeat(scale[rows], np.diff(picked.indptr))
            np.log1p(picked.data, out=picked.data)
        return picked.toarray()

    @staticmethod
    def _read_runs(ds: h5py.Dataset, starts: np.ndarray, stops: np.ndarray, out: np.ndarray) -> None:
        """Read rows/elements [starts[i], stops[i]) of `ds`, back to back, into `out`.

        Runs are read as unions of hyperslabs, RUNS_PER_READ per HDF5 call: one call per run costs ~20 us of
        Python selection overhead, and HDF5's union of many hyperslabs grows quadratically.
        """
        fspace = ds.id.get_space()
        tail = tuple(ds.shape[1:])
        starts, stops = starts.tolist(), stops.tolist()
        off = 0
        for g in range(0, len(starts), RUNS_PER_READ):
            fspace.select_none()
            n = 0
            for a, b in zip(starts[g : g + RUNS_PER_READ], stops[g : g + RUNS_PER_READ], strict=True):
                if b > a:
                    fspace.select_hyperslab((a,) + (0,) * len(tail), (b - a,) + tail, op=h5s.SELECT_OR)
                    n += b - a
            if n:
                ds.id.read(h5s.create_simple((n,) + tail), fspace, out[off : off + n])
                off += n

    # -- whole-matrix scans (validation, library sizes) ---------------------------------------------------

    def _blocks(self) -> Iterator[tuple[int, int, np.ndarray, np.ndarray | None]]:
        """X in row blocks of ~SCAN_BLOCK_ELEMENTS: (row0, row1, values, local indptr or None if dense)."""
        if self.x.sparse:
            indptr = self.x.indptr
            assert indptr is not None
            data_ds = self._dataset("X/data")
            r0 = 0
            while r0 < self.n_obs:
                r1 = int(np.searchsorted(indptr, indptr[r0] + SCAN_BLOCK_ELEMENTS, side="right")) - 1
                r1 = min(max(r1, r0 + 1), self.n_obs)
                vals = np.asarray(data_ds[indptr[r0] : indptr[r1]], dtype=np.float32)
                yield r0, r1, vals, indptr[r0 : r1 + 1] - indptr[r0]
                r0 = r1
        else:
            ds = self._dataset("X")
            step = max(1, SCAN_BLOCK_ELEMENTS // max(1, self.n_vars))
            for r0 in range(0, self.n_obs, step):
                r1 = min(r0 + step, self.n_obs)
                yield r0, r1, np.asarray(ds[r0:r1], dtype=np.float32), None

    def scan(self, *, want_libsize: bool) -> _ValueStats:
        """One pass over all of X in blocks: value statistics, and library sizes when asked."""
        stats = _ValueStats()
        lib = np.zeros(self.n_obs, dtype=np.float32) if want_libsize else None
        for r0, r1, vals, local_indptr in self._blocks():
            stats.update(vals, r0, local_indptr)
            if lib is not None:
                if local_indptr is None:
                    lib[r0:r1] = vals.sum(axis=1, dtype=np.float64)
                else:
                    cs = np.concatenate([[0.0], np.cumsum(vals, dtype=np.float64)])
                    lib[r0:r1] = cs[local_indptr[1:]] - cs[local_indptr[:-1]]
        if lib is not None:
            self._libsize = lib
        return stats

    def sample_stats(self, n_rows: int = VALIDATE_ROWS) -> _ValueStats:
        """Value statistics over a deterministic, evenly spaced sample of rows."""
        rows = np.unique(np.linspace(0, self.n_obs - 1, min(n_rows, self.n_obs)).astype(np.int64))
        stats = _ValueStats()
        step = max(1, SCAN_BLOCK_ELEMENTS // max(1, self.n_vars))  # bound the dense temporary
        for i in range(0, rows.size, step):
            stats.update(self.read_rows(rows[i : i + step]), 0, None, row_ids=rows[i : i + step])
        return stats

    def x_elements(self) -> int:
        """Stored elements of X (nnz for CSR)."""
        if self.x.sparse:
            assert self.x.indptr is not None
            return int(self.x.indptr[-1])
        return self.n_obs * self.n_vars


class _ValueStats:
    """Running checks over X values: non-finite, negative, integral, max."""

    def __init__(self) -> None:
        self.n = 0
        self.max = 0.0
        self.all_integral = True
        self.nonfinite_row: int | None = None
        self.negative_row: int | None = None
        self.negative_min = 0.0
        self.fraction_row: int | None = None
        self.fraction_value = 0.0

    def update(
        self, vals: np.ndarray, row0: int, local_indptr: np.ndarray | None, row_ids: np.ndarray | None = None
    ) -> None:
        if vals.size == 0:
            return
        flat = vals.reshape(-1)
        n_cols = vals.shape[1] if vals.ndim == 2 else 1

        def row_of(i: int) -> int:
            if local_indptr is not None:
                return row0 + int(np.searchsorted(local_indptr, i, side="right")) - 1
            r = i // n_cols
            return int(row_ids[r]) if row_ids is not None else row0 + r

        self.n += flat.size
        finite = np.isfinite(flat)
        if self.nonfinite_row is None and not finite.all():
            self.nonfinite_row = row_of(int(np.argmin(finite)))
        good = flat[finite] if not finite.all() else flat
        if good.size:
            self.max = max(self.max, float(good.max()))
            mn = float(good.min())
            if mn < 0 and self.negative_row is None:
                self.negative_min = mn
                self.negative_row = row_of(int(np.flatnonzero(flat < 0)[0]))
            frac = good != np.round(good)
            if frac.any():
                self.all_integral = False
                if self.fraction_row is None:
                    i = (
                        int(np.flatnonzero(finite)[np.argmax(frac)])
                        if not finite.all()
                        else int(np.argmax(frac))
                    )
                    self.fraction_row = row_of(i)
                    self.fraction_value = float(flat[i])


def _check_values(screen: H5Screen, input_transform: str) -> None:
    """NaN/Inf, negatives, and counts-vs-log1p, on a row sample or (small file, or counts) all of X."""
    full = input_transform == "counts" or screen.x_elements() <= FULL_CHECK_ELEMENTS
    stats = screen.scan(want_libsize=input_transform == "counts") if full else screen.sample_stats()
    what = "all values" if full else f"a sample of {min(VALIDATE_ROWS, screen.n_obs)} rows"
    where = f"{screen.path}, X"
    if stats.nonfinite_row is not None:
        raise UserError(
            f"X has NaN or Inf values ({where}, row {stats.nonfinite_row}); remove or fix those cells"
        )
    if stats.negative_row is not None:
        raise UserError(
            f"X has negative values (min {stats.negative_min:g} at row {stats.negative_row}; {where}); "
            "X must hold counts or log1p-normalised expression, not scaled/centred values"
        )
    if input_transform == "log1p" and stats.all_integral and stats.max > COUNTS_MAX_THRESHOLD:
        raise UserError(
            f"X looks like raw integer counts ({what} are integers, max {stats.max:g}; {where}) "
            "but data.input_transform=log1p; set data.input_transform=counts"
        )
    if input_transform == "counts" and not stats.all_integral:
        raise UserError(
            f"X has non-integer values (e.g. {stats.fraction_value:g} at row {stats.fraction_row}; {where}) "
            "but data.input_transform=counts; set data.input_transform=log1p if X is already normalised"
        )


def _check_obsm_values(screen: H5Screen, key: str) -> None:
    rows = np.unique(np.linspace(0, screen.n_obs - 1, min(VALIDATE_ROWS, screen.n_obs)).astype(np.int64))
    vals = screen.read_obsm_rows(key, rows)
    if not np.isfinite(vals).all():
        r = int(rows[np.argmin(np.isfinite(vals).all(axis=1))])
        raise UserError(
            f"obsm['{key}'] has NaN or Inf values ({screen.path}, row {r}); recompute the embedding"
        )


# ----------------------------------------------------------------------------------------------------------
# inputs besides the screens: gene list, perturbation features, split TOML


def read_gene_list(path: str | os.PathLike) -> list[str]:
    """A header-less CSV: the first field of each non-empty line is a gene name."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"gene list not found: {p}; check data.gene_list")
    genes = [line.split(",")[0].strip().strip('"') for line in p.read_text().splitlines() if line.strip()]
    if not genes:
        raise UserError(f"gene list {p} is empty; give one gene name per line")
    seen: set[str] = set()
    dup = [g for g in genes if g in seen or seen.add(g)]
    if dup:
        raise UserError(f"gene list {p} repeats genes ({', '.join(dup[:5])}); keep each gene once")
    return genes


def load_pert_features(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], str]:
    """A `torch.load`-able dict name -> 1-D tensor; returns ({name: float32 vector}, sha256 of the file)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"perturbation features file not found: {p}; check data.pert_features")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any load failure is a bad file for the user
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"cannot load perturbation features {p} ({msg}); save a dict name -> 1-D torch tensor with torch.save"
        ) from None
    if not isinstance(obj, dict) or not obj:
        raise UserError(f"perturbation features {p} is not a non-empty dict; save a dict name -> 1-D tensor")
    feats: dict[str, np.ndarray] = {}
    dim = None
    for name, vec in obj.items():
        arr = np.asarray(vec.detach().cpu() if torch.is_tensor(vec) else vec, dtype=np.float32)
        if arr.ndim != 1 or (dim is not None and arr.shape[0] != dim):
            raise UserError(
                f"perturbation features {p}: entry '{name}' has shape {arr.shape}, expected 1-D of one length; "
                "store one 1-D vector per perturbation"
            )
        dim = arr.shape[0]
        feats[str(name)] = arr
    digest = hashlib.sha256(p.read_bytes()).hexdigest()
    return feats, digest


def _expand_braces(pattern: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    out: list[str] = []
    for alt in m.group(1).split(","):
        out.extend(_expand_braces(pattern[: m.start()] + alt + pattern[m.end() :]))
    return out


def _dataset_files(name: str, spec: Any, toml_path: Path) -> list[Path]:
    """cell-load's [datasets] entry: a directory, a file, or a glob with {a,b} braces."""
    specs = spec if isinstance(spec, list) else [spec]
    files: list[Path] = []
    for s in specs:
        for pat in _expand_braces(str(s)):
            # relative paths: the current directory first (as cell-load does), then the TOML's folder
            bases = [Path(pat)] if Path(pat).is_absolute() else [Path(pat), toml_path.parent / pat]
            found: list[Path] = []
            for cand in bases:
                if cand.is_dir():
                    found = sorted(q for q in cand.iterdir() if q.suffix in (".h5", ".h5ad"))
                elif glob.has_magic(str(cand)):
                    found = sorted(Path(q) for q in glob.glob(str(cand)))
                elif cand.is_file():
                    found = [cand]
                if found:
                    break
            if not found:
                raise UserError(
                    f"split TOML {toml_path}: dataset '{name}' path '{pat}' matches no file; "
                    "fix the path in [datasets] (relative paths are tried from the current directory, "
                    "then from the TOML's folder)"
                )
            files.extend(found)
    return files


@dataclass
class SplitToml:
    """A cell-load style split TOML, parsed: dataset -> files, zeroshot and fewshot entries."""

    datasets: dict[str, list[Path]]
    zeroshot: dict[tuple[str, str], str]
    fewshot: dict[tuple[str, str], dict[str, list[str]]]


def parse_split_toml(path: str | os.PathLike) -> SplitToml:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"split TOML not found: {p}; check data.split_toml")
    try:
        doc = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"cannot parse split TOML {p} ({exc}); fix its syntax") from None
    unknown = set(doc) - {"datasets", "training", "zeroshot", "fewshot"}
    if unknown:
        raise UserError(
            f"split TOML {p} has unknown sections {sorted(unknown)}; "
            'use [datasets], [training], [zeroshot], [fewshot."<dataset>.<cell type>"]'
        )
    raw_ds = doc.get("datasets", {})
    if not isinstance(raw_ds, dict) or not raw_ds:
        raise UserError(f'split TOML {p} has no [datasets] table; add name = "path" entries')
    datasets = {str(k): _dataset_files(str(k), v, p) for k, v in raw_ds.items()}

    def key_of(section: str, key: str) -> tuple[str, str]:
        ds, _, ct = key.partition(".")
        if not ct or ds not in datasets:
            raise UserError(
                f"split TOML {p}: [{section}] key '{key}' is not '<dataset>.<cell type>' with a dataset from "
                f"[datasets] ({', '.join(datasets)}); fix the key"
            )
        return ds, ct

    for ds in doc.get("training", {}):
        if ds not in datasets:
            raise UserError(f"split TOML {p}: [training] names unknown dataset '{ds}'; add it to [datasets]")
    zeroshot = {}
    for key, split in doc.get("zeroshot", {}).items():
        if split not in ("val", "test"):
            raise UserError(f"split TOML {p}: [zeroshot] '{key}' = '{split}'; use \"val\" or \"test\"")
        zeroshot[key_of("zeroshot", key)] = split
    fewshot = {}
    for key, table in doc.get("fewshot", {}).items():
        if not isinstance(table, dict) or set(table) - {"val", "test"}:
            raise UserError(f'split TOML {p}: [fewshot."{key}"] may only hold val = [...] and test = [...]')
        fewshot[key_of("fewshot", key)] = {s: [str(x) for x in table.get(s, [])] for s in ("val", "test")}
    return SplitToml(datasets, zeroshot, fewshot)


# ----------------------------------------------------------------------------------------------------------
# groups, pools and the set sampler


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


class SetDescriptor(NamedTuple):
    """One set: S target rows of one (file, cell type, pert) and S basal control rows (global row ids)."""

    file: int
    pert: int
    cell_type: int
    pert_rows: np.ndarray
    ctrl_rows: np.ndarray


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


# ----------------------------------------------------------------------------------------------------------
# the dataset: reads the rows of a batch of sets


class SetDataset(Dataset):
    """Reads sets described by `SetDescriptor`s into the batch contract of docs/design.md.

    `__getitems__(descriptors)` reads a whole batch with one sorted pass per file (pert and control rows
    together); `__getitem__(descriptor)` is the same for one set (`B = 1`). The DataLoader must use
    `collate_fn=identity_collate`.
    """

    def __init__(
        self,
        screens: Sequence[H5Screen],
        offsets: np.ndarray,
        gene_cols: Sequence[np.ndarray | None],
        *,
        input_transform: str,
        embed_key: str | None,
        need_counts: bool,
        pert_matrix: np.ndarray,
        pert_names: Sequence[str],
        cell_types: Sequence[str],
        batch_of_row: np.ndarray | None,
        debug_rows: bool = False,
    ) -> None:
        self.screens = list(screens)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.gene_cols = list(gene_cols)
        self.input_transform = input_transform
        self.embed_key = embed_key
        self.need_counts = need_counts
        self.pert_matrix = pert_matrix
        self.pert_names = list(pert_names)
        self.cell_types = list(cell_types)
        self.batch_of_row = batch_of_row
        self.debug_rows = debug_rows

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def expression(self, file: int, local_rows: np.ndarray) -> np.ndarray:
        return self.screens[file].read_log1p(local_rows, self.gene_cols[file], self.input_transform)

    def model_input(self, file: int, local_rows: np.ndarray) -> np.ndarray:
        if self.embed_key is None:
            return self.expression(file, local_rows)
        return self.screens[file].read_obsm_rows(self.embed_key, local_rows)

    def __getitem__(self, desc: SetDescriptor) -> dict[str, Any]:
        return self.__getitems__([desc])

    def __getitems__(self, descs: Sequence[SetDescriptor]) -> dict[str, Any]:
        B, S = len(descs), len(descs[0].pert_rows)
        files = np.array([d.file for d in descs])
        pert_rows = np.stack([d.pert_rows for d in descs]).astype(np.int64)
        ctrl_rows = np.stack([d.ctrl_rows for d in descs]).astype(np.int64)
        parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"pert": [], "ctrl": [], "counts": []}
        for f in np.unique(files).tolist():
            sel = np.flatnonzero(files == f)
            p = (pert_rows[sel] - self.offsets[f]).reshape(-1)
            c = (ctrl_rows[sel] - self.offsets[f]).reshape(-1)
            both = self.model_input(f, np.concatenate([p, c]))  # one sorted pass over pert + ctrl rows
            parts["pert"].append((sel, both[: p.size]))
            parts["ctrl"].append((sel, both[p.size :]))
            if self.embed_key is not None and self.need_counts:
                parts["counts"].append((sel, self.expression(f, p)))

        def assemble(chunks: list[tuple[np.ndarray, np.ndarray]]) -> torch.Tensor:
            if len(chunks) == 1:
                return torch.from_numpy(chunks[0][1].reshape(B, S, -1))
            dim = chunks[0][1].shape[1]
            out = np.empty((B, S, dim), dtype=np.float32)
            for sel, vals in chunks:
                out[sel] = vals.reshape(len(sel), S, dim)
            return torch.from_numpy(out)

        perts = np.array([d.pert for d in descs])
        pert_emb = np.ascontiguousarray(
            np.broadcast_to(self.pert_matrix[perts][:, None, :], (B, S, self.pert_matrix.shape[1]))
        )
        batch: dict[str, Any] = {
            "pert_emb": torch.from_numpy(pert_emb),
            "ctrl_cell_emb": assemble(parts["ctrl"]),
            "pert_cell_emb": assemble(parts["pert"]),
        }
        if parts["counts"]:
            batch["pert_cell_counts"] = assemble(parts["counts"])
        if self.batch_of_row is not None:
            batch["batch"] = torch.from_numpy(self.batch_of_row[pert_rows].astype(np.int64))
        batch["pert_name"] = [self.pert_names[d.pert] for d in descs]
        batch["cell_type"] = [self.cell_types[d.cell_type] for d in descs]
        if self.debug_rows:
            batch["pert_rows"] = torch.from_numpy(pert_rows)
            batch["ctrl_rows"] = torch.from_numpy(ctrl_rows)
        return batch


def identity_collate(batch: Any) -> Any:
    """`SetDataset.__getitems__` already returns a collated batch."""
    return batch


def _worker_init(_worker_id: int) -> None:
    # workers only do I/O and numpy scatter; more threads per worker just fight over the cores
    torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------------------
# the data module


def _as_data_config(cfg: DataConfig | DictConfig | dict) -> DataConfig:
    if isinstance(cfg, DataConfig):
        return cfg
    try:
        merged = OmegaConf.merge(OmegaConf.structured(DataConfig), cfg)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise UserError(
            f"config error at 'data.{getattr(exc, 'full_key', '')}': {str(exc).splitlines()[0]}; "
            "check the data config keys and types"
        ) from None


def _fmt_list(names: Sequence[str], n: int = 5) -> str:
    names = list(names)
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(repr(x) for x in names[:n]) + more


class PerturbationDataModule(L.LightningDataModule):
    """Screens (.h5ad) -> training/validation batches of sets, plus the data manifest.

    `embed_key=None`: input and target are log1p gene expression over the evaluator's genes
    (raw_expression encoder). `embed_key="X_state"`: input and target are `obsm["X_state"]` rows, and
    with `need_counts` the batch also carries `pert_cell_counts` (gene expression, for the decoder).

    Splits: listed val/test perturbations (few-shot) and held-out cell types (zero-shot) take those
    cells out of training. Control cells are shared: every split draws basal controls from the same
    control pools, and with `yield_controls` all controls (held-out cell types' too, as cell-load's
    "observational" controls) are also training targets labelled with the control name.
    """

    def __init__(
        self,
        data_cfg: DataConfig | DictConfig | dict,
        *,
        embed_key: str | None,
        need_counts: bool,
        cell_set_len: int,
        seed: int,
        rank: int | None = None,
        world_size: int | None = None,
        debug_rows: bool = False,
    ) -> None:
        super().__init__()
        self.cfg = _as_data_config(data_cfg)
        self.embed_key = embed_key
        self.need_counts = bool(need_counts) and embed_key is not None
        self.cell_set_len = int(cell_set_len)
        self.seed = int(seed)
        self.rank, self.world_size = rank, world_size
        self.debug_rows = debug_rows
        self._ready = False
        self._resume_at: tuple[int, int] | None = None

    # -- setup --------------------------------------------------------------------------------------------

    def _check_options(self) -> None:
        c = self.cfg
        if c.input_transform not in ("log1p", "counts"):
            raise UserError(
                f"data.input_transform='{c.input_transform}' is not valid; use log1p (normalised) or counts (raw)"
            )
        if c.basal_mapping not in ("random", "batch"):
            raise UserError(f"data.basal_mapping='{c.basal_mapping}' is not valid; use random or batch")
        if c.basal_mapping == "batch" and not c.batch_col:
            raise UserError(
                "data.basal_mapping=batch needs data.batch_col; set it or use basal_mapping=random"
            )
        if self.cell_set_len < 1 or c.batch_size < 1:
            raise UserError(
                f"model.cell_set_len={self.cell_set_len}, data.batch_size={c.batch_size}: both must be >= 1; "
                "set positive values"
            )
        if c.num_workers < 0 or c.prefetch_factor < 1:
            raise UserError(
                f"data.num_workers={c.num_workers}, data.prefetch_factor={c.prefetch_factor}: need num_workers >= 0 "
                "and prefetch_factor >= 1; fix the values"
            )
        if c.split_toml and (c.val_perts or c.test_perts or c.val_cell_types or c.test_cell_types):
            raise UserError(
                "both data.split_toml and data.val_perts/test_perts/val_cell_types/test_cell_types are set; "
                "use one of the two"
            )

    def _resolve_paths(self) -> tuple[list[Path], list[str], SplitToml | None]:
        c = self.cfg
        toml = parse_split_toml(c.split_toml) if c.split_toml else None
        if c.path is None or (isinstance(c.path, (list, tuple)) and not c.path) or c.path == "":
            if toml is None:
                raise UserError("data.path is not set; give an .h5ad path (or a list), or data.split_toml")
            paths, names = [], []
            for ds, files in toml.datasets.items():
                paths += files
                names += [ds] * len(files)
            return paths, names, toml
        raw = list(c.path) if isinstance(c.path, (list, tuple)) or OmegaConf.is_list(c.path) else [c.path]
        paths = [Path(os.path.expanduser(str(p))) for p in raw]
        names = [p.stem for p in paths]
        if toml is not None:  # name each file by the TOML dataset that lists it
            owner = {f.resolve(): ds for ds, files in toml.datasets.items() for f in files}
            names = [owner.get(p.resolve(), p.stem) for p in paths]
        return paths, names, toml

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        c = self.cfg
        self._check_options()
        paths, ds_names, toml = self._resolve_paths()
        self.data_paths = [str(p) for p in paths]
        screens = [H5Screen(p) for p in paths]
        self.screens = screens

        # columns, control, genes, values, obsm
        cols = [c.pert_col, c.cell_type_col] + ([c.batch_col] if c.batch_col else [])
        for s in screens:
            for col in cols:
                if not s.has_obs(col):
                    raise UserError(
                        f"obs column '{col}' not found in {s.path} (columns: {_fmt_list(s.obs_columns(), 12)}); "
                        "set data.pert_col / data.cell_type_col / data.batch_col to the right names"
                    )
        self.gene_names, gene_cols = self._resolve_genes(screens)
        for s in screens:
            _check_values(s, c.input_transform)
            if self.embed_key is not None:
                if f"obsm/{self.embed_key}" not in s._h5():
                    raise UserError(
                        f"obsm['{self.embed_key}'] not found in {s.path} (obsm keys: "
                        f"{', '.join(s.obsm_keys) or 'none'}); compute the embedding first "
                        "(e.g. state emb transform) or use encoder=raw_expression"
                    )
                _check_obsm_values(s, self.embed_key)
        if self.embed_key is not None:
            dims = {s.obsm_dim(self.embed_key) for s in screens}
            if len(dims) > 1:
                raise UserError(
                    f"obsm['{self.embed_key}'] has different widths across files ({sorted(dims)}); "
                    "use embeddings from one model"
                )

        # labels -> global codes
        per_file = [{col: s.obs_codes(col) for col in cols} for s in screens]
        for s, labels in zip(screens, per_file, strict=True):
            for col, (codes, _) in labels.items():
                n_missing = int((codes < 0).sum())
                if n_missing:
                    raise UserError(
                        f"obs column '{col}' has {n_missing} cells without a value ({s.path}); "
                        "fill in or drop those cells"
                    )
            codes, cats = labels[c.pert_col]
            if c.control_pert not in cats or not (codes == cats.index(c.control_pert)).any():
                raise UserError(
                    f"control label '{c.control_pert}' not found in obs['{c.pert_col}'] of {s.path} "
                    f"(values: {_fmt_list(sorted(set(cats)))}); set data.control_pert"
                )

        def used(col: str) -> list[str]:
            names: set[str] = set()
            for labels in per_file:
                codes, cats = labels[col]
                names.update(cats[i] for i in np.unique(codes).tolist())
            return sorted(names)

        self.pert_names = used(c.pert_col)
        self.cell_types = used(c.cell_type_col)
        self.batches = used(c.batch_col) if c.batch_col else None
        self.control_idx = self.pert_names.index(c.control_pert)

        def to_global(labels: dict, col: str, names: list[str]) -> np.ndarray:
            codes, cats = labels[col]
            index = {x: i for i, x in enumerate(names)}
            lut = np.array([index.get(x, -1) for x in cats], dtype=np.int32)
            return lut[codes] if len(lut) else np.zeros(0, np.int32)

        self.offsets = np.concatenate([[0], np.cumsum([s.n_obs for s in screens])]).astype(np.int64)
        file_of = np.repeat(np.arange(len(screens), dtype=np.int32), [s.n_obs for s in screens])
        pert_of = np.concatenate([to_global(lb, c.pert_col, self.pert_names) for lb in per_file])
        ct_of = np.concatenate([to_global(lb, c.cell_type_col, self.cell_types) for lb in per_file])
        batch_of = (
            np.concatenate([to_global(lb, c.batch_col, self.batches) for lb in per_file]).astype(np.int64)
            if c.batch_col and self.batches is not None
            else None
        )
        self._pert_of, self._ct_of, self._file_of, self._batch_of = pert_of, ct_of, file_of, batch_of

        self._build_pert_matrix()
        split_bits = self._assign_splits(ds_names, toml, file_of, ct_of, pert_of)
        self._build_groups(file_of, ct_of, pert_of, batch_of, split_bits)

        self.dataset = SetDataset(
            screens,
            self.offsets,
            gene_cols,
            input_transform=c.input_transform,
            embed_key=self.embed_key,
            need_counts=self.need_counts,
            pert_matrix=self.pert_matrix_np,
            pert_names=self.pert_names,
            cell_types=self.cell_types,
            batch_of_row=batch_of,
            debug_rows=self.debug_rows,
        )
        self._gene_cols = gene_cols
        self._check_memory()
        self._ready = True
        log.info(
            "data: %d file(s), %d cells, %d genes, %d perturbations, %d cell types; "
            "sets per epoch train %d, val %d",
            len(screens),
            int(self.offsets[-1]),
            len(self.gene_names),
            len(self.pert_names),
            len(self.cell_types),
            self.train_plan.n_sets,
            self.val_plan.n_sets,
        )

    def _resolve_genes(self, screens: list[H5Screen]) -> tuple[list[str], list[np.ndarray | None]]:
        c = self.cfg
        if c.gene_list:
            genes = read_gene_list(c.gene_list)
            cols: list[np.ndarray | None] = []
            for s in screens:
                pos: dict[str, int] = {}
                dup = set()
                for i, g in enumerate(s.var_names.tolist()):
                    if g in pos:
                        dup.add(g)
                    pos[g] = i
                missing = [g for g in genes if g not in pos]
                if missing:
                    raise UserError(
                        f"{len(missing)} genes of the gene list {c.gene_list} are not in var of {s.path} "
                        f"({_fmt_list(missing)}); fix data.gene_list or the file's var_names"
                    )
                amb = [g for g in genes if g in dup]
                if amb:
                    raise UserError(
                        f"genes of the gene list appear more than once in var of {s.path} ({_fmt_list(amb)}); "
                        "make var_names unique (adata.var_names_make_unique())"
                    )
                idx = np.array([pos[g] for g in genes], dtype=np.int64)
                cols.append(None if np.array_equal(idx, np.arange(s.n_vars)) else idx)
            return genes, cols
        ref = screens[0]
        for s in screens[1:]:
            if s.n_vars != ref.n_vars or not np.array_equal(s.var_names, ref.var_names):
                n = min(s.n_vars, ref.n_vars)
                diff = np.flatnonzero(s.var_names[:n] != ref.var_names[:n])
                at = (
                    f"first difference at position {diff[0]}: {ref.var_names[diff[0]]!r} vs {s.var_names[diff[0]]!r}"
                    if diff.size
                    else "one list extends the other"
                )
                raise UserError(
                    f"files have different genes: {ref.path} ({ref.n_vars}) vs {s.path} ({s.n_vars}; {at}); "
                    "set data.gene_list to reindex every file to one list"
                )
        return [str(g) for g in ref.var_names.tolist()], [None] * len(screens)

    def _build_pert_matrix(self) -> None:
        c = self.cfg
        n = len(self.pert_names)
        if not c.pert_features:
            self.pert_matrix_np = np.eye(n, dtype=np.float32)
            self.pert_features = {"source": "onehot", "sha256": None}
            return
        feats, digest = load_pert_features(c.pert_features)
        dim = len(next(iter(feats.values())))
        missing = [p for p in self.pert_names if p not in feats and p != c.control_pert]
        if missing and not c.allow_missing_pert_features:
            raise UserError(
                f"{len(missing)} perturbations have no vector in {c.pert_features} ({_fmt_list(missing)}); "
                "add them, or set data.allow_missing_pert_features=true to give them zero vectors"
            )
        if missing:
            log.warning(
                "%d perturbations are missing from %s and get zero vectors: %s",
                len(missing),
                c.pert_features,
                _fmt_list(missing),
            )
        if c.control_pert not in feats:
            log.info("control '%s' is not in %s: it gets the zero vector", c.control_pert, c.pert_features)
        mat = np.zeros((n, dim), dtype=np.float32)
        for i, p in enumerate(self.pert_names):
            if p in feats:
                mat[i] = feats[p]
        self.pert_matrix_np = mat
        self.pert_features = {"source": str(c.pert_features), "sha256": digest}

    def _assign_splits(
        self,
        ds_names: list[str],
        toml: SplitToml | None,
        file_of: np.ndarray,
        ct_of: np.ndarray,
        pert_of: np.ndarray,
    ) -> np.ndarray:
        """Split bits per cell (TRAIN|VAL|TEST; val and test may overlap in a TOML); controls: TRAIN or 0."""
        c = self.cfg
        n_ct, n_p = len(self.cell_types), len(self.pert_names)
        p_index = {p: i for i, p in enumerate(self.pert_names)}
        ct_index = {t: i for i, t in enumerate(self.cell_types)}
        pair = file_of.astype(np.int64) * n_ct + ct_of  # (file, cell type) of each cell
        present = set(np.unique(pair).tolist())
        bits = np.full(pert_of.size, TRAIN, dtype=np.int8)

        def few_lut(split: str, names: list[str], lut: np.ndarray, where: str, known: set[int]) -> None:
            for p in names:
                if p == c.control_pert:
                    raise UserError(
                        f"{where} {split} lists the control '{p}'; controls are shared, remove it"
                    )
                code = p_index.get(p, -1)
                if code not in known:
                    raise UserError(
                        f"{where} {split} lists '{p}', which has no cells in obs['{c.pert_col}'] "
                        f"({_fmt_list(self.data_paths, 3)}); fix the name or remove it"
                    )
                lut[code] |= _SPLIT_BITS[split]

        if toml is None:
            lut = np.zeros(n_p, dtype=np.int8)
            for split in ("val", "test"):
                few_lut(split, list(getattr(c, f"{split}_perts")), lut, "data", set(range(n_p)))
            fb = lut[pert_of]
            bits = np.where(fb > 0, fb, bits)
            zero = np.zeros(n_ct, dtype=np.int8)
            for split in ("val", "test"):
                for ct in getattr(c, f"{split}_cell_types"):
                    if ct not in ct_index:
                        raise UserError(
                            f"data.{split}_cell_types lists '{ct}', which has no cells in "
                            f"obs['{c.cell_type_col}'] (cell types: {_fmt_list(self.cell_types)}); fix the name"
                        )
                    zero[ct_index[ct]] |= _SPLIT_BITS[split]
            zb = zero[ct_of]
            bits = np.where(zb > 0, zb, bits)
        else:
            files_of_ds: dict[str, list[int]] = {}
            for f, ds in enumerate(ds_names):
                files_of_ds.setdefault(ds, []).append(f)

            def pairs_of(section: str, ds: str, ct: str) -> list[int]:
                t = ct_index.get(ct, -1)
                out = [f * n_ct + t for f in files_of_ds.get(ds, []) if t >= 0 and f * n_ct + t in present]
                if not out:
                    raise UserError(
                        f"split TOML {section} '{ds}.{ct}': no cells of cell type '{ct}' in dataset '{ds}' "
                        f"(files: {_fmt_list(self.data_paths, 3)}); fix the cell type or dataset name"
                    )
                return out

            for (ds, ct), table in toml.fewshot.items():
                in_pairs = np.flatnonzero(np.isin(pair, pairs_of("[fewshot]", ds, ct)))
                known = set(np.unique(pert_of[in_pairs]).tolist())
                lut = np.zeros(n_p, dtype=np.int8)
                for split in ("val", "test"):
                    few_lut(split, table[split], lut, f'split TOML [fewshot."{ds}.{ct}"]', known)
                fb = lut[pert_of[in_pairs]]
                bits[in_pairs] = np.where(fb > 0, fb, bits[in_pairs])
            for (ds, ct), split in toml.zeroshot.items():
                for q in pairs_of("[zeroshot]", ds, ct):
                    bits[pair == q] = _SPLIT_BITS[split]
        bits[pert_of == self.control_idx] = TRAIN if c.yield_controls else 0
        return bits

    def _build_groups(
        self,
        file_of: np.ndarray,
        ct_of: np.ndarray,
        pert_of: np.ndarray,
        batch_of: np.ndarray | None,
        split_bits: np.ndarray,
    ) -> None:
        c = self.cfg
        by_batch = c.basal_mapping == "batch" and batch_of is not None
        bkey = batch_of if by_batch else np.zeros_like(pert_of, dtype=np.int64)
        ctrl = self.control_idx

        # control pools: (file, ct) and, for batch mapping, (file, ct, batch)
        crow = np.flatnonzero(pert_of == ctrl)
        corder = np.lexsort((bkey[crow], ct_of[crow], file_of[crow]))
        crow = crow[corder]
        cf, cc, cb = file_of[crow], ct_of[crow], bkey[crow]

        def runs(*keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            if keys[0].size == 0:
                return np.zeros(0, np.int64), np.zeros(0, np.int64)
            change = np.zeros(keys[0].size, bool)
            change[0] = True
            for k in keys:
                change[1:] |= k[1:] != k[:-1]
            start = np.flatnonzero(change)
            size = np.diff(np.r_[start, keys[0].size])
            return start, size

        ct_start, ct_size = runs(cf, cc)
        ct_pool_of = {(int(cf[s]), int(cc[s])): i for i, s in enumerate(ct_start)}
        pool_rows = [crow]
        pool_start, pool_size = [ct_start], [ct_size]
        b_pool_of: dict[tuple[int, int, int], int] = {}
        if by_batch:
            b_start, b_size = runs(cf, cc, cb)
            b_pool_of = {
                (int(cf[s]), int(cc[s]), int(cb[s])): len(ct_start) + i for i, s in enumerate(b_start)
            }
            pool_start.append(b_start)
            pool_size.append(b_size)
        self.pools = Pools(
            np.concatenate(pool_rows).astype(np.int64), np.concatenate(pool_start), np.concatenate(pool_size)
        )

        # target groups: (file, ct, pert[, batch]) over cells that are targets in some split
        rows = np.flatnonzero(split_bits > 0)
        order = np.lexsort((bkey[rows], pert_of[rows], ct_of[rows], file_of[rows]))
        rows = rows[order]
        gf, gc, gp, gb = file_of[rows], ct_of[rows], pert_of[rows], bkey[rows]
        start, size = runs(gf, gc, gp, gb)
        pools = np.empty(start.size, dtype=np.int64)
        for i, s in enumerate(start.tolist()):
            key = (int(gf[s]), int(gc[s]))
            if key not in ct_pool_of:
                raise UserError(
                    f"cell type '{self.cell_types[key[1]]}' in {self.data_paths[key[0]]} has no control cells "
                    f"('{c.control_pert}'); basal controls never cross files: add controls or drop those cells"
                )
            pools[i] = (
                b_pool_of.get((key[0], key[1], int(gb[s])), ct_pool_of[key]) if by_batch else ct_pool_of[key]
            )
        all_groups = Groups(rows.astype(np.int64), start, size, gf[start], gc[start], gp[start], pools)
        gbits = split_bits[rows[start]] if start.size else np.zeros(0, np.int8)
        self._groups = all_groups
        self._group_bits = gbits

        train = all_groups.subset((gbits & TRAIN) > 0)
        val = all_groups.subset((gbits & VAL) > 0)
        test = all_groups.subset((gbits & TEST) > 0)
        pert_train = train.pert != ctrl
        if not pert_train.any():
            raise UserError(
                "no perturbed cells left for training after the val/test split; hold out fewer perturbations"
            )
        biggest = int(np.argmax(np.where(pert_train, train.size, -1)))
        if self.cell_set_len > train.size[biggest]:
            raise UserError(
                f"model.cell_set_len={self.cell_set_len} is larger than every training group (largest: "
                f"{int(train.size[biggest])} cells, cell type '{self.cell_types[train.cell_type[biggest]]}', "
                f"perturbation '{self.pert_names[train.pert[biggest]]}'); lower model.cell_set_len to "
                f"<= {int(train.size[biggest])}"
            )
        common = dict(
            cell_set_len=self.cell_set_len,
            batch_size=c.batch_size,
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
        )
        self.train_plan = SetPlan(train, self.pools, train=True, stream=0, **common)
        self.val_plan = SetPlan(
            val, self.pools, train=False, sets_per_group=c.val_sets_per_group, stream=1, **common
        )
        self.test_plan = SetPlan(
            test, self.pools, train=False, sets_per_group=c.val_sets_per_group, stream=2, **common
        )

    def _check_memory(self) -> None:
        c = self.cfg
        d = self.dims
        per_cell = (
            d["input_dim"] + d["output_dim"] + (d["gene_dim"] if self.need_counts else 0) + d["pert_dim"]
        )
        batch_bytes = c.batch_size * self.cell_set_len * per_cell * 4
        in_flight = (c.num_workers * c.prefetch_factor if c.num_workers > 0 else 0) + 2
        resident = in_flight * batch_bytes
        gib = 1 << 30
        log.info(
            "loader memory: %.3f GiB per batch x %d in flight = %.2f GiB (budget %.1f GiB)",
            batch_bytes / gib,
            in_flight,
            resident / gib,
            c.memory_budget_gb,
        )
        if resident > c.memory_budget_gb * gib:
            raise UserError(
                f"the loader would hold ~{resident / gib:.2f} GiB of batches ({in_flight} x {batch_bytes / gib:.3f} GiB: "
                f"batch_size={c.batch_size} x cell_set_len={self.cell_set_len} x {per_cell} floats/cell), over "
                f"data.memory_budget_gb={c.memory_budget_gb}; lower data.batch_size, model.cell_set_len, "
                "data.num_workers or data.prefetch_factor (or raise data.memory_budget_gb)"
            )

    # -- properties ---------------------------------------------------------------------------------------

    def _need_setup(self) -> None:
        if not self._ready:
            raise RuntimeError("PerturbationDataModule.setup() has not been called")

    @property
    def dims(self) -> dict[str, int | None]:
        d_in = len(self.gene_names) if self.embed_key is None else self.screens[0].obsm_dim(self.embed_key)
        return {
            "input_dim": d_in,
            "output_dim": d_in,
            "pert_dim": int(self.pert_matrix_np.shape[1]),
            "gene_dim": len(self.gene_names),
            "batch_dim": len(self.batches) if self.batches is not None else None,
        }

    @property
    def pert_matrix(self) -> torch.Tensor:
        """float32 `[n_perts, P]`; row i is `pert_names[i]`."""
        return torch.from_numpy(self.pert_matrix_np)

    @property
    def splits(self) -> dict[str, list[str]]:
        """Perturbations (control excluded) with target cells in each split."""
        self._need_setup()
        out = {}
        for name, bit in _SPLIT_BITS.items():
            codes = np.unique(self._groups.pert[(self._group_bits & bit) > 0])
            out[name] = [self.pert_names[i] for i in codes.tolist() if i != self.control_idx]
        return out

    def manifest(self) -> dict[str, Any]:
        """The data manifest of docs/design.md (plain python types; `pert_matrix` a tensor)."""
        self._need_setup()
        c = self.cfg
        splits = self.splits
        return {
            "gene_names": list(self.gene_names),
            "encoder": "se600m" if self.embed_key else "raw_expression",
            "embed_key": self.embed_key,
            "input_dim": int(self.dims["input_dim"]),
            "pert_col": c.pert_col,
            "control_pert": c.control_pert,
            "cell_type_col": c.cell_type_col,
            "batch_col": c.batch_col,
            "pert_names": list(self.pert_names),
            "pert_features": dict(self.pert_features),
            "pert_matrix": self.pert_matrix.clone(),
            "cell_types": list(self.cell_types),
            "batches": list(self.batches) if self.batches is not None else None,
            "input_transform": c.input_transform,
            "cell_set_len": self.cell_set_len,
            "splits": {"val": splits["val"], "test": splits["test"]},
            "data_paths": list(self.data_paths),
        }

    # -- loaders ------------------------------------------------------------------------------------------

    def _loader(self, plan: SetPlan) -> DataLoader:
        c = self.cfg
        workers = int(c.num_workers)
        return DataLoader(
            self.dataset,
            batch_sampler=plan,
            collate_fn=identity_collate,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
            prefetch_factor=c.prefetch_factor if workers > 0 else None,
            worker_init_fn=_worker_init if workers > 0 else None,
        )

    def train_dataloader(self) -> DataLoader:
        self._need_setup()
        if self._resume_at is not None:
            self.train_plan.resume_from(*self._resume_at)
            self._resume_at = None
        return self._loader(self.train_plan)

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Make the next training loader continue epoch `epoch` after its first `batches_done` batches."""
        self._resume_at = (int(epoch), int(batches_done))

    def val_dataloader(self) -> DataLoader:
        self._need_setup()
        return self._loader(self.val_plan)

    def test_dataloader(self) -> DataLoader:
        self._need_setup()
        return self._loader(self.test_plan)

    # -- row access for predict/evaluate ------------------------------------------------------------------

    def split_cells(self, split: str) -> dict[Any, np.ndarray]:
        """`{(cell_type, pert): global rows}` for the split's perturbed cells, and `{cell_type: control rows}`.

        Cells of one (cell type, pert) from several files or batches are merged; control rows are those of
        the cell types that appear in the split (all files).
        """
        self._need_setup()
        if split not in _SPLIT_BITS:
            raise ValueError(f"split must be one of {list(_SPLIT_BITS)}")
        g = self._groups
        sel = np.flatnonzero(((self._group_bits & _SPLIT_BITS[split]) > 0) & (g.pert != self.control_idx))
        out: dict[Any, np.ndarray] = {}
        parts: dict[tuple[str, str], list[np.ndarray]] = {}
        for i in sel.tolist():
            key = (self.cell_types[g.cell_type[i]], self.pert_names[g.pert[i]])
            parts.setdefault(key, []).append(g.rows[g.start[i] : g.start[i] + g.size[i]])
        for key, chunks in sorted(parts.items()):
            out[key] = np.sort(np.concatenate(chunks))
        ctrl_rows = np.flatnonzero(self._pert_of == self.control_idx)
        for ct in sorted({k[0] for k in parts}):
            out[ct] = ctrl_rows[self._ct_of[ctrl_rows] == self.cell_types.index(ct)].astype(np.int64)
        return out

    def _read_global(self, rows: np.ndarray, fn: Any, width: int) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((rows.size, width), dtype=np.float32)
        if rows.size and (rows.min() < 0 or rows.max() >= self.offsets[-1]):
            raise IndexError("global row out of range")
        files = np.searchsorted(self.offsets, rows, side="right") - 1
        for f in np.unique(files).tolist():
            sel = np.flatnonzero(files == f)
            out[sel] = fn(f, rows[sel] - self.offsets[f])
        return out

    def read_expression(self, rows: np.ndarray) -> np.ndarray:
        """log1p-normalised expression over `gene_names` for global rows, float32 `[n, G]`."""
        self._need_setup()
        return self._read_global(rows, self.dataset.expression, len(self.gene_names))

    def read_input(self, rows: np.ndarray) -> np.ndarray:
        """The model's input space (expression, or `obsm[embed_key]`) for global rows."""
        self._need_setup()
        return self._read_global(rows, self.dataset.model_input, int(self.dims["input_dim"]))
