"""`run_sweep`: the study from start to end. Check everything (`plan.make_plan`), deal the folds, open or
create the Optuna study, fail the trials a dead process left running, run trials until the study holds
`n_trials` finished ones, then write trials.csv, best.yaml and the plots, and with `final=true` train the best
recipe on the folds and score it on their test perturbations (`study.reproduce`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tahoe_ft.config import PrunerName, ReproduceConfig, SweepConfig, checked
from tahoe_ft.errors import UserError
from tahoe_ft.runs import git_commit, write_json_atomic
from tahoe_ft.search.outputs import train_command, write_outputs
from tahoe_ft.search.pins import base_change, base_pin, data_change, data_pin
from tahoe_ft.search.plan import SweepPlan, make_plan
from tahoe_ft.search.space import override
from tahoe_ft.search.storage import fail_dead_trials, open_storage
from tahoe_ft.search.trial import Objective, SweepStopped

if TYPE_CHECKING:
    from tahoe_ft.data import GroupKey

log = logging.getLogger(__name__)

RECIPE_ATTR = "tahoe_ft_recipe"
PIN_DATA, PIN_BASE = "tahoe_ft_data", "tahoe_ft_base"
TOP = 5  # trials in the console table and sweep.json's "top"
FINAL_ATTR = "tahoe_ft_final_looks"  # one record per final=true: when, commit, trial, params, result


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
    # the data (a bad path is refused here, before the study exists) and what the study is pinned to
    paths, groups = _screen(cfg)
    pins = {PIN_DATA: data_pin(cfg.data, paths), PIN_BASE: base_pin(plan.bases)}
    n_test = _n_test(cfg, len({g.pert for g in groups}))
    existing = _existing_study(plan)
    if existing is not None:  # continued: refused, with nothing written, when anything it depends on changed
        _check_study(existing, plan, pins)
    if cfg.final:
        _check_final_once(existing, plan)
    undo = _Undo(plan)
    study = None
    try:
        folds = _folds(plan, n_test)  # <sweep>/folds/ (the data sets are made where they are opened)
        _warn_small_final(plan, folds, groups)
        storage = open_storage(plan.storage_url, cfg.heartbeat_s)
        study = _create_study(plan, storage, cfg)
        if RECIPE_ATTR not in study.user_attrs:  # created now: pin it
            study.set_user_attr(RECIPE_ATTR, _json(plan.recipe()))
            for key, pin in pins.items():
                study.set_user_attr(key, pin)
        else:  # made by another process since `_existing_study` looked
            _check_study(study, plan, pins)
        fail_dead_trials(study, storage)
        # seeded, and continued: a resumed run draws new values instead of repeating the first run's
        base_seed = cfg.seed if cfg.sampler_seed is None else cfg.sampler_seed
        study.sampler = optuna.samplers.TPESampler(seed=base_seed + len(study.trials))
        finished_states = (TrialState.COMPLETE, TrialState.PRUNED)
        done = len(study.get_trials(deepcopy=False, states=finished_states))
        log.info(
            "sweep %s: %d of %d trials finished; study %s", plan.name, done, cfg.n_trials, plan.storage_url
        )
        if done < cfg.n_trials:
            try:
                with quiet_trials(), _sigterm_stops_the_sweep():
                    study.optimize(
                        Objective(plan, folds),
                        n_trials=cfg.n_trials - done,
                        callbacks=[MaxTrialsCallback(cfg.n_trials, states=finished_states), _say_trial],
                        gc_after_trial=True,
                    )
            except KeyboardInterrupt:
                raise UserError(_stopped(plan, study, "interrupted (Ctrl-C)")) from None
            except SweepStopped:
                raise UserError(_stopped(plan, study, "stopped by SIGTERM")) from None
    except BaseException:
        undo(study)
        raise
    outputs = write_outputs(plan, study)
    summary = _summary(plan, study, outputs)
    if cfg.final:
        summary["final"] = _final(plan, study, folds)
    summary["final_looks"] = list(study.user_attrs.get(FINAL_ATTR, []))
    write_json_atomic(plan.sweep_dir / "sweep.json", summary)
    return summary


def _json(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _screen(cfg: SweepConfig) -> tuple[list[str], list[GroupKey]]:
    """The data's files and perturbed groups (the embedded data sets are made where missing); a bad data
    path or column is one line here, before the study exists."""
    from tahoe_ft.data import CellCatalog
    from tahoe_ft.datasets import ensure_files

    ensure_files(cfg.data)
    catalog = CellCatalog.open(cfg.data, embed_key=None)
    groups = sorted({key for split in ("train", "val", "test") for key in catalog.groups(split)})
    return list(catalog.data_paths), groups


def _warn_small_final(plan: SweepPlan, folds: list[Any], groups: list[GroupKey]) -> None:
    """Say before the search when the nested final test set holds too few groups for `final=true` to reach
    a verdict (`evaluation.verdict.MIN_GROUPS`): its look could then only say "indistinguishable"."""
    from tahoe_ft.evaluation.verdict import MIN_GROUPS

    cfg = plan.cfg
    if cfg.folds == 0 or str(cfg.regime) != "unseen_perturbation" or not folds:
        return
    final = set(folds[0].test)
    n = sum(1 for g in groups if g.pert in final)
    if n < MIN_GROUPS:
        log.warning(
            "sweep %s: the final test set is %d group(s) (%s); with fewer than %d, final=true can only say "
            "'indistinguishable' against every baseline. A larger n_test= gives it more (the search keeps the "
            "rest)",
            plan.name,
            n,
            ", ".join(sorted(final)),
            MIN_GROUPS,
        )


def _n_test(cfg: SweepConfig, n_perts: int) -> int:
    """The size of the final test set: `n_test`, or one fold's share (perturbations // (folds + 1))."""
    if cfg.folds == 0:
        return 0  # the data set's own split: its test perturbations are the final test set
    return int(cfg.n_test) if cfg.n_test is not None else max(1, n_perts // (cfg.folds + 1))


def _existing_study(plan: SweepPlan) -> Any | None:
    """The study when it exists already, found without creating a database or a study."""
    import optuna

    if plan.default_storage and not (plan.sweep_dir / "study.db").is_file():
        return None
    storage = open_storage(plan.storage_url, plan.cfg.heartbeat_s)
    if plan.name not in optuna.study.get_all_study_names(storage):
        return None
    return optuna.load_study(study_name=plan.name, storage=storage)


def _create_study(plan: SweepPlan, storage: Any, cfg: SweepConfig) -> Any:
    import optuna

    try:
        return optuna.create_study(
            storage=storage,
            study_name=plan.name,
            direction=plan.direction,
            load_if_exists=True,
            pruner=_pruner(cfg),
        )
    except optuna.exceptions.StorageInternalError as exc:
        raise UserError(
            f"storage={plan.storage_url!r}: the study cannot be written ({_cause(exc)}); make the database "
            "writable, or give another storage=..."
        ) from None


def _cause(exc: BaseException) -> str:
    inner = exc.__cause__ or exc.__context__ or exc
    text = str(getattr(inner, "orig", None) or inner).strip().splitlines()
    return text[0] if text else type(inner).__name__


class _Undo:
    """Removes what this invocation created (the sweep folder, the database, the study) when it fails before
    the study holds a trial: a corrected retry then starts afresh instead of being refused as a changed study."""

    def __init__(self, plan: SweepPlan):
        self.plan = plan
        self.had_dir = plan.sweep_dir.exists()
        self.had_folds = (plan.sweep_dir / "folds").exists()
        self.had_db = (plan.sweep_dir / "study.db").exists()
        self.had_study = _existing_study(plan) is not None if not plan.default_storage else self.had_db

    def __call__(self, study: Any | None) -> None:
        import shutil

        import optuna

        if study is not None and study.get_trials(deepcopy=False):
            return  # a trial ran: the study is the user's now
        d = self.plan.sweep_dir
        if not self.plan.default_storage and study is not None and not self.had_study:
            with contextlib.suppress(Exception):
                optuna.delete_study(study_name=self.plan.name, storage=self.plan.storage_url)
        if not self.had_dir:
            shutil.rmtree(d, ignore_errors=True)
            return
        if not self.had_db and self.plan.default_storage:
            for suffix in ("", "-journal", "-wal", "-shm"):
                (d / f"study.db{suffix}").unlink(missing_ok=True)
        if not self.had_folds:
            shutil.rmtree(d / "folds", ignore_errors=True)


def _stopped(plan: SweepPlan, study: Any, how: str) -> str:
    from optuna.trial import TrialState

    failed = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))]
    which = f"trial {failed[-1]}" if failed else "a trial"
    return (
        f"sweep '{plan.name}' {how} during {which}: it is marked FAIL and does not count; run the same command "
        "again to continue the study"
    )


def _say_trial(study: Any, trial: Any) -> None:
    """One line per finished trial (the trials' own training output is kept off the console)."""
    state = trial.state.name.lower()
    params = ", ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
    value = f" {trial.value:.6g}" if trial.value is not None else ""
    log.info("sweep %s: trial %d %s%s (%s)", study.study_name, trial.number, state, value, params)


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


@contextlib.contextmanager
def quiet_trials() -> Iterator[None]:
    """Keep the trials' training output off the console: Lightning's and tahoe-ft's training INFO lines (each
    run's run.json, config and metrics keep what they say), Optuna's per-trial lines (`_say_trial` prints a
    shorter one) and Lightning's deprecation warnings. The training's own SIGTERM line, which advises
    `resume=true` (a train key), is dropped: `run_sweep` says how to continue the sweep."""
    import optuna

    names = [
        "lightning", "lightning.pytorch", "lightning.fabric", "tahoe_ft.training", "tahoe_ft.data",
        "tahoe_ft.datasets", "tahoe_ft.prediction", "tahoe_ft.checkpoints", "tahoe_ft.model",
    ]  # fmt: skip
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    session = logging.getLogger("tahoe_ft.training.session")
    drop_sigterm = _DropSigterm()
    # Optuna logs a stopped trial with its traceback; `run_sweep` says it in one line
    optimize, drop_stop = logging.getLogger("optuna.study._optimize"), _DropStopTraceback()
    optimize.addFilter(drop_stop)
    verbosity = optuna.logging.get_verbosity()
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    session.addFilter(drop_sigterm)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"lightning\b.*")
            warnings.filterwarnings("ignore", message=r".*(does not have many workers|LitLogger).*")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        session.removeFilter(drop_sigterm)
        optimize.removeFilter(drop_stop)
        optuna.logging.set_verbosity(verbosity)


@contextlib.contextmanager
def _sigterm_stops_the_sweep() -> Iterator[None]:
    """SIGTERM during the trials raises `SweepStopped` (Optuna marks the trial FAIL, `run_sweep` says how to
    continue) wherever it lands: Lightning's own handler, which also runs, covers only the fit itself."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise SweepStopped("SIGTERM")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _DropStopTraceback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, KeyboardInterrupt | SweepStopped)


class _DropSigterm(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("training stopped by SIGTERM")


def _folds(plan: SweepPlan, n_test: int) -> list[Any]:
    """The nested folds under <sweep>/folds/ (`study.folds.make_folds` with `n_test`: the final test set drawn
    first, every fold validating on its own part of the rest), or [None] for the data set's own split."""
    cfg = plan.cfg
    if cfg.folds == 0:
        plan.sweep_dir.mkdir(parents=True, exist_ok=True)
        return [None]
    from tahoe_ft.study.folds import make_folds

    regime = str(cfg.regime)
    return make_folds(
        cfg.data,
        cfg.folds,
        plan.sweep_dir / "folds",
        seed=cfg.fold_seed,
        n_val=cfg.n_val,
        # another regime deals other names than the screen's perturbations: null is one fold's share of those
        n_test=n_test if regime == "unseen_perturbation" else cfg.n_test,
        regime=regime,
        target_context=cfg.target_context,
    )


def _pruner(cfg: SweepConfig):
    import optuna

    if cfg.pruner == PrunerName.median:
        return optuna.pruners.MedianPruner(
            n_startup_trials=cfg.pruner_startup_trials, n_warmup_steps=cfg.pruner_warmup_steps
        )
    if cfg.pruner == PrunerName.halving:
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=cfg.pruner_warmup_steps or "auto")
    return optuna.pruners.NopPruner()


def _check_study(study: Any, plan: SweepPlan, pins: dict[str, Any]) -> None:
    """A study continues only with the recipe, data and base model it was started with."""
    where = f"study '{plan.name}' in {plan.storage_url}"
    again = "continue it with its own settings, or start another study (sweep.name=... or storage=...)"
    if study.direction.name.lower() != plan.direction:
        raise UserError(
            f"{where} {study.direction.name.lower()}s, but objective={plan.cfg.objective} would "
            f"{plan.direction}; use its objective or another name (sweep.name=...)"
        )
    want = _json(plan.recipe())
    have = study.user_attrs.get(RECIPE_ATTR)
    if have is None:
        return  # created by a process that has not pinned it yet
    if not have.get("nested"):
        raise UserError(
            f"{where} was made by an older tahoe-ft, whose final test perturbations were other folds' "
            "validation ones; start another study (sweep.name=...)"
        )
    changed = [k for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)]
    if changed:
        k = changed[0]
        raise UserError(
            f"{where} was started with {k}={have.get(k)!r}, now {want.get(k)!r}"
            + (f" (+{len(changed) - 1} more)" if len(changed) > 1 else "")
            + f"; {again}"
        )
    for key, differ in ((PIN_DATA, data_change), (PIN_BASE, base_change)):
        pinned = study.user_attrs.get(key)
        what = differ(pinned, pins[key]) if pinned is not None else None
        if what:
            raise UserError(f"{where}: {what} changed since the study started; {again}")


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
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    top = sorted(complete, key=lambda t: t.value, reverse=plan.direction == "maximize")[:TOP]
    return {
        "study": plan.name,
        "storage": plan.storage_url,
        "sweep_dir": str(plan.sweep_dir),
        "objective": str(plan.cfg.objective),
        "direction": plan.direction,
        "trials": counts,
        "best": best,
        "top": [{"number": t.number, "value": t.value, "params": t.params} for t in top],
        "train_command": train_command(plan) if best else None,
        **outputs,
    }


def _check_final_once(study: Any | None, plan: SweepPlan) -> None:
    """final=true looks at the test set once; a second look needs final_again=true (and is recorded)."""
    looks = list(study.user_attrs.get(FINAL_ATTR, [])) if study is not None else []
    if looks and not plan.cfg.final_again:
        last = looks[-1]
        raise UserError(
            f"final=true: study '{plan.name}' scored its final test set already ({len(looks)} time(s), last "
            f"{last.get('when')}: trial {last.get('trial')}, {last.get('dir')}); another look at the test set "
            "needs final_again=true, which the study records"
        )


def _final(plan: SweepPlan, study: Any, folds: list[Any]) -> dict[str, Any]:
    """The best recipe trained again on every fold (as its trials were) and scored once on the final test set
    (every fold's test perturbations; none was a validation perturbation of any fold), with the panel and the
    ceiling. The look is recorded in the study before the test set is read (when, commit, trial, params)."""
    from optuna.trial import TrialState

    from tahoe_ft.runs import now_iso
    from tahoe_ft.study.comparison import compare_splits
    from tahoe_ft.study.reproduce import fold_data, reproduce

    cfg = plan.cfg
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise UserError(
            f"final=true: study '{plan.name}' has no complete trial yet; run more trials (n_trials=...)"
        )
    best = study.best_trial
    looks = list(study.user_attrs.get(FINAL_ATTR, []))
    out_dir = Path(plan.sweep_dir) / "final" / f"look-{len(looks) + 1}"
    record = {
        "look": len(looks) + 1,
        "when": now_iso(),
        "commit": git_commit(),
        "trial": best.number,
        "value": best.value,
        "params": best.params,
        "final_again": bool(looks),
        "test": list(folds[0].test) if folds[0] is not None else "the data set's own test split",
        "dir": str(out_dir),
    }
    study.set_user_attr(FINAL_ATTR, [*looks, record])  # counted even if the scoring fails half-way
    overrides = [
        *plan.final_args,
        override("logger.wandb_group", f"sweep-{plan.name}"),
        override("logger.wandb_tags", [f"sweep:{plan.name}", "final"]),
        *plan.overrides,
        *cfg.train_overrides,
        *(override(k, v) for k, v in best.params.items()),
    ]

    def chain(runs_dir: Path, data: Any) -> dict[str, Any]:
        rcfg = ReproduceConfig(
            runs_dir=str(runs_dir),
            step_scale=cfg.step_scale,
            experiments=list(plan.rounds),
            evaluate=list(plan.rounds),
            train_overrides=overrides,
            profile=cfg.profile,
            num_threads=cfg.num_threads,
            folds=0,
            seeds=[cfg.seed],
            data=data,
            paths=cfg.paths,
        )
        return reproduce(checked(rcfg))

    log.info("sweep %s: final: trial %d's recipe on the final test set (look %d)", plan.name, best.number,
             record["look"])  # fmt: skip
    if folds[0] is None:
        result = chain(out_dir, cfg.data)
    else:
        splits = []
        for fold in folds:
            runs = out_dir / f"fold-{fold.index}"
            chain(runs, fold_data(cfg.data, fold.toml, fold.regime))
            splits.append(({"fold": fold.index}, runs))
        compare_splits(splits, out_dir)
        result = {"compare_csv": str(out_dir / "compare.csv")}
    record = {**record, **result}
    study.set_user_attr(FINAL_ATTR, [*looks, record])
    return record
