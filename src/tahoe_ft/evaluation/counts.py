"""Count space: log1p expression turned back into integer counts (issue #33), and the checks counts must pass.

The VCC 2026 scorer (cell-eval2's `vcc2026` preset) and its upload tool (vcc-cli 0.3.0) take integer counts
on both sides: no fractional or negative value, no cell whose total is above 1e6. tahoe-ft predicts
log1p-normalised expression, so every file scored in count space (the prediction, its baselines, the ceiling,
a generator null) goes through one generator, `to_counts`, on equal terms.

The generator is the inverse of how tahoe-ft reads a screen. A cell with counts `c` (library size `L`, the sum
of its counts over the screen's genes) is read as `x = log1p(c * T / L)`, `T` the target sum. So
`c = expm1(x) * L / T`, with:

- `T`: for `input_transform=counts`, tahoe-ft's own `TARGET_SUM` (1e4: `data.h5screen.read_log1p` normalises
  each cell to 1e4, not to the median library size); for `log1p`, the `target_sum` given, else the median over
  the control cells of `expm1(X).sum(1)` (the total the screen was normalised to, when X is log1p over the same
  genes the library sizes count), else 1e4 (scanpy's and VCC's convention) when the controls hold counts only.
- `L`: a predicted cell has no library size of its own; it draws one (with replacement, seeded) from the real
  control cells of its context (`celltype_col`; one context without it). A control cell's library size is, in
  this order (`library_sizes`): `obs["library_size"]` (a caller's explicit number, e.g. the sum over all the
  screen's genes when `controls` holds a subset of them), the row sums of `layers["counts"]`, the row sums of X
  when X holds integer counts, then an obs column `n_counts` / `total_counts` / `nCount_RNA`. Row sums come
  first because they are what tahoe-ft normalised by (Papalexi's `n_counts` equals them). A cell of `adata` with
  its own `obs["library_size"]` keeps it (a real cell: its counts come back exactly).
- Integers: `expm1(x) * L / T` is rounded stochastically (seeded): `floor(y) + Bernoulli(y - floor(y))`, after
  snapping values within float32 precision of an integer (a real cell's own values, which are integers up to
  the log1p/expm1 round trip in float32). Unbiased (each cell's expected counts are `y`, so means and
  pseudobulk effects are kept; rounding to nearest would zero every expected count below 0.5, a DE call on its
  own) and within one count of `y`: re-normalising with the library size used, `log1p(c * T / L)`, gives the
  input back within one count's step `T / L` in normalised units (exactly, for a real cell's own library size).
  Not Poisson or multinomial sampling: those add sampling noise of their own on top of the cell-to-cell
  variation the prediction already carries, and lose the round trip.
- A cell whose emitted total would pass 1e6 (`MAX_COUNTS_PER_CELL`, the scorer's limit) is scaled down to it
  before rounding; `uns["counts"]["n_scaled_to_cap"]` says how many.

Output: CSR float32 with integral values (exact up to 2**24; the scorer and vcc-cli store float32 too; an
integer dtype would break in-place float arithmetic downstream), the obs and var of `adata` (plus
`obs["library_size"]`, the `L` each cell was scaled by) and `uns["counts"]`, the generator's record (method, target sum, library-size source, seed).

`check_counts` refuses what the scorer refuses (fractional, negative, non-finite, a cell total above 1e6), one
line each.
"""

from __future__ import annotations

from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from tahoe_ft.data.labels import ScreenLabels
from tahoe_ft.errors import UserError

TARGET_SUM = 1e4  # as data.h5screen.TARGET_SUM: what tahoe-ft normalises counts input to
MAX_COUNTS_PER_CELL = (
    1_000_000  # cell-eval2 vcc2026's max_counts_per_cell; vcc-cli's cap (a total of 1e6 passes)
)
LIBRARY_SIZE_COL = "library_size"  # obs column: a cell's library size, given explicitly
LIBRARY_OBS_COLS = (LIBRARY_SIZE_COL, "n_counts", "total_counts", "nCount_RNA")
INPUT_TRANSFORMS = ("log1p", "counts")
METHOD = "stochastic rounding of expm1(x) * L / T, L drawn from the context's control library sizes"
# a value this close (relative) to an integer is that integer: float32's log1p/expm1 round trip of a real count
SNAP_RTOL = 1e-5
ROW_BLOCK = 4096  # rows converted at a time (dense [block, genes] float64 in memory)


def _rows(x, a: int, b: int) -> np.ndarray:
    block = x[a:b]
    block = block.toarray() if sp.issparse(block) else np.asarray(block)
    return block.astype(np.float64, copy=False)


def _row_sums(x) -> np.ndarray:
    return np.asarray(x.sum(axis=1), dtype=np.float64).ravel()


def is_integral(x) -> bool:
    """Every stored value of `x` (dense or sparse) is a whole number."""
    data = x.data if sp.issparse(x) else np.asarray(x)
    if np.issubdtype(data.dtype, np.integer):
        return True
    return bool(np.all(np.isfinite(data)) and np.all(np.modf(data)[0] == 0))


def library_sizes(controls: ad.AnnData) -> tuple[np.ndarray, str]:
    """Each control cell's library size and where it came from (see the module docstring for the order)."""
    if LIBRARY_SIZE_COL in controls.obs:
        return controls.obs[LIBRARY_SIZE_COL].to_numpy(dtype=np.float64), f"obs['{LIBRARY_SIZE_COL}']"
    if "counts" in controls.layers:
        return _row_sums(controls.layers["counts"]), "row sums of layers['counts']"
    if controls.n_obs and is_integral(controls.X):
        return _row_sums(controls.X), "row sums of X (integer counts)"
    for col in LIBRARY_OBS_COLS[1:]:
        if col in controls.obs:
            return controls.obs[col].to_numpy(dtype=np.float64), f"obs['{col}']"
    raise UserError(
        "the control cells hold no library sizes (no layers['counts'], X is not integer counts, no obs column "
        f"{' / '.join(LIBRARY_OBS_COLS)}); counts cannot be drawn: give a screen with raw counts "
        "(X or layers['counts']) or an obs column of library sizes"
    )


def target_sum_of(input_transform: str, controls: ad.AnnData, target_sum: float | None = None) -> float:
    """The total the log1p values were normalised to (see the module docstring)."""
    if input_transform not in INPUT_TRANSFORMS:
        raise UserError(f"input transform {input_transform!r} is not valid; use log1p or counts")
    if target_sum is not None:
        if not np.isfinite(target_sum) or target_sum <= 0:
            raise UserError(f"a target sum of {target_sum} is not valid; give a positive number")
        return float(target_sum)
    if input_transform == "counts" or controls.n_obs == 0 or is_integral(controls.X):
        return TARGET_SUM
    totals = np.zeros(controls.n_obs)
    for a in range(0, controls.n_obs, ROW_BLOCK):
        totals[a : a + ROW_BLOCK] = np.expm1(_rows(controls.X, a, a + ROW_BLOCK)).sum(axis=1)
    totals = totals[totals > 0]
    return float(np.median(totals)) if totals.size else TARGET_SUM


def _contexts(obs: pd.DataFrame, celltype_col: str | None, n: int) -> np.ndarray:
    if celltype_col is None:
        return np.full(n, "", dtype=object)
    if celltype_col not in obs:
        raise UserError(
            f"obs column '{celltype_col}' (the context) not found (columns: {', '.join(map(str, obs.columns))}); "
            "pass the cell-type column of the predictions"
        )
    return obs[celltype_col].astype(str).to_numpy(dtype=object)


def stochastic_round(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`floor(y) + Bernoulli(frac(y))`, with values within `SNAP_RTOL` of an integer snapped to it first."""
    near = np.rint(y)
    snap = np.abs(y - near) <= SNAP_RTOL * np.maximum(1.0, np.abs(y))
    base = np.floor(y)
    up = rng.random(y.shape) < (y - base)
    return np.where(snap, near, base + up)


def to_counts(
    adata: ad.AnnData,
    *,
    input_transform: str,
    controls: ad.AnnData,
    celltype_col: str | None,
    seed: int,
    target_sum: float | None = None,
    x: Any = None,
) -> ad.AnnData:
    """`adata`'s log1p expression as integer counts (CSR float32, integral values): the inverse of
    `input_transform`, each cell scaled by a library size drawn from its context's control cells, rounded
    stochastically (seeded). See the module docstring for every choice.

    `x`: the log1p rows to read instead of `adata.X` (anything sliced by rows, e.g. the h5py dataset of a dense
    .h5ad, read `ROW_BLOCK` rows at a time: memory does not grow with the cells); `adata` then gives obs/var."""
    x_in = adata.X if x is None else x
    if x_in is None or x_in.shape != (adata.n_obs, adata.n_vars):
        raise UserError(f"no log1p values of shape {adata.shape} to turn into counts")
    T = target_sum_of(input_transform, controls, target_sum)
    lib, lib_source = library_sizes(controls)
    if not np.all(np.isfinite(lib)) or np.any(lib < 0):
        raise UserError(f"the control cells' library sizes ({lib_source}) hold negative or non-finite values")
    ctx = _contexts(adata.obs, celltype_col, adata.n_obs)
    ctrl_ctx = _contexts(controls.obs, celltype_col, controls.n_obs)
    rng = np.random.default_rng(seed)
    own = adata.obs[LIBRARY_SIZE_COL].to_numpy(dtype=np.float64) if LIBRARY_SIZE_COL in adata.obs else None
    cell_lib = np.empty(adata.n_obs, dtype=np.float64)
    for c in sorted(set(ctx.tolist())):
        rows = np.flatnonzero(ctx == c)
        pool = lib[(ctrl_ctx == c) & (lib > 0)]
        if own is not None and np.all(np.isfinite(own[rows])):
            cell_lib[rows] = own[rows]
            continue
        if pool.size == 0:
            where = f"context '{c}' ({celltype_col})" if celltype_col else "the controls"
            raise UserError(
                f"no control cells with a library size in {where}; counts for its {rows.size} cells cannot be "
                "drawn: include that context's control cells"
            )
        cell_lib[rows] = rng.choice(pool, size=rows.size, replace=True)
    blocks, n_scaled = [], 0
    for a in range(0, adata.n_obs, ROW_BLOCK):
        block = _rows(x_in, a, a + ROW_BLOCK)
        if not np.all(np.isfinite(block)) or (block.size and block.min() < 0):
            raise UserError(
                "log1p values to turn into counts hold NaN, Inf or negative values; fix the prediction"
            )
        y = np.expm1(block) * (cell_lib[a : a + ROW_BLOCK] / T)[:, None]
        total = y.sum(axis=1)
        over = total > MAX_COUNTS_PER_CELL - y.shape[1]  # room for rounding up every gene
        if over.any():
            y[over] *= ((MAX_COUNTS_PER_CELL - y.shape[1]) / total[over])[:, None]
            n_scaled += int(over.sum())
        blocks.append(sp.csr_matrix(stochastic_round(y, rng).astype(np.float32)))
    x_out = sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, adata.n_vars), dtype=np.float32)
    x_out.eliminate_zeros()
    out = ad.AnnData(X=x_out.astype(np.float32), obs=adata.obs.copy(), var=adata.var.copy())
    out.obs[LIBRARY_SIZE_COL] = cell_lib.astype(np.float32)  # the library size each cell was scaled by
    out.uns["counts"] = {
        "method": METHOD,
        "input_transform": input_transform,
        "target_sum": T,
        "library_sizes": lib_source,
        "own_library_sizes": own is not None,
        "seed": int(seed),
        "n_scaled_to_cap": n_scaled,
    }
    return out


def renormalise(counts, library_size: np.ndarray, target_sum: float = TARGET_SUM) -> np.ndarray:
    """`log1p(counts * T / L)`, dense float64: what tahoe-ft reads a counts cell as (the round trip's other leg)."""
    c = counts.toarray() if sp.issparse(counts) else np.asarray(counts)
    scale = np.divide(
        target_sum, library_size, out=np.zeros_like(library_size, dtype=np.float64), where=library_size > 0
    )
    return np.log1p(c.astype(np.float64) * scale[:, None])


def check_counts(x, where: str, *, max_per_cell: float = MAX_COUNTS_PER_CELL) -> None:
    """What cell-eval2's vcc2026 refuses in counts, one line each: non-finite, negative, fractional values, a
    cell total above `max_per_cell`."""
    data = x.data if sp.issparse(x) else np.asarray(x)
    if data.size and not np.all(np.isfinite(data)):
        raise UserError(f"{where} holds NaN or Inf where counts are expected; write finite integer counts")
    if data.size and data.min() < 0:
        raise UserError(f"{where} holds negative values (min {data.min():g}) where counts are expected")
    if not is_integral(x):
        frac = data[np.modf(data)[0] != 0]
        raise UserError(
            f"{where} holds {frac.size} fractional values (e.g. {frac[0]:g}) where integer counts are expected; "
            "turn log1p predictions into counts with tahoe-ft predict output=counts (tahoe_ft.evaluation.counts)"
        )
    totals = _row_sums(x)
    if totals.size and totals.max() > max_per_cell:
        raise UserError(
            f"{where}: {int((totals > max_per_cell).sum())} cells total more than {max_per_cell:,.0f} counts "
            f"(max {totals.max():,.0f}), the scorer's limit; scale those cells down"
        )


def record(out: ad.AnnData) -> dict[str, Any]:
    """The generator's record of a file it wrote (`uns["counts"]`), {} when there is none."""
    return dict(out.uns.get("counts", {}))


def emit_like(
    adata: ad.AnnData,
    reference: ad.AnnData,
    *,
    labels: ScreenLabels,
    seed: int,
) -> ad.AnnData:
    """Any log1p prediction (a baseline, the ceiling, a generator null, a scaled effect) in counts on the terms
    of a run's `real_counts.h5ad` (`reference`): its control cells' library sizes (`obs["library_size"]`), its
    input transform and target sum (`uns["counts"]`). The non-control rows of `adata` go through `to_counts`;
    its control rows are replaced by the reference's control cells (real counts, as predict writes them), so
    the result is `adata`'s perturbed cells, then the reference's controls."""
    info = dict(reference.uns.get("counts", {}))
    if "input_transform" not in info:
        raise UserError(
            "the reference holds no generator record (uns['counts']); give the real_counts.h5ad that "
            "tahoe-ft predict output=counts wrote"
        )
    pert_col, control_pert, celltype_col = labels.pert_col, labels.control_pert, labels.cell_type_col
    ref_ctrl = (reference.obs[pert_col].astype(str) == control_pert).to_numpy()
    controls = reference[ref_ctrl].copy()
    perturbed = adata[(adata.obs[pert_col].astype(str) != control_pert).to_numpy()].copy()
    perturbed.obs = perturbed.obs.drop(columns=[LIBRARY_SIZE_COL], errors="ignore")
    gen = to_counts(
        perturbed,
        input_transform=str(info["input_transform"]),
        controls=controls,
        celltype_col=celltype_col,
        seed=seed,
        target_sum=float(info["target_sum"]),
    )
    missing = [g for g in gen.var_names if g not in set(controls.var_names)]
    if missing:
        raise UserError(
            f"{len(missing)} genes of the prediction are not in the reference (e.g. {missing[0]})"
        )
    controls = controls[:, gen.var_names].copy()
    out = ad.concat([gen, controls], join="outer", merge="first")
    out.X = sp.csr_matrix(out.X, dtype=np.float32)
    out.uns["counts"] = gen.uns["counts"]
    return out
