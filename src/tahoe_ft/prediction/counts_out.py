"""`predict output=counts`: the prediction files again in integer counts, for the VCC 2026 scorer (issue #33).

Beside `pred.h5ad` / `real.h5ad` (log1p, what cell-eval's `vcc` profile and the baseline panel read), predict
writes `pred_counts.h5ad`, `real_counts.h5ad` (and `pred_shuffled_counts.h5ad` with a shuffle): the same
cells, obs and genes, X as CSR float32 integral counts.

- Real cells and the control cells: the screen's own raw counts where it holds them (`count_source`): X when
  the screen is read as counts (`data.input_transform=counts`, Papalexi), else `layers["counts"]` (the demo).
  A log1p screen with no raw counts but an obs column of library sizes (`n_counts`, `total_counts`,
  `nCount_RNA`, `library_size`) has its real cells emitted through the generator with each cell's own library
  size. Neither: refused before anything is read or written.
- Predicted cells: `tahoe_ft.evaluation.counts.to_counts` (library sizes drawn from the context's written
  control cells, seeded with predict's seed), and the control rows of pred files are the real ones, as in the
  log1p files.
- Library sizes are the sum over all the screen's genes (what tahoe-ft normalised by), stored per control cell in
  `obs["library_size"]` of the count files. The target sum: 1e4 for counts input; for log1p input the median over
  the written control cells of `expm1(X).sum()` over all the screen's genes.

predict.json's `counts` says where each file's counts came from.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import scipy.sparse as sp

from tahoe_ft.errors import UserError
from tahoe_ft.evaluation.counts import LIBRARY_OBS_COLS, LIBRARY_SIZE_COL, TARGET_SUM, to_counts
from tahoe_ft.fileio import atomic_path

log = logging.getLogger(__name__)

# the log1p file -> its counts twin
COUNT_FILES = {
    "pred.h5ad": "pred_counts.h5ad",
    "real.h5ad": "real_counts.h5ad",
    "pred_shuffled.h5ad": "pred_shuffled_counts.h5ad",
}
BLOCK = 2048


@dataclass
class CountSource:
    """Per data file: where its raw counts are ("X", "layers/counts") or its library sizes ("obs:<col>")."""

    kinds: list[str]

    def describe(self, paths: list[str]) -> str:
        what = {
            "X": "raw counts of X",
            "layers/counts": "raw counts of layers['counts']",
        }
        parts = []
        for kind, path in zip(self.kinds, paths, strict=True):
            if kind.startswith("obs:"):
                desc = f"generator with each cell's own library size (obs['{kind[4:]}'])"
            else:
                desc = what[kind]
            parts.append(f"{Path(path).name}: {desc}")
        return "; ".join(parts)


def count_source(plan) -> CountSource:
    """Where each file's counts come from; a screen with none of them is refused (one line)."""
    kinds = []
    for screen in plan.catalog.reader.screens:
        if plan.manifest.input_transform == "counts":
            kinds.append("X")
            continue
        f = screen._h5()
        if "layers/counts" in f:
            info = screen._matrix_info("layers/counts")
            if info.shape != (screen.n_obs, screen.n_vars):
                raise UserError(f"{screen.path}: layers['counts'] has shape {info.shape}, X {screen.x.shape}")
            kinds.append("layers/counts")
            continue
        col = next((c for c in LIBRARY_OBS_COLS if screen.has_obs(c)), None)
        if col is None:
            raise UserError(
                f"predict output=counts: {screen.path} holds log1p values with no raw counts (no layers['counts']) "
                f"and no obs column of library sizes ({' / '.join(LIBRARY_OBS_COLS)}), so no counts can be drawn; "
                "add layers['counts'] or an obs n_counts column, or predict with output=log1p"
            )
        kinds.append(f"obs:{col}")
    return CountSource(kinds)


def _by_file(plan, rows: np.ndarray):
    """(file, positions in `rows`, local rows) for the files `rows` (global) fall in."""
    offsets = plan.catalog.reader.offsets
    files = np.searchsorted(offsets, rows, side="right") - 1
    for f in np.unique(files).tolist():
        sel = np.flatnonzero(files == f)
        yield f, sel, rows[sel] - offsets[f]


def _obs_numbers(screen, col: str, local: np.ndarray) -> np.ndarray:
    codes, cats = screen.obs_codes(col)
    try:
        values = np.asarray(cats, dtype=np.float64)
    except ValueError:
        raise UserError(
            f"{screen.path}: obs column '{col}' is not numeric; it cannot give library sizes"
        ) from None
    out = values[codes[local]]
    out[codes[local] < 0] = np.nan
    return out


def _raw_rows(plan, source: CountSource, rows: np.ndarray) -> sp.csr_matrix:
    """Raw counts over the gene list of global `rows` (files whose kind holds them)."""
    reader = plan.catalog.reader
    blocks, order = [], []
    for f, sel, local in _by_file(plan, rows):
        screen, cols = reader.screens[f], reader.gene_cols[f]
        info = screen.x if source.kinds[f] == "X" else screen._matrix_info("layers/counts")
        for a in range(0, local.size, BLOCK):
            blocks.append(sp.csr_matrix(screen._read(info, local[a : a + BLOCK], cols, None)))
            order.append(sel[a : a + BLOCK])
    mat = sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, len(plan.manifest.gene_names)))
    inv = np.empty(rows.size, dtype=np.int64)
    inv[np.concatenate(order)] = np.arange(rows.size)
    return mat[inv].astype(np.float32)


def _library_sizes(plan, source: CountSource, rows: np.ndarray) -> np.ndarray:
    """Each global row's library size over all its screen's genes."""
    lib = np.empty(rows.size, dtype=np.float64)
    reader = plan.catalog.reader
    for f, sel, local in _by_file(plan, rows):
        screen, kind = reader.screens[f], source.kinds[f]
        if kind == "X":
            lib[sel] = screen.library_sizes()[local]
        elif kind == "layers/counts":
            info = screen._matrix_info("layers/counts")
            for a in range(0, local.size, BLOCK):
                lib[sel[a : a + BLOCK]] = screen._read(info, local[a : a + BLOCK], None, None).sum(axis=1)
        else:
            lib[sel] = _obs_numbers(screen, kind[4:], local)
    return lib


def _target_sum(plan, rows: np.ndarray) -> float:
    """1e4 for counts input; for log1p, the median over `rows` of expm1(X) summed over all the screen's genes."""
    if plan.manifest.input_transform == "counts":
        return TARGET_SUM
    reader, totals = plan.catalog.reader, []
    for f, _, local in _by_file(plan, rows):
        screen = reader.screens[f]
        for a in range(0, local.size, BLOCK):
            totals.append(np.expm1(screen.read_rows(local[a : a + BLOCK]).astype(np.float64)).sum(axis=1))
    t = np.concatenate(totals) if totals else np.zeros(0)
    t = t[t > 0]
    return float(np.median(t)) if t.size else TARGET_SUM


def _write(path: Path, x: sp.csr_matrix, obs, var, uns: dict) -> None:
    with atomic_path(path, suffix=".h5ad") as tmp:
        ad.AnnData(X=x.astype(np.float32), obs=obs, var=var, uns=uns).write_h5ad(tmp)


def write_count_files(plan, source: CountSource) -> dict[str, Any]:
    """The count twins of the files predict just wrote in `plan.out_dir`; returns predict.json's `counts`."""
    m, out_dir, n_pred = plan.manifest, Path(plan.out_dir), plan.n_pred
    ctrl = plan.ctrl_rows
    ctrl_lib = _library_sizes(plan, source, ctrl)
    T = _target_sum(plan, ctrl)
    has_raw = [k in ("X", "layers/counts") for k in source.kinds]
    obs = plan.obs.copy()
    # real and control rows: raw counts where the screen holds them, else generated with their own library size
    all_rows = np.concatenate([plan.real_rows, ctrl])
    lib_all = np.concatenate([_library_sizes(plan, source, plan.real_rows), ctrl_lib])
    obs[LIBRARY_SIZE_COL] = lib_all.astype(np.float32)
    if all(has_raw):
        real_x = _raw_rows(plan, source, all_rows)
        real_how = source.describe(plan.catalog.data_paths)
    else:  # some file without raw counts: every real cell through the generator with its own library size
        own = ad.AnnData(obs=obs.copy(), var=plan.var.copy())
        with h5py.File(out_dir / "real.h5ad", "r") as f:
            real_x = to_counts(
                own,
                input_transform=m.input_transform,
                controls=own[n_pred:],
                celltype_col=None,
                seed=plan.seed,
                target_sum=T,
                x=_Head(f["X"], len(obs)),
            ).X
        real_how = (
            "generator with each cell's own library size (a file holds no raw counts: "
            + source.describe(plan.catalog.data_paths)
            + ")"
        )
    uns_counts = {
        "input_transform": m.input_transform,
        "target_sum": T,
        "library_sizes": "sum over all the screen's genes (obs['library_size'])",
        "seed": int(plan.seed),
    }
    _write(
        out_dir / COUNT_FILES["real.h5ad"],
        real_x,
        obs,
        plan.var.copy(),
        {
            "tahoe_ft": {"kind": "observed, counts", **plan.source},
            "counts": {**uns_counts, "source": real_how},
        },
    )
    controls = ad.AnnData(X=real_x[n_pred:], obs=obs.iloc[n_pred:].copy(), var=plan.var.copy())
    record: dict[str, Any] = {
        "files": {},
        "real": real_how,
        "target_sum": T,
        "library_sizes": "each control cell's sum over all the screen's genes; predicted cells draw one from "
        "their cell type's written control cells",
        "generator": "tahoe_ft.evaluation.counts.to_counts (stochastic rounding, seeded)",
    }
    record["files"]["real.h5ad"] = COUNT_FILES["real.h5ad"]
    for name in ("pred.h5ad", "pred_shuffled.h5ad"):
        if not (out_dir / name).is_file() or (name == "pred_shuffled.h5ad" and not plan.shuffle):
            continue
        head = ad.AnnData(obs=obs.iloc[:n_pred].drop(columns=[LIBRARY_SIZE_COL]), var=plan.var.copy())
        with h5py.File(out_dir / name, "r") as f:  # the dense X predict wrote, read in blocks
            gen = to_counts(
                head,
                input_transform=m.input_transform,
                controls=controls,
                celltype_col=m.cell_type_col,
                seed=plan.seed,
                target_sum=T,
                x=_Head(f["X"], n_pred),
            )
        pobs = obs.copy()
        pobs.iloc[:n_pred, pobs.columns.get_loc(LIBRARY_SIZE_COL)] = gen.obs[LIBRARY_SIZE_COL].to_numpy()
        x = sp.vstack([gen.X, real_x[n_pred:]], format="csr")
        kind = (
            "prediction, counts"
            if name == "pred.h5ad"
            else "prediction, perturbation features shuffled, counts"
        )
        _write(
            out_dir / COUNT_FILES[name],
            x,
            pobs,
            plan.var.copy(),
            {"tahoe_ft": {"kind": kind, **plan.source}, "counts": {**uns_counts, **gen.uns["counts"]}},
        )
        record["files"][name] = COUNT_FILES[name]
    log.info("wrote the count files %s", ", ".join(record["files"].values()))
    return record


class _Head:
    """The first `n` rows of a 2-D h5py dataset, sliced by rows (what `to_counts` reads in blocks)."""

    def __init__(self, ds, n: int) -> None:
        self.ds, self.shape = ds, (n, ds.shape[1])

    def __getitem__(self, rows: slice) -> np.ndarray:
        a, b, _ = rows.indices(self.shape[0])
        return self.ds[a:b]


def retire_count_files(out_dir: str | Path, written: dict[str, str]) -> list[Path]:
    """Count files of an earlier prediction that this one did not write: removed (they describe another one)."""
    done = []
    for twin in COUNT_FILES.values():
        path = Path(out_dir) / twin
        if twin not in written.values() and path.exists():
            path.unlink()
            done.append(path)
    return done
