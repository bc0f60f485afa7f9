"""What a prediction will do, decided before any cell is read: `build_plan` -> `PredictionPlan`.

The plan holds the data settings (the manifest, resolved from the checkpoint or its upstream run folder), the
cell catalog, the held-out groups in prediction order, every random draw (basal cells group by group, then the
real control cells) in the order predict has always made them, the obs/var of the output files, the
derangement for the shuffle test, and the sets cut into blocks. Row numbers only: the cells are read by
`tahoe_ft.prediction.stream`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch

from tahoe_ft.checkpoints.io import LoadedCheckpoint
from tahoe_ft.data import CellCatalog, GroupKey, Manifest
from tahoe_ft.data.features import target_gene_index
from tahoe_ft.errors import UserError
from tahoe_ft.evaluation.diagnostics import derangement
from tahoe_ft.prediction.forward import PRECISIONS, decodes, device_of
from tahoe_ft.runs import PredictRecord

# cells read, predicted and written per block (basal cells of several sets in one read; real and control
# cells copied this many rows at a time): ~37 MiB per [block, 18,080] float32 matrix, whatever the screen size
BLOCK_CELLS = 512
SPLITS = ("test", "val")


class PlannedSet(NamedTuple):
    """One predicted set: its first row in pred.h5ad, its basal rows, its perturbation (and the shuffle's),
    and its group (an index into `PredictionPlan.groups`)."""

    out_row: int
    basal: np.ndarray
    pert: int
    shuffled_pert: int
    group: int


@dataclass
class PredictionPlan:
    """Everything `predict` decided before reading a cell (see the module docstring)."""

    checkpoint: Path  # as given (a file, or an upstream run folder): recorded in the h5ad files' uns
    out_dir: Path
    manifest: Manifest
    catalog: CellCatalog
    split: str
    seed: int
    groups: list[GroupKey]  # held-out groups, by cell type, perturbation, dataset
    basal_rows: list[np.ndarray]  # per group: its basal control rows, in the order they form sets
    real_rows: np.ndarray  # the groups' observed cells, group after group
    ctrl_rows: np.ndarray  # the real control cells written into every file
    obs: pd.DataFrame  # predicted cells, then control cells
    var: pd.DataFrame
    shuffle: dict[
        str, str
    ]  # perturbation -> whose features predict it in pred_shuffled.h5ad ({}: no shuffle)
    set_len: int
    sets_per_pass: int
    precision: str
    block_cells: int
    batches: list[list[PlannedSet]]  # blocks of sets of one length, in prediction order
    pert_matrix: torch.Tensor  # [n_perts, P]
    pert_target: torch.Tensor | None  # per perturbation its target-gene column (knock-down models)
    batch_of: np.ndarray | None  # per cell its training batch index (models with a batch encoder)
    # per group its cell type's index in the manifest's cell_types (-1: unseen), for a model with a feature prior
    cell_type_index: torch.Tensor | None = None
    recentre_basal: bool = False
    # per group, added to each of its basal cells (input space) so that their mean is the cell type's control
    # mean: `basal_shifts` (reads cells), filled in before streaming when `recentre_basal`; None: raw draws
    basal_shift: np.ndarray | None = None  # [n_groups, D_in] float32

    @property
    def n_pred(self) -> int:
        return int(self.real_rows.size)

    @property
    def rows_per_pass(self) -> int:
        """Cells in one full forward pass (what bf16's prepacked weights are laid out for)."""
        return self.sets_per_pass * self.set_len

    @property
    def source(self) -> dict[str, str]:
        """What pred.h5ad and real.h5ad record of their source in `uns["tahoe_ft"]`."""
        return {"checkpoint": str(self.checkpoint), "split": self.split}

    def record(self, loaded: LoadedCheckpoint) -> PredictRecord:
        m = self.manifest
        return PredictRecord(
            checkpoint=str(Path(loaded.checkpoint_path).resolve()),
            checkpoint_step=loaded.step,
            split=self.split,
            n_groups=len(self.groups),
            n_pred_cells=self.n_pred,
            n_control_cells=int(self.ctrl_rows.size),
            n_genes=len(m.gene_names),
            pert_col=m.pert_col,
            control_pert=m.control_pert,
            cell_type_col=m.cell_type_col,
            data_paths=list(self.catalog.data_paths),
            seed=self.seed,
            shuffle=self.shuffle,
            recentre_basal=self.recentre_basal,
        )


def check_arguments(config: Any) -> torch.device:
    """The arguments of a PredictConfig that need no file, checked before anything is loaded or drawn;
    returns the device."""
    if int(config.sets_per_pass) < 1:
        raise UserError(f"sets_per_pass={config.sets_per_pass} must be >= 1")
    if str(config.precision) not in PRECISIONS:
        raise UserError(
            f"precision={str(config.precision)!r} is not valid; use one of {', '.join(PRECISIONS)}"
        )
    if str(config.split) not in SPLITS:
        raise UserError(f"split={str(config.split)!r} is not valid; use one of {', '.join(SPLITS)}")
    if int(config.max_controls) < 0:
        raise UserError(f"max_controls={config.max_controls} must be >= 0")
    try:
        return device_of(str(config.device))
    except RuntimeError:
        raise UserError(
            f"device={config.device!r} is not a torch device; use auto, cpu or cuda[:N]"
        ) from None


def draw_basal(rng: np.random.Generator, pool: np.ndarray, n: int) -> np.ndarray:
    """`n` basal control rows in the order they form sets: random draws of the pool (without replacement
    when it is large enough), never re-sorted, so a file stored by replicate (or batch) does not give sets
    of one replicate each, unlike training sets."""
    return rng.choice(pool, size=n, replace=n > pool.size)


def _prediction_order(keys: Iterable[GroupKey]) -> list[GroupKey]:
    # by cell type, perturbation, then dataset: the order predict has always drawn basal cells in, so a seed
    # draws the same cells (a dataset-first order would change the draws of multi-dataset runs)
    return sorted(keys, key=lambda k: (k.cell_type, k.pert, k.dataset))


def _manifest_of(loaded: LoadedCheckpoint, ckpt: Path, config: Any) -> Manifest:
    """The checkpoint's data manifest, or an upstream run folder's vocabulary and split as one."""
    if loaded.manifest:
        return Manifest.from_dict(loaded.manifest)
    if loaded.run_folder is not None:
        return loaded.run_folder.manifest(
            loaded.model.hparams,
            data_paths=config.data_path,
            split_toml=config.split_toml,
            decoded=decodes(loaded.model),
        )
    raise UserError(
        f"{ckpt} has no data manifest; predict needs a tahoe-ft checkpoint or an upstream run folder"
    )


def _training_batches(model, m: Manifest, catalog: CellCatalog) -> np.ndarray | None:
    """For a model with a batch encoder: every cell's batch as the index the model trained with (the
    manifest's `batches`), int64 `[n_cells]`; the basal cells carry their own batch into the prediction."""
    if getattr(model, "batch_encoder", None) is None:
        return None
    if catalog.batch_of is None or not m.batches:
        raise UserError(
            "this model has a batch encoder, but the checkpoint's manifest names no batch column; "
            "predict needs each basal cell's batch (train with data.batch_col set)"
        )
    index = {b: i for i, b in enumerate(m.batches)}
    unseen = [b for b in catalog.batches or [] if b not in index]
    if unseen:
        raise UserError(
            f"batches {unseen[:5]} of the cells to predict were not in training ({len(m.batches)} batches); "
            "the batch encoder has no embedding for them: predict from a file with the training batches"
        )
    lut = np.array([index[b] for b in catalog.batches or []], dtype=np.int64)
    return lut[catalog.batch_of]


def _controls(
    rng: np.random.Generator, catalog: CellCatalog, groups: list[GroupKey], max_controls: int, control: str
) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """The same real control cells for both files (cell-eval computes deltas against each file's controls):
    up to `max_controls` per (cell type, dataset), sorted, and their labels."""
    ctrl_rows, ctrl_labels = [], []
    for ct, ds in sorted({(k.cell_type, k.dataset) for k in groups}):
        pool = catalog.controls(ds, ct)
        pick = np.sort(rng.choice(pool, size=min(pool.size, max_controls), replace=False))
        ctrl_rows.append(pick)
        ctrl_labels += [(control, ct)] * pick.size
    return np.concatenate(ctrl_rows), ctrl_labels


def _frames(m: Manifest, labels: list[tuple[str, str]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """obs (perturbation and cell-type columns, categorical) and var (the evaluator's genes) of every file."""
    var = pd.DataFrame(index=pd.Index(m.gene_names, name=None))
    obs = pd.DataFrame(labels, columns=[m.pert_col, m.cell_type_col])
    obs.index = [f"cell{i}" for i in range(len(obs))]
    for col in obs.columns:
        obs[col] = obs[col].astype("category")
    return obs, var


def _sets(basal_rows: list[np.ndarray], perts: list[int], shuffled: list[int], s: int) -> list[PlannedSet]:
    """Each group's basal draws cut into sets of <= s cells in draw order, at their rows of the output."""
    out, row = [], 0
    for g, (rows, p, q) in enumerate(zip(basal_rows, perts, shuffled, strict=True)):
        for a in range(0, rows.size, s):
            out.append(PlannedSet(row + a, rows[a : a + s], p, q, g))
        row += rows.size
    return out


def _batches(sets: list[PlannedSet], max_sets: int) -> Iterator[list[PlannedSet]]:
    """Blocks of at most `max_sets` sets of equal length: the full-length sets of every group together, then
    each shorter length (group tails) together."""
    by_len: dict[int, list[PlannedSet]] = {}
    for st in sets:
        by_len.setdefault(st.basal.size, []).append(st)
    for n in sorted(by_len, reverse=True):
        same = by_len[n]
        for a in range(0, len(same), max_sets):
            yield same[a : a + max_sets]


def build_plan(
    loaded: LoadedCheckpoint, ckpt: str | os.PathLike, out_dir: Path, config: Any
) -> PredictionPlan:
    """The plan of predicting `config.split` with `loaded` (read from `ckpt`) into `out_dir`: opens the data
    (`CellCatalog.from_manifest`, writing nothing) and makes every draw, in the order predict has always
    made them (basal cells group by group, then the control cells), so a seed gives the same files."""
    model, ckpt, split = loaded.model, Path(ckpt), str(config.split)
    m = _manifest_of(loaded, ckpt, config)
    catalog = CellCatalog.from_manifest(m, data_paths=config.data_path)
    cells = catalog.groups(split)
    groups = _prediction_order(cells)
    if not groups:
        other = next(sp for sp in SPLITS if sp != split)
        fix = (
            f"predict split={other} (its {len(catalog.groups(other))} held-out groups)"
            if catalog.groups(other)
            else "train a round that holds perturbations out (data.val_perts, data.test_perts or data.split_toml)"
        )
        raise UserError(f"the checkpoint's manifest holds no '{split}' perturbations out to predict; {fix}")
    pert_index = {p: i for i, p in enumerate(m.pert_names)}
    for key in groups:
        if key.pert not in pert_index:
            raise UserError(
                f"perturbation '{key.pert}' is not in the checkpoint's manifest; it cannot be predicted"
            )
    rng = np.random.default_rng(config.seed)
    basal_rows = [draw_basal(rng, catalog.controls(k.dataset, k.cell_type), cells[k].size) for k in groups]
    real_rows = np.concatenate([cells[k] for k in groups])
    labels = [(k.pert, k.cell_type) for k in groups for _ in range(cells[k].size)]
    ctrl, ctrl_labels = _controls(rng, catalog, groups, config.max_controls, m.control_pert)
    derange = derangement(sorted({k.pert for k in groups})) if config.shuffle else {}
    obs, var = _frames(m, labels + ctrl_labels)
    s = int(model.hparams["cell_set_len"])
    perts = [pert_index[k.pert] for k in groups]
    shuffled = [pert_index[derange.get(k.pert, k.pert)] for k in groups]
    # sets per block: BLOCK_CELLS cells, or one pass's worth when that is more
    block_sets = max(1, BLOCK_CELLS // s, config.sets_per_pass)
    return PredictionPlan(
        checkpoint=ckpt,
        out_dir=Path(out_dir),
        manifest=m,
        catalog=catalog,
        split=split,
        seed=config.seed,
        groups=groups,
        basal_rows=basal_rows,
        real_rows=real_rows,
        ctrl_rows=ctrl,
        obs=obs,
        var=var,
        shuffle=derange,
        set_len=s,
        sets_per_pass=int(config.sets_per_pass),
        precision=str(config.precision),
        block_cells=BLOCK_CELLS,
        batches=list(_batches(_sets(basal_rows, perts, shuffled, s), block_sets)),
        pert_matrix=torch.as_tensor(m.pert_matrix),
        # the knock-down path's target gene follows the perturbation (the shuffle swaps it with the features)
        pert_target=(
            torch.from_numpy(target_gene_index(m.pert_names, m.gene_names, m.control_pert))
            if getattr(model, "target_knockdown", None) is not None
            else None
        ),
        batch_of=_training_batches(model, m, catalog),  # None without a batch encoder
        cell_type_index=_cell_type_index(model, m, groups),
        recentre_basal=bool(config.recentre_basal),
    )


def _cell_type_index(model, m: Manifest, groups: list[GroupKey]) -> torch.Tensor | None:
    if getattr(model, "feature_prior", None) is None:
        return None
    index = {ct: i for i, ct in enumerate(m.cell_types)}
    return torch.tensor([index.get(k.cell_type, -1) for k in groups], dtype=torch.int64)


def basal_shifts(plan: PredictionPlan) -> np.ndarray:
    """Per held-out group, what moves the mean of its basal draws onto the mean of its (dataset, cell type)'s
    control cells in the output files (up to `max_controls` of them; cell-eval takes deltas against these):
    `control mean - draws' mean`, [n_groups, D_in] float32. Each cell keeps its deviation from the draws'
    mean, so the predicted set keeps its cell-to-cell variation and its pseudobulk loses the sampling noise of
    the draw. The draws of a cell type repeat its control cells, so each distinct control cell of a cell type
    is read once for all of its groups (at 60,000 predicted cells: a tenth of the rows a read per draw took)."""
    by_pool: dict[tuple[str, str], list[int]] = {}
    for g, key in enumerate(plan.groups):
        by_pool.setdefault((key.dataset, key.cell_type), []).append(g)
    shifts = np.empty((len(plan.groups), plan.catalog.input_dim), dtype=np.float32)
    for pool, gs in by_pool.items():
        # the control cells written into the files: what cell-eval takes deltas against
        written = np.intersect1d(plan.ctrl_rows, plan.catalog.controls(*pool))
        means = plan.catalog.mean_inputs([written] + [plan.basal_rows[g] for g in gs], plan.block_cells)
        shifts[gs] = means[0] - means[1:]
    return shifts
