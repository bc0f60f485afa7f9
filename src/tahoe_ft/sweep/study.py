"""`run_sweep`: the study from start to end. Check everything (`plan.make_plan`), deal the folds, open or
create the Optuna study, fail the trials a dead process left running, run trials until the study holds
`n_trials` finished ones, then write trials.csv, best.yaml and the plots, and with `final=true` train the best
recipe on the folds and score it on their test perturbations (`study.reproduce`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tahoe_ft.config import PrunerName, ReproduceConfig, SweepConfig, checked
from tahoe_ft.errors import UserError
from tahoe_ft.runs import write_json_atomic
from tahoe_ft.sweep.outputs import write_outputs
from tahoe_ft.sweep.plan import SweepPlan, make_plan
from tahoe_ft.sweep.space import override
from tahoe_ft.sweep.storage import fail_dead_trials, open_storage
from tahoe_ft.sweep.trial import Objective

log = logging.getLogger(__name__)

RECIPE_ATTR = "tahoe_ft_recipe"


def run_sweep(cfg: SweepConfig) -> dict[str, Any]:
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    plan = make_plan(cfg)  # every check that needs no data; nothing is written before it passes
    if cfg.folds == 0 and not (cfg.data.split_toml or cfg.data.val_perts or cfg.data.val_cell_types):
        raise UserError(
            "folds=0 uses the data set's own split, which has no validation perturbations; give folds=K (>= 2) "
            "or data.val_perts=[...]"
        )
    if plan.default_storage:
        plan.sweep_dir.mkdir(parents=True, exist_ok=True)  # the first write: the study's SQLite file
    storage = open_storage(plan.storage_url, cfg.heartbeat_s)
    study = optuna.create_study(
        storage=storage,
        study_name=plan.name,
        direction=plan.direction,
        load_if_exists=True,
        pruner=_pruner(cfg),
    )
    recipe = _check_recipe(study, plan)  # before the folds' files are (re)written
    folds = _folds(plan)  # <sweep>/folds/ (the data sets are made where they are opened)
    if recipe is not None:
        study.set_user_attr(RECIPE_ATTR, recipe)
    fail_dead_trials(study, storage)
    # seeded, and continued: a resumed run draws new values instead of repeating the first run's
    base_seed = cfg.seed if cfg.sampler_seed is None else cfg.sampler_seed
    study.sampler = optuna.samplers.TPESampler(seed=base_seed + len(study.trials))
    finished_states = (TrialState.COMPLETE, TrialState.PRUNED)
    done = len(study.get_trials(deepcopy=False, states=finished_states))
    log.info("sweep %s: %d of %d trials finished; study %s", plan.name, done, cfg.n_trials, plan.storage_url)
    if done < cfg.n_trials:
        study.optimize(
            Objective(plan, folds),
            n_trials=cfg.n_trials - done,
            callbacks=[MaxTrialsCallback(cfg.n_trials, states=finished_states)],
            gc_after_trial=True,
        )
    outputs = write_outputs(plan, study)
    summary = _summary(plan, study, outputs)
    if cfg.final:
        summary["final"] = _final(plan, study)
    write_json_atomic(plan.sweep_dir / "sweep.json", summary)
    return summary


def _folds(plan: SweepPlan) -> list[Any]:
    """The folds of `reproduce folds=K` (same dealing, same TOML files) under <sweep>/folds/, or [None]."""
    cfg = plan.cfg
    if cfg.folds == 0:
        plan.sweep_dir.mkdir(parents=True, exist_ok=True)
        return [None]
    from tahoe_ft.study.folds import make_folds

    return make_folds(cfg.data, cfg.folds, plan.sweep_dir / "folds", seed=cfg.fold_seed, n_val=cfg.n_val)


def _pruner(cfg: SweepConfig):
    import optuna

    if cfg.pruner == PrunerName.median:
        return optuna.pruners.MedianPruner(
            n_startup_trials=cfg.pruner_startup_trials, n_warmup_steps=cfg.pruner_warmup_steps
        )
    if cfg.pruner == PrunerName.halving:
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=cfg.pruner_warmup_steps or "auto")
    return optuna.pruners.NopPruner()


def _check_recipe(study: Any, plan: SweepPlan) -> dict[str, Any] | None:
    """A study continues only with the recipe it was started with (rounds, space, folds, objective, ...);
    returns the recipe to record when the study has none yet."""
    if study.direction.name.lower() != plan.direction:
        raise UserError(
            f"study '{plan.name}' in {plan.storage_url} {study.direction.name.lower()}s, but objective="
            f"{plan.cfg.objective} would {plan.direction}; use its objective or another name (sweep.name=...)"
        )
    want = json.loads(json.dumps(plan.recipe(), default=str))
    have = study.user_attrs.get(RECIPE_ATTR)
    if have is None:
        return want
    changed = [k for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)]
    if changed:
        k = changed[0]
        raise UserError(
            f"study '{plan.name}' in {plan.storage_url} was started with {k}={have.get(k)!r}, now {want.get(k)!r}"
            + (f" (+{len(changed) - 1} more)" if len(changed) > 1 else "")
            + "; continue it with its own settings, or start another study (sweep.name=... or storage=...)"
        )
    return None


def _summary(plan: SweepPlan, study: Any, outputs: dict[str, Any]) -> dict[str, Any]:
    from optuna.trial import TrialState

    counts = {
        s.name.lower(): 0
        for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
    }
    for t in study.get_trials(deepcopy=False):
        key = t.state.name.lower()
        if key in counts:
            counts[key] += 1
    best = None
    if counts["complete"]:
        b = study.best_trial
        best = {
            "number": b.number,
            "value": b.value,
            "params": b.params,
            "fold_values": b.user_attrs.get("fold_values"),
        }
    return {
        "study": plan.name,
        "storage": plan.storage_url,
        "sweep_dir": str(plan.sweep_dir),
        "objective": str(plan.cfg.objective),
        "direction": plan.direction,
        "trials": counts,
        "best": best,
        **outputs,
    }


def _final(plan: SweepPlan, study: Any) -> dict[str, Any]:
    """The best recipe trained on the same folds and scored once on their test perturbations (reproduce)."""
    from optuna.trial import TrialState

    from tahoe_ft.study.reproduce import reproduce

    cfg = plan.cfg
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise UserError(
            f"final=true: study '{plan.name}' has no complete trial yet; run more trials (n_trials=...)"
        )
    best = study.best_trial
    overrides = [
        *plan.final_args,
        override("logger.wandb_group", f"sweep-{plan.name}"),
        override("logger.wandb_tags", [f"sweep:{plan.name}", "final"]),
        *plan.overrides,
        *cfg.train_overrides,
        *(override(k, v) for k, v in best.params.items()),
    ]
    rcfg = ReproduceConfig(
        runs_dir=str(Path(plan.sweep_dir) / "final"),
        step_scale=cfg.step_scale,
        experiments=list(plan.rounds),
        evaluate=list(plan.rounds),
        train_overrides=overrides,
        profile=cfg.profile,
        num_threads=cfg.num_threads,
        folds=cfg.folds,
        seeds=[cfg.seed],
        fold_seed=cfg.fold_seed,
        n_val=cfg.n_val,
        data=cfg.data,
        paths=cfg.paths,
    )
    log.info("sweep %s: final: trial %d's recipe on the folds' test perturbations", plan.name, best.number)
    return {"trial": best.number, "params": best.params, **reproduce(checked(rcfg))}
