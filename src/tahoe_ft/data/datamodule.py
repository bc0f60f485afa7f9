"""`PerturbationDataModule`: the Lightning data module, glue from a `CellCatalog` to training loaders."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from tahoe_ft.config import DataConfig
from tahoe_ft.data.catalog import CellCatalog, as_data_config
from tahoe_ft.data.dataset import SetDataset, identity_collate, worker_init
from tahoe_ft.data.features import build_features, target_gene_index, training_knockdown_ratio
from tahoe_ft.data.manifest import Manifest
from tahoe_ft.data.sampler import Groups, SetPlan, group_cells
from tahoe_ft.data.splits import TEST, TRAIN, VAL
from tahoe_ft.errors import UserError

log = logging.getLogger(__name__)


class PerturbationDataModule(L.LightningDataModule):
    """Screens (.h5ad) -> training/validation batches of sets, plus the data manifest.

    `embed_key=None`: input and target are log1p gene expression over the evaluator's genes
    (raw_expression encoder). `embed_key="X_state"`: input and target are `obsm["X_state"]` rows, and
    with `need_counts` the batch also carries `pert_cell_counts` (gene expression, for the decoder).
    `aux_key` (e.g. "X_state" in a gene-space round): the batch also carries `pert_cell_aux`, the target cells'
    `obsm[aux_key]` rows, for the auxiliary loss (`loss.aux_key`). `target_knockdown` (gene space only): the
    batch also carries `pert_target`, each set's target-gene column, and `dims["target_knockdown"]` is the
    training cells' median knock-down ratio, the knock-down path's starting value (model.target_knockdown).

    Splits: listed val/test perturbations (few-shot) and held-out cell types (zero-shot) take those
    cells out of training. Control cells are shared: every split draws basal controls from the same
    control pools, and with `yield_controls` all controls (held-out cell types' too, as cell-load's
    "observational" controls) are also training targets labelled with the control name.
    """

    def __init__(
        self,
        data_cfg: DataConfig | DictConfig | Mapping,
        *,
        embed_key: str | None,
        need_counts: bool,
        cell_set_len: int,
        seed: int,
        aux_key: str | None = None,
        target_knockdown: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        debug_rows: bool = False,
    ) -> None:
        super().__init__()
        self.cfg = as_data_config(data_cfg)
        self.embed_key = embed_key
        self.need_counts = bool(need_counts) and embed_key is not None
        self.cell_set_len = int(cell_set_len)
        self.seed = int(seed)
        self.aux_key = aux_key
        self.target_knockdown = bool(target_knockdown)
        self.knockdown_ratio: float | None = None
        self.rank, self.world_size = rank, world_size
        self.debug_rows = debug_rows
        self._catalog: CellCatalog | None = None
        self._ready = False
        self._resume_at: tuple[int, int] | None = None

    # -- setup --------------------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        c = self.cfg
        self._check_options()
        catalog = CellCatalog.open(c, embed_key=self.embed_key)
        if self.aux_key is not None:
            catalog.check_obsm(self.aux_key, "loss.aux_key")
        self.pert_matrix_np, self.pert_features = build_features(
            catalog,
            c.pert_features,
            allow_missing=c.allow_missing_pert_features,
            dim=c.pert_feature_dim,
            seed=self.seed,
        )
        pert_target = self._knockdown(catalog) if self.target_knockdown else None
        self._build_plans(catalog)
        self.dataset = SetDataset(
            catalog,
            self.pert_matrix_np,
            need_counts=self.need_counts,
            aux_key=self.aux_key,
            pert_target=pert_target,
            basal_means=self._pool_means(catalog) if c.recentre_basal else None,
            debug_rows=self.debug_rows,
        )
        self._check_memory(self._dims(catalog))
        self._catalog = catalog
        self._ready = True
        log.info(
            "data: %d file(s), %d cells, %d genes, %d perturbations, %d cell types; "
            "sets per epoch train %d, val %d",
            len(catalog.screens),
            catalog.n_cells,
            len(catalog.gene_names),
            len(catalog.pert_names),
            len(catalog.cell_types),
            self.train_plan.n_sets,
            self.val_plan.n_sets,
        )

    def _knockdown(self, catalog: CellCatalog) -> np.ndarray:
        """Each perturbation's target-gene column, and the training cells' knock-down ratio (its start)."""
        if self.embed_key is not None:
            raise UserError(
                "model.target_knockdown=true needs gene-space input and output (encoder=raw_expression); "
                f"this round reads obsm['{self.embed_key}']"
            )
        ratio, n = training_knockdown_ratio(catalog, self.seed)
        if ratio is None:
            raise UserError(
                "model.target_knockdown=true, but no training perturbation is named after a measured gene "
                f"(data.pert_col values vs the {len(catalog.gene_names)} var_names); set model.target_knockdown=false"
            )
        log.info("target knock-down path: ratio %.3f at the start (median over %d training groups)", ratio, n)
        self.knockdown_ratio = ratio
        return target_gene_index(catalog.pert_names, catalog.gene_names, catalog.control_pert)

    def _check_options(self) -> None:
        """The loader's options (the catalog checks the data options when it opens)."""
        c = self.cfg
        if c.basal_mapping == "batch" and not c.batch_col:
            raise UserError(
                "data.basal_mapping=batch needs data.batch_col; set it or use data.basal_mapping=random"
            )
        if self.cell_set_len < 1 or c.batch_size < 1:
            raise UserError(
                f"model.cell_set_len={self.cell_set_len}, data.batch_size={c.batch_size}: both must be >= 1; "
                "set positive values"
            )
        if c.num_workers < 0 or c.prefetch_factor < 1:
            raise UserError(
                f"data.num_workers={c.num_workers}, data.prefetch_factor={c.prefetch_factor}: need num_workers >= 0 "
                "and prefetch_factor >= 1; fix the values"
            )

    def _build_plans(self, catalog: CellCatalog) -> None:
        """Groups and control pools of the catalog's cells -> the train/val/test `SetPlan`s."""
        c = self.cfg
        by_batch = c.basal_mapping == "batch" and catalog.batch_of is not None
        groups, self.pools, bits = group_cells(
            catalog.file_of,
            catalog.cell_type_of,
            catalog.pert_of,
            catalog.batch_of if by_batch else None,
            catalog.split_bits,
            catalog.control_idx,
        )
        train, val, test = (groups.subset((bits & bit) > 0) for bit in (TRAIN, VAL, TEST))
        self._check_training_groups(train, catalog)
        common = dict(
            cell_set_len=self.cell_set_len,
            batch_size=c.batch_size,
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
        )
        self.train_plan = SetPlan(train, self.pools, train=True, stream=0, **common)
        self.val_plan = SetPlan(
            val, self.pools, train=False, sets_per_group=c.val_sets_per_group, stream=1, **common
        )
        self.test_plan = SetPlan(
            test, self.pools, train=False, sets_per_group=c.val_sets_per_group, stream=2, **common
        )

    def _pool_means(self, catalog: CellCatalog, chunk: int = 4096) -> np.ndarray:
        """float32 [n_pools, D_in]: the mean model input of each control pool's cells (data.recentre_basal),
        each distinct cell read once (a batch's pool shares its cells with its cell type's), in chunks of
        `chunk` rows (18,080 genes x 4,096 rows = 0.3 GB at a time)."""
        p = self.pools
        pools = [p.rows[a : a + n] for a, n in zip(p.start.tolist(), p.size.tolist(), strict=True)]
        return catalog.mean_inputs(pools, chunk).astype(np.float32)

    def _check_training_groups(self, train: Groups, catalog: CellCatalog) -> None:
        pert_train = train.pert != catalog.control_idx
        if not pert_train.any():
            raise UserError(
                "no perturbed cells left for training after the val/test split; hold out fewer perturbations"
            )
        biggest = int(np.argmax(np.where(pert_train, train.size, -1)))
        if self.cell_set_len > train.size[biggest]:
            raise UserError(
                f"model.cell_set_len={self.cell_set_len} is larger than every training group (largest: "
                f"{int(train.size[biggest])} cells, cell type '{catalog.cell_types[train.cell_type[biggest]]}', "
                f"perturbation '{catalog.pert_names[train.pert[biggest]]}'); lower model.cell_set_len to "
                f"<= {int(train.size[biggest])}"
            )

    def _check_memory(self, d: dict[str, int | None]) -> None:
        c = self.cfg
        per_cell = (
            d["input_dim"]
            + d["output_dim"]
            + (d["gene_dim"] if self.need_counts else 0)
            + (d["aux_dim"] or 0)
            + d["pert_dim"]
        )
        batch_bytes = c.batch_size * self.cell_set_len * per_cell * 4
        in_flight = (c.num_workers * c.prefetch_factor if c.num_workers > 0 else 0) + 2
        resident = in_flight * batch_bytes
        gib = 1 << 30
        log.info(
            "loader memory: %.3f GiB per batch x %d in flight = %.2f GiB (budget %.1f GiB)",
            batch_bytes / gib,
            in_flight,
            resident / gib,
            c.memory_budget_gb,
        )
        if resident > c.memory_budget_gb * gib:
            raise UserError(
                f"the loader would hold ~{resident / gib:.2f} GiB of batches ({in_flight} x {batch_bytes / gib:.3f} GiB: "
                f"{c.batch_size} sets x {self.cell_set_len} cells x {per_cell} floats/cell), over "
                f"data.memory_budget_gb={c.memory_budget_gb}; lower data.batch_size, model.cell_set_len, "
                "data.num_workers or data.prefetch_factor (or raise data.memory_budget_gb)"
            )

    # -- what the data is ---------------------------------------------------------------------------------

    def _need_setup(self) -> None:
        if not self._ready:
            raise RuntimeError("PerturbationDataModule.setup() has not been called")

    @property
    def catalog(self) -> CellCatalog:
        """The cells (labels, splits, row reads) the loaders sample from."""
        self._need_setup()
        assert self._catalog is not None
        return self._catalog

    @property
    def gene_names(self) -> list[str]:
        return self.catalog.gene_names

    @property
    def pert_names(self) -> list[str]:
        return self.catalog.pert_names

    @property
    def cell_types(self) -> list[str]:
        return self.catalog.cell_types

    def feature_ridge(self):
        """The baseline panel's feature ridge on this data's training groups and perturbation features (a
        model's feature prior): fitted on the group means of `CellCatalog.training_cells` with eval's defaults,
        as `eval` fits it, read one group at a time (`training_group_means`: the same fit, to the bit)."""
        from tahoe_ft.config import EvalConfig
        from tahoe_ft.evaluation.baselines import fit_feature_ridge_on_means

        cat = self.catalog
        means = cat.training_group_means(EvalConfig.max_train_cells_per_group, seed=0)
        features = {p: self.pert_matrix_np[i] for i, p in enumerate(cat.pert_names)}
        return fit_feature_ridge_on_means(means, cat.control_pert, features)

    @property
    def batches(self) -> list[str] | None:
        return self.catalog.batches

    @property
    def data_paths(self) -> list[str]:
        return self.catalog.data_paths

    @property
    def dims(self) -> dict[str, int | None]:
        return self._dims(self.catalog)

    def _dims(self, cat: CellCatalog) -> dict[str, int | None]:
        return {
            "input_dim": cat.input_dim,
            "output_dim": cat.input_dim,
            "pert_dim": int(self.pert_matrix_np.shape[1]),
            "gene_dim": len(cat.gene_names),
            "batch_dim": len(cat.batches) if cat.batches is not None else None,
            "aux_dim": cat.screens[0].obsm_dim(self.aux_key) if self.aux_key is not None else None,
            "target_knockdown": self.knockdown_ratio,
        }

    @property
    def pert_matrix(self) -> torch.Tensor:
        """float32 `[n_perts, P]`; row i is `pert_names[i]`."""
        return torch.from_numpy(self.pert_matrix_np)

    @property
    def splits(self) -> dict[str, list[str]]:
        """Perturbations (control excluded) with target cells in each split."""
        return self.catalog.splits

    def manifest(self) -> Manifest:
        """The data manifest of docs/design.md, with the held-out groups and each file's dataset name."""
        cat, c = self.catalog, self.cfg
        splits = cat.splits
        return Manifest(
            gene_names=list(cat.gene_names),
            encoder="se600m" if self.embed_key else "raw_expression",
            embed_key=self.embed_key,
            input_dim=cat.input_dim,
            pert_col=c.pert_col,
            control_pert=c.control_pert,
            cell_type_col=c.cell_type_col,
            batch_col=c.batch_col,
            pert_names=list(cat.pert_names),
            pert_features=dict(self.pert_features),
            pert_matrix=self.pert_matrix.clone(),
            cell_types=list(cat.cell_types),
            batches=list(cat.batches) if cat.batches is not None else None,
            input_transform=c.input_transform,
            cell_set_len=self.cell_set_len,
            splits={"val": splits["val"], "test": splits["test"]},
            data_paths=list(cat.data_paths),
            datasets=list(cat.datasets),
            held_out=cat.held_out(),
        )

    # -- loaders ------------------------------------------------------------------------------------------

    def _loader(self, plan: SetPlan) -> DataLoader:
        workers = int(self.cfg.num_workers)
        return DataLoader(
            self.dataset,
            batch_sampler=plan,
            collate_fn=identity_collate,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
            prefetch_factor=self.cfg.prefetch_factor if workers > 0 else None,
            worker_init_fn=worker_init if workers > 0 else None,
        )

    def train_dataloader(self) -> DataLoader:
        self._need_setup()
        if self._resume_at is not None:
            self.train_plan.resume_from(*self._resume_at)
            self._resume_at = None
        return self._loader(self.train_plan)

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Make the next training loader continue epoch `epoch` after its first `batches_done` batches."""
        self._resume_at = (int(epoch), int(batches_done))

    def val_dataloader(self) -> DataLoader:
        self._need_setup()
        return self._loader(self.val_plan)

    def test_dataloader(self) -> DataLoader:
        self._need_setup()
        return self._loader(self.test_plan)
