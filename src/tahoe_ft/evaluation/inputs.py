"""The scorer's inputs: loaded, sanitised copies of pred / real / train, and cell-eval's input contract checked.

cell-eval (0.8.2) casts and re-normalises its inputs in place and crashes or silently rescales on several
kinds of bad input, so every input is turned into an `EvalInput` first:

- a *copy* (a caller's AnnData is never modified) with float32 `X`; NaN/Inf is an error (never silently
  zeroed); negative predictions are clipped to 0 (logged), negative real/train values are an error;
- log1p data only: integer-valued `X` is refused (cell-eval would re-normalise it to the median library size,
  a scale unrelated to the real side's), as are values >= 15;
- the perturbation (and cell-type) columns as clean string categoricals: unused categories crash cell-eval
  with ``ZeroDivisionError``.

`read_inputs` then checks gene names and order, the perturbation set and the control label up front
(`check_pair`), with errors that say which genes / perturbations differ and how to fix it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import scipy.sparse as sp

from tahoe_ft.data.labels import ScreenLabels
from tahoe_ft.errors import UserError
from tahoe_ft.fileio import sha256_file

log = logging.getLogger(__name__)

# cell-eval's own rule for "this is integer counts" (cell_eval.utils.guess_is_lognorm)
_FRAC_EPS = 1e-3
_LOG1P_MAX = 15.0
CHUNK = 1 << 24  # values per block when scanning or hashing X


@dataclass
class EvalInput:
    """One loaded, sanitised input: the AnnData copy, where it came from, and its file's sha256.

    `where` names the input in error messages (the file path, or "in-memory <name> AnnData"); `sha` is the
    sha256 of the file it was read from, None for an in-memory AnnData (hash its content for a cache key).
    """

    adata: ad.AnnData
    where: str
    sha: str | None


def one_line(text: object, limit: int = 300) -> str:
    """`text` on one line of at most `limit` characters (for error messages from other libraries)."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def preview(items: Any, n: int = 5) -> str:
    """The first `n` of `items` (sorted, as strings) for an error message, with how many more there are."""
    items = sorted(map(str, items))
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return "[" + ", ".join(items[:n]) + "]" + more


def read_input(
    obj: ad.AnnData | str | os.PathLike,
    name: str,
    *,
    labels: ScreenLabels,
    clip_negative: bool,
    celltype_optional: bool = False,
) -> EvalInput:
    """Load `obj` (an AnnData or a path to an .h5ad file) and sanitise a copy of it (see `sanitize`).

    `celltype_optional`: a missing `labels.cell_type_col` is not an error (the column is then left alone).
    """
    a, where, sha, owned = _load(obj, name)
    if celltype_optional and labels.cell_type_col not in a.obs:
        labels = dataclasses.replace(labels, cell_type_col=None)
    a = sanitize(a, name, where, owned=owned, labels=labels, clip_negative=clip_negative)
    return EvalInput(a, where, sha)


def _load(obj: ad.AnnData | str | os.PathLike, name: str) -> tuple[ad.AnnData, str, str | None, bool]:
    """Return (adata, where, file_sha or None, owned): `owned` = we may modify it in place."""
    if isinstance(obj, ad.AnnData):
        return obj, f"in-memory {name} AnnData", None, False
    if not isinstance(obj, str | os.PathLike):
        raise UserError(
            f"{name} must be an AnnData or a path to an .h5ad file, got {type(obj).__name__}; "
            "pass the file path or the loaded AnnData"
        )
    path = Path(obj)
    if not path.is_file():
        raise UserError(f"{name} file not found: {path}; check the path (run `tahoe-ft predict` to write it)")
    try:
        a = ad.read_h5ad(path)
    except Exception as e:  # h5py/anndata raise many types for a file that is not an AnnData
        raise UserError(
            f"{name} file {path} is not a readable AnnData .h5ad ({type(e).__name__}: {one_line(e, 120)}); "
            "write it with AnnData.write_h5ad"
        ) from e
    return a, str(path), sha256_file(path), True


def _scan(X: Any) -> dict[str, Any]:
    """One pass over X: NaN/Inf/negative counts, min/max, and whether any positive value is fractional."""
    stats = {"nan": 0, "inf": 0, "neg": 0, "min": math.inf, "max": -math.inf, "frac": False, "n": 0}

    def blocks() -> Iterator[np.ndarray]:
        if sp.issparse(X):
            data = X.data
            for s in range(0, data.size, CHUNK):
                yield data[s : s + CHUNK]
        else:
            rows = max(1, CHUNK // max(1, X.shape[1]))
            for s in range(0, X.shape[0], rows):
                yield np.asarray(X[s : s + rows]).ravel()

    for b in blocks():
        if b.size == 0:
            continue
        stats["n"] += b.size
        nan = np.isnan(b)
        inf = np.isinf(b)
        stats["nan"] += int(nan.sum())
        stats["inf"] += int(inf.sum())
        finite = b[~(nan | inf)] if (stats["nan"] or stats["inf"]) else b
        if finite.size == 0:
            continue
        stats["neg"] += int((finite < 0).sum())
        stats["min"] = min(stats["min"], float(finite.min()))
        stats["max"] = max(stats["max"], float(finite.max()))
        if not stats["frac"]:
            frac, _ = np.modf(np.maximum(finite, 0))
            stats["frac"] = bool((frac > _FRAC_EPS).any())
    if sp.issparse(X) and X.nnz < X.shape[0] * X.shape[1]:
        stats["min"] = min(stats["min"], 0.0)
        stats["max"] = max(stats["max"], 0.0)
    return stats


def sanitize(
    a: ad.AnnData,
    name: str,
    where: str,
    *,
    owned: bool,
    labels: ScreenLabels,
    clip_negative: bool,
) -> ad.AnnData:
    """A float32, checked, log1p copy of `a` with clean categorical labels (`labels.pert_col`, and
    `labels.cell_type_col` unless None; never modifies a non-owned `a`)."""
    pert_col, celltype_col = labels.pert_col, labels.cell_type_col
    for key, col in [("pert_col", pert_col)] + ([("cell_type_col", celltype_col)] if celltype_col else []):
        if col not in a.obs.columns:
            raise UserError(
                f"column {col!r} not found in obs of {name} ({where}); columns are {preview(a.obs.columns, 10)}; "
                f"pass {key}=<the column>"
            )
    if a.X is None:
        raise UserError(f"{name} ({where}) has no X matrix; write the log1p expression into X")
    if a.n_obs == 0 or a.n_vars == 0:
        raise UserError(f"{name} ({where}) is empty (shape {a.shape}); check the file")
    if not owned or a.is_view:
        a = a.copy()
    X = a.X
    if sp.issparse(X):
        if not isinstance(X, sp.csr_matrix | sp.csc_matrix):
            X = sp.csr_matrix(X)
        X = X.astype(np.float32, copy=X.dtype != np.float32)
    else:
        X = np.asarray(X).astype(np.float32, copy=np.asarray(X).dtype != np.float32)
    a.X = X
    _check_values(a, name, where, clip_negative=clip_negative)
    for col in [pert_col] + ([celltype_col] if celltype_col else []):
        a.obs[col] = a.obs[col].astype(str).astype("category").cat.remove_unused_categories()
    a.var_names = a.var_names.astype(str)
    return a


def _check_values(a: ad.AnnData, name: str, where: str, *, clip_negative: bool) -> None:
    """Refuse NaN/Inf, integer counts and values outside log1p's range; clip (or refuse) negatives in place."""
    s = _scan(a.X)
    if s["nan"] or s["inf"]:
        raise UserError(
            f"{name} ({where}) has {s['nan']} NaN and {s['inf']} infinite values in X; "
            "fix the model output or the file (NaN is never silently replaced by 0 here)"
        )
    if s["neg"]:
        if not clip_negative:
            raise UserError(
                f"{name} ({where}) has {s['neg']} negative values in X (min {s['min']:.3g}); "
                "X must be log1p-normalised expression (>= 0), not scaled/centred data"
            )
        log.warning("%s (%s): clipping %d negative values (min %.3g) to 0", name, where, s["neg"], s["min"])
        vals = a.X.data if sp.issparse(a.X) else a.X
        np.clip(vals, 0.0, None, out=vals)
    if not s["frac"]:
        raise UserError(
            f"{name} ({where}) has integer-valued X (raw counts?), but evaluation expects log1p values; "
            "cell-eval would silently re-normalise it to a different scale: normalise it like the real data "
            "(normalize_total(target_sum=1e4) then log1p) before evaluating"
        )
    if s["max"] >= _LOG1P_MAX:
        raise UserError(
            f"{name} ({where}) has values up to {s['max']:.4g} in X, above the log1p range [0, {_LOG1P_MAX:g}); "
            "normalise to a fixed total and apply log1p (scanpy: normalize_total(target_sum=1e4) then log1p)"
        )


def check_pair(
    pred: ad.AnnData,
    real: ad.AnnData,
    pred_where: str,
    real_where: str,
    *,
    labels: ScreenLabels,
    what: str = "",
) -> None:
    """cell-eval's input contract, checked with errors that say what differs and how to fix it
    (`labels.cell_type_col` is not read)."""
    pert_col, control_pert = labels.pert_col, labels.control_pert
    if not np.array_equal(pred.var_names.to_numpy(), real.var_names.to_numpy()):
        p, r = list(pred.var_names), list(real.var_names)
        missing, extra = set(r) - set(p), set(p) - set(r)
        if missing or extra:
            detail = f"{len(missing)} real genes missing from pred {preview(missing)}, {len(extra)} extra {preview(extra)}"
        elif len(p) != len(r):
            detail = f"duplicated gene names (pred {len(p)} vs real {len(r)} names)"
        else:
            i = next(i for i, (x, y) in enumerate(zip(p, r, strict=True)) if x != y)
            detail = f"same genes in a different order (first difference at position {i}: pred {p[i]!r}, real {r[i]!r})"
        raise UserError(
            f"gene names of pred ({pred_where}) do not match real ({real_where}){what}: {detail}; "
            "write pred with exactly the real var_names in the same order (e.g. pred[:, real.var_names])"
        )
    pp = set(pred.obs[pert_col].astype(str))
    rp = set(real.obs[pert_col].astype(str))
    if control_pert not in rp:
        raise UserError(
            f"control {control_pert!r} not found in {pert_col!r} of real ({real_where}){what}; "
            f"labels are {preview(rp)}; pass control_pert=<the control label>"
        )
    if control_pert not in pp:
        raise UserError(
            f"control {control_pert!r} not found in {pert_col!r} of pred ({pred_where}){what}; "
            "copy the real control cells into the predicted file (cell-eval computes deltas against them)"
        )
    if pp != rp:
        raise UserError(
            f"perturbations differ between pred ({pred_where}) and real ({real_where}){what}: "
            f"missing from pred {preview(rp - pp)}, extra in pred {preview(pp - rp)}; "
            "predict exactly the perturbations of the real file"
        )
    if len(rp) < 2:
        raise UserError(
            f"real ({real_where}){what} has no perturbation besides the control; nothing to evaluate"
        )


def _check_train(train: EvalInput, real: EvalInput, *, labels: ScreenLabels) -> None:
    """What the cell-mean baseline needs of the training cells: the real file's genes, and control cells."""
    pert_col, control_pert = labels.pert_col, labels.control_pert
    if not np.array_equal(train.adata.var_names.to_numpy(), real.adata.var_names.to_numpy()):
        raise UserError(
            f"gene names of train ({train.where}) do not match real ({real.where}); "
            "the baseline needs the training cells with the real file's genes in the same order"
        )
    if control_pert not in set(train.adata.obs[pert_col]):
        raise UserError(
            f"control {control_pert!r} not found in {pert_col!r} of train ({train.where}); "
            "the cell-mean baseline needs the training control cells"
        )


def celltype_parts(
    pred: EvalInput,
    real: EvalInput,
    train: EvalInput | None,
    *,
    labels: ScreenLabels,
) -> Iterator[tuple[str, ad.AnnData, ad.AnnData, ad.AnnData | None]]:
    """Yield (cell type, pred, real, train) for each cell type of real (`labels.cell_type_col`, which must be
    set), in sorted order, each pair checked.

    Lazily: a cell type's slices are made (and checked) only when the one before has been scored. Train
    without the cell-type column gives all its cells to every cell type (logged).
    """
    pert_col, control_pert, celltype_col = labels.pert_col, labels.control_pert, labels.cell_type_col
    if celltype_col is None:
        raise ValueError("celltype_parts needs labels.cell_type_col")
    cts_r = set(real.adata.obs[celltype_col])
    cts_p = set(pred.adata.obs[celltype_col])
    if cts_r != cts_p:
        raise UserError(
            f"cell types differ between pred ({pred.where}) and real ({real.where}): missing from pred "
            f"{preview(cts_r - cts_p)}, extra {preview(cts_p - cts_r)}; predict every cell type of real"
        )
    cols = [pert_col, celltype_col]
    for ct in sorted(cts_r):
        p_ct, r_ct = _part(pred.adata, celltype_col, ct, cols), _part(real.adata, celltype_col, ct, cols)
        check_pair(
            p_ct,
            r_ct,
            pred.where,
            real.where,
            labels=labels,
            what=f" for cell type {ct!r}",
        )
        t_ct = None
        if train is not None:
            if celltype_col in train.adata.obs:
                t_ct = _part(train.adata, celltype_col, ct, cols)
                if control_pert not in set(t_ct.obs[pert_col]):
                    raise UserError(
                        f"train has no {control_pert!r} cells of cell type {ct!r}; the cell-mean baseline "
                        "needs training controls of every evaluated cell type"
                    )
            else:
                log.warning(
                    "train has no %r column: the baseline for %r uses all training cells", celltype_col, ct
                )
                t_ct = train.adata
        yield ct, p_ct, r_ct, t_ct
        del p_ct, r_ct, t_ct


def _part(a: ad.AnnData, celltype_col: str, ct: str, cols: list[str]) -> ad.AnnData:
    """The cells of cell type `ct`, with the categories of `cols` that they do not use dropped."""
    sub = a[(a.obs[celltype_col] == ct).to_numpy()].copy()
    for c in cols:
        if c in sub.obs:
            sub.obs[c] = sub.obs[c].cat.remove_unused_categories()
    return sub


def read_inputs(
    pred: ad.AnnData | str | os.PathLike,
    real: ad.AnnData | str | os.PathLike,
    train: ad.AnnData | str | os.PathLike | None,
    *,
    labels: ScreenLabels,
) -> tuple[EvalInput, EvalInput, EvalInput | None]:
    """Read, sanitise and check the scorer's three inputs: (pred, real, train or None), under `labels`.

    Negative predictions are clipped; negative real or training values are an error. Train may lack the
    cell-type column (its cells then serve every cell type's baseline).
    """
    real_in = read_input(real, "real", labels=labels, clip_negative=False)
    pred_in = read_input(pred, "pred", labels=labels, clip_negative=True)
    check_pair(pred_in.adata, real_in.adata, pred_in.where, real_in.where, labels=labels)
    if train is None:
        return pred_in, real_in, None
    train_in = read_input(train, "train", labels=labels, clip_negative=False, celltype_optional=True)
    _check_train(train_in, real_in, labels=labels)
    return pred_in, real_in, train_in
