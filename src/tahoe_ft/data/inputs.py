"""Inputs besides the screens: the gene list and perturbation features (and the matrix built from them).

Split TOMLs are read and written by `tahoe_ft.data.split_file`; `SplitToml` and `parse_split_toml` are
re-exported here for the modules that import them from this one.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tahoe_ft.data.checks import fmt_list
from tahoe_ft.data.split_file import SplitToml, parse_split_toml
from tahoe_ft.errors import UserError

log = logging.getLogger(__name__)

__all__ = ["SplitToml", "build_pert_matrix", "load_pert_features", "parse_split_toml", "read_gene_list"]


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


def build_pert_matrix(
    pert_names: Sequence[str],
    control_pert: str,
    features: str | os.PathLike | None,
    *,
    allow_missing: bool = False,
) -> tuple[np.ndarray, dict[str, Any]]:
    """(float32 `[n_perts, P]`, row i = `pert_names[i]`; the features source for the manifest).

    No features file: one-hot over the (sorted) names, control included. A features file: each name's
    vector; the control and, with `allow_missing`, missing names (reported) get the zero vector.
    """
    n = len(pert_names)
    if not features:
        return np.eye(n, dtype=np.float32), {"source": "onehot", "sha256": None}
    feats, digest = load_pert_features(features)
    dim = len(next(iter(feats.values())))
    missing = [p for p in pert_names if p not in feats and p != control_pert]
    if missing and not allow_missing:
        raise UserError(
            f"{len(missing)} perturbations have no vector in {features} ({fmt_list(missing)}); "
            "add them, or set data.allow_missing_pert_features=true to give them zero vectors"
        )
    if missing:
        log.warning(
            "%d perturbations are missing from %s and get zero vectors: %s",
            len(missing),
            features,
            fmt_list(missing),
        )
    if control_pert not in feats:
        log.info("control '%s' is not in %s: it gets the zero vector", control_pert, features)
    mat = np.zeros((n, dim), dtype=np.float32)
    for i, p in enumerate(pert_names):
        if p in feats:
            mat[i] = feats[p]
    return mat, {"source": str(features), "sha256": digest}
