"""`H5Screen`: one `.h5ad` file read with h5py, in blocks, never loaded whole; `ScreenSet`: several, by global row.

Obs columns, gene names, and rows of `X` (CSR group or dense dataset) or of `obsm/<key>`. Requested rows are
sorted and coalesced into contiguous runs (small gaps read through), the runs read as unions of hyperslabs
(one HDF5 call per 128 runs and array), then densified in the caller's order. `indptr` lives in RAM; no row
caches.

A file that h5py cannot read (a corrupted block, a broken object header) is one `UserError` naming the file,
wherever the read happens (`_readable`): train, predict and eval meet it as `check` does. `check` itself reads
every block of X (`verify`): values, CSR indices and indptr.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import scipy.sparse as sp
from h5py import h5s

from tahoe_ft.data.checks import VALIDATE_ROWS, ValueStats
from tahoe_ft.errors import UserError

# normalize_total target, as scanpy's default for log1p-normalised screens
TARGET_SUM = 1e4
# merge two row runs when the elements in between are fewer than this: reading ~8 KiB more costs about
# what one more hyperslab block does (scripts/bench_loader.py)
GAP_ELEMENTS = 1024
# runs per HDF5 read call (a union of hyperslabs; HDF5's union cost grows quadratically with its size)
RUNS_PER_READ = 128
# elements per block when scanning all of X (library sizes, full validation): 16 MiB of float32
SCAN_BLOCK_ELEMENTS = 1 << 22
# HDF5 chunk cache (per open file): none for uncompressed data (HDF5 then reads just the selected bytes
# of a chunk, not whole chunks: faster for random rows, and a row read touches only that row's bytes);
# 16 MiB when X is compressed, where a chunk must be decompressed whole anyway
H5_CHUNK_CACHE_BYTES = 16 << 20


# what h5py raises when the bytes of a file are not what its structure says (a corrupted chunk or object
# header: "Can't synchronously read data", "Unable to synchronously open object (message not aligned)")
_H5_READ_ERRORS = (OSError, KeyError, RuntimeError)


def unreadable(path: str | os.PathLike, exc: BaseException) -> UserError:
    """The one line for a file whose content h5py could not read."""
    text = " ".join(str(exc).split())[:160]
    return UserError(
        f"{path} is corrupted or unreadable ({type(exc).__name__}: {text}); copy it again or rewrite it with "
        "anndata's write_h5ad (`tahoe-ft check` reads every block of X)"
    )


def _readable(method: Callable) -> Callable:
    """`method` of an `H5Screen` with h5py's read errors turned into one `UserError` naming the file."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except _H5_READ_ERRORS as exc:
            raise unreadable(self.path, exc) from None

    return wrapper


def _attr(attrs: h5py.AttributeManager, key: str) -> str:
    value = attrs.get(key, "")
    return value.decode() if isinstance(value, bytes) else str(value)


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

    @_readable
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
            enc = _attr(obj.attrs, "encoding-type")
            # anndata before 0.7 wrote sparse matrices as h5sparse groups: `h5sparse_format` ("csr"/"csc")
            # and `h5sparse_shape` instead of `encoding-type` and `shape`; anndata still reads them
            legacy = "h5sparse_format" in obj.attrs and not enc
            if legacy:
                enc = f"{_attr(obj.attrs, 'h5sparse_format')}_matrix"
            shape_key = "h5sparse_shape" if legacy else "shape"
            if enc == "csc_matrix":
                raise UserError(
                    f"{self.path}: '{name}' is a CSC matrix, which cannot be read by rows; "
                    "convert it with adata.X = adata.X.tocsr() and write the file again"
                )
            if not all(k in obj for k in ("data", "indices", "indptr")) or shape_key not in obj.attrs:
                raise UserError(
                    f"{self.path}: '{name}' is neither a CSR matrix nor a dense array; "
                    "write the file with anndata (CSR or dense X)"
                )
            shape = tuple(int(s) for s in obj.attrs[shape_key])
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

    @_readable
    def has_obs(self, column: str) -> bool:
        return column in self._h5()["obs"]

    @_readable
    def obs_columns(self) -> list[str]:
        g = self._h5()["obs"]
        idx = g.attrs.get("_index", "_index")
        return [k for k in g.keys() if k != idx]

    @_readable
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

    @_readable
    def has_obsm(self, key: str) -> bool:
        return f"obsm/{key}" in self._h5()

    @_readable
    def obsm_dim(self, key: str) -> int:
        return self._matrix_info(f"obsm/{key}").shape[1]

    # -- rows ---------------------------------------------------------------------------------------------

    @_readable
    def read_rows(self, rows: np.ndarray, cols: np.ndarray | None = None) -> np.ndarray:
        """X rows as float32 `[len(rows), n_cols]`, in the caller's order (rows may repeat).

        `cols` selects and reorders genes (positions in var); None keeps all genes in file order.
        """
        return self._read(self.x, rows, cols, None)

    @_readable
    def read_obsm_rows(self, key: str, rows: np.ndarray) -> np.ndarray:
        """`obsm[key]` rows as float32 `[len(rows), dim]`, in the caller's order."""
        if not self.has_obsm(key):
            raise UserError(
                f"obsm['{key}'] not found in {self.path} (obsm keys: {', '.join(self.obsm_keys) or 'none'}); "
                "compute the embedding first or use the raw_expression encoder"
            )
        return self._read(self._matrix_info(f"obsm/{key}"), rows, None, None)

    @_readable
    def read_log1p(self, rows: np.ndarray, cols: np.ndarray | None, input_transform: str) -> np.ndarray:
        """log1p-normalised expression: X as is for "log1p"; normalize_total(1e4) + log1p for "counts"."""
        if input_transform == "log1p":
            return self._read(self.x, rows, cols, None)
        if self._scale is None:
            lib = self.library_sizes()
            self._scale = np.divide(TARGET_SUM, lib, out=np.zeros_like(lib), where=lib > 0)
        return self._read(self.x, rows, cols, self._scale)

    @_readable
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
        if ind.size and (int(ind.min()) < 0 or int(ind.max()) >= info.shape[1]):
            raise UserError(
                f"{self.path}: '{info.name}/indices' holds column indices outside [0, {info.shape[1]}); the file "
                "is corrupted: copy it again or rewrite it with anndata's write_h5ad"
            )
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

    @_readable
    def scan(self, *, want_libsize: bool) -> ValueStats:
        """One pass over all of X in blocks: value statistics, and library sizes when asked."""
        stats = ValueStats()
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

    @_readable
    def verify(self) -> ValueStats:
        """Every block of X read (`tahoe-ft check`): value statistics as `scan` gives them, and for CSR its
        structure: `indptr` starts at 0, never decreases and ends at the number of stored values, and every
        column index lies in [0, n_vars). A corrupted block is one `UserError` naming the file (h5py's read
        error, or the first structural fault found), not a traceback in the middle of a training."""
        if self.x.sparse:
            indptr = self.x.indptr
            assert indptr is not None
            n_stored = int(self._dataset("X/data").shape[0])
            fault = None
            if indptr[0] != 0 or (np.diff(indptr) < 0).any():
                fault = "X/indptr does not rise from 0"
            elif int(indptr[-1]) != n_stored or int(self._dataset("X/indices").shape[0]) != n_stored:
                fault = f"X/indptr ends at {int(indptr[-1])}, but X/data and X/indices hold other lengths"
            else:
                ind_ds = self._dataset("X/indices")
                for a in range(0, n_stored, SCAN_BLOCK_ELEMENTS):
                    ind = ind_ds[a : a + SCAN_BLOCK_ELEMENTS]
                    bad = np.flatnonzero((ind < 0) | (ind >= self.n_vars))
                    if bad.size:
                        at = a + int(bad[0])
                        row = int(np.searchsorted(indptr, at, side="right")) - 1
                        fault = (
                            f"X/indices holds column index {int(ind[bad[0]])} (row {row}), outside "
                            f"[0, {self.n_vars})"
                        )
                        break
            if fault:
                raise UserError(
                    f"{self.path}: {fault}; the file is corrupted: copy it again or rewrite it with anndata's "
                    "write_h5ad"
                )
        return self.scan(want_libsize=False)

    @_readable
    def sample_stats(self, n_rows: int = VALIDATE_ROWS) -> ValueStats:
        """Value statistics over a deterministic, evenly spaced sample of rows."""
        rows = np.unique(np.linspace(0, self.n_obs - 1, min(n_rows, self.n_obs)).astype(np.int64))
        stats = ValueStats()
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


class ScreenSet:
    """The files of a data set in order, read by *global* row (the files concatenated; `offsets[f]` is file
    f's first row), in gene space over one gene list or in the model's input space."""

    def __init__(
        self,
        screens: Sequence[H5Screen],
        gene_cols: Sequence[np.ndarray | None],
        *,
        input_transform: str,
        embed_key: str | None,
    ) -> None:
        self.screens = list(screens)
        self.gene_cols = list(gene_cols)  # per file: var positions of the genes, or None (all, file order)
        self.input_transform = input_transform
        self.embed_key = embed_key
        self.offsets = np.concatenate([[0], np.cumsum([s.n_obs for s in self.screens])]).astype(np.int64)

    @property
    def n_cells(self) -> int:
        return int(self.offsets[-1])

    def expression(self, file: int, local_rows: np.ndarray) -> np.ndarray:
        """log1p-normalised expression over the gene list of rows of one file."""
        return self.screens[file].read_log1p(local_rows, self.gene_cols[file], self.input_transform)

    def model_input(self, file: int, local_rows: np.ndarray) -> np.ndarray:
        """The model's input space (expression, or `obsm[embed_key]`) of rows of one file."""
        if self.embed_key is None:
            return self.expression(file, local_rows)
        return self.screens[file].read_obsm_rows(self.embed_key, local_rows)

    def read_global(self, rows: np.ndarray, width: int, *, expression: bool) -> np.ndarray:
        """Global rows as float32 `[n, width]` in the caller's order: expression, or the model's input."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.offsets[-1]):
            raise IndexError("global row out of range")
        read = self.expression if expression else self.model_input
        files = np.searchsorted(self.offsets, rows, side="right") - 1
        if rows.size and (files == files[0]).all():
            # one file (every single-file screen): its rows as read, without a second [n, width] copy
            f = int(files[0])
            return read(f, rows - self.offsets[f])
        out = np.empty((rows.size, width), dtype=np.float32)
        for f in np.unique(files).tolist():
            sel = np.flatnonzero(files == f)
            out[sel] = read(f, rows[sel] - self.offsets[f])
        return out
