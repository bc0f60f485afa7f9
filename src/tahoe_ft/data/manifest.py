"""The data manifest saved with every checkpoint (docs/design.md): how the model saw its cells.

Genes in order, perturbation names and their feature rows, columns, transform, splits, the data files and
their dataset names, and the held-out (dataset, cell type, perturbation, split) groups, so `predict` and
`eval` read cells exactly as training did without the training config or files besides the screens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from tahoe_ft.errors import UserError


@dataclass(eq=False, kw_only=True)
class Manifest:
    """One checkpoint's data manifest; `to_dict()` is what the `.pt` file stores."""

    gene_names: list[str]  # the evaluator's genes, in order (the model's gene space)
    encoder: str  # "se600m" | "raw_expression" (the encoder config's name)
    embed_key: str | None = None  # obsm key of the input embedding; None: genes in
    input_dim: int
    pert_col: str
    control_pert: str
    cell_type_col: str
    batch_col: str | None = None
    pert_names: list[str]  # sorted, control included; row i of pert_matrix
    pert_features: dict[str, Any]  # {"source": "onehot" | path, "sha256": str | None}
    pert_matrix: torch.Tensor  # float32 [n_perts, P]
    cell_types: list[str]
    batches: list[str] | None = None
    input_transform: str  # "log1p" | "counts"
    cell_set_len: int
    splits: dict[str, list[str]]  # {"val": [...], "test": [...]}: perturbations with held-out cells
    data_paths: list[str]
    # dataset name of each data path (TOML [datasets] names, else file stems); None in older manifests
    datasets: list[str] | None = None
    # [{"dataset", "cell_type", "pert", "split"}]; None in older manifests (then `splits` holds the
    # perturbations out in every cell type)
    held_out: list[dict[str, str]] | None = None
    # lineage (tahoe_ft.lineage); None in older manifests and in manifests rebuilt without a training run
    data_fingerprint: str | None = None  # fileio.data_fingerprint of data_paths
    split_id: str | None = None  # lineage.split_id of held_out
    trained: dict[str, list[str]] | None = None  # cell type -> perturbations with training cells
    lineage: list[dict[str, Any]] | None = None  # the ancestors, parent first (lineage.entry_of)

    def to_dict(self, *, include_pert_matrix: bool = True) -> dict[str, Any]:
        """Plain python types (and the `pert_matrix` tensor): loads with `torch.load(weights_only=True)`.

        `include_pert_matrix=False` gives the JSON-able part (`manifest.json`).
        """
        out: dict[str, Any] = {
            "gene_names": list(self.gene_names),
            "encoder": str(self.encoder),  # a plain str, not the config's StrEnum
            "embed_key": self.embed_key,
            "input_dim": int(self.input_dim),
            "pert_col": self.pert_col,
            "control_pert": self.control_pert,
            "cell_type_col": self.cell_type_col,
            "batch_col": self.batch_col,
            "pert_names": list(self.pert_names),
            "pert_features": dict(self.pert_features),
            "pert_matrix": self.pert_matrix.clone(),
            "cell_types": list(self.cell_types),
            "batches": list(self.batches) if self.batches is not None else None,
            "input_transform": str(self.input_transform),
            "cell_set_len": int(self.cell_set_len),
            "splits": {k: list(v) for k, v in self.splits.items()},
            "data_paths": list(self.data_paths),
            "datasets": list(self.datasets) if self.datasets is not None else None,
            "held_out": [dict(e) for e in self.held_out] if self.held_out is not None else None,
            "data_fingerprint": self.data_fingerprint,
            "split_id": self.split_id,
            "trained": {k: list(v) for k, v in self.trained.items()} if self.trained is not None else None,
            "lineage": [dict(e) for e in self.lineage] if self.lineage is not None else None,
        }
        if not include_pert_matrix:
            del out["pert_matrix"]
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Manifest:
        """A manifest from a checkpoint's dict; keys added since (`datasets`, `held_out`) may be missing, keys
        this version does not know are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        missing = sorted(required - set(d))
        if missing:
            raise UserError(
                f"the checkpoint's data manifest lacks {missing}; predict needs a checkpoint written by tahoe-ft"
            )
        kw = {k: v for k, v in d.items() if k in names}
        kw["pert_matrix"] = torch.as_tensor(d["pert_matrix"], dtype=torch.float32)
        for key in ("gene_names", "pert_names", "cell_types", "data_paths"):
            kw[key] = [str(x) for x in d[key]]
        for key in ("batches", "datasets"):
            if kw.get(key) is not None:
                kw[key] = [str(x) for x in kw[key]]
        kw["splits"] = {str(k): [str(x) for x in v] for k, v in d["splits"].items()}
        kw["pert_features"] = dict(d["pert_features"])
        if kw.get("held_out") is not None:
            kw["held_out"] = [
                {k: str(e[k]) for k in ("dataset", "cell_type", "pert", "split")} for e in kw["held_out"]
            ]
        return cls(**kw)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Manifest):
            return NotImplemented
        a, b = self.to_dict(), other.to_dict()
        ma, mb = a.pop("pert_matrix"), b.pop("pert_matrix")
        return a == b and ma.shape == mb.shape and ma.dtype == mb.dtype and torch.equal(ma, mb)
