"""Perturbation screens on disk -> labelled cells -> `[B, S, ·]` training batches.

| module | what it is |
|---|---|
| `labels` | `ScreenLabels`: the label columns (perturbation, control, cell type, batch) and their defaults |
| `h5screen` | `H5Screen`: one `.h5ad` read with h5py in row blocks (CSR or dense `X`, `obsm`) |
| `checks` | value checks on open (NaN/Inf, negatives, counts vs log1p, embeddings) |
| `inputs` | side inputs: gene list, perturbation features (-> the pert matrix), split TOML |
| `splits` | split bits per cell: config lists, split TOML, or a manifest's held-out groups |
| `catalog` | `CellCatalog`: every cell labelled, split per `GroupKey(dataset, cell_type, pert)`, row reads |
| `manifest` | `Manifest`: the data manifest saved with every checkpoint |
| `sampler` | `Groups`, `Pools`, `SetPlan`: the seeded set sampler (all draws in the main process) |
| `dataset` | `SetDataset`: reads a batch of sets into a `Batch` (the batch contract) |
| `datamodule` | `PerturbationDataModule`: the Lightning glue: catalog -> plans -> loaders, and the manifest |

Predict, eval and `tahoe-ft check` read cells through `CellCatalog`; only training needs the data module.
Row ids that leave this package are *global*: the files in `data_paths` order, concatenated.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tahoe_ft.data.catalog import CellCatalog, GroupKey
    from tahoe_ft.data.datamodule import PerturbationDataModule
    from tahoe_ft.data.dataset import Batch, SetDataset, identity_collate
    from tahoe_ft.data.h5screen import H5Screen
    from tahoe_ft.data.inputs import (
        SplitToml,
        build_pert_matrix,
        load_pert_features,
        parse_split_toml,
        read_gene_list,
    )
    from tahoe_ft.data.labels import ScreenLabels
    from tahoe_ft.data.manifest import Manifest
    from tahoe_ft.data.sampler import Groups, Pools, SetDescriptor, SetPlan
    from tahoe_ft.data.splits import SPLIT_BITS, TEST, TRAIN, VAL

# each name from its module on first use: `tahoe_ft.data.labels` (what config.py reads) and the light modules
# load without torch; the data module imports Lightning (~10 s on a loaded box), which predict, eval and
# check never need
_HOME = {
    "CellCatalog": "catalog",
    "GroupKey": "catalog",
    "PerturbationDataModule": "datamodule",
    "Batch": "dataset",
    "SetDataset": "dataset",
    "identity_collate": "dataset",
    "H5Screen": "h5screen",
    "SplitToml": "inputs",
    "build_pert_matrix": "inputs",
    "load_pert_features": "inputs",
    "parse_split_toml": "inputs",
    "read_gene_list": "inputs",
    "ScreenLabels": "labels",
    "Manifest": "manifest",
    "Groups": "sampler",
    "Pools": "sampler",
    "SetDescriptor": "sampler",
    "SetPlan": "sampler",
    "SPLIT_BITS": "splits",
    "TEST": "splits",
    "TRAIN": "splits",
    "VAL": "splits",
}

__all__ = [
    "SPLIT_BITS",
    "TEST",
    "TRAIN",
    "VAL",
    "Batch",
    "CellCatalog",
    "GroupKey",
    "Groups",
    "H5Screen",
    "Manifest",
    "PerturbationDataModule",
    "Pools",
    "SetDataset",
    "SetDescriptor",
    "SetPlan",
    "ScreenLabels",
    "SplitToml",
    "build_pert_matrix",
    "identity_collate",
    "load_pert_features",
    "parse_split_toml",
    "read_gene_list",
]


def __getattr__(name: str):
    if name in _HOME:
        import importlib

        return getattr(importlib.import_module(f"tahoe_ft.data.{_HOME[name]}"), name)
    raise AttributeError(f"module 'tahoe_ft.data' has no attribute {name!r}")
