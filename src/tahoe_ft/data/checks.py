"""Value checks on open: NaN/Inf, negatives, counts vs log1p in `X`, finite embeddings in `obsm`.

Each failure is one `UserError` line (what, where, how to fix). `fmt_list` shortens name lists in messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from tahoe_ft.errors import UserError

if TYPE_CHECKING:
    from tahoe_ft.data.h5screen import H5Screen

# rows sampled (evenly spaced) from X, and the size under which all of X is checked
VALIDATE_ROWS = 2000
FULL_CHECK_ELEMENTS = 1 << 24
# "integer counts" heuristic for log1p-declared data: log1p-normalised values stay far below this
COUNTS_MAX_THRESHOLD = 20.0


def fmt_list(names: Sequence[str], n: int = 5) -> str:
    """The first `n` names, quoted, and how many more: `'a', 'b' (+3 more)`."""
    names = list(names)
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(repr(x) for x in names[:n]) + more


class ValueStats:
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


def check_values(screen: H5Screen, input_transform: str, *, fix: str = "", every_block: bool = False) -> None:
    """NaN/Inf, negatives, and counts-vs-log1p, on a row sample or (small file, or counts) all of X; `fix`
    replaces the advice to change data.input_transform (a checkpoint's transform is fixed). `every_block`
    (`tahoe-ft check`): every block of X read and its CSR structure checked too (`H5Screen.verify`), whatever
    the file's size, so a corrupted block is found before a training meets it."""
    full = every_block or input_transform == "counts" or screen.x_elements() <= FULL_CHECK_ELEMENTS
    if every_block:
        stats = screen.verify()
    elif full:
        stats = screen.scan(want_libsize=input_transform == "counts")
    else:
        stats = screen.sample_stats(VALIDATE_ROWS)
    what = "all values" if full else f"a sample of {min(VALIDATE_ROWS, screen.n_obs)} rows"
    where = f"{screen.path}, X"
    told = (
        f"the checkpoint reads {input_transform} values" if fix else f"data.input_transform={input_transform}"
    )
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
            f"but {told}; {fix or 'set data.input_transform=counts'}"
        )
    if input_transform == "counts" and not stats.all_integral:
        raise UserError(
            f"X has non-integer values (e.g. {stats.fraction_value:g} at row {stats.fraction_row}; {where}) "
            f"but {told}; {fix or 'set data.input_transform=log1p if X is already normalised'}"
        )


def check_unique_genes(screen: H5Screen) -> None:
    """Each name of var appears once: a gene is then one column of every matrix that names it (a prediction's
    var, cell-eval's tables), so two columns of one name cannot be trained on and then refused by predict."""
    names = np.asarray(screen.var_names, dtype=object)
    uniq, counts = np.unique(names.astype(str), return_counts=True)
    dup = uniq[counts > 1]
    if dup.size:
        raise UserError(
            f"var_names of {screen.path} repeat {dup.size} gene names ({fmt_list(dup.tolist())}); make them "
            "unique (adata.var_names_make_unique(), or keep one column per gene) and write the file again"
        )


def check_obsm_values(screen: H5Screen, key: str) -> None:
    """`obsm[key]` exists, and has no NaN/Inf on the same evenly spaced row sample."""
    if not screen.has_obsm(key):
        raise UserError(
            f"obsm['{key}'] not found in {screen.path} (obsm keys: {', '.join(screen.obsm_keys) or 'none'}); "
            "compute the embedding first (e.g. state emb transform) or use encoder=raw_expression"
        )
    rows = np.unique(np.linspace(0, screen.n_obs - 1, min(VALIDATE_ROWS, screen.n_obs)).astype(np.int64))
    vals = screen.read_obsm_rows(key, rows)
    if not np.isfinite(vals).all():
        r = int(rows[np.argmin(np.isfinite(vals).all(axis=1))])
        raise UserError(
            f"obsm['{key}'] has NaN or Inf values ({screen.path}, row {r}); recompute the embedding"
        )


def check_obsm_widths(screens: Sequence[H5Screen], key: str) -> None:
    """`obsm[key]` has one width across files."""
    dims = {s.obsm_dim(key) for s in screens}
    if len(dims) > 1:
        raise UserError(
            f"obsm['{key}'] has different widths across files ({sorted(dims)}); use embeddings from one model"
        )
