"""One trial: the space's parameters drawn, the rounds trained in order on every fold (ordinary runs under
`<sweep>/trial-NNNN/fold-K/<round>/<timestamp>/`), the objective computed on the folds' validation
perturbations only, and the validation losses reported to Optuna's pruner as they are logged.

`TrialReporter` is the Lightning callback: at every validation check after step 0 (a check of the starting
weights is not a result of the recipe's training) it reports `val_loss` (negated when the study maximises
val_score) at step `offset + global_step`, where fold k's round r has offset
`(k * n_rounds + r) * stride` so no two checks of a trial share a step, and raises `optuna.TrialPruned` when
the pruner says so (or when a loss is not finite). optuna_integration's PyTorchLightningPruningCallback is not
used: it reports at the epoch number, which our step-based runs (one long epoch, several rounds and folds)
would collide on.
"""

from __future__ import annotations

import logging
import math
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch

from tahoe_ft.config import DataConfig, EvalConfig, PredictConfig, Split, SweepObjective, compose_round
from tahoe_ft.runs import read_run_info, update_run_info
from tahoe_ft.search.plan import SweepPlan
from tahoe_ft.search.storage import mark_process
from tahoe_ft.study.reproduce import fold_data as _split_by_toml
from tahoe_ft.training.callbacks import checked_val_loss

log = logging.getLogger(__name__)


def fold_name(fold: Any) -> str:
    return "fold-own" if fold is None else f"fold-{fold.index}"


def fold_data(data: DataConfig, fold: Any) -> DataConfig:
    """The data a trial trains on for `fold` (a `study.folds.Fold`, or None: the data set's own split)."""
    return data if fold is None else _split_by_toml(data, fold.toml, fold.regime)


class SweepStopped(Exception):  # noqa: N818 - a stop, not an error of the trial's recipe
    """The process was told to stop (SIGTERM) mid-trial: Optuna marks the trial FAIL and `run_sweep` says so."""


class TrialReporter(L.Callback):
    """Reports each validation check's `metric` (`plan.fair_metric`) to the trial; prunes; writes the trial
    into run.json; keeps every check's value (`values`, by step) for the objective."""

    def __init__(
        self, trial: Any, *, offset: int, sign: float, block: dict[str, Any], metric: str = "val_loss"
    ):
        self.trial, self.offset, self.sign, self.block, self.metric = trial, offset, sign, block, metric
        self.run_dir: Path | None = None
        self.reported: set[int] = set()
        self.values: dict[int, float] = {}
        self.interrupted = False

    def setup(self, trainer, pl_module, stage) -> None:
        if self.run_dir is None:
            self.run_dir = Path(trainer.default_root_dir)
            if trainer.is_global_zero:
                update_run_info(self.run_dir, sweep=self.block)

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if not torch.isfinite(loss.detach()).all():
            self._prune(f"training loss {float(loss.detach()):g} at step {trainer.global_step}")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # Lightning turns Ctrl-C into sys.exit(1) after this hook; `_train` makes it a KeyboardInterrupt again
        self.interrupted = self.interrupted or isinstance(exception, KeyboardInterrupt)

    def on_validation_end(self, trainer, pl_module) -> None:
        val = checked_val_loss(trainer)
        if val is None:
            return
        if not math.isfinite(val):
            self._prune(f"val_loss {val:g} at step {trainer.global_step}")
        if self.metric != "val_loss":
            fair = trainer.callback_metrics.get(self.metric)
            if fair is None:
                self._prune(f"{self.metric} was not logged at step {trainer.global_step}")
            val = float(fair)
            if not math.isfinite(val):
                self._prune(f"{self.metric} {val:g} at step {trainer.global_step}")
        self.values[int(trainer.global_step)] = val
        if trainer.global_step == 0:
            # the starting weights' check (checkpoint.validate_at_start) judges the start, not the recipe's
            # training: on Papalexi it pruned one-hot and co-expression trials by 2e-5 before they trained
            return
        step = self.offset + trainer.global_step
        if step in self.reported:
            return
        self.reported.add(step)
        self.trial.report(self.sign * val, step)
        if self.trial.should_prune():
            self._prune(f"{self.metric} {val:.5g} at step {trainer.global_step} (reported step {step})")

    def _prune(self, why: str) -> None:
        import optuna

        where = f"{self.block['fold']} round {self.block['round']}"
        raise optuna.TrialPruned(f"pruned in {where}: {why}")


class Objective:
    """`study.optimize`'s function: a trial's mean over folds of the last round's objective value."""

    def __init__(self, plan: SweepPlan, folds: list[Any]):
        self.plan, self.folds = plan, folds

    def __call__(self, trial: Any) -> float:
        import optuna

        plan = self.plan
        mark_process(trial)
        values = {p.key: p.suggest(trial) for p in plan.params}
        run_dirs: list[str] = []
        fold_values: list[float] = []
        try:
            for k, fold in enumerate(self.folds):
                value = self.run_fold(trial, values, k, fold, run_dirs)
                if not math.isfinite(value):
                    raise optuna.TrialPruned(f"{fold_name(fold)}: objective {value} is not finite")
                fold_values.append(value)
                trial.set_user_attr("fold_values", fold_values)
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", "interrupted (Ctrl-C)")
            raise
        except SweepStopped:
            trial.set_user_attr("fail_reason", "stopped by SIGTERM")
            raise
        finally:  # complete, pruned or failed: no later step reads a trial's weights
            for run in run_dirs:
                drop_checkpoints(Path(run))
        return float(sum(fold_values) / len(fold_values))

    def run_fold(self, trial: Any, values: dict[str, Any], k: int, fold: Any, run_dirs: list[str]) -> float:
        """Train the rounds on fold `k` (appending each run to `run_dirs` and the trial's `run_dirs`); return
        the fold's objective value (written into the last run's run.json)."""
        plan, cfg = self.plan, self.plan.cfg
        name = fold_name(fold)
        data = fold_data(cfg.data, fold)
        trial_dir = plan.sweep_dir / f"trial-{trial.number:04d}"
        sign = -1.0 if plan.direction == "maximize" else 1.0
        run_dir, reporter = None, None
        for r, exp in enumerate(plan.rounds):
            tags = [f"sweep:{plan.name}", f"trial-{trial.number}", name]
            args = plan.train_args(exp, trial_dir / name, values, tags)
            train_cfg = compose_round(exp, args, data=data, paths=cfg.paths)
            metric = plan.metrics.get(exp, "val_loss")
            block = {
                "study": plan.name,
                "storage": plan.storage_url,
                "trial": trial.number,
                "fold": name,
                "round": exp,
                "params": values,
                "objective": str(cfg.objective),
                "metric": metric,
            }
            offset = (k * len(plan.rounds) + r) * plan.stride
            reporter = TrialReporter(trial, offset=offset, sign=sign, block=block, metric=metric)
            try:
                run_dir = _train(train_cfg, reporter)
            finally:  # a pruned or failed round's run is listed too
                if reporter.run_dir is not None:
                    run_dirs.append(str(reporter.run_dir))
                    trial.set_user_attr("run_dirs", run_dirs)
        assert run_dir is not None and reporter is not None
        value = self._value(run_dir, reporter)
        update_run_info(run_dir, sweep={**read_run_info(run_dir).get("sweep", {}), "fold_value": value})
        return value

    def _value(self, run_dir: Path, reporter: TrialReporter) -> float:
        """val_loss: the round's `metric` (`plan.fair_metric`: the unbiased energy distance for the energy loss)
        at the step best-val.pt was saved at (run.json `best_step`); val_score: cell-eval's avg_score of the
        run's prediction of its validation perturbations (the cell-mean baseline from training cells only)."""
        cfg = self.plan.cfg
        if cfg.objective == SweepObjective.val_loss:
            step = read_run_info(run_dir).get("best_step")
            value = reporter.values.get(int(step)) if step is not None else None
            return float(value) if value is not None else math.nan
        from tahoe_ft.evaluation.logs import quiet_console
        from tahoe_ft.evaluation.run import evaluate_run
        from tahoe_ft.prediction import predict

        runs = str(cfg.runs_dir)  # the DE cache (runs_dir/.de_cache) is shared by the trials of the folds
        predict(
            PredictConfig(run_dir=str(run_dir), runs_dir=runs, split=Split.val, seed=cfg.seed, shuffle=False)
        )
        config = EvalConfig(
            run_dir=str(run_dir),
            runs_dir=runs,
            baselines=False,
            profile=cfg.profile,
            num_threads=cfg.num_threads,
        )
        with quiet_console(False):
            score = evaluate_run(config)
        return float(score.avg_score)


# a trial's weights: no later step reads them (final=true trains the best recipe again; best.yaml holds its
# parameters), and each fold run's last.ckpt and best-val.pt made the README's demo sweep 1.2 GB
WEIGHT_PATTERNS = ("*.ckpt", "*.pt")


def drop_checkpoints(run_dir: Path) -> list[str]:
    """Delete a finished trial run's weights (`checkpoints/*.ckpt`, `*.pt`); note them in run.json."""
    ckpts = run_dir / "checkpoints"
    removed = sorted({p.name for pattern in WEIGHT_PATTERNS for p in ckpts.glob(pattern) if p.is_file()})
    for name in removed:
        (ckpts / name).unlink(missing_ok=True)
    if removed and (run_dir / "run.json").is_file():
        sweep = read_run_info(run_dir).get("sweep", {})
        update_run_info(run_dir, sweep={**sweep, "weights_removed": removed})
    return removed


def _train(train_cfg, reporter: TrialReporter) -> Path:
    import optuna
    from lightning.pytorch.callbacks import ModelSummary

    from tahoe_ft.training import train

    try:
        # max_depth=0: no model summary table per fold run (a sweep's console is one line per trial)
        return train(train_cfg, callbacks=[reporter, ModelSummary(max_depth=0)])
    except optuna.TrialPruned:
        if reporter.run_dir is not None:
            update_run_info(reporter.run_dir, status="pruned")
        raise
    except SystemExit as exc:
        if reporter.interrupted:  # Lightning's answer to Ctrl-C: sys.exit(1), SIGINT ignored from then on
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt from None
        if exc.code == 128 + signal.SIGTERM:  # training.session's answer to SIGTERM
            raise SweepStopped("SIGTERM") from None
        raise
