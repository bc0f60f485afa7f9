"""Inputs besides the screens: the gene list, perturbation features (and the matrix built from them), and
cell-load style split TOMLs (`[datasets]` with `{a,b}` globs, `[zeroshot]`, `[fewshot."<dataset>.<cell type>"]`).
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tahoe_ft.data.checks import fmt_list
from tahoe_ft.errors import UserError

log = logging.getLogger(__name__)


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
    """Read and check a split TOML; `[datasets]` entries are resolved to files (see `_dataset_files`)."""
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
