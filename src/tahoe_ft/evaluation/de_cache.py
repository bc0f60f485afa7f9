"""The on-disk cache of the real side's DE table and of the cell-mean baseline's aggregate tables.

The real side's DE (pdex, the expensive part of a cell-eval run) and the baseline's ``agg_results.csv``
depend only on the real file (and the training cells), so evaluating many checkpoints against one real file
computes them once. Layout under the cache folder (``de_cache_dir``)::

    real_de/<real key>.csv                       the real DE table (read-only: outdirs hard-link to it)
    real_de/<real key>.json                      what the key stands for (real sha, labels, versions)
    baseline/<real key>/<profile>/<train key>.csv  the baseline's aggregate table

A real key covers the real data, the cell type, the labels and the cell-eval / pdex versions; bump
`_CACHE_FORMAT` when the layout or the meaning of an entry changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import scipy.sparse as sp

from tahoe_ft.evaluation.inputs import CHUNK
from tahoe_ft.fileio import atomic_copy, atomic_write_text

log = logging.getLogger(__name__)

# bump when the layout or the meaning of a cache entry changes
_CACHE_FORMAT = 1


def content_sha256(a: ad.AnnData, cols: list[str]) -> str:
    """Hash of what the DE depends on: X (values, sparsity, dtype), the obs columns `cols`, names.

    The cache key of an in-memory AnnData (one read from a file is keyed by the file's sha256).
    """
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
        rows = max(1, CHUNK // max(1, X.shape[1]))
        for start in range(0, X.shape[0], rows):
            h.update(memoryview(np.ascontiguousarray(X[start : start + rows])).cast("B"))
    for values in [a.obs_names, a.var_names, *(a.obs[c] for c in cols)]:
        h.update("\x00".join(map(str, values)).encode())
        h.update(b"\x01")
    return h.hexdigest()


def cache_key(**parts: Any) -> str:
    """A short, stable name for a cache entry: the sha256 of its parts as sorted JSON."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def link_or_copy(src: Path, dst: Path) -> None:
    """Put `src` at `dst` (a hard link when possible: the DE tables are large)."""
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        atomic_copy(src, dst)


@dataclass(frozen=True)
class DECache:
    """The cache folder; entries are addressed by a real key (see `real_key`)."""

    root: Path

    def real_key(
        self,
        real_sha: str,
        *,
        versions: dict[str, str],
        pert_col: str,
        control_pert: str,
        celltype: str | None,
    ) -> str:
        """The key of everything cached for one real side (one cell type of it, with `celltype`)."""
        return cache_key(
            format=_CACHE_FORMAT,
            data=real_sha,
            cell_eval=versions["cell-eval"],
            pdex=versions["pdex"],
            pert_col=pert_col,
            control=control_pert,
            celltype=celltype,
            allow_discrete=False,
            pdex_kwargs={},
        )

    def real_de(self, real_key: str) -> Path:
        """Where the real DE table of `real_key` is (or goes)."""
        return self.root / "real_de" / f"{real_key}.csv"

    def store_real_de(self, src: Path, real_key: str, *, meta: dict[str, Any]) -> None:
        """Keep the real DE table `src` (just computed by cell-eval) and what it was computed from."""
        dst = self.real_de(real_key)
        atomic_copy(src, dst)
        dst.chmod(0o444)  # read-only: the outdir copies are hard links to it
        atomic_write_text(dst.with_suffix(".json"), json.dumps(meta, indent=1))

    def baseline_dir(self, real_key: str, profile: str) -> Path:
        """The folder of the baseline tables of one real side and profile (one per training set)."""
        return self.root / "baseline" / real_key / profile

    def baseline(self, real_key: str, profile: str, *, train_sha: str | None, celltype: str | None) -> Path:
        """Where the baseline aggregate table for these training cells is (or goes)."""
        return self.baseline_dir(real_key, profile) / f"{cache_key(train=train_sha, celltype=celltype)}.csv"

    def newest_baseline(self, real_key: str, profile: str) -> Path | None:
        """The newest cached baseline table for this real side (any training set), None if there is none."""
        base_dir = self.baseline_dir(real_key, profile)
        found = sorted(base_dir.glob("*.csv"), key=lambda p: p.stat().st_mtime) if base_dir.is_dir() else []
        if not found:
            return None
        if len(found) > 1:
            log.warning("%d cached baselines for this real file; using the newest, %s", len(found), found[-1])
        return found[-1]
