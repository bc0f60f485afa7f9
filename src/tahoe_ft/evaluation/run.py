"""Evaluate a run: `evaluate_run(EvalConfig) -> Score`, what `tahoe-ft eval` and `tahoe_ft.evaluate` do.

1. Which files: `pred=` and `real=` if given (the run directory: `run_dir=`, else the prediction's folder),
   else `pred.h5ad` / `real.h5ad` of `run_dir=` or of the newest run that holds a prediction (of `exp=`).
2. What predicted them: the run's `predict.json` (`runs.PredictRecord`): the checkpoint, the label columns
   and the seed. The keys `pert_col=`, `control_pert=`, `cell_type_col=` win over it; without either (files
   from elsewhere) the labels are the VCC defaults (`target_gene`, `non-targeting`, no cell-type column).
3. The training cells: `train=<h5ad>` (files from anywhere: training perturbations and controls, or with
   `split_toml=` the whole screen minus the TOML's val/test perturbations; `read_training_cells`), else the
   checkpoint's data manifest (`read_manifest`: its weights are not read) re-opens the training data
   (`CellCatalog.training_cells`). Either way at most `max_train_cells_per_group` cells per group, drawn alike.
4. `score_predictions` on the prediction, `score_panel` (the baseline panel and the ceiling; `feature_ridge`
   from `features=` or the checkpoint's features) when there are training cells and `baselines=true`, and the
   diagnostics (collapse; the shuffle test when predict wrote `pred_shuffled.h5ad`); `<run>/eval/score.json`
   is written once, with all of it.

Every input that only needs obs and var (labels, columns, the training cells and their leak check, the
features) is checked before `<run>/eval/` is touched: a bad input is one line naming the key to fix, and
writes nothing. While it runs, the libraries' logs, warnings and progress bars go to `<run>/eval/eval.log`
(`evaluation.logs.capture`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tahoe_ft.data.labels import DEFAULT_CONTROL_PERT, DEFAULT_PERT_COL, ScreenLabels
from tahoe_ft.errors import UserError
from tahoe_ft.evaluation.inputs import preview
from tahoe_ft.evaluation.logs import capture, verbose
from tahoe_ft.evaluation.score import Score, score_predictions
from tahoe_ft.fileio import atomic_write_text

if TYPE_CHECKING:
    import anndata as ad

    from tahoe_ft.config import EvalConfig
    from tahoe_ft.data.h5screen import H5Screen
    from tahoe_ft.runs import PredictRecord

log = logging.getLogger(__name__)

LOG_FILE = "eval.log"  # in <run>/eval/
STAGE_PREFIX = ".staging-"  # in <run>/eval/: an evaluation's tables until it is done
WRITTEN = ".written.json"  # in <run>/eval/: the files the last evaluation wrote (what the next may replace)


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
        for key, p in (("pred", pred), ("real", real)):
            if not p.is_file():
                raise UserError(f"{key}={p} not found; pass the path of an .h5ad file")
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


def resolve_labels(config: EvalConfig, record: PredictRecord | None) -> ScreenLabels:
    """Each label: the config's key if set (it wins over predict.json), else predict.json's, else the
    default (`target_gene`, `non-targeting`, no cell-type column)."""
    out = {}
    for key, default in (
        ("pert_col", DEFAULT_PERT_COL),
        ("control_pert", DEFAULT_CONTROL_PERT),
        ("cell_type_col", None),
    ):
        given = getattr(config, key)
        recorded = getattr(record, key) if record is not None else None
        if given is not None and recorded is not None and given != recorded:
            log.info("%s=%s given; predict.json says %r (the given value is used)", key, given, recorded)
        out[key] = given if given is not None else recorded if recorded is not None else default
    return ScreenLabels(**out)


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

    The training cells come from `train=` (files from anywhere) or the run's checkpoint (predict.json names
    it); without either the cell-mean baseline comes from the cache and the panel is left out.
    """
    files = resolve_files(config)
    record = _predict_record(files.run_dir)
    prepared = prepare(config, files, record)  # every bad input is reported here, before eval/ is touched
    side = training_side(config, record, prepared)  # the training cells: read, checked; nothing written
    if side.train is None:
        check_cached_baseline(config, files, prepared)
    if config.vcc2026:
        from tahoe_ft.evaluation.vcc2026 import require

        require()  # the VCC 2026 scorer installed (one line if not), before eval/ is touched
    files.eval_dir.mkdir(parents=True, exist_ok=True)
    # the tables are made in a staging folder and moved into eval/ only when the whole evaluation is done:
    # a failure leaves the earlier evaluation's files as they were (and no half-written table)
    stage = Path(tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=files.eval_dir))
    try:
        # the log is appended to (an earlier evaluation's log stays); verbose: prints and progress bars stay on
        # the console (the records reach the log file either way)
        with capture(
            files.eval_dir / LOG_FILE, console=verbose(config.verbose), staged=(stage, files.eval_dir)
        ):
            log.info("evaluating %s against %s", files.pred, files.real)
            score = _evaluate(config, files, record, prepared, side, stage)
        atomic_write_text(stage / "score.json", score.to_json())
        _commit(stage, files.eval_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    path = files.eval_dir / "score.json"
    log.info(
        "score %s: avg_score %.4f (leaderboard %.2f) -> %s",
        files.run_dir,
        score.avg_score,
        score.leaderboard_score,
        path,
    )
    return score


def _commit(stage: Path, eval_dir: Path) -> None:
    """Move the finished evaluation's files from `stage` into `eval_dir`, each renamed into place whole,
    score.json last; then remove the files the previous evaluation wrote (its list, `WRITTEN`) that this one
    did not write again, so every table in eval/ belongs to its score.json. A file eval/ holds that no
    evaluation wrote (the user's own, beside a `pred=` from elsewhere) is never touched."""
    new = sorted(p.relative_to(stage) for p in stage.rglob("*") if p.is_file() or p.is_symlink())
    for rel in sorted(new, key=lambda r: r.as_posix() == "score.json"):
        (eval_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(stage / rel, eval_dir / rel)
    written = {r.as_posix() for r in new}
    try:
        before = set(json.loads((eval_dir / WRITTEN).read_text()))
    except (OSError, ValueError, TypeError):
        before = set()
    for rel in sorted(before - written, reverse=True):
        path = eval_dir / rel
        if ".." in Path(rel).parts or not path.is_file():
            continue
        path.unlink()
        for folder in path.relative_to(eval_dir).parents:  # the folders it leaves empty
            d = eval_dir / folder
            if d != eval_dir and d.is_dir() and not any(d.iterdir()):
                d.rmdir()
    atomic_write_text(eval_dir / WRITTEN, json.dumps(sorted(written)))


@dataclasses.dataclass
class TrainingSide:
    """The training cells an evaluation scores the baselines with (None: none given, none recorded), what
    they are, the checkpoint's manifest (None: no checkpoint) and the perturbation features."""

    train: ad.AnnData | None
    note: str | None
    manifest: dict[str, Any] | None
    features: dict[str, np.ndarray] | None


def training_side(config: EvalConfig, record: PredictRecord | None, prepared: Prepared) -> TrainingSide:
    """`train=`'s cells, else the checkpoint's (its manifest re-opens its training data), and the features;
    every way this can fail is one line naming a key of eval, before anything is written."""
    from tahoe_ft.data import CellCatalog

    train, note = prepared.train, prepared.train_note
    ckpt = record.checkpoint if record is not None and record.checkpoint else None
    manifest = read_manifest(ckpt) if ckpt else None
    if train is None and manifest:
        for p in manifest.get("data_paths") or []:
            if not Path(os.path.expanduser(str(p))).is_file():
                raise UserError(
                    f"the checkpoint {ckpt} trained on {p}, which is not found here, so its training cells "
                    "cannot be read for the baselines; pass train=<the training cells' .h5ad> (or the whole "
                    "screen with split_toml=<its split TOML>), or baselines=false"
                )
        try:
            cat = CellCatalog.from_manifest(manifest)
        except UserError as exc:  # its advice is predict's (data_path=): eval's is train=
            what = str(exc).split("; ")[0]
            raise UserError(
                f"the training cells of the checkpoint {ckpt} cannot be read ({what}); pass train=<the "
                "training cells' .h5ad> (or the whole screen with split_toml=<its split TOML>)"
            ) from None
        train = _relabelled(
            cat.training_cells(config.max_train_cells_per_group, seed=0), cat, prepared.labels
        )
        note = f"the training cells of the checkpoint {ckpt}"
    features = prepared.features if prepared.features is not None else pert_features(manifest)
    if prepared.features is not None and train is not None and prepared.train is None:
        lacking = set(train.obs[prepared.labels.pert_col].astype(str)) - {prepared.labels.control_pert}
        lacking -= set(prepared.features)
        if lacking:
            raise UserError(
                f"features={config.features} has no vector for {len(lacking)} training perturbations of the "
                f"checkpoint {preview(lacking)}; add them, or leave features= unset (the checkpoint's features)"
            )
    return TrainingSide(train, note, manifest, features)


def check_cached_baseline(config: EvalConfig, files: RunFiles, prepared: Prepared) -> None:
    """Without training cells the cell-mean baseline (what the score is normalised against) must be in the
    cache for this real file (each scored cell type): checked before anything is computed or written."""
    from tahoe_ft.data.h5screen import H5Screen
    from tahoe_ft.evaluation.de_cache import DECache
    from tahoe_ft.evaluation.score import versions
    from tahoe_ft.fileio import sha256_file

    cache = DECache(Path(config.runs_dir) / ".de_cache")
    cts: list[str | None] = [None]
    if prepared.celltype_col:
        real = H5Screen(files.real)
        cts = sorted(set(_labels_of(real, "real", "cell_type_col", prepared.celltype_col).tolist()))
        real.close()
    sha, v = sha256_file(files.real), versions()
    labels = prepared.labels
    for ct in cts:
        key = cache.real_key(
            sha, versions=v, pert_col=labels.pert_col, control_pert=labels.control_pert, celltype=ct
        )
        if cache.newest_baseline(key, config.profile) is None:
            raise UserError(
                f"no training cells for the cell-mean baseline that the score is normalised against: no "
                f"predict.json names a checkpoint beside pred ({files.pred}), no train= is given, and "
                f"{cache.root} holds no baseline of real ({files.real}"
                + (f", cell type {ct!r}" if ct else "")
                + "); pass train=<the training cells' .h5ad, controls included> (or the whole screen with "
                "split_toml=<its split TOML>)"
            )


def _predict_record(run_dir: Path) -> PredictRecord | None:
    from tahoe_ft.runs import PredictRecord

    return PredictRecord.read(run_dir)


@dataclasses.dataclass
class Prepared:
    """The checked inputs of one evaluation besides the two files: labels, the cell-type column it scores
    by, and the training cells and features given by key (None: the checkpoint's, if any)."""

    labels: ScreenLabels
    celltype_col: str | None
    train: ad.AnnData | None
    features: dict[str, np.ndarray] | None
    train_note: str | None


def prepare(config: EvalConfig, files: RunFiles, record: PredictRecord | None) -> Prepared:
    """The labels resolved; pred's and real's obs checked against them; `train=` read and checked (genes,
    columns, controls, no held-out group of real in it); `features=` read and checked. Writes nothing."""
    labels = resolve_labels(config, record)
    celltype_col = labels.cell_type_col if config.per_cell_type else None
    real = _obs_file(files.real, "real", labels, celltype_col)
    pred = _obs_file(files.pred, "pred", labels, celltype_col)
    real_groups = _real_groups(real, labels, celltype_col, pred)
    _check_pair(pred, real, labels)
    genes = [str(g) for g in real.var_names]
    pred.close()
    real.close()
    if config.split_toml and not config.train:
        raise UserError(
            f"split_toml={config.split_toml} is given without train=; pass train=<the whole screen> "
            "(its cells minus the TOML's val/test perturbations are the training cells)"
        )
    train, note = None, None
    if config.train:
        train, note = read_training_cells(
            config.train,
            labels=labels,
            celltype_col=celltype_col,
            genes=genes,
            held_out=real_groups,
            split_toml=config.split_toml,
            max_per_group=config.max_train_cells_per_group,
        )
    features = None
    if config.features:
        has_checkpoint = record is not None and bool(record.checkpoint)
        if train is None and not has_checkpoint:
            raise UserError(
                f"features={config.features} feeds the baseline panel's feature_ridge, which needs training "
                "cells: pass train=<h5ad> too"
            )
        need = {p for _, p in real_groups}
        if train is not None:
            need |= set(train.obs[labels.pert_col].astype(str))
        features = read_features(config.features, need - {labels.control_pert})
    return Prepared(labels, celltype_col, train, features, note)


def _obs_file(path: Path, name: str, labels: ScreenLabels, celltype_col: str | None) -> H5Screen:
    """`path` opened for its obs and var, its label columns and X's values checked (in blocks, as the data
    checks do: all of X when small, else an even sample of rows; `score_predictions` checks every value)."""
    from tahoe_ft.data.checks import FULL_CHECK_ELEMENTS, VALIDATE_ROWS
    from tahoe_ft.data.h5screen import H5Screen
    from tahoe_ft.evaluation.inputs import one_line

    try:
        screen = H5Screen(path)
        stats = screen.scan(want_libsize=False) if screen.x_elements() <= FULL_CHECK_ELEMENTS else None
        stats = stats or screen.sample_stats(VALIDATE_ROWS)
    except (OSError, KeyError, ValueError, UserError) as exc:
        raise UserError(
            f"{name} file {path} is not a readable AnnData .h5ad ({type(exc).__name__}: {one_line(exc, 120)}); "
            "write it with AnnData.write_h5ad"
        ) from None
    cols = [("pert_col", labels.pert_col)] + ([("cell_type_col", celltype_col)] if celltype_col else [])
    for key, col in cols:
        if not screen.has_obs(col):
            raise UserError(
                f"{key}={col} is not an obs column of {name} ({path}); its columns are "
                f"{preview(screen.obs_columns(), 12)}; pass {key}=<the column>"
            )
    where = f"{name} ({path})"
    if stats.nonfinite_row is not None:
        raise UserError(
            f"{where} has NaN or infinite values in X (row {stats.nonfinite_row}); fix the model output or the "
            "file (NaN is never silently replaced by 0 here)"
        )
    if stats.negative_row is not None and name != "pred":  # negative predictions are clipped to 0
        raise UserError(
            f"{where} has negative values in X (min {stats.negative_min:.3g}); X must be log1p-normalised "
            "expression (>= 0), not scaled/centred data"
        )
    if stats.n and stats.all_integral:
        raise UserError(
            f"{where} has integer-valued X (raw counts?), but evaluation expects log1p values: normalise it like "
            "the real data (normalize_total(target_sum=1e4) then log1p) before evaluating"
        )
    if stats.max >= 15.0:
        raise UserError(
            f"{where} has values up to {stats.max:.4g} in X, above the log1p range [0, 15); normalise to a fixed "
            "total and apply log1p (scanpy: normalize_total(target_sum=1e4) then log1p)"
        )
    return screen


def _check_pair(pred: H5Screen, real: H5Screen, labels: ScreenLabels) -> None:
    """cell-eval's contract on pred and real (genes in order, the same perturbations, the control in both),
    checked on their obs and var only (`evaluation.inputs.check_pair`'s messages)."""
    import anndata as ad
    import pandas as pd

    from tahoe_ft.evaluation.inputs import check_pair

    def light(screen: H5Screen, name: str) -> ad.AnnData:
        perts = _labels_of(screen, name, "pert_col", labels.pert_col)
        obs = pd.DataFrame({labels.pert_col: perts}, index=[str(i) for i in range(len(perts))])
        return ad.AnnData(obs=obs, var=pd.DataFrame(index=[str(g) for g in screen.var_names]))

    check_pair(
        light(pred, "pred"),
        light(real, "real"),
        str(pred.path),
        str(real.path),
        labels=labels,
    )


def _labels_of(screen: H5Screen, name: str, key: str, col: str) -> np.ndarray:
    """The values of obs column `col` per cell (strings); a cell without one is an error."""
    codes, cats = screen.obs_codes(col)
    missing = int((codes < 0).sum())
    if missing:
        raise UserError(
            f"{missing} cells of {name} ({screen.path}) have no value in obs column {col!r} ({key}=); "
            "fill in or drop those cells"
        )
    return np.asarray(cats, dtype=object)[codes] if len(cats) else np.zeros(0, dtype=object)


def _real_groups(
    real: H5Screen, labels: ScreenLabels, celltype_col: str | None, pred: H5Screen | None = None
) -> set[tuple[str, str]]:
    """The held-out (cell type, perturbation) groups of real (cell type "" without `celltype_col`); its
    control label checked (against `pred`'s, to tell a wrong label from control cells that real lacks)."""
    pred_perts = _labels_of(pred, "pred", "pert_col", labels.pert_col) if pred is not None else None
    perts = _labels_of(real, "real", "pert_col", labels.pert_col)
    if not (perts == labels.control_pert).any():
        if pred_perts is not None and (pred_perts == labels.control_pert).any():
            raise UserError(
                f"real ({real.path}) has no control cells: pred has {int((pred_perts == labels.control_pert).sum())} "
                f"{labels.control_pert!r} cells in obs[{labels.pert_col!r}], real none (its labels are "
                f"{preview(set(perts))}); cell-eval measures each perturbation against real's own control "
                "cells: add them to real (tahoe-ft predict writes them into real.h5ad)"
            )
        raise UserError(
            f"real ({real.path}) has no cells labelled control_pert={labels.control_pert} in "
            f"obs[{labels.pert_col!r}] (its labels are {preview(set(perts))}); if its control cells carry "
            "another label, pass control_pert=<that label>; if real has none, add them (cell-eval measures "
            "each perturbation against real's own control cells)"
        )
    cts = (
        _labels_of(real, "real", "cell_type_col", celltype_col)
        if celltype_col
        else np.full(len(perts), "", dtype=object)
    )
    held = perts != labels.control_pert
    return set(zip(cts[held].tolist(), perts[held].tolist(), strict=True))


def read_training_cells(
    path: str | Path,
    *,
    labels: ScreenLabels,
    celltype_col: str | None,
    genes: list[str],
    held_out: set[tuple[str, str]],
    split_toml: str | None = None,
    max_per_group: int = 500,
    seed: int = 0,
) -> tuple[ad.AnnData, str]:
    """The training cells of `train=<path>` as `CellCatalog.training_cells` gives a run's: at most
    `max_per_group` cells per (cell type, perturbation) and of each cell type's controls, drawn without
    replacement by one seeded generator in the same order; log1p X over `genes` (real's, by name); obs with
    the perturbation (and cell-type) column. With `split_toml` the file is the whole screen and the TOML's
    val/test perturbations (and zero-shot cell types) are left out first.

    Refused, one line each: a missing column or control label, genes of real that the file lacks, no
    training perturbation, a cell type of real without training controls, and any training cell of a
    held-out group of real (`held_out`: (cell type or "", perturbation); training on it would leak the
    answer). Only obs and var are read before the drawn rows."""
    import anndata as ad
    import pandas as pd

    from tahoe_ft.data.catalog import draw_training_rows
    from tahoe_ft.data.h5screen import H5Screen
    from tahoe_ft.evaluation.inputs import one_line, sanitize

    path = Path(path)
    if not path.is_file():
        raise UserError(f"train={path} not found; pass the .h5ad of the training cells (or the whole screen)")
    try:
        screen = H5Screen(path)
    except (OSError, KeyError, ValueError, UserError) as exc:
        raise UserError(
            f"train={path} is not a readable AnnData .h5ad ({type(exc).__name__}: {one_line(exc, 120)}); "
            "write it with AnnData.write_h5ad"
        ) from None
    name = f"train ({path})"
    ct_col = labels.cell_type_col if (celltype_col or split_toml) else None
    for key, col in [("pert_col", labels.pert_col)] + ([("cell_type_col", ct_col)] if ct_col else []):
        if not screen.has_obs(col):
            raise UserError(
                f"{key}={col} is not an obs column of {name}; its columns are "
                f"{preview(screen.obs_columns(), 12)}; pass {key}=<the column>, or train= a file that has it"
            )
    if split_toml and ct_col is None:
        raise UserError(
            f"split_toml={split_toml} holds perturbations out per cell type; pass cell_type_col=<the obs column>"
        )
    perts = _labels_of(screen, "train", "pert_col", labels.pert_col)
    cts = (
        _labels_of(screen, "train", "cell_type_col", ct_col)
        if ct_col
        else np.full(len(perts), "", dtype=object)
    )
    is_ctrl = perts == labels.control_pert
    if not is_ctrl.any():
        raise UserError(
            f"control_pert={labels.control_pert} has no cells in obs[{labels.pert_col!r}] of {name}; "
            f"its labels are {preview(set(perts))}; the baselines need the training controls: pass "
            "control_pert=<the control label>, or train= a file with the controls"
        )
    file_genes = [str(g) for g in screen.var_names]
    cols = None
    if file_genes != genes:
        pos = {g: i for i, g in enumerate(file_genes)}
        missing = [g for g in genes if g not in pos]
        if missing:
            raise UserError(
                f"{name} lacks {len(missing)} of real's {len(genes)} genes {preview(missing)}; pass train= "
                "cells measured on real's genes (var_names)"
            )
        cols = np.array([pos[g] for g in genes], dtype=np.int64)
        log.info("train: real's %d genes taken by name from the file's %d", len(genes), len(file_genes))
    keep = np.ones(len(perts), dtype=bool)
    if split_toml:
        keep = ~_toml_held_out(split_toml, path, labels, ct_col, file_genes)
    ct_scored = cts if celltype_col else np.full(len(perts), "", dtype=object)
    candidates = np.flatnonzero(keep & ~is_ctrl)
    leak = candidates[
        [(c, p) in held_out for c, p in zip(ct_scored[candidates], perts[candidates], strict=True)]
    ]
    if leak.size:
        bad = sorted({f"{c}/{p}" if c else p for c, p in zip(ct_scored[leak], perts[leak], strict=True)})
        where = f"{name} with split_toml={split_toml}" if split_toml else name
        raise UserError(
            f"{where} has {leak.size} training cells of real's held-out perturbations {preview(bad)}: "
            "scoring against them would leak the answer; pass train= without them (or the whole screen "
            "with split_toml=<its split TOML>)"
        )
    if not (keep & ~is_ctrl).any():
        raise UserError(f"{name} has no perturbed training cells; pass train= with training perturbations")
    if celltype_col:
        lacking = sorted({c for c, _ in held_out} - set(cts[keep & is_ctrl].tolist()))
        if lacking:
            raise UserError(
                f"{name} has no {labels.control_pert!r} cells of real's cell types {preview(lacking)}; "
                "the baselines need training controls of every scored cell type: add them to train="
            )
    # CellCatalog.training_cells' draws: groups keyed by the text of (cell type, pert), controls by the
    # cell type, in sorted key order, one generator
    kept = np.flatnonzero(keep)
    frame = pd.DataFrame({"ct": cts[kept], "pert": perts[kept], "row": kept})
    draws = [
        (str(c) if p == labels.control_pert else str((c, p)), rows.to_numpy(), p, c)
        for (c, p), rows in frame.groupby(["ct", "pert"], sort=False)["row"]
    ]
    rows, obs_rows = draw_training_rows(draws, max_per_group, seed)
    x = screen.read_rows(rows, cols)
    screen.close()
    obs = pd.DataFrame(obs_rows, columns=[labels.pert_col, ct_col or "_cell_type"])
    if ct_col is None:
        obs = obs.drop(columns="_cell_type")
    obs.index = [f"train{i}" for i in range(len(obs))]
    train = ad.AnnData(X=x, obs=obs.astype("category"), var=pd.DataFrame(index=list(genes)))
    train = sanitize(
        train,
        "train",
        str(path),
        owned=True,
        labels=dataclasses.replace(labels, cell_type_col=ct_col),
        clip_negative=False,
    )
    n_groups = len({k for k in zip(cts[keep & ~is_ctrl], perts[keep & ~is_ctrl], strict=True)})
    note = (
        f"train={path}"
        + (f" minus the val/test perturbations of split_toml={split_toml}" if split_toml else "")
        + f": {train.n_obs} cells ({n_groups} training groups and the controls, at most {max_per_group} per group)"
    )
    return train, note


def _toml_held_out(
    toml_path: str, train_path: Path, labels: ScreenLabels, ct_col: str, genes: list[str]
) -> np.ndarray:
    """Per cell of the screen: held out by the split TOML (its `[fewshot]` val/test perturbations of a cell
    type, or every perturbed cell of a `[zeroshot]` cell type); controls never are. Read as training reads it:
    the screen opened as a `CellCatalog` and split by `data.splits.toml_split_bits`, under the name of the
    TOML's dataset that lists `train_path` (or its only dataset); the other datasets' entries do not apply."""
    from tahoe_ft.data.catalog import CellCatalog
    from tahoe_ft.data.split_file import parse_split_toml
    from tahoe_ft.data.splits import TEST, VAL, toml_split_bits

    if not Path(toml_path).is_file():
        raise UserError(f"split_toml={toml_path} not found; pass the cell-load split TOML of the screen")
    toml = parse_split_toml(toml_path)
    target = train_path.resolve()
    names = [ds for ds, files in toml.datasets.items() if any(f.resolve() == target for f in files)]
    if not names and len(toml.datasets) == 1:
        names = list(toml.datasets)
        log.info(
            "split_toml: train=%s is not in its [datasets]; its only dataset %s applies", train_path, names[0]
        )
    if not names:
        raise UserError(
            f"split_toml={toml_path} lists datasets {preview(toml.datasets)}, none of them train={train_path}; "
            "pass train= the screen file that its [datasets] names"
        )
    # the entries of every dataset that names the file, under one name (the file is one dataset here)
    name = names[0]
    fewshot: dict[tuple[str, str], dict[str, list[str]]] = {}
    for (ds, ct), table in toml.fewshot.items():
        if ds in names:
            into = fewshot.setdefault((name, ct), {"val": [], "test": []})
            for split in ("val", "test"):
                into[split] += [p for p in table[split] if p not in into[split]]
    zeroshot = {(name, ct): split for (ds, ct), split in toml.zeroshot.items() if ds in names}
    mine = dataclasses.replace(toml, datasets={name: [train_path]}, fewshot=fewshot, zeroshot=zeroshot)
    try:
        cat = CellCatalog(
            [train_path],
            [name],
            labels=dataclasses.replace(labels, cell_type_col=ct_col, batch_col=None),
            input_transform="log1p",
            embed_key=None,
            genes=genes,  # the file's own: no gene list applies here
        )
        try:
            bits = toml_split_bits(cat, mine)
        finally:
            for screen in cat.screens:
                screen.close()
    except UserError as exc:
        raise UserError(f"split_toml={toml_path} on train={train_path}: {exc}") from None
    return ((bits & (VAL | TEST)) > 0) & (cat.pert_of != cat.control_idx)


def read_features(path: str, need: set[str]) -> dict[str, np.ndarray]:
    """`features=<path>` (a torch.load-able dict name -> 1-D tensor, `data.inputs.load_pert_features`), with
    a vector for every perturbation in `need` (the training and scored perturbations, control excluded)."""
    from tahoe_ft.data.inputs import load_pert_features

    if not Path(path).is_file():
        raise UserError(
            f"features={path} not found; pass a torch.save'd dict perturbation name -> 1-D tensor"
        )
    try:
        feats, _ = load_pert_features(path)
    except UserError as exc:
        raise UserError(f"features={path}: {exc}") from None
    missing = sorted(need - set(feats))
    if missing:
        raise UserError(
            f"features={path} has no vector for {len(missing)} perturbations {preview(missing)}; add one for "
            "every training and scored perturbation"
        )
    return {k: np.asarray(v, dtype=np.float64) for k, v in feats.items()}


def _evaluate(
    config: EvalConfig,
    files: RunFiles,
    record: PredictRecord | None,
    prepared: Prepared,
    side: TrainingSide,
    outdir: Path,
) -> Score:
    """The prediction, the panel and the diagnostics scored, their tables written under `outdir`."""
    from tahoe_ft.evaluation.baselines import PanelSettings
    from tahoe_ft.evaluation.panel import score_panel
    from tahoe_ft.evaluation.verdict import attach_verdicts

    train, note, features = side.train, side.note, side.features
    # the labels scored by: the cell-type column only when each cell type is scored on its own
    labels = dataclasses.replace(prepared.labels, cell_type_col=prepared.celltype_col)
    common = dict(
        labels=labels,
        profile=config.profile,
        num_threads=config.num_threads,
        de_cache_dir=Path(config.runs_dir) / ".de_cache",
    )
    score = score_predictions(files.pred, files.real, train, outdir, **common, write_score=False)
    partial: dict[str, Any] = {}
    panel_dir = None
    if config.baselines and train is not None:
        import anndata as ad

        panel = score_panel(
            train,
            ad.read_h5ad(files.real),
            outdir,
            **common,
            settings=PanelSettings(
                linear_k=config.linear_k,
                linear_ridge=config.linear_ridge,
                seed=record.seed if record is not None else 0,
                # the baselines' basal cells re-centred as the round's were (predict's recentre_basal)
                recentre_basal=record.recentre_basal if record is not None else config.recentre_basal,
            ),
            features=features,
        )
        notes = {**panel["notes"], "training_cells": note}
        score = dataclasses.replace(score, baselines=panel["baselines"], baseline_notes=notes)
        panel_dir = panel.get("dir")
        partial = _round_on_partial(panel.get("partial") or {}, files, train, common, outdir)
    diag = diagnostics(score, files, train, common, outdir)
    if partial:
        diag["partial_baselines"] = partial
    # the round against each baseline, group by group, with its bootstrap interval (writes per_group.csv)
    score = attach_verdicts(dataclasses.replace(score, diagnostics=diag), outdir, panel_dir)
    if config.vcc2026:
        score = _vcc2026(config, files, record, prepared, side, score, outdir)
    return score


def _vcc2026(
    config: EvalConfig,
    files: RunFiles,
    record: PredictRecord | None,
    prepared: Prepared,
    side: TrainingSide,
    score: Score,
    outdir: Path,
) -> Score:
    """The VCC 2026 scorer beside cell-eval (`evaluation.vcc2026.evaluate`): the round, the panel's baselines
    (the files `score_panel` left under `outdir/baselines/`) and the ceiling in count space, into score.json's
    `vcc2026` (each baseline's `vcc2026` too), the generator null and the amplitude audit into `diagnostics`."""
    import anndata as ad

    from tahoe_ft.evaluation import vcc2026

    panel = {}
    for name in score.baselines or {}:
        path = outdir / "baselines" / f"{name}.h5ad"
        if name != "ceiling" and path.is_file():
            panel[name] = ad.read_h5ad(path)
    counts_file = files.real.with_name("real_counts.h5ad")
    pred_counts = files.pred.with_name("pred_counts.h5ad")
    block = vcc2026.evaluate(
        ad.read_h5ad(files.pred),
        ad.read_h5ad(files.real),
        outdir / "vcc2026",
        panel=panel,
        counts=ad.read_h5ad(counts_file) if counts_file.is_file() else None,
        pred_counts=ad.read_h5ad(pred_counts) if counts_file.is_file() and pred_counts.is_file() else None,
        labels=dataclasses.replace(prepared.labels, cell_type_col=prepared.celltype_col),
        input_transform=str((side.manifest or {}).get("input_transform") or "log1p"),
        seed=record.seed if record is not None else 0,
        splits=config.vcc2026_splits,
        num_threads=config.num_threads,
    )
    diag = dict(score.diagnostics or {})
    diag["vcc2026_null"] = block.pop("null")
    diag["amplitude_audit"] = block.pop("amplitude_audit")
    baselines = score.baselines
    if baselines is not None:
        baselines = {
            name: {**entry, "vcc2026": block["baselines"][name]} if name in block["baselines"] else entry
            for name, entry in baselines.items()
        }
    return dataclasses.replace(score, vcc2026=block, diagnostics=diag, baselines=baselines)


def _round_on_partial(
    partial: dict[str, Any], files: RunFiles, train, common: dict, outdir: Path
) -> dict[str, Any]:
    """Each baseline the panel has for some held-out groups only, beside the round scored on the same groups
    (tables under `outdir/partial/<name>`): `{name: {groups, n_groups, of, avg_score, metrics, ..., "round":
    {avg_score, metrics, normalized}}}`."""
    from tahoe_ft.evaluation.panel import score_on_groups

    out = {}
    for name, entry in partial.items():
        s = score_on_groups(
            files.pred, files.real, train, entry["groups"], outdir / "partial" / name, **common
        )
        d = s.to_dict()
        out[name] = {**entry, "round": {k: d[k] for k in ("avg_score", "metrics", "normalized")}}
    return out


def _relabelled(train: ad.AnnData, cat: Any, labels: ScreenLabels) -> ad.AnnData:
    """The checkpoint's training cells (`cat`: its `CellCatalog`) under the labels given by key, where they
    differ from its data's (pred and real carry those)."""
    pc = cat.pert_col
    if cat.control_pert != labels.control_pert:
        ctrl = {cat.control_pert: labels.control_pert}
        train.obs[pc] = train.obs[pc].astype(str).replace(ctrl).astype("category")
    names = {pc: labels.pert_col, cat.cell_type_col: labels.cell_type_col or cat.cell_type_col}
    train.obs = train.obs.rename(columns={k: v for k, v in names.items() if k != v})
    return train


def pert_features(manifest: dict[str, Any] | None) -> dict[str, np.ndarray] | None:
    """The round's perturbation features by name (the manifest's `pert_matrix` rows): the feature ridge's
    inputs, exactly what the model was given."""
    if not manifest:
        return None
    matrix = np.asarray(manifest["pert_matrix"], dtype=np.float64)
    return {str(p): matrix[i] for i, p in enumerate(manifest["pert_names"])}


def diagnostics(
    score: Score, files: RunFiles, train, common: dict, outdir: Path | None = None
) -> dict[str, Any]:
    """Collapse of the predicted effects, and the shuffle test when predict wrote pred_shuffled.h5ad (its
    tables under `outdir/shuffled`, default `<run>/eval/shuffled`); `common`: `score_predictions`' keywords
    (`labels`, the scoring settings)."""
    import anndata as ad

    from tahoe_ft.evaluation.diagnostics import collapse, design

    out: dict[str, Any] = {
        "collapse": collapse(ad.read_h5ad(files.pred), ad.read_h5ad(files.real), labels=common["labels"]),
        # what the design can measure: the discrimination flag (degenerate, coarse) and the absent baselines
        "design": design(score),
    }
    shuffled = files.pred.with_name("pred_shuffled.h5ad")
    if shuffled.is_file():
        outdir = files.eval_dir if outdir is None else outdir
        s = score_predictions(shuffled, files.real, train, outdir / "shuffled", **common)
        out["shuffle"] = {
            "avg_score": s.avg_score,
            "metrics": s.to_dict()["metrics"],
            "drop": score.avg_score - s.avg_score,
            "note": "the same basal cells, each held-out perturbation predicted with another's features",
        }
    return out
