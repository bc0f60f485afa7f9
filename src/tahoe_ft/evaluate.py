"""Score predictions with cell-eval: a thin, careful shell over its Python API.

What this adds to cell-eval (0.8.2) and why:

- Inputs are sanitised on *copies* (cell-eval casts and re-normalises its inputs in place): `X` becomes
  float32, NaN/Inf is an error (never silently zeroed), negative predictions are clipped to 0 (logged),
  unused categories of the perturbation column are dropped (cell-eval crashes on them with
  ``ZeroDivisionError``).
- The data are log1p. cell-eval silently re-normalises integer-valued `X` (normalize_total to the median
  library size, then log1p), which makes the score meaningless next to a real side normalised differently,
  so integer-valued `X` is refused here, as are values >= 15 (not log1p).
- Gene names and order, the perturbation set and the control label are checked up front, with errors that
  say which genes / perturbations differ.
- The cell-mean baseline is cell-eval's own (`build_base_mean_adata` on the training cells with the eval
  set's cells per perturbation), evaluated with the same profile, and the score is cell-eval's own
  normalisation (`score_agg_metrics`): the 0-1 `avg_score` and the leaderboard's x100 scale.
- The real side's DE table (the expensive part) and the baseline's aggregate table are cached on disk
  (``de_cache_dir``) so that evaluating many checkpoints against one real file computes them once.

Files written in ``outdir``: cell-eval's ``results.csv``, ``agg_results.csv``, ``pred_de.csv`` and
``real_de.csv`` (a hard link to / copy of the cached table when it was reused), ``baseline/`` (the same for
the baseline, or only ``agg_results.csv`` when the baseline came from the cache) and ``score.json``.
With ``celltype_col`` every file carries cell-eval's ``<celltype>_`` prefix.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import math
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import polars as pl
import scipy.sparse as sp

from tahoe_ft.errors import UserError
from tahoe_ft.fileio import atomic_write_text as _atomic_write_text
from tahoe_ft.fileio import sha256_file as _sha256_file

log = logging.getLogger(__name__)

# cell-eval's own rule for "this is integer counts" (cell_eval.utils.guess_is_lognorm)
_FRAC_EPS = 1e-3
_LOG1P_MAX = 15.0
# bump when the layout or the meaning of a cache entry changes
_CACHE_FORMAT = 1
_CHUNK = 1 << 24  # values per block when scanning X
# fewest perturbations (per evaluated cell type) for cell-eval's clustering_agreement in profile=full
MIN_PERTS_CLUSTERING = 5

__all__ = ["evaluate", "prep_submission", "versions"]


# --------------------------------------------------------------------------------------------------------
# small helpers


def versions() -> dict[str, str]:
    """Versions that scores depend on: cell-eval, pdex (its DE) and tahoe-ft."""

    def _v(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"

    out = {"cell-eval": _v("cell-eval"), "pdex": _v("pdex"), "tahoe-ft": _v("tahoe-ft")}
    if out["tahoe-ft"] == "unknown":
        import tahoe_ft

        out["tahoe-ft"] = str(getattr(tahoe_ft, "__version__", "unknown"))
    return out


def _one_line(text: object, limit: int = 300) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _preview(items: Any, n: int = 5) -> str:
    items = sorted(map(str, items))
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return "[" + ", ".join(items[:n]) + "]" + more


def _atomic_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _link_or_copy(src: Path, dst: Path) -> None:
    """Put `src` at `dst` (a hard link when possible: the DE tables are large)."""
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        _atomic_copy(src, dst)


def _sha256_content(a: ad.AnnData, cols: list[str]) -> str:
    """Hash of what the DE depends on: X (values, sparsity, dtype), the obs columns `cols`, names."""
    h = hashlib.sha256()
    X = a.X
    if sp.issparse(X):
        X = X.tocsr()
        h.update(f"csr{X.shape}{X.data.dtype}".encode())
        for arr in (X.indptr, X.indices, X.data):
            h.update(memoryview(np.ascontiguousarray(arr)).cast("B"))
    else:
        X = np.asarray(X)
        h.update(f"dense{X.shape}{X.dtype}".encode())
        for start in range(0, X.shape[0], max(1, _CHUNK // max(1, X.shape[1]))):
            block = np.ascontiguousarray(X[start : start + max(1, _CHUNK // max(1, X.shape[1]))])
            h.update(memoryview(block).cast("B"))
    for values in [a.obs_names, a.var_names, *(a.obs[c] for c in cols)]:
        h.update("\x00".join(map(str, values)).encode())
        h.update(b"\x01")
    return h.hexdigest()


def _key(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _json_float(x: Any) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


# --------------------------------------------------------------------------------------------------------
# loading and sanitising


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
            f"{name} file {path} is not a readable AnnData .h5ad ({type(e).__name__}: {_one_line(e, 120)}); "
            "write it with AnnData.write_h5ad"
        ) from e
    return a, str(path), _sha256_file(path), True


def _scan(X: Any) -> dict[str, Any]:
    """One pass over X: NaN/Inf/negative counts, min/max, and whether any positive value is fractional."""
    stats = {"nan": 0, "inf": 0, "neg": 0, "min": math.inf, "max": -math.inf, "frac": False, "n": 0}

    def blocks() -> Iterator[np.ndarray]:
        if sp.issparse(X):
            data = X.data
            for s in range(0, data.size, _CHUNK):
                yield data[s : s + _CHUNK]
        else:
            rows = max(1, _CHUNK // max(1, X.shape[1]))
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


def _sanitize(
    a: ad.AnnData,
    name: str,
    where: str,
    *,
    owned: bool,
    pert_col: str,
    celltype_col: str | None,
    clip_negative: bool,
) -> ad.AnnData:
    """A float32, checked, log1p copy of `a` with clean categorical labels (never modifies a non-owned `a`)."""
    for col in [pert_col] + ([celltype_col] if celltype_col else []):
        if col not in a.obs.columns:
            raise UserError(
                f"column {col!r} not found in obs of {name} ({where}); columns are {_preview(a.obs.columns, 10)}; "
                f"pass the right column name (pert_col / celltype_col)"
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

    s = _scan(X)
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
    for col in [pert_col] + ([celltype_col] if celltype_col else []):
        a.obs[col] = a.obs[col].astype(str).astype("category").cat.remove_unused_categories()
    a.var_names = a.var_names.astype(str)
    return a


def _check_pair(
    pred: ad.AnnData,
    real: ad.AnnData,
    pred_where: str,
    real_where: str,
    *,
    pert_col: str,
    control_pert: str,
    what: str = "",
) -> None:
    """cell-eval's input contract, checked with errors that say what differs and how to fix it."""
    if not np.array_equal(pred.var_names.to_numpy(), real.var_names.to_numpy()):
        p, r = list(pred.var_names), list(real.var_names)
        missing, extra = set(r) - set(p), set(p) - set(r)
        if missing or extra:
            detail = f"{len(missing)} real genes missing from pred {_preview(missing)}, {len(extra)} extra {_preview(extra)}"
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
            f"labels are {_preview(rp)}; pass the right control_pert"
        )
    if control_pert not in pp:
        raise UserError(
            f"control {control_pert!r} not found in {pert_col!r} of pred ({pred_where}){what}; "
            "copy the real control cells into the predicted file (cell-eval computes deltas against them)"
        )
    if pp != rp:
        raise UserError(
            f"perturbations differ between pred ({pred_where}) and real ({real_where}){what}: "
            f"missing from pred {_preview(rp - pp)}, extra in pred {_preview(pp - rp)}; "
            "predict exactly the perturbations of the real file"
        )
    if len(rp) < 2:
        raise UserError(
            f"real ({real_where}){what} has no perturbation besides the control; nothing to evaluate"
        )


# --------------------------------------------------------------------------------------------------------
# the evaluation


def _agg_means(agg: pl.DataFrame) -> dict[str, float]:
    row = agg.filter(pl.col("statistic") == "mean").drop("statistic")
    return {c: float("nan") if row[c][0] is None else float(row[c][0]) for c in row.columns}


def _score_one(
    pred: ad.AnnData,
    real: ad.AnnData,
    train: ad.AnnData | None,
    train_sha: str | None,
    real_sha: str,
    outdir: Path,
    cache: Path,
    *,
    prefix: str | None,
    celltype: str | None,
    pert_col: str,
    control_pert: str,
    profile: str,
    num_threads: int,
    vers: dict[str, str],
) -> dict[str, Any]:
    from cell_eval import MetricsEvaluator, build_base_mean_adata, score_agg_metrics

    skip_de = profile == "pds"  # as cell-eval's CLI does: that profile needs no DE
    fprefix = prefix.replace("/", "-") if prefix else None
    n_perts = len(set(real.obs[pert_col].astype(str)) - {control_pert})
    # cell-eval's clustering_agreement (Leiden on perturbation centroids) fails on a handful of
    # perturbations ("Maximum allowed size exceeded" with 2): skip it there, on both sides, and say so
    skip_metrics = ["clustering_agreement"] if profile == "full" and n_perts < MIN_PERTS_CLUSTERING else None
    if skip_metrics:
        log.warning(
            "only %d perturbations: clustering_agreement skipped (needs >= %d)", n_perts, MIN_PERTS_CLUSTERING
        )

    def fname(base: str) -> str:
        return f"{fprefix}_{base}" if fprefix else base

    real_key = _key(
        format=_CACHE_FORMAT,
        data=real_sha,
        cell_eval=vers["cell-eval"],
        pdex=vers["pdex"],
        pert_col=pert_col,
        control=control_pert,
        celltype=celltype,
        allow_discrete=False,
        pdex_kwargs={},
    )
    de_cached = cache / "real_de" / f"{real_key}.csv"
    de_real = None if skip_de or not de_cached.is_file() else str(de_cached)
    if de_real:
        log.info("reusing cached real DE %s", de_cached)

    def run(p: ad.AnnData, out: Path, de: str | None, what: str) -> pl.DataFrame:
        try:
            ev = MetricsEvaluator(
                p,
                real,
                de_real=de,
                control_pert=control_pert,
                pert_col=pert_col,
                num_threads=num_threads,
                outdir=str(out),
                allow_discrete=False,
                prefix=prefix,
                skip_de=skip_de,
            )
        except ValueError as e:  # what our checks did not anticipate
            raise UserError(f"cell-eval rejected the {what} input: {_one_line(e)}") from e
        _, agg = ev.compute(profile=profile, break_on_error=True, skip_metrics=skip_metrics)
        return agg

    # an earlier evaluation into this outdir may have left a hard link to a cache entry here: cell-eval
    # would write its new table *through* it (open + truncate), corrupting the cache. Unlink it first.
    (outdir / fname("real_de.csv")).unlink(missing_ok=True)
    agg_user = run(pred, outdir, de_real, "pred")
    if not skip_de:
        if de_real is None:  # computed just now: keep it for the baseline and for later evaluations
            _atomic_copy(outdir / fname("real_de.csv"), de_cached)
            de_cached.chmod(0o444)  # read-only: the outdir copies are hard links to it
            _atomic_write_text(
                de_cached.with_suffix(".json"),
                json.dumps(
                    {
                        "real": real_sha,
                        "celltype": celltype,
                        "pert_col": pert_col,
                        "control_pert": control_pert,
                        "versions": vers,
                    },
                    indent=1,
                ),
            )
        else:
            _link_or_copy(de_cached, outdir / fname("real_de.csv"))

    # the cell-mean baseline: cached per (real, train, profile)
    base_dir = cache / "baseline" / real_key / profile
    base_out = outdir / "baseline"
    if train is not None:
        base_cached = base_dir / f"{_key(train=train_sha, celltype=celltype)}.csv"
        if base_cached.is_file():
            log.info("reusing cached baseline aggregate %s", base_cached)
            agg_base = pl.read_csv(base_cached)
            base_source = f"cache:{base_cached}"
        else:
            counts = (
                real.obs[pert_col]
                .astype(str)
                .value_counts()
                .rename_axis(pert_col)
                .reset_index(name="n_cells")
            )
            counts = counts[counts[pert_col] != control_pert]
            log.info("building the cell-mean baseline from %d training cells", train.n_obs)
            base = build_base_mean_adata(
                train,
                counts_df=pl.from_pandas(counts),
                pert_col=pert_col,
                control_pert=control_pert,
            )
            base = _sanitize(
                base,
                "baseline",
                "built from train",
                owned=True,
                pert_col=pert_col,
                celltype_col=None,
                clip_negative=False,
            )
            _check_pair(base, real, "baseline", "real", pert_col=pert_col, control_pert=control_pert)
            agg_base = run(base, base_out, None if skip_de else str(de_cached), "baseline")
            del base
            _atomic_copy(base_out / fname("agg_results.csv"), base_cached)
            base_source = "computed"
    else:
        found = sorted(base_dir.glob("*.csv"), key=lambda p: p.stat().st_mtime) if base_dir.is_dir() else []
        if not found:
            raise UserError(
                f"no training data given and no cached baseline for this real file in {cache}"
                f"{' (cell type ' + repr(celltype) + ')' if celltype else ''}; "
                "pass train= (the training cells incl. controls) once to build the cell-mean baseline"
            )
        base_cached = found[-1]
        if len(found) > 1:
            log.warning(
                "%d cached baselines for this real file; using the newest, %s", len(found), base_cached
            )
        agg_base = pl.read_csv(base_cached)
        base_source = f"cache:{base_cached}"
    if base_source != "computed":  # keep the table next to the score for the record
        _atomic_copy(base_cached, base_out / fname("agg_results.csv"))

    if agg_base.columns != agg_user.columns:
        raise UserError(
            f"baseline metrics {agg_base.columns[1:]} do not match this profile's {agg_user.columns[1:]}; "
            f"delete the baseline cache {base_dir} or pass train= to rebuild it"
        )
    scored = score_agg_metrics(agg_user, agg_base)
    norm = dict(zip(scored["metric"].to_list(), scored["from_baseline"].to_list(), strict=True))
    avg = float(norm.pop("avg_score"))
    return {
        "avg_score": avg,
        "metrics": _agg_means(agg_user),
        "baseline": _agg_means(agg_base),
        "normalized": {k: float(v) for k, v in norm.items()},
        "n_perts": n_perts,
        "skipped_metrics": skip_metrics or [],
        "baseline_source": base_source,
        "real_de": None if skip_de else str(de_cached),
    }


def evaluate(
    pred: ad.AnnData | str | os.PathLike,
    real: ad.AnnData | str | os.PathLike,
    train: ad.AnnData | str | os.PathLike | None,
    outdir: str | os.PathLike,
    *,
    pert_col: str = "target_gene",
    control_pert: str = "non-targeting",
    profile: str = "vcc",
    num_threads: int = 2,
    celltype_col: str | None = None,
    de_cache_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Evaluate predictions against the observed cells with cell-eval; return (and write) the score.

    pred: predicted cells (log1p, the real control cells copied in); real: observed cells (log1p);
    train: training cells incl. controls (log1p, same genes) for the cell-mean baseline, or None to use
    the baseline cached for this real file. Inputs are never modified.

    Returns the dict written to ``outdir/score.json``: ``avg_score`` (0-1), ``leaderboard_score``
    (100 x avg_score), ``metrics`` / ``baseline`` / ``normalized`` (per cell-eval metric name),
    ``profile``, ``n_perts``, ``versions`` (+ ``per_celltype`` with ``celltype_col``).
    """
    from cell_eval import KNOWN_PROFILES

    if profile not in KNOWN_PROFILES:
        raise UserError(
            f"unknown cell-eval profile {profile!r}; use one of {KNOWN_PROFILES} (vcc gives the score)"
        )
    outdir = Path(outdir)
    cache = Path(de_cache_dir) if de_cache_dir is not None else outdir.parent / ".de_cache"
    vers = versions()
    cols = [pert_col] + ([celltype_col] if celltype_col else [])

    real_a, real_where, real_sha, owned = _load(real, "real")
    real_a = _sanitize(
        real_a,
        "real",
        real_where,
        owned=owned,
        pert_col=pert_col,
        celltype_col=celltype_col,
        clip_negative=False,
    )
    if real_sha is None:
        real_sha = _sha256_content(real_a, cols)
    pred_a, pred_where, _, owned = _load(pred, "pred")
    pred_a = _sanitize(
        pred_a,
        "pred",
        pred_where,
        owned=owned,
        pert_col=pert_col,
        celltype_col=celltype_col,
        clip_negative=True,
    )
    _check_pair(pred_a, real_a, pred_where, real_where, pert_col=pert_col, control_pert=control_pert)

    train_a, train_sha = None, None
    if train is not None:
        train_a, train_where, train_sha, owned = _load(train, "train")
        train_a = _sanitize(
            train_a,
            "train",
            train_where,
            owned=owned,
            pert_col=pert_col,
            celltype_col=celltype_col if celltype_col in train_a.obs else None,
            clip_negative=False,
        )
        if not np.array_equal(train_a.var_names.to_numpy(), real_a.var_names.to_numpy()):
            raise UserError(
                f"gene names of train ({train_where}) do not match real ({real_where}); "
                "the baseline needs the training cells with the real file's genes in the same order"
            )
        if control_pert not in set(train_a.obs[pert_col]):
            raise UserError(
                f"control {control_pert!r} not found in {pert_col!r} of train ({train_where}); "
                "the cell-mean baseline needs the training control cells"
            )
        if train_sha is None:
            train_sha = _sha256_content(train_a, [pert_col])

    common = dict(
        pert_col=pert_col, control_pert=control_pert, profile=profile, num_threads=num_threads, vers=vers
    )
    if celltype_col is None:
        res = _score_one(
            pred_a, real_a, train_a, train_sha, real_sha, outdir, cache, prefix=None, celltype=None, **common
        )
        per_ct = None
    else:
        cts_r = set(real_a.obs[celltype_col])
        cts_p = set(pred_a.obs[celltype_col])
        if cts_r != cts_p:
            raise UserError(
                f"cell types differ between pred ({pred_where}) and real ({real_where}): missing from pred "
                f"{_preview(cts_r - cts_p)}, extra {_preview(cts_p - cts_r)}; predict every cell type of real"
            )
        per_ct = {}
        for ct in sorted(cts_r):

            def part(a: ad.AnnData, col: str | None = celltype_col, ct: str = ct) -> ad.AnnData:
                sub = a[(a.obs[col] == ct).to_numpy()].copy()
                for c in cols:
                    if c in sub.obs:
                        sub.obs[c] = sub.obs[c].cat.remove_unused_categories()
                return sub

            p_ct, r_ct = part(pred_a), part(real_a)
            _check_pair(
                p_ct,
                r_ct,
                pred_where,
                real_where,
                pert_col=pert_col,
                control_pert=control_pert,
                what=f" for cell type {ct!r}",
            )
            t_ct = None
            if train_a is not None:
                if celltype_col in train_a.obs:
                    t_ct = part(train_a)
                    if control_pert not in set(t_ct.obs[pert_col]):
                        raise UserError(
                            f"train has no {control_pert!r} cells of cell type {ct!r}; the cell-mean baseline "
                            "needs training controls of every evaluated cell type"
                        )
                else:
                    log.warning(
                        "train has no %r column: the baseline for %r uses all training cells",
                        celltype_col,
                        ct,
                    )
                    t_ct = train_a
            per_ct[ct] = _score_one(
                p_ct, r_ct, t_ct, train_sha, real_sha, outdir, cache, prefix=ct, celltype=ct, **common
            )
            del p_ct, r_ct, t_ct
        res = _combine(per_ct)
        res["n_perts"] = len(set(real_a.obs[pert_col]) - {control_pert})

    avg = float(res["avg_score"])
    score = {
        "avg_score": avg,
        "leaderboard_score": 100.0 * avg,
        "metrics": {k: _json_float(v) for k, v in res["metrics"].items()},
        "baseline": {k: _json_float(v) for k, v in res["baseline"].items()},
        "normalized": {k: _json_float(v) for k, v in res["normalized"].items()},
        "profile": profile,
        "n_perts": int(res["n_perts"]),
        "versions": vers,
        "pert_col": pert_col,
        "control_pert": control_pert,
        "celltype_col": celltype_col,
        "real": real_where,
        "pred": pred_where,
        "de_cache_dir": str(cache),
    }
    if per_ct is None:
        score["baseline_source"] = res["baseline_source"]
        score["skipped_metrics"] = res["skipped_metrics"]
    else:
        score["per_celltype"] = {
            ct: {
                "avg_score": r["avg_score"],
                "metrics": {k: _json_float(v) for k, v in r["metrics"].items()},
                "baseline": {k: _json_float(v) for k, v in r["baseline"].items()},
                "normalized": {k: _json_float(v) for k, v in r["normalized"].items()},
                "n_perts": r["n_perts"],
                "skipped_metrics": r["skipped_metrics"],
                "baseline_source": r["baseline_source"],
            }
            for ct, r in per_ct.items()
        }
    _atomic_write_text(outdir / "score.json", json.dumps(score, indent=2) + "\n")
    log.info(
        "avg_score %.4f (leaderboard %.2f) over %d perturbations -> %s",
        avg,
        100 * avg,
        score["n_perts"],
        outdir / "score.json",
    )
    return score


def _combine(per_ct: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Cell types weigh equally: each number is the mean over cell types of the per-cell-type number."""

    def mean_of(field: str) -> dict[str, float]:
        keys = list(
            dict.fromkeys(k for r in per_ct.values() for k in r[field])
        )  # a metric one cell type skipped
        return {k: float(np.nanmean([r[field].get(k, np.nan) for r in per_ct.values()])) for k in keys}

    return {
        "avg_score": float(np.mean([r["avg_score"] for r in per_ct.values()])),
        "metrics": mean_of("metrics"),
        "baseline": mean_of("baseline"),
        "normalized": mean_of("normalized"),
    }


# --------------------------------------------------------------------------------------------------------
# submission file


def prep_submission(
    pred_path: str | os.PathLike,
    gene_list_csv: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    pert_col: str = "target_gene",
    control_pert: str = "non-targeting",
    celltype_col: str | None = None,
) -> Path:
    """Pack predictions for the Virtual Cell Challenge with cell-eval's `prep` (a tar of pred.h5ad.zst).

    `gene_list_csv`: the expected genes in order, one per line, no header (genes are reordered to it;
    missing or extra genes are an error). Needs `zstd` and `tar` on PATH.
    """
    for tool in ("tar", "zstd"):
        if shutil.which(tool) is None:
            raise UserError(
                f"`{tool}` not found on PATH, needed to pack the submission; install {tool}: "
                f"`apt-get install {tool}` (Debian/Ubuntu), `brew install {tool}`, or `conda install {tool}`"
            )
    from cell_eval._cli._prep import strip_anndata

    gene_list_csv = Path(gene_list_csv)
    if not gene_list_csv.is_file():
        raise UserError(
            f"gene list not found: {gene_list_csv}; pass a CSV with one gene name per line, no header"
        )
    genes = pl.read_csv(gene_list_csv, has_header=False).to_series(0).cast(str).to_list()
    a, where, _, _ = _load(pred_path, "pred")
    a = _sanitize(
        a, "pred", where, owned=True, pert_col=pert_col, celltype_col=celltype_col, clip_negative=True
    )
    if control_pert not in set(a.obs[pert_col]):
        raise UserError(
            f"control {control_pert!r} not found in {pert_col!r} of pred ({where}); "
            "copy the real control cells into the predicted file"
        )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        strip_anndata(
            a,
            output_path=tmp,
            genelist=genes,
            pert_col=pert_col,
            celltype_col=celltype_col,
            ntc_name=control_pert,
            encoding=32,
            allow_discrete=False,
            exp_gene_dim=None,
        )
        # cell-eval does not check the exit status of zstd / tar: check the result instead
        try:
            with tarfile.open(tmp) as tf:
                names = tf.getnames()
        except tarfile.TarError as e:
            raise UserError(f"cell-eval prep wrote no valid tar ({e}); check that zstd and tar work") from e
        if "pred.h5ad.zst" not in names:
            raise UserError(
                f"cell-eval prep wrote a tar without pred.h5ad.zst ({names}); check that zstd works"
            )
        os.replace(tmp, out_path)
    except ValueError as e:
        raise UserError(f"cell-eval prep rejected {where}: {_one_line(e)}") from e
    finally:
        Path(tmp).unlink(missing_ok=True)
    log.info("submission written to %s", out_path)
    return out_path
