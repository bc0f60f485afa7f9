"""The cell catalog: every cell of the screens labelled, and the split of each (dataset, cell type, pert) group.

`CellCatalog.open(data_cfg)` opens and validates the screens as training does; `CellCatalog.from_manifest(m)`
reads them exactly as a checkpoint saw them (its genes, columns, transform and held-out groups), writing
nothing. Predict, eval's training-cell baseline and `tahoe-ft check` read cells through it; the training data
module builds its sampler on top of it.

Rows are *global*: the files in `data_paths` order, concatenated (`offsets[f]` is file f's first row).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tahoe_ft.config import DataConfig, checked
from tahoe_ft.data.checks import (
    check_obsm_values,
    check_obsm_widths,
    check_unique_genes,
    check_values,
    fmt_list,
)
from tahoe_ft.data.h5screen import H5Screen, ScreenSet
from tahoe_ft.data.inputs import SplitToml, parse_split_toml, read_gene_list
from tahoe_ft.data.labels import ScreenLabels
from tahoe_ft.data.manifest import Manifest
from tahoe_ft.data.splits import (
    SPLIT_BITS,
    TRAIN,
    config_split_bits,
    held_out_split_bits,
    split_bit,
    toml_split_bits,
)
from tahoe_ft.errors import UserError

# how to fix cells that do not match the checkpoint they are reopened for (predict's data_path=)
CHECKPOINT_FIX = (
    "the checkpoint was trained on other data: predict from a file with its genes, obs columns, labels and "
    "transform (data_path=), or use a checkpoint trained on this one"
)

if TYPE_CHECKING:
    import anndata as ad


class GroupKey(NamedTuple):
    """One (dataset, cell type, perturbation) group: the unit that splits hold out (SPEC §5.2)."""

    dataset: str
    cell_type: str
    pert: str


def as_data_config(cfg: DataConfig | DictConfig | Mapping) -> DataConfig:
    """A `DataConfig` from itself, a Hydra node or a dict (unknown keys and bad types are a `UserError`)."""
    if isinstance(cfg, DataConfig):
        return checked(cfg)  # built in Python: its enum options are checked as composition checks them
    try:
        merged = OmegaConf.merge(OmegaConf.structured(DataConfig), cfg)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise UserError(
            f"config error at 'data.{getattr(exc, 'full_key', '')}': {str(exc).splitlines()[0]}; "
            "check the data config keys and types"
        ) from None


def _columns(source: DataConfig | Manifest) -> dict[str, Any]:
    """The labels and the transform, named alike in a data config and a manifest."""
    return {"labels": ScreenLabels.of(source), "input_transform": source.input_transform}


def _check_options(c: DataConfig) -> None:
    if c.split_toml and (c.val_perts or c.test_perts or c.val_cell_types or c.test_cell_types):
        raise UserError(
            "both data.split_toml and data.val_perts/test_perts/val_cell_types/test_cell_types are set; "
            "use one of the two"
        )


def _resolve_paths(c: DataConfig) -> tuple[list[Path], list[str], SplitToml | None]:
    """(files, dataset name of each, parsed split TOML or None) from data.path and data.split_toml."""
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


def _resolve_genes(
    screens: list[H5Screen], genes: list[str] | None, source: str, fix: str = ""
) -> tuple[list[str], list[np.ndarray | None]]:
    """(gene names, per file the var positions of those genes or None for "all, in file order"); `fix`: how to
    fix genes missing from a file (default: data.gene_list or the file)."""
    if genes is not None:
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
                    f"{len(missing)} genes of {source} are not in var of {s.path} "
                    f"({fmt_list(missing)}); " + (fix or "fix data.gene_list or the file's var_names")
                )
            amb = [g for g in genes if g in dup]
            if amb:
                raise UserError(
                    f"genes of the gene list appear more than once in var of {s.path} ({fmt_list(amb)}); "
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


class CellCatalog:
    """Every cell of the screens: its file, dataset, cell type, perturbation and batch, and its split.

    Build it with `open` (from a data config, validated as `train` does) or `from_manifest` (as a
    checkpoint saw the data). Labels are codes per global row: `file_of`, `pert_of` (into `pert_names`,
    sorted, control included), `cell_type_of` (into `cell_types`), `batch_of` (into `batches`, or None),
    and `split_bits` (TRAIN | VAL | TEST; controls are TRAIN when they are training targets, else 0).
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        datasets: Sequence[str],
        *,
        labels: ScreenLabels,
        input_transform: str,
        embed_key: str | None,
        gene_list: str | os.PathLike | None = None,
        genes: Sequence[str] | None = None,
    ) -> None:
        """Open and validate the screens and label their cells; `open`/`from_manifest` then set the splits.

        Genes: `genes` (a list), else the gene list file `gene_list`, else the files' var_names. `labels`
        must name a cell-type column (a catalog's cells always have one).
        """
        if labels.cell_type_col is None:
            raise ValueError("CellCatalog needs labels.cell_type_col")
        self.data_paths = [str(p) for p in paths]
        self.datasets = list(datasets)
        self.labels = labels
        pert_col, cell_type_col, batch_col = labels.pert_col, labels.cell_type_col, labels.batch_col
        self.input_transform, self.embed_key = input_transform, embed_key
        self.screens = [H5Screen(p) for p in paths]
        screens = self.screens

        # `genes` given: the data reopened as a checkpoint saw it (predict, eval), where no data.* key applies
        ckpt_fix = self._fix = "" if genes is None else CHECKPOINT_FIX
        cols = [pert_col, cell_type_col] + ([batch_col] if batch_col else [])
        for s in screens:
            for col in cols:
                if not s.has_obs(col):
                    raise UserError(
                        f"obs column '{col}' not found in {s.path} (columns: {fmt_list(s.obs_columns(), 12)}); "
                        + (
                            ckpt_fix
                            or "set data.pert_col / data.cell_type_col / data.batch_col to the right names"
                        )
                    )
        if genes is not None:
            gene_names, source = list(genes), "the checkpoint's gene list"
        else:
            gene_names = read_gene_list(gene_list) if gene_list else None
            source = f"the gene list {gene_list}"
        if gene_names is None:  # the files' var_names are the gene list: each name once
            for s in screens:
                check_unique_genes(s)
        self.gene_names, gene_cols = _resolve_genes(screens, gene_names, source, ckpt_fix)
        self.reader = ScreenSet(screens, gene_cols, input_transform=input_transform, embed_key=embed_key)
        self.offsets = self.reader.offsets
        for s in screens:
            check_values(s, input_transform, fix=ckpt_fix)
            if embed_key is not None:
                check_obsm_values(s, embed_key)
        if embed_key is not None:
            check_obsm_widths(screens, embed_key)
        self._label_cells(cols)
        self.dataset_names = sorted(set(self.datasets))
        ds_index = {d: i for i, d in enumerate(self.dataset_names)}
        self._file_dataset = np.array([ds_index[d] for d in self.datasets], dtype=np.int32)
        self._control_rows = np.flatnonzero(self.pert_of == self.control_idx).astype(np.int64)
        self.split_bits = np.zeros(self.n_cells, dtype=np.int8)

    @property
    def pert_col(self) -> str:
        return self.labels.pert_col

    @property
    def control_pert(self) -> str:
        return self.labels.control_pert

    @property
    def cell_type_col(self) -> str:
        return self.labels.cell_type_col

    @property
    def batch_col(self) -> str | None:
        return self.labels.batch_col

    def _label_cells(self, cols: list[str]) -> None:
        """obs labels of every file -> sorted names and global codes per row."""
        per_file = [{col: s.obs_codes(col) for col in cols} for s in self.screens]
        for s, labels in zip(self.screens, per_file, strict=True):
            for col, (codes, _) in labels.items():
                n_missing = int((codes < 0).sum())
                if n_missing:
                    raise UserError(
                        f"obs column '{col}' has {n_missing} cells without a value ({s.path}); "
                        "fill in or drop those cells"
                    )
            codes, cats = labels[self.pert_col]
            if self.control_pert not in cats or not (codes == cats.index(self.control_pert)).any():
                raise UserError(
                    f"control label '{self.control_pert}' not found in obs['{self.pert_col}'] of {s.path} "
                    f"(values: {fmt_list(sorted(set(cats)))}); {self._fix or 'set data.control_pert'}"
                )

        def used(col: str) -> list[str]:
            names: set[str] = set()
            for labels in per_file:
                codes, cats = labels[col]
                names.update(cats[i] for i in np.unique(codes).tolist())
            return sorted(names)

        def to_global(col: str, names: list[str]) -> np.ndarray:
            index = {x: i for i, x in enumerate(names)}
            out = []
            for labels in per_file:
                codes, cats = labels[col]
                lut = np.array([index.get(x, -1) for x in cats], dtype=np.int32)
                out.append(lut[codes] if len(lut) else np.zeros(0, np.int32))
            return np.concatenate(out)

        self.pert_names = used(self.pert_col)
        self.cell_types = used(self.cell_type_col)
        self.batches = used(self.batch_col) if self.batch_col else None
        self.control_idx = self.pert_names.index(self.control_pert)
        sizes = [s.n_obs for s in self.screens]
        self.file_of = np.repeat(np.arange(len(self.screens), dtype=np.int32), sizes)
        self.pert_of = to_global(self.pert_col, self.pert_names)
        self.cell_type_of = to_global(self.cell_type_col, self.cell_types)
        self.batch_of = (
            to_global(self.batch_col, self.batches).astype(np.int64)
            if self.batch_col and self.batches is not None
            else None
        )

    # -- construction --------------------------------------------------------------------------------------

    @classmethod
    def open(
        cls, data_cfg: DataConfig | DictConfig | Mapping, *, embed_key: str | None = None
    ) -> CellCatalog:
        """The screens of a data config, validated and split as `train` does (one-line `UserError`s)."""
        c = as_data_config(data_cfg)
        _check_options(c)
        paths, names, toml = _resolve_paths(c)
        cat = cls(paths, names, embed_key=embed_key, gene_list=c.gene_list, **_columns(c))
        if toml is None:
            bits = config_split_bits(
                cat,
                val_perts=list(c.val_perts),
                test_perts=list(c.test_perts),
                val_cell_types=list(c.val_cell_types),
                test_cell_types=list(c.test_cell_types),
            )
        else:
            bits = toml_split_bits(cat, toml)
        cat._set_split_bits(bits, yield_controls=c.yield_controls)
        return cat

    @classmethod
    def from_manifest(
        cls,
        manifest: Manifest | Mapping[str, Any],
        *,
        data_paths: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    ) -> CellCatalog:
        """The cells as the checkpoint saw them: its genes, columns, transform and held-out groups.

        `data_paths` replaces the manifest's files (same order; dataset names are taken from the manifest).
        Manifests without `held_out` hold their `splits` perturbations out in every cell type.
        """
        m = manifest if isinstance(manifest, Manifest) else Manifest.from_dict(manifest)
        if data_paths is None:
            raw = list(m.data_paths)
        elif isinstance(data_paths, (str, os.PathLike)):
            raw = [data_paths]
        else:
            raw = list(data_paths)
        paths = [Path(os.path.expanduser(str(p))) for p in raw]
        for p in paths:
            if not p.is_file():
                raise UserError(
                    f"data file {p} (from the checkpoint's manifest) not found; pass data_path=<file>"
                )
        cat = cls(
            paths, _manifest_datasets(m, paths), embed_key=m.embed_key, genes=m.gene_names, **_columns(m)
        )
        if m.held_out is not None:
            bits = held_out_split_bits(cat, m.held_out)
        else:
            bits = config_split_bits(
                cat, val_perts=m.splits.get("val", []), test_perts=m.splits.get("test", [])
            )
        cat._set_split_bits(bits, yield_controls=True)
        return cat

    def _set_split_bits(self, bits: np.ndarray, *, yield_controls: bool) -> None:
        """Controls: training targets (`yield_controls`) or none; every target needs controls in its file."""
        bits = bits.astype(np.int8, copy=True)
        bits[self.pert_of == self.control_idx] = TRAIN if yield_controls else 0
        self.split_bits = bits
        n_ct = len(self.cell_types)
        pair = self.file_of.astype(np.int64) * n_ct + self.cell_type_of  # (file, cell type) of each cell
        lacking = np.setdiff1d(np.unique(pair[bits > 0]), np.unique(pair[self._control_rows]))
        if lacking.size:
            f, t = divmod(int(lacking[0]), n_ct)
            raise UserError(
                f"cell type '{self.cell_types[t]}' in {self.data_paths[f]} has no control cells "
                f"('{self.control_pert}'); basal controls never cross files: add controls or drop those cells"
            )

    # -- what is where -------------------------------------------------------------------------------------

    @property
    def n_cells(self) -> int:
        return int(self.offsets[-1])

    def check_obsm(self, key: str, what: str) -> None:
        """Every file has a finite `obsm[key]` of one width (an auxiliary target named by config key `what`)."""
        for s in self.screens:
            if not s.has_obsm(key):
                raise UserError(
                    f"{what}='{key}': obsm['{key}'] not found in {s.path} (obsm keys: "
                    f"{', '.join(s.obsm_keys) or 'none'}); compute the embedding first or set {what}=null"
                )
            check_obsm_values(s, key)
        check_obsm_widths(self.screens, key)

    @property
    def input_dim(self) -> int:
        """Width of the model's input: genes, or `obsm[embed_key]`."""
        return len(self.gene_names) if self.embed_key is None else self.screens[0].obsm_dim(self.embed_key)

    def dataset_codes(self) -> np.ndarray:
        """Per global row, its dataset as an index into `dataset_names`."""
        return self._file_dataset[self.file_of]

    @property
    def splits(self) -> dict[str, list[str]]:
        """Perturbations (control excluded) with target cells in each split."""
        out = {}
        for name, bit in SPLIT_BITS.items():
            codes = np.unique(self.pert_of[(self.split_bits & bit) > 0])
            out[name] = [self.pert_names[i] for i in codes.tolist() if i != self.control_idx]
        return out

    def groups(self, split: str) -> dict[GroupKey, np.ndarray]:
        """`{GroupKey: sorted global rows}` of the perturbed cells of each group in `split`, in key order.

        A group's cells from several files of its dataset, or from several batches, are merged.
        """
        rows = np.flatnonzero(((self.split_bits & split_bit(split)) > 0) & (self.pert_of != self.control_idx))
        if rows.size == 0:
            return {}
        ds, ct, pert = self.dataset_codes()[rows], self.cell_type_of[rows], self.pert_of[rows]
        order = np.lexsort((pert, ct, ds))  # stable: rows stay ascending within a group
        rows, ds, ct, pert = rows[order], ds[order], ct[order], pert[order]
        start = np.flatnonzero(
            np.r_[True, (ds[1:] != ds[:-1]) | (ct[1:] != ct[:-1]) | (pert[1:] != pert[:-1])]
        )
        stop = np.r_[start[1:], rows.size]
        return {
            GroupKey(self.dataset_names[ds[a]], self.cell_types[ct[a]], self.pert_names[pert[a]]): rows[a:b]
            for a, b in zip(start.tolist(), stop.tolist(), strict=True)
        }

    def controls(self, dataset: str, cell_type: str) -> np.ndarray:
        """Sorted global rows of the control cells of `cell_type` in `dataset`."""
        if dataset not in self.dataset_names or cell_type not in self.cell_types:
            raise KeyError(f"no cells of dataset {dataset!r} / cell type {cell_type!r} in this catalog")
        rows = self._control_rows
        d, t = self.dataset_names.index(dataset), self.cell_types.index(cell_type)
        return rows[(self.cell_type_of[rows] == t) & (self._file_dataset[self.file_of[rows]] == d)]

    def held_out(self) -> list[dict[str, str]]:
        """The val and test groups, as the manifest records them: `{"dataset", "cell_type", "pert", "split"}`."""
        return [
            {"dataset": k.dataset, "cell_type": k.cell_type, "pert": k.pert, "split": split}
            for split in ("val", "test")
            for k in self.groups(split)
        ]

    # -- reading rows --------------------------------------------------------------------------------------

    def read_expression(self, rows: np.ndarray) -> np.ndarray:
        """log1p-normalised expression over `gene_names` for global rows, float32 `[n, G]`."""
        return self.reader.read_global(rows, len(self.gene_names), expression=True)

    def read_input(self, rows: np.ndarray) -> np.ndarray:
        """The model's input space (expression, or `obsm[embed_key]`) for global rows, float32."""
        return self.reader.read_global(rows, self.input_dim, expression=False)

    def mean_inputs(self, row_sets: Sequence[np.ndarray], block: int) -> np.ndarray:
        """float64 `[len(row_sets), input_dim]`: the mean model input of each set of global rows (a repeated row
        counts each time), reading each distinct row of their union once, `block` rows at a time, in row order:
        sets that share cells (basal draws of one cell type, a cell type's pool and its batches' pools) cost
        one read of the cells they share."""
        import scipy.sparse as sp

        union, inverse = np.unique(np.concatenate(row_sets), return_inverse=True)
        sizes = np.array([r.size for r in row_sets])
        which = np.repeat(np.arange(len(row_sets)), sizes)
        # counts[s, j]: how often set s holds row union[j] (duplicates summed on conversion to CSR)
        counts = sp.csr_matrix((np.ones(inverse.size), (which, inverse)), shape=(len(row_sets), union.size))
        total = np.zeros((len(row_sets), self.input_dim))
        for a in range(0, union.size, block):  # a dense product (BLAS): scipy's sparse one is 3x slower here
            x = self.read_input(union[a : a + block]).astype(np.float64)
            total += counts[:, a : a + block].toarray() @ x
        return total / sizes[:, None]

    def training_cells(self, max_per_group: int, seed: int = 0) -> ad.AnnData:
        """Training perturbations and controls in gene space, for cell-eval's cell-mean baseline.

        At most `max_per_group` cells (drawn without replacement) per (cell type, perturbation), merged over
        datasets as cell-eval sees them, and the controls of every cell type (all datasets; controls are shared
        by all splits, so a held-out cell type's controls are there for the baselines too). obs holds the
        perturbation and cell-type columns; var the genes.
        """
        import anndata as ad
        import pandas as pd

        rows, labels = draw_training_rows(self._training_draws(), max_per_group, seed)
        x = self.read_expression(rows)
        obs = pd.DataFrame(labels, columns=[self.pert_col, self.cell_type_col])
        obs.index = [f"train{i}" for i in range(len(obs))]
        obs = obs.astype("category")
        return ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=list(self.gene_names)))

    def training_group_means(self, max_per_group: int, seed: int = 0) -> dict[tuple[str, str], np.ndarray]:
        """`{(cell type, pert): float64 mean over genes}` of exactly the cells `training_cells` gives (controls
        under the control label), read one group at a time: the same numbers as the means of its matrix, without
        holding every training cell in memory at once (20,000 cells x 18,080 genes is 1.4 GB in float32)."""
        rows, labels = draw_training_rows(self._training_draws(), max_per_group, seed)
        means: dict[tuple[str, str], np.ndarray] = {}
        start = 0
        while start < len(labels):  # each draw's rows are contiguous, in draw order
            pert, ct = labels[start]
            stop = start + 1
            while stop < len(labels) and labels[stop] == (pert, ct):
                stop += 1
            means[(ct, pert)] = self.read_expression(rows[start:stop]).astype(np.float64).mean(axis=0)
            start = stop
        return means

    def _training_draws(self) -> list[tuple[str, np.ndarray, str, str]]:
        """(order key, rows, pert, cell type) of every training group and every cell type's controls."""
        merged: dict[tuple[str, str], list[np.ndarray]] = {}
        for key, rows in self.groups("train").items():
            merged.setdefault((key.cell_type, key.pert), []).append(rows)
        if not merged:
            raise UserError(
                "no perturbed cells left for training after the val/test split; hold out fewer perturbations"
            )
        # (order key, rows, pert, cell type); the order is the text of ('cell type', 'pert') for groups and
        # the cell type for controls, as tahoe-ft has always drawn them: it fixes which cells a seed picks
        draws = [(str(k), np.sort(np.concatenate(v)), k[1], k[0]) for k, v in merged.items()]
        ctrl = self._control_rows
        for ct in self.cell_types:
            rows = ctrl[self.cell_type_of[ctrl] == self.cell_types.index(ct)]
            if rows.size:
                draws.append((str(ct), rows, self.control_pert, ct))
        return draws

    def __repr__(self) -> str:
        return (
            f"CellCatalog({self.n_cells} cells in {len(self.screens)} file(s), {len(self.gene_names)} genes, "
            f"{len(self.pert_names)} perturbations, {len(self.cell_types)} cell types)"
        )


def draw_training_rows(
    draws: list[tuple[str, np.ndarray, str, str]], max_per_group: int, seed: int
) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """The training cells that the baselines see: for each (order key, rows, pert, cell type) in the order of
    the keys, at most `max_per_group` of `rows` drawn without replacement (sorted) by one generator seeded
    with `seed`. Returns the drawn rows and each row's (pert, cell type). `CellCatalog.training_cells` and
    `tahoe-ft eval train=` both draw with it, so a run's panel and a file's panel see the same cells."""
    rng = np.random.default_rng(seed)
    picks, labels = [], []
    for _, rows, pert, ct in sorted(draws, key=lambda d: d[0]):
        pick = np.sort(rng.choice(rows, size=min(rows.size, max_per_group), replace=False))
        picks.append(pick)
        labels += [(pert, ct)] * pick.size
    return np.concatenate(picks), labels


def _manifest_datasets(m: Manifest, paths: list[Path]) -> list[str]:
    """Dataset name of each file read for a manifest: the manifest's, position by position."""
    if m.datasets is None or m.held_out is None:  # older manifest: names are not used
        return [p.stem for p in paths]
    if len(m.datasets) == len(paths):
        return list(m.datasets)
    if len(set(m.datasets)) == 1:
        return [m.datasets[0]] * len(paths)
    raise UserError(
        f"data_path gives {len(paths)} file(s) but the checkpoint was trained on {len(m.datasets)} of datasets "
        f"{fmt_list(sorted(set(m.datasets)))}; pass one file per data path of its manifest, in the same order"
    )
