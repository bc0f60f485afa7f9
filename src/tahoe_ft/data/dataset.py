"""`SetDataset`: reads the rows of a batch of sets into the batch contract (`Batch`, docs/design.md)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np
import torch
from torch.utils.data import Dataset

from tahoe_ft.data.sampler import SetDescriptor

if TYPE_CHECKING:
    from tahoe_ft.data.catalog import CellCatalog


class Batch(TypedDict, total=False):
    """A batch of B sets of S cells (the batch contract of docs/design.md)."""

    pert_emb: torch.Tensor  # float32 [B, S, P]: the set's perturbation features, repeated per cell
    ctrl_cell_emb: torch.Tensor  # float32 [B, S, D_in]: basal control cells
    pert_cell_emb: torch.Tensor  # float32 [B, S, D_out]: observed perturbed cells
    pert_cell_counts: torch.Tensor  # float32 [B, S, G]: embedding input only, the targets in gene space
    pert_cell_aux: torch.Tensor  # float32 [B, S, E]: the targets' obsm[loss.aux_key] (auxiliary loss only)
    batch: torch.Tensor  # int64 [B, S]: batch index (data.batch_col set)
    pert_target: torch.Tensor  # int64 [B, S]: the target gene's column, -1 for none (model.target_knockdown)
    pert_name: list[str]  # [B]
    cell_type: list[str]  # [B]
    cell_type_idx: torch.Tensor  # int64 [B]: the set's cell type, its index in the catalog's cell_types
    pert_rows: torch.Tensor  # int64 [B, S]: global rows of the targets (debug_rows only)
    ctrl_rows: torch.Tensor  # int64 [B, S]: global rows of the basal controls (debug_rows only)


class SetDataset(Dataset):
    """Reads sets described by `SetDescriptor`s into the batch contract of docs/design.md.

    `__getitems__(descriptors)` reads a whole batch with one sorted pass per file (pert and control rows
    together); `__getitem__(descriptor)` is the same for one set (`B = 1`). The DataLoader must use
    `collate_fn=identity_collate`.

    It keeps the catalog's row reader and labels, not the catalog: a worker that gets the dataset pickled
    (spawn) receives the per-cell batch codes (8 bytes/cell), not every label array.
    """

    def __init__(
        self,
        catalog: CellCatalog,
        pert_matrix: np.ndarray,
        *,
        need_counts: bool,
        aux_key: str | None = None,
        pert_target: np.ndarray | None = None,
        basal_means: np.ndarray | None = None,
        debug_rows: bool = False,
    ) -> None:
        self.reader = catalog.reader
        self.offsets = self.reader.offsets
        self.embed_key = self.reader.embed_key
        self.need_counts = need_counts
        self.aux_key = aux_key
        self.pert_matrix = pert_matrix  # float32 [n_perts, P]; row i = pert_names[i]
        self.pert_target = pert_target  # int64 [n_perts] target-gene columns (-1: none), or None
        # float32 [n_pools, D_in]: each control pool's mean input; given, every set's basal draws are moved onto
        # their pool's mean (data.recentre_basal)
        self.basal_means = basal_means
        self.pert_names = list(catalog.pert_names)
        self.cell_types = list(catalog.cell_types)
        self.batch_of_row = catalog.batch_of
        self.debug_rows = debug_rows

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, desc: SetDescriptor) -> Batch:
        return self.__getitems__([desc])

    def __getitems__(self, descs: Sequence[SetDescriptor]) -> Batch:
        B, S = len(descs), len(descs[0].pert_rows)
        files = np.array([d.file for d in descs])
        pert_rows = np.stack([d.pert_rows for d in descs]).astype(np.int64)
        ctrl_rows = np.stack([d.ctrl_rows for d in descs]).astype(np.int64)
        parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {
            "pert": [],
            "ctrl": [],
            "counts": [],
            "aux": [],
        }
        for f in np.unique(files).tolist():
            sel = np.flatnonzero(files == f)
            p = (pert_rows[sel] - self.offsets[f]).reshape(-1)
            c = (ctrl_rows[sel] - self.offsets[f]).reshape(-1)
            both = self.reader.model_input(f, np.concatenate([p, c]))  # one sorted pass over pert + ctrl rows
            parts["pert"].append((sel, both[: p.size]))
            parts["ctrl"].append((sel, both[p.size :]))
            if self.embed_key is not None and self.need_counts:
                parts["counts"].append((sel, self.reader.expression(f, p)))
            if self.aux_key is not None:
                parts["aux"].append((sel, self.reader.screens[f].read_obsm_rows(self.aux_key, p)))

        def assemble(chunks: list[tuple[np.ndarray, np.ndarray]]) -> torch.Tensor:
            if len(chunks) == 1:
                return torch.from_numpy(chunks[0][1].reshape(B, S, -1))
            dim = chunks[0][1].shape[1]
            out = np.empty((B, S, dim), dtype=np.float32)
            for sel, vals in chunks:
                out[sel] = vals.reshape(len(sel), S, dim)
            return torch.from_numpy(out)

        perts = np.array([d.pert for d in descs])
        pert_emb = np.ascontiguousarray(
            np.broadcast_to(self.pert_matrix[perts][:, None, :], (B, S, self.pert_matrix.shape[1]))
        )
        ctrl = assemble(parts["ctrl"])
        if self.basal_means is not None:
            pools = np.array([d.pool for d in descs])
            if (pools < 0).any():
                raise ValueError("data.recentre_basal needs each set's control pool (SetDescriptor.pool)")
            means = torch.from_numpy(self.basal_means[pools])[:, None, :]  # [B,1,D_in]
            ctrl = ctrl - ctrl.mean(dim=1, keepdim=True) + means
        batch: Batch = {
            "pert_emb": torch.from_numpy(pert_emb),
            "ctrl_cell_emb": ctrl,
            "pert_cell_emb": assemble(parts["pert"]),
        }
        if parts["counts"]:
            batch["pert_cell_counts"] = assemble(parts["counts"])
        if parts["aux"]:
            batch["pert_cell_aux"] = assemble(parts["aux"])
        if self.pert_target is not None:
            batch["pert_target"] = torch.from_numpy(
                np.ascontiguousarray(np.broadcast_to(self.pert_target[perts][:, None], (B, S)))
            )
        if self.batch_of_row is not None:
            batch["batch"] = torch.from_numpy(self.batch_of_row[pert_rows].astype(np.int64))
        batch["pert_name"] = [self.pert_names[d.pert] for d in descs]
        batch["cell_type"] = [self.cell_types[d.cell_type] for d in descs]
        batch["cell_type_idx"] = torch.tensor([d.cell_type for d in descs], dtype=torch.int64)
        if self.debug_rows:
            batch["pert_rows"] = torch.from_numpy(pert_rows)
            batch["ctrl_rows"] = torch.from_numpy(ctrl_rows)
        return batch


def identity_collate(batch: Any) -> Any:
    """`SetDataset.__getitems__` already returns a collated batch."""
    return batch


def worker_init(_worker_id: int) -> None:
    # workers only do I/O and numpy scatter; more threads per worker just fight over the cores
    torch.set_num_threads(1)
