"""Upstream `state tx train` run folders, read (`pretrained=`, `init_from=`, `predict`, `load_checkpoint`); the
writer (`tahoe-ft export-state`) is `tahoe_ft.checkpoints.upstream_export`, which shares this module's layout
constants and TOML writer. This module imports nothing of `checkpoints.io` (which imports it).

A run folder is what `state tx train` leaves in `<output_dir>/<name>/`:

    config.yaml          the resolved Hydra config (data.kwargs: columns, control label, embed_key, split TOML)
    var_dims.pkl         a pickled dict: input/output/pert/batch dims, gene_names, pert_names
    pert_onehot_map.pt   a torch file: {perturbation name: one-hot (or feature) vector}
    checkpoints/*.ckpt   Lightning checkpoints of StateTransitionPerturbationModel (best, last, final)

Reading never runs code from the folder. `var_dims.pkl` and `pert_onehot_map.pt` are unpickled by
`tahoe_ft.checkpoints.safe_pickle`, which rebuilds only dicts, lists, tuples, strings, numbers and numeric/string numpy
values (from raw bytes) and, in a torch file, tensors; anything else a pickle names (`os.system`,
`builtins.open`, `eval`, ...) is refused with one line. `config.yaml` is read
with `yaml.safe_load`; the checkpoint with `tahoe_ft.checkpoints.io.safe_load` (`weights_only=True`).

"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tahoe_ft.checkpoints.safe_pickle import read_pickle, read_torch_data
from tahoe_ft.data.labels import ScreenLabels
from tahoe_ft.errors import UserError

log = logging.getLogger(__name__)

FOLDER_FILES = ("config.yaml", "var_dims.pkl", "pert_onehot_map.pt")
# which checkpoint of a folder is used, in order; otherwise the newest *.ckpt
CHECKPOINT_PREFERENCE = ("best.ckpt", "final.ckpt")


# -----------------------------------------------------------------------------------------------------
# reading a run folder


def pick_checkpoint(folder: Path) -> Path:
    """`checkpoints/best.ckpt`, else `final.ckpt`, else the newest `*.ckpt` of the folder."""
    ckdir = folder / "checkpoints"
    for name in CHECKPOINT_PREFERENCE:
        if (ckdir / name).is_file():
            return ckdir / name
    found = sorted(ckdir.glob("*.ckpt"), key=lambda p: p.stat().st_mtime) if ckdir.is_dir() else []
    found = [p for p in found if p.is_file()]
    if not found:
        raise UserError(f"run folder {folder} has no checkpoints/*.ckpt; is the training finished?")
    return found[-1]


@dataclass
class RunFolder:
    """A `state tx train` run folder, read safely: its checkpoint, config, dims and vocabulary."""

    path: Path
    checkpoint: Path
    config: dict[str, Any]
    var_dims: dict[str, Any]
    pert_names: list[str]  # sorted by one-hot column (or sorted names for feature vectors)
    pert_matrix: torch.Tensor  # float32 [n_perts, pert_dim], row i = pert_names[i]
    onehot: bool  # pert_matrix is the identity: column j of pert_encoder.0 is pert_names[j]

    @classmethod
    def open(cls, path: str | os.PathLike, checkpoint: str | os.PathLike | None = None) -> RunFolder:
        """Read the folder (`checkpoint`: which .ckpt; default `pick_checkpoint`)."""
        import yaml

        folder = Path(path)
        missing = [f for f in FOLDER_FILES if not (folder / f).is_file()]
        if missing:
            raise UserError(
                f"{folder} is not a state tx train run folder (no {', '.join(missing)}); "
                "give the folder that holds config.yaml, var_dims.pkl, pert_onehot_map.pt and checkpoints/"
            )
        ckpt = Path(checkpoint) if checkpoint is not None else pick_checkpoint(folder)
        try:
            config = yaml.safe_load((folder / "config.yaml").read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(
                f"{folder / 'config.yaml'} is not valid YAML ({str(exc).splitlines()[0]})"
            ) from None
        if not isinstance(config, dict):
            raise UserError(f"{folder / 'config.yaml'} is not a mapping; is it a state tx train config?")
        var_dims = read_pickle(folder / "var_dims.pkl")
        if not isinstance(var_dims, dict) or "pert_dim" not in var_dims:
            raise UserError(f"{folder / 'var_dims.pkl'} is not cell-load's var_dims dict (no pert_dim)")
        names, matrix, onehot = _pert_vocabulary(folder / "pert_onehot_map.pt", var_dims)
        log.info("upstream run folder %s: checkpoint %s, %d perturbations", folder, ckpt.name, len(names))
        return cls(folder, ckpt, config, var_dims, names, matrix, onehot)

    @classmethod
    def of_checkpoint(cls, ckpt: str | os.PathLike) -> RunFolder | None:
        """The run folder a `.ckpt` sits in (`<folder>/checkpoints/x.ckpt`), or None."""
        p = Path(ckpt)
        folder = p.parent.parent
        if p.parent.name == "checkpoints" and all((folder / f).is_file() for f in FOLDER_FILES):
            return cls.open(folder, checkpoint=p)
        return None

    @property
    def data_kwargs(self) -> dict[str, Any]:
        data = self.config.get("data") or {}
        return dict(data.get("kwargs") or {}) if isinstance(data, dict) else {}

    @property
    def gene_names(self) -> list[str] | None:
        names = self.var_dims.get("gene_names")
        return [str(g) for g in names] if names is not None else None

    def columns(self) -> dict[str, Any]:
        """pert/cell-type/batch columns and the control label, as `state tx train` used them."""
        kw = self.data_kwargs
        missing = [k for k in ("pert_col", "cell_type_key", "control_pert") if not kw.get(k)]
        if missing:
            raise UserError(
                f"{self.path / 'config.yaml'} has no 'data.kwargs' {missing}; is it a state tx train config?"
            )
        control = str(kw["control_pert"])
        if kw["pert_col"] == "drugname_drugconc":  # what state tx train forces for Tahoe
            control = "[('DMSO_TF', 0.0, 'uM')]"
        return {
            "pert_col": str(kw["pert_col"]),
            "control_pert": control,
            "cell_type_col": str(kw["cell_type_key"]),
            "batch_col": kw.get("batch_col") or None,
        }

    def manifest(
        self,
        hparams: dict[str, Any],
        *,
        data_paths: Any = None,
        split_toml: str | os.PathLike | None = None,
        decoded: bool,
    ):
        """A tahoe-ft `Manifest` for predicting with this folder's model on the screens of its split TOML.

        The held-out groups come from `split_toml`, else the folder's `data.kwargs.toml_config_path`; the cells
        from `data_paths`, else the TOML's `[datasets]`. `decoded`: the model predicts through its gene decoder
        (then the gene names must match the decoder's width, else the main output's).
        """
        from tahoe_ft.data import CellCatalog, Manifest
        from tahoe_ft.data.splits import toml_split_bits

        cols = self.columns()
        genes = self.gene_names
        width = hparams["decoder_cfg"]["gene_dim"] if decoded else hparams["output_dim"]
        if hparams.get("output_space") == "embedding" or (hparams.get("embed_key") and not decoded):
            raise UserError(
                f"{self.path}: the model predicts {hparams.get('embed_key')} embeddings without a gene decoder "
                "(output_space embedding); tahoe-ft predict writes gene space only"
            )
        if genes is None or len(genes) != width:
            raise UserError(
                f"{self.path / 'var_dims.pkl'} lists {0 if genes is None else len(genes)} gene names but the model "
                f"predicts {width} genes (upstream does not save the HVG names of HVG models); "
                "predict needs the model's own gene list"
            )
        toml = self._split_toml(split_toml, data_paths)
        paths, names = [], []
        for ds, files in toml.datasets.items():
            paths += files
            names += [ds] * len(files)
        cat = CellCatalog(
            paths,
            names,
            input_transform="log1p",  # upstream reads X as stored
            embed_key=hparams.get("embed_key"),
            genes=genes,
            labels=ScreenLabels(**cols),
        )
        cat._set_split_bits(toml_split_bits(cat, toml), yield_controls=True)
        splits = cat.splits
        onehot_src = "onehot" if self.onehot else str(self.path / "pert_onehot_map.pt")
        return Manifest(
            gene_names=genes,
            encoder="se600m" if hparams.get("embed_key") else "raw_expression",
            embed_key=hparams.get("embed_key"),
            input_dim=int(hparams["input_dim"]),
            pert_names=list(self.pert_names),
            pert_features={"source": onehot_src, "sha256": None},
            pert_matrix=self.pert_matrix.clone(),
            cell_types=list(cat.cell_types),
            batches=list(cat.batches) if cat.batches is not None else None,
            input_transform="log1p",
            cell_set_len=int(hparams["cell_set_len"]),
            splits={"val": splits["val"], "test": splits["test"]},
            data_paths=list(cat.data_paths),
            datasets=list(cat.datasets),
            held_out=cat.held_out(),
            **cols,
        )

    def _split_toml(self, split_toml: str | os.PathLike | None, data_paths: Any):
        """The parsed split TOML; with `data_paths`, those files replace the TOML's [datasets] entries."""
        from tahoe_ft.data.split_file import parse_split_toml, split_toml_datasets

        src = split_toml or self.data_kwargs.get("toml_config_path")
        if not src or not Path(src).is_file():
            where = (
                f"its toml_config_path {src} is not readable"
                if src
                else "its config.yaml names no split TOML"
            )
            raise UserError(
                f"run folder {self.path}: {where}; give split_toml=<cell-load split TOML> (and data_path=)"
            )
        if data_paths is None:
            return parse_split_toml(src)
        files = [Path(p) for p in ([data_paths] if isinstance(data_paths, str | os.PathLike) else data_paths)]
        datasets = split_toml_datasets(src)
        if len(datasets) != 1:
            try:
                return parse_split_toml(src)  # several datasets: their own files
            except UserError:
                raise UserError(
                    f"split TOML {src} names {len(datasets)} datasets; with data_path= give a TOML whose "
                    "[datasets] point at your files (split_toml=)"
                ) from None
        # one dataset: the given files are it (the TOML's own paths may be on another machine)
        return _parse_with_files(src, datasets[0], files)


def _parse_with_files(src: str | os.PathLike, dataset: str, files: list[Path]):
    """`parse_split_toml` of `src` with its one dataset's files replaced by `files` (which must exist)."""
    from tahoe_ft.data.split_file import parse_split_toml

    return parse_split_toml(src, files={dataset: [f.resolve() for f in files]})


def _pert_vocabulary(path: Path, var_dims: dict[str, Any]) -> tuple[list[str], torch.Tensor, bool]:
    """(names, matrix rows, one-hot?) of `pert_onehot_map.pt`; for one-hot maps, names are in column order."""
    mapping = read_torch_data(path)
    if not isinstance(mapping, dict) or not mapping:
        raise UserError(f"{path} is not a non-empty dict perturbation -> vector; is it from state tx train?")
    vecs = {}
    for k, v in mapping.items():
        if not isinstance(v, torch.Tensor) or v.dim() != 1:
            raise UserError(f"{path}: entry {k!r} is not a 1-D tensor; is it from state tx train?")
        vecs[str(k)] = v.detach().float()
    widths = {v.shape[0] for v in vecs.values()}
    if len(widths) != 1:
        raise UserError(f"{path}: vectors of different widths {sorted(widths)}")
    width = widths.pop()
    if int(var_dims["pert_dim"]) != width:
        raise UserError(
            f"{path}: vectors of width {width} but var_dims.pkl says pert_dim {var_dims['pert_dim']}"
        )
    onehot = all(((v == 0) | (v == 1)).all() and v.sum() == 1 for v in vecs.values())
    if onehot:
        cols = {n: int(v.argmax()) for n, v in vecs.items()}
        onehot = len(set(cols.values())) == len(cols) == width
    names = sorted(vecs, key=lambda n: cols[n]) if onehot else sorted(vecs)
    return names, torch.stack([vecs[n] for n in names]), onehot
