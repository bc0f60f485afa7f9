"""The case study in one call (`tahoe-ft reproduce`, `tahoe_ft.reproduce`).

demo data -> pretrain (the ST-Tahoe stand-in) -> 0826 -> 0901 and 0905 -> 0906 -> 0907 (and 0907aux) -> 0908
-> predict -> eval (with the baseline panel and the data ceiling) -> compare. Every stage is what the Python API
call a user would make runs (`tahoe_ft.train(compose("train", ["+experiment=0906"]))`,
`tahoe_ft.predict(PredictConfig(exp="0906"))`, ...), so the runs it leaves behind are ordinary runs, each with its
own wandb run; parents are resolved by name. Every round trains on the typed `ReproduceConfig.data` (and
`paths`): its config is `config.compose_round` of the experiment file on that data, so
`tahoe_ft.reproduce(ReproduceConfig(data=DataConfig(name="custom", path=...)))` trains on that file. This module
calls the library below the API (`tahoe_ft.api` imports it, not the other way round).

Over folds and seeds (`folds=K`, `seeds=[...]`): the perturbations are dealt into K folds (`tahoe_ft.study.folds`;
`regime=` says what a fold holds out, `target_context=` the cell type of the context regimes),
and the chain runs once per (seed, fold) under `runs_dir/seed-S/fold-K/`; the base model (`pretrain`, which
does not see the screen) is trained once per seed and shared by that seed's folds. `data_seeds=[...]` repeats
all of it on demo data sets made with other generator seeds (`runs_dir/data-D/`). `compare.csv` then holds
every round and every baseline as mean ± sd over the splits (`compare_splits.csv`: each split's rows).

`refit=true` (`refit_chain`): once a chain is trained and scored, its rounds are trained again into
`<chain>/refit/` on the training and validation perturbations together (the validation perturbations move into
training; the test ones stay out), each for the step count its validation chose (`best_step`, 0 included: then
the refit round is its starting weights) and from its parent's refit (`final.pt`); the first gene-space round
refits the feature prior on both. Those rounds are predicted and scored with the panel of the same training
perturbations (its ridges then see the validation ones too), into `<chain>/refit/compare.csv` and, over splits,
`runs_dir/refit/compare.csv`. Nothing in it chooses anything on the test perturbations.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from rich.console import Console

from tahoe_ft.config import (
    DataConfig,
    DemoConfig,
    EvalConfig,
    PathsConfig,
    PredictConfig,
    ReproduceConfig,
    compose_round,
    config_dir,
)
from tahoe_ft.errors import UserError
from tahoe_ft.fileio import atomic_write_text
from tahoe_ft.runs import RUN_REF, newest_run, read_run_info, resolve_ref, write_json_atomic

log = logging.getLogger(__name__)

BASE = "pretrain"  # the base model round: trained on the demo drug set, never on the screen


def experiment_name(e: object) -> str:
    """An experiment name; `0905` typed unquoted on the command line arrives as the integer 905."""
    s = str(e)
    return s.zfill(4) if s.isdigit() else s


def stages(cfg: ReproduceConfig) -> list[tuple[str, str]]:
    """(command, experiment) of one chain, in the order they run."""
    plan = [("train", experiment_name(e)) for e in cfg.experiments]
    plan += [("predict", experiment_name(e)) for e in cfg.evaluate]
    plan += [("eval", experiment_name(e)) for e in cfg.evaluate]
    if cfg.evaluate:
        plan.append(("compare", ""))
    return plan


class StageClock:
    def __init__(self, console: Console):
        self.console, self.t0, self.timings = console, time.perf_counter(), []

    def stage(self, label: str, fn, *args, **kw):
        self.console.rule(f"[bold]reproduce: {label}  (elapsed {time.perf_counter() - self.t0:.0f} s)")
        ts = time.perf_counter()
        out = fn(*args, **kw)
        self.timings.append({"stage": label, "seconds": round(time.perf_counter() - ts, 1)})
        return out

    @property
    def wall(self) -> float:
        return time.perf_counter() - self.t0


def _train(exp: str, args: list[str], data: DataConfig, cfg: ReproduceConfig) -> Path:
    from tahoe_ft.training import train

    return train(compose_round(exp, args, data=data, paths=cfg.paths))


def _predict(config: PredictConfig) -> Path:
    """What `tahoe_ft.predict(config)` does."""
    from tahoe_ft.prediction import predict

    return predict(config)


def _evaluate(config: EvalConfig):
    """What `tahoe_ft.evaluate(config)` does."""
    from tahoe_ft.evaluation.run import evaluate_run

    return evaluate_run(config)


def _compare(runs_dir: Path):
    from tahoe_ft.study.comparison import compare

    return compare(runs_dir)


def _chain(
    cfg: ReproduceConfig,
    clock: StageClock,
    runs_dir: Path,
    data: DataConfig,
    overrides: Sequence[str] = (),
    *,
    seed: int,
    prefix: str = "",
    skip: Sequence[str] = (),
) -> None:
    """Train, predict, evaluate and compare one chain of rounds on `data` into `runs_dir`."""
    for cmd, exp in stages(cfg):
        if exp in skip:
            continue
        label = f"{prefix}{cmd} {exp}".strip()
        if cmd == "train":
            args = [f"step_scale={cfg.step_scale}", f"runs_dir={runs_dir}", f"seed={seed}"]
            clock.stage(label, _train, exp, [*args, *overrides, *cfg.train_overrides], data, cfg)
        elif cmd == "predict":
            clock.stage(label, _predict, PredictConfig(exp=exp, runs_dir=str(runs_dir), seed=seed))
        elif cmd == "eval":
            config = EvalConfig(
                exp=exp, runs_dir=str(runs_dir), profile=cfg.profile, num_threads=cfg.num_threads
            )
            clock.stage(label, _evaluate, config)
        else:
            clock.stage(label, _compare, runs_dir)


def refit_data(data: DataConfig, out_dir: Path) -> DataConfig:
    """`data` with its validation perturbations (and cell types) moved into training: no val lists, and a split
    TOML rewritten into `out_dir/split.toml` without its `val` entries (`[fewshot]` val lists emptied,
    `[zeroshot]` val cell types dropped)."""
    toml = None
    if data.split_toml:
        toml = str(out_dir / "split.toml")
        atomic_write_text(Path(toml), _without_val(Path(data.split_toml)))
    return dataclasses.replace(data, split_toml=toml, val_perts=[], val_cell_types=[])


def _without_val(path: Path) -> str:
    """The split TOML at `path` with its validation entries dropped (test ones kept), through the one writer."""
    from tahoe_ft.data.split_file import format_split_toml, parse_split_toml

    toml = parse_split_toml(path)
    return (
        format_split_toml(
            {ds: [str(f) for f in files] for ds, files in toml.datasets.items()},
            zeroshot={key: split for key, split in toml.zeroshot.items() if split != "val"},
            fewshot={key: {"val": [], "test": list(t["test"])} for key, t in toml.fewshot.items()},
            header=f"{path} without its validation entries (tahoe-ft reproduce refit=true)",
        )
        + "\n"
    )


def refit_chain(
    cfg: ReproduceConfig,
    clock: StageClock,
    runs_dir: Path,
    data: DataConfig,
    overrides: Sequence[str] = (),
    *,
    seed: int,
    prefix: str = "",
    skip: Sequence[str] = (),
) -> Path:
    """The trained chain in `runs_dir` again on training + validation perturbations, into `runs_dir/refit`
    (module docstring); returns that folder."""
    out = runs_dir / "refit"
    data = refit_data(data, out)
    refitted: set[str] = set()
    for exp in (experiment_name(e) for e in cfg.experiments):
        if exp in skip:
            continue
        info = read_run_info(newest_run(runs_dir, exp))
        steps = info.get("best_step")
        if steps is None:
            raise UserError(
                f"refit=true: round {exp} in {runs_dir} has no best validation step (a split without "
                "validation perturbations?); refit needs the step count validation chose"
            )
        args = [
            f"step_scale={cfg.step_scale}",
            f"runs_dir={out}",
            f"seed={seed}",
            *overrides,
            *cfg.train_overrides,
        ]
        init = str(compose_round(exp, args, data=data, paths=cfg.paths).init_from or "")
        parent = RUN_REF.match(init)
        refit = [f"trainer.max_steps={steps}"]
        if parent is not None:
            # the parent's refit, or for a round not refitted (the base model) what the chain started from
            refitted_parent = parent.group("exp") in refitted
            start = f"run:{parent.group('exp')}/final.pt" if refitted_parent else resolve_ref(init, runs_dir)
            refit.append(f"init_from={start}")
        clock.stage(f"{prefix}refit train {exp} ({steps} steps)", _train, exp, [*args, *refit], data, cfg)
        refitted.add(exp)
    for exp in (experiment_name(e) for e in cfg.evaluate):
        config = PredictConfig(exp=exp, runs_dir=str(out), seed=seed, ckpt="final.pt")
        clock.stage(f"{prefix}refit predict {exp}", _predict, config)
    for exp in (experiment_name(e) for e in cfg.evaluate):
        config = EvalConfig(exp=exp, runs_dir=str(out), profile=cfg.profile, num_threads=cfg.num_threads)
        clock.stage(f"{prefix}refit eval {exp}", _evaluate, config)
    if cfg.evaluate:
        clock.stage(f"{prefix}refit compare", _compare, out)
    return out


def check_plan(cfg: ReproduceConfig) -> None:
    """What needs no data, checked before anything is generated, trained or written: `step_scale`, `folds`,
    the seeds, the rounds' names and every round's train config with `train_overrides` (composed, not run)."""
    from tahoe_ft.config import experiments
    from tahoe_ft.training.recipe import MAX_STEP_SCALE

    if not 0 < cfg.step_scale <= MAX_STEP_SCALE:
        raise UserError(
            f"step_scale={cfg.step_scale} must be > 0 and <= {MAX_STEP_SCALE:g}; it multiplies the study's "
            "step counts (1 = the study's own)"
        )
    if cfg.folds < 0 or cfg.folds == 1:
        raise UserError(f"folds={cfg.folds}: use folds=0 (the data set's own split) or folds >= 2")
    check_regime(cfg.regime, cfg.target_context, cfg.folds)
    for key in ("seeds", "data_seeds"):
        values = list(getattr(cfg, key))
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise UserError(f"{key}={values}: give whole numbers >= 0, e.g. {key}=[0,1,2]")
    known = experiments()
    for key in ("experiments", "evaluate"):
        unknown = [experiment_name(e) for e in getattr(cfg, key) if experiment_name(e) not in known]
        if unknown:
            raise UserError(f"{key}=[...] names unknown rounds {unknown}; choose from: {', '.join(known)}")
    for exp in dict.fromkeys(experiment_name(e) for e in cfg.experiments):
        args = [f"step_scale={cfg.step_scale}", f"runs_dir={cfg.runs_dir}", *cfg.train_overrides]
        compose_round(exp, args, data=cfg.data, paths=cfg.paths)


def check_regime(regime: Any, target_context: str | None, folds: int) -> None:
    """A regime other than unseen_perturbation is dealt into folds; target_context goes with such a regime."""
    regime = str(getattr(regime, "value", regime))
    if regime != "unseen_perturbation" and folds == 0:
        raise UserError(
            f"regime={regime} is dealt into folds, but folds=0 uses the data set's own split; give folds=K (>= 2)"
        )
    if target_context is not None and regime == "unseen_perturbation":
        raise UserError(
            f"target_context={target_context} goes with regime=few_shot_context, zero_shot_context or "
            "unseen_combination; unseen_perturbation holds perturbations out in every cell type: drop target_context"
        )


def reproduce(cfg: ReproduceConfig) -> dict[str, Any]:
    """Run the study in this process; return {"wall_time_s", "stages": [...], "compare_csv"}.

    Every round trains on `cfg.data` and `cfg.paths` (`config.compose_round`); `cfg.train_overrides` (Hydra
    syntax) go to every round's train config after `step_scale`, `runs_dir` and `seed`.
    """
    check_plan(cfg)
    console = Console(stderr=True)
    clock = StageClock(console)
    runs = Path(cfg.runs_dir)
    seeds = [int(s) for s in cfg.seeds] or [0]
    data_seeds = [int(s) for s in cfg.data_seeds]
    if data_seeds and cfg.data.name != "demo":
        raise UserError(
            f"data_seeds={data_seeds} sets the demo generator's seed, but data={cfg.data.name}: "
            "drop data_seeds, or use data=demo"
        )
    if cfg.folds == 0 and len(seeds) == 1 and not data_seeds:
        _chain(cfg, clock, runs, cfg.data, seed=seeds[0])
        if cfg.refit:
            refit_chain(cfg, clock, runs, cfg.data, seed=seeds[0], skip=[BASE])
    else:
        from tahoe_ft.study.comparison import compare_splits

        splits: list[tuple[dict[str, Any], Path]] = []
        for d in data_seeds or [None]:
            if d is None:
                splits += _cross_validate(cfg, clock, runs, cfg.data, seeds)
            else:
                data = with_demo_seed(cfg.data, cfg.paths, d)
                found = _cross_validate(cfg, clock, runs / f"data-{d}", data, seeds, prefix=f"data {d} ")
                splits += [({"data_seed": d, **labels}, path) for labels, path in found]
        if cfg.evaluate:  # with nothing evaluated (evaluate=[]) there is nothing to compare
            clock.stage("compare over splits", compare_splits, splits, runs)
            if cfg.refit:
                refits = [(labels, path / "refit") for labels, path in splits]
                clock.stage("refit: compare over splits", compare_splits, refits, runs / "refit")
    summary = {
        "wall_time_s": round(clock.wall, 1),
        "stages": clock.timings,
        "compare_csv": str(runs / "compare.csv") if cfg.evaluate else None,
        "refit_compare_csv": str(runs / "refit" / "compare.csv") if cfg.refit and cfg.evaluate else None,
    }
    write_json_atomic(runs / "reproduce.json", summary)
    console.rule(f"[bold green]reproduce finished in {clock.wall / 60:.1f} min")
    return summary


@dataclasses.dataclass
class _DataOnly:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    paths: PathsConfig = dataclasses.field(default_factory=PathsConfig)


def with_demo_seed(data: DataConfig, paths: PathsConfig, seed: int) -> DataConfig:
    """The demo data set made with generator seed `seed`: `data.demo.seed` set, and the files that
    `configs/data/demo.yaml` derives from the spec (`${tahoe_demo:FILE}`) derived again for it."""
    from tahoe_ft.config import register, to_object, validate

    spec = dataclasses.replace(data.demo or DemoConfig(), seed=seed)
    group = OmegaConf.to_container(OmegaConf.load(config_dir() / "data" / "demo.yaml"), resolve=False)
    derived = {k: v for k, v in group.items() if isinstance(v, str) and "${tahoe_demo:" in v}
    node = OmegaConf.merge(OmegaConf.structured(dataclasses.replace(data, demo=spec)), derived)
    register()
    return to_object(validate({"data": node, "paths": OmegaConf.structured(paths)}, _DataOnly)).data


def _cross_validate(
    cfg: ReproduceConfig, clock: StageClock, runs: Path, data: DataConfig, seeds: list[int], prefix: str = ""
) -> list[tuple[dict[str, Any], Path]]:
    """Every (seed, fold) chain on one data set under `runs`; each split's labels and runs dir."""
    from tahoe_ft.study.folds import make_folds

    exps = [experiment_name(e) for e in cfg.experiments]
    folds: list[Any] = [None]
    if cfg.folds:
        folds = make_folds(
            data,
            cfg.folds,
            runs / "folds",
            seed=cfg.fold_seed,
            n_val=cfg.n_val,
            regime=cfg.regime,
            target_context=cfg.target_context,
        )
    splits = []
    for seed in seeds:
        base_runs = runs / f"seed-{seed}"
        shared: list[str] = []
        if BASE in exps:  # the base model does not see the screen: one per seed, shared by the folds
            _chain(_only(cfg, BASE), clock, base_runs, data, seed=seed, prefix=f"{prefix}seed {seed}: ")
            shared = [f"pretrained={(base_runs / BASE / 'latest').resolve() / 'checkpoints' / 'best-val.pt'}"]
        for fold in folds:
            name = "fold-own" if fold is None else f"fold-{fold.index}"
            split = (
                cfg,
                clock,
                base_runs / name,
                data if fold is None else fold_data(data, fold.toml, fold.regime),
                shared,
            )
            label = f"{prefix}seed {seed} {name}: "
            _chain(*split, seed=seed, prefix=label, skip=[BASE])
            if cfg.refit:
                refit_chain(*split, seed=seed, prefix=label, skip=[BASE])
            splits.append(({"seed": seed, "fold": "own" if fold is None else fold.index}, base_runs / name))
    return splits


def fold_data(data: DataConfig, toml: str, regime: Any = None) -> DataConfig:
    """`data` split by a fold's TOML: the data set's own split lists must not add to it. `regime`: the one
    that dealt the fold (recorded in each run's manifest)."""
    return dataclasses.replace(
        data,
        split_toml=toml,
        val_perts=[],
        test_perts=[],
        val_cell_types=[],
        test_cell_types=[],
        regime=regime if regime is not None else data.regime,
    )


def _only(cfg: ReproduceConfig, exp: str) -> ReproduceConfig:
    return dataclasses.replace(cfg, experiments=[exp], evaluate=[])
