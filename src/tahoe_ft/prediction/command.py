"""`predict(config)`: check the arguments, resolve and load the checkpoint, plan, stream, record."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from tahoe_ft.checkpoints.io import load_checkpoint
from tahoe_ft.prediction.counts_out import count_source, retire_count_files, write_count_files
from tahoe_ft.prediction.forward import prepare_model
from tahoe_ft.prediction.plan import basal_shifts, build_plan, check_arguments
from tahoe_ft.prediction.resolve import check_output_folder, resolve_checkpoint, retire_stale_outputs
from tahoe_ft.prediction.stream import PRED_MAX, write_predictions

if TYPE_CHECKING:
    from tahoe_ft.config import PredictConfig

log = logging.getLogger(__name__)


def predict(config: PredictConfig) -> Path:
    """Predict the held-out groups of `config.split` with the checkpoint `config.ckpt`; return the output
    directory (`config.run_dir`, default: the run directory two levels above the checkpoint, or an upstream
    run folder itself).

    Writes `pred.h5ad`, `real.h5ad` (and, with `shuffle`, `pred_shuffled.h5ad`) and `predict.json`
    (`runs.PredictRecord`). Refused, before anything is drawn: an output folder that is another run, or holds
    another checkpoint's prediction (`check_output_folder`). Redoing a prediction moves the earlier one's
    `eval/` to `eval.superseded/` and removes a `pred_shuffled.h5ad` this one did not write. The arguments that need no file are checked first (`check_arguments`); then the
    checkpoint is loaded, every draw made (`build_plan`: row numbers only) and the cells read, predicted and
    written in blocks (`write_predictions`), so memory does not grow with the number of cells predicted.
    `sets_per_pass` 1 gives exactly the numbers of predicting one set at a time; more is faster on CPU but
    differs in the last float32 bits (`forward.predict_batch`).
    """
    device = check_arguments(config)
    ckpt, out_dir = resolve_checkpoint(
        str(config.ckpt),
        run_dir=str(config.run_dir) if config.run_dir else None,
        exp=config.exp,
        runs_dir=str(config.runs_dir),
    )
    loaded = load_checkpoint(ckpt)
    # another run's folder, or another checkpoint's prediction, is not overwritten (before any draw or write)
    check_output_folder(ckpt, out_dir, loaded.checkpoint_path)
    plan = build_plan(loaded, ckpt, out_dir, config)
    # output=counts on a screen with no raw counts nor library sizes: refused before anything is written
    counts_from = count_source(plan) if str(config.output) == "counts" else None
    if plan.recentre_basal:
        plan.basal_shift = basal_shifts(plan)
    prepare_model(loaded.model, device, plan.precision, rows=plan.rows_per_pass)
    n_clip = write_predictions(plan, loaded.model, device)
    if n_clip:
        log.info("clipped %d predicted values to [0, %g]", n_clip, PRED_MAX)
    # what was derived from the prediction just replaced (its shuffle test, its scores) is not left looking
    # current beside the new one
    for path in retire_stale_outputs(plan.out_dir, shuffled=bool(plan.shuffle)):
        log.warning(
            "%s %s: it came from the prediction this one replaced",
            "moved to" if path.exists() else "removed",
            path,
        )
    counts = write_count_files(plan, counts_from) if counts_from is not None else {}
    for path in retire_count_files(plan.out_dir, counts.get("files", {})):
        log.warning("removed %s: it came from the prediction this one replaced", path)
    dataclasses.replace(plan.record(loaded), output=str(config.output), counts=counts).write(plan.out_dir)
    log.info(
        "wrote %s and %s (%d groups, %d cells)",
        plan.out_dir / "pred.h5ad",
        plan.out_dir / "real.h5ad",
        len(plan.groups),
        len(plan.obs),
    )
    return plan.out_dir
