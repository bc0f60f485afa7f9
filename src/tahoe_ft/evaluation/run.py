"""Evaluate a run: `evaluate_run(EvalConfig) -> Score`, what `tahoe-ft eval` and `tahoe_ft.evaluate` do.

1. Which files: `pred=` and `real=` if given (the run directory: `run_dir=`, else the prediction's folder),
   else `pred.h5ad` / `real.h5ad` of `run_dir=` or of the newest run that holds a prediction (of `exp=`).
2. What predicted them: the run's `predict.json` (`runs.PredictRecord`): the checkpoint, the label columns
   and the seed. Without one (files from elsewhere) the labels are the VCC defaults and there are no
   training cells.
3. The training cells: the checkpoint's data manifest (`read_manifest`: its weights are not read) re-opens
   the training data (`CellCatalog.training_cells`).
4. `score_predictions` on the prediction, `score_panel` (the baseline panel and the ceiling) when there are
   training cells and `baselines=true`, and the diagnostics (collapse; the shuffle test when predict wrote
   `pred_shuffled.h5ad`); `<run>/eval/score.json` is written once, with all of it.

While it runs, the libraries' logs, warnings and progress bars go to `<run>/eval/eval.log`
(`evaluation.logs.capture`).
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tahoe_ft.errors import UserError
from tahoe_ft.evaluation.logs import capture, verbose
from tahoe_ft.evaluation.score import Score, score_predictions
from tahoe_ft.fileio import atomic_write_text

if TYPE_CHECKING:
    from tahoe_ft.config import EvalConfig
    from tahoe_ft.runs import PredictRecord

log = logging.getLogger(__name__)

LOG_FILE = "eval.log"  # in <run>/eval/
# labels of files that no predict.json describes (cell-eval's and the VCC's defaults)
DEFAULT_PERT_COL = "target_gene"
DEFAULT_CONTROL_PERT = "non-targeting"


@dataclasses.dataclass(frozen=True)
class RunFiles:
    """What one evaluation reads and where it writes: the prediction, the real cells, the run directory."""

    run_dir: Path
    pred: Path
    real: Path

    @property
    def eval_dir(self) -> Path:
        return self.run_dir / "eval"


def resolve_files(config: EvalConfig) -> RunFiles:
    """The prediction, the real cells and the run directory of `config` (both files must exist)."""
    if config.pred or config.real:
        if not (config.pred and config.real):
            raise UserError("give both pred=<pred.h5ad> and real=<real.h5ad>, or neither (latest prediction)")
        pred, real = Path(config.pred), Path(config.real)
        run_dir = Path(config.run_dir) if config.run_dir else pred.parent
    else:
        if config.run_dir:
            run_dir = Path(config.run_dir)
        else:
            from tahoe_ft.prediction import newest_training_run

            run_dir = newest_training_run(config.runs_dir, config.exp, need="pred.h5ad")
        pred, real = run_dir / "pred.h5ad", run_dir / "real.h5ad"
    for p in (pred, real):
        if not p.is_file():
            raise UserError(f"{p} not found; run tahoe-ft predict first (or pass pred= and real=)")
    return RunFiles(Path(run_dir), pred, real)


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    """The data manifest of a checkpoint (None if it has none), without reading its weights.

    A tahoe-ft checkpoint is torch's zip format: `torch.load(mmap=True, weights_only=True)` unpickles the
    dict and maps the tensor storages without reading them; only the manifest's own tensors (`pert_matrix`)
    are copied out, the mapping is dropped with the rest. Anything that does not load that way (an upstream
    Lightning checkpoint with OmegaConf objects, a legacy or broken file) goes through the full, checked
    `checkpoints.io.safe_load`, as before.
    """
    import torch

    from tahoe_ft.checkpoints.io import safe_load

    path = Path(path)
    if not path.is_file():
        return safe_load(path).get("manifest")  # its "checkpoint not found" error
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, OSError, EOFError):
        obj = safe_load(path)
    if not isinstance(obj, dict):
        return safe_load(path).get("manifest")  # its "not a checkpoint dict" error
    manifest = obj.get("manifest")
    return None if manifest is None else _owned(manifest)


def _owned(x: Any) -> Any:
    """`x` with every tensor copied into memory (off the checkpoint's mapping)."""
    import torch

    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, dict):
        return {k: _owned(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(_owned(v) for v in x)
    return x


def evaluate_run(config: EvalConfig) -> Score:
    """Score a run's prediction with cell-eval, beside the baseline panel and the data ceiling; write
    `<run>/eval/` (score.json, eval.log, the panel under `eval/baselines/`) and return the `Score`.

    Without the run's checkpoint (predict.json names it) there are no training cells: the cell-mean baseline
    then comes from the cache and the panel is left out.
    """
    files = resolve_files(config)
    record = _predict_record(files.run_dir)
    files.eval_dir.mkdir(parents=True, exist_ok=True)
    (files.eval_dir / LOG_FILE).unlink(missing_ok=True)  # the log of this evaluation only
    # verbose: prints and progress bars stay on the console (the records reach the log file either way)
    with capture(files.eval_dir / LOG_FILE, console=verbose(config.verbose)):
        score = _evaluate(config, files, record)
    path = files.eval_dir / "score.json"
    atomic_write_text(path, score.to_json())
    log.info(
        "score %s: avg_score %.4f (leaderboard %.2f) -> %s",
        files.run_dir,
        score.avg_score,
        score.leaderboard_score,
        path,
    )
    return score


def _predict_record(run_dir: Path) -> PredictRecord | None:
    from tahoe_ft.runs import PredictRecord

    return PredictRecord.read(run_dir)


def _evaluate(config: EvalConfig, files: RunFiles, record: PredictRecord | None) -> Score:
    from tahoe_ft.data import CellCatalog
    from tahoe_ft.evaluation.baselines import PanelSettings
    from tahoe_ft.evaluation.panel import score_panel

    train = None
    manifest = read_manifest(record.checkpoint) if record is not None and record.checkpoint else None
    if manifest:
        train = CellCatalog.from_manifest(manifest).training_cells(config.max_train_cells_per_group, seed=0)
    labels = {
        "pert_col": record.pert_col if record is not None else DEFAULT_PERT_COL,
        "control_pert": record.control_pert if record is not None else DEFAULT_CONTROL_PERT,
    }
    celltype_col = record.cell_type_col if record is not None and config.per_cell_type else None
    common = dict(
        profile=config.profile,
        num_threads=config.num_threads,
        celltype_col=celltype_col,
        de_cache_dir=Path(config.runs_dir) / ".de_cache",
    )
    score = score_predictions(
        files.pred, files.real, train, files.eval_dir, **labels, **common, write_score=False
    )
    if config.baselines and train is not None:
        import anndata as ad

        panel = score_panel(
            train,
            ad.read_h5ad(files.real),
            files.eval_dir,
            **labels,
            **common,
            settings=PanelSettings(
                linear_k=config.linear_k,
                linear_ridge=config.linear_ridge,
                seed=record.seed if record is not None else 0,
                # the baselines' basal cells re-centred as the round's were (predict's recentre_basal)
                recentre_basal=record.recentre_basal if record is not None else config.recentre_basal,
            ),
            features=pert_features(manifest),
        )
        score = dataclasses.replace(score, baselines=panel["baselines"], baseline_notes=panel["notes"])
    return dataclasses.replace(score, diagnostics=diagnostics(score, files, train, labels, common))


def pert_features(manifest: dict[str, Any] | None) -> dict[str, np.ndarray] | None:
    """The round's perturbation features by name (the manifest's `pert_matrix` rows): the feature ridge's
    inputs, exactly what the model was given."""
    if not manifest:
        return None
    matrix = np.asarray(manifest["pert_matrix"], dtype=np.float64)
    return {str(p): matrix[i] for i, p in enumerate(manifest["pert_names"])}


def diagnostics(score: Score, files: RunFiles, train, labels: dict, common: dict) -> dict[str, Any]:
    """Collapse of the predicted effects, and the shuffle test when predict wrote pred_shuffled.h5ad."""
    import anndata as ad

    from tahoe_ft.evaluation.diagnostics import collapse

    out: dict[str, Any] = {
        "collapse": collapse(
            ad.read_h5ad(files.pred), ad.read_h5ad(files.real), celltype_col=common["celltype_col"], **labels
        )
    }
    shuffled = files.pred.with_name("pred_shuffled.h5ad")
    if shuffled.is_file():
        s = score_predictions(shuffled, files.real, train, files.eval_dir / "shuffled", **labels, **common)
        out["shuffle"] = {
            "avg_score": s.avg_score,
            "metrics": s.to_dict()["metrics"],
            "drop": score.avg_score - s.avg_score,
            "note": "the same basal cells, each held-out perturbation predicted with another's features",
        }
    return out
