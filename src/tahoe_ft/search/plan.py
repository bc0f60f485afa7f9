"""A sweep checked before anything is written: the space's rounds, overrides and parameters (every round
composed with both ends of every range and every choice, as `config.compose_round` composes what a trial
trains), each round's parent, the storage URL and the study's settings. `make_plan` raises `UserError` for any
bad input; only then does `tahoe_ft.search.study` create the sweep folder and the study.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tahoe_ft.config import SweepConfig, SweepObjective, TrainConfig, compose_round, experiments
from tahoe_ft.errors import UserError
from tahoe_ft.runs import RUN_REF, resolve_ref
from tahoe_ft.search.space import Param, flatten, override, parse_param
from tahoe_ft.study.reproduce import BASE, check_regime, experiment_name

# keys a trial's round gets from the sweep itself; neither a parameter nor a fixed override may set them
RESERVED = {"experiment", "runs_dir", "run_dir", "seed", "step_scale", "resume", "init_from", "pretrained"}
# the split is the fold's: a key that moves perturbations between train, val and test would let a trial read
# (or choose by) test perturbations
SPLIT_KEYS = {"data", "paths", "data.path", "data.split_toml", "data.val_perts", "data.test_perts",
              "data.val_cell_types", "data.test_cell_types"}  # fmt: skip
_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")


@dataclass
class SweepPlan:
    """What every trial trains, checked: `train_args` gives a round's overrides for one trial and fold."""

    cfg: SweepConfig
    name: str
    where: str
    rounds: list[str]
    params: list[Param]
    overrides: list[str]
    # per round: its parent when it lies outside the chain (init_from=<checkpoint>, resolved under runs_dir)
    parents: dict[str, list[str]] = field(default_factory=dict)
    # final=true's reproduce: pretrained= (resolved when the first round starts from it), or init_from=
    final_args: list[str] = field(default_factory=list)
    # per round that starts outside the chain: its parent's resolved path (None: from scratch); pinned
    bases: dict[str, str | None] = field(default_factory=dict)
    # per round: the validation metric trials are compared by (`fair_metric`)
    metrics: dict[str, str] = field(default_factory=dict)
    # reported steps of one round of one fold: fold k's round r reports at (k * rounds + r) * stride + step
    stride: int = 1
    sweep_dir: Path = Path(".")
    storage_url: str = ""
    default_storage: bool = True

    @property
    def direction(self) -> str:
        return "maximize" if self.cfg.objective == SweepObjective.val_score else "minimize"

    def train_args(self, exp: str, runs_dir: Path, values: dict[str, Any], tags: list[str]) -> list[str]:
        """The overrides of one round of one trial on one fold (compose_round adds the fold's data)."""
        c = self.cfg
        return [
            override("step_scale", c.step_scale),
            override("runs_dir", str(runs_dir)),
            override("seed", c.seed),
            override("pretrained", c.pretrained),
            *self.parents.get(exp, []),
            # a trial's console is the sweep's: no progress bar (train_overrides may turn it on again)
            override("trainer.enable_progress_bar", False),
            override("logger.wandb_group", f"sweep-{self.name}"),
            override("logger.wandb_tags", tags),
            *self.overrides,
            *c.train_overrides,
            *(override(k, v) for k, v in values.items()),
        ]

    def recipe(self) -> dict[str, Any]:
        """What the study's objective depends on: a resumed or parallel run must not change it."""
        c = self.cfg
        return {
            "rounds": self.rounds,
            "overrides": self.overrides,
            "params": {p.key: p.text for p in self.params},
            "folds": c.folds,
            "fold_seed": c.fold_seed,
            "n_val": c.n_val,
            "n_test": c.n_test,
            # the final test perturbations are drawn before the search and are no fold's validation ones
            "nested": True,
            "objective": str(c.objective),
            "step_scale": c.step_scale,
            "seed": c.seed,
            # what the folds hold out (absent for unseen_perturbation: the studies made before regimes)
            **(
                {"regime": str(c.regime), "target_context": c.target_context}
                if str(c.regime) != "unseen_perturbation" or c.target_context is not None
                else {}
            ),
        }


def make_plan(cfg: SweepConfig) -> SweepPlan:
    """Check the sweep as far as it can be without data: see the module docstring. Writes nothing."""
    space = cfg.sweep
    if space is None:
        raise UserError(
            f"no search space: tahoe-ft sweep +sweep=NAME (configs/sweep/: {', '.join(spaces())})"
        )
    name = space.name
    if not name or not _NAME.match(str(name)):
        raise UserError(
            f"sweep space name {name!r}: give the study a name of letters, digits, '.', '_' or '-' "
            "(sweep.name=... on the command line, or name: in the space file)"
        )
    where = f"sweep space '{name}'"
    _check_numbers(cfg)
    check_regime(cfg.regime, cfg.target_context, cfg.folds)

    rounds = [experiment_name(r) for r in space.rounds or []]
    if not rounds:
        raise UserError(f"{where}: rounds is empty; list the round(s) a trial trains, e.g. rounds: ['0905']")
    known = experiments()
    unknown = [r for r in rounds if r not in known]
    if unknown:
        raise UserError(f"{where}: unknown round(s) {unknown} in rounds; choose from: {', '.join(known)}")
    if BASE in rounds:
        raise UserError(
            f"{where}: '{BASE}' trains the base model on the demo drug set, not the screen; drop it from rounds "
            "and give its checkpoint as pretrained=..."
        )
    if len(set(rounds)) != len(rounds):
        raise UserError(f"{where}: rounds {rounds} lists a round twice; each resolves its parent by name")

    overrides = [str(o) for o in space.overrides or []]
    for source, items in (
        ("overrides", overrides),
        ("train_overrides", [str(o) for o in cfg.train_overrides]),
    ):
        for item in items:
            key = _key(item)
            if key in RESERVED or key in SPLIT_KEYS:
                raise UserError(f"{where}: {source} sets '{key}', which the sweep sets itself; drop '{item}'")
    params = [parse_param(k, v, where) for k, v in flatten(dict(space.params or {}), where).items()]
    fixed = {_key(o) for o in [*overrides, *cfg.train_overrides]}
    for p in params:
        if p.key in RESERVED or p.key in SPLIT_KEYS:
            raise UserError(
                f"{where}: params.{p.key} is set by the sweep itself (or moves the split); drop it"
            )
        if p.key in fixed:
            raise UserError(f"{where}: params.{p.key} is also fixed by an override; drop one of them")

    sweep_dir = Path(cfg.runs_dir) / "sweeps" / name
    plan = SweepPlan(cfg, name, where, rounds, params, overrides, sweep_dir=sweep_dir)
    _check_rounds(plan)
    from tahoe_ft.search.storage import check_storage, default_url

    plan.default_storage = cfg.storage is None
    plan.storage_url = cfg.storage or default_url(sweep_dir)
    check_storage(plan.storage_url, default=plan.default_storage)
    return plan


def spaces() -> list[str]:
    from tahoe_ft.config import group_options

    return sorted(group_options("sweep"))


def _key(item: str) -> str:
    return str(item).lstrip("+~").split("=", 1)[0].strip()


def _check_numbers(cfg: SweepConfig) -> None:
    checks = [
        (cfg.n_trials >= 1, f"n_trials={cfg.n_trials} must be >= 1"),
        (
            cfg.folds == 0 or cfg.folds >= 2,
            f"folds={cfg.folds}: use folds=0 (the data's own split) or folds >= 2",
        ),
        (
            cfg.step_scale > 0,
            f"step_scale={cfg.step_scale} must be > 0; it multiplies the rounds' step counts",
        ),
        (cfg.heartbeat_s >= 1, f"heartbeat_s={cfg.heartbeat_s} must be >= 1 (seconds)"),
        (cfg.pruner_startup_trials >= 0, f"pruner_startup_trials={cfg.pruner_startup_trials} must be >= 0"),
        (cfg.pruner_warmup_steps >= 0, f"pruner_warmup_steps={cfg.pruner_warmup_steps} must be >= 0"),
        (cfg.n_val is None or cfg.n_val >= 1, f"n_val={cfg.n_val} must be >= 1 (or null: half a fold)"),
        (
            cfg.n_test is None or cfg.n_test >= 1,
            f"n_test={cfg.n_test} must be >= 1 (or null: one fold's share of the perturbations)",
        ),
        (not cfg.final_again or cfg.final, "final_again=true goes with final=true"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def _check_rounds(plan: SweepPlan) -> None:
    """Compose every round with every parameter's candidate values; resolve parents outside the chain."""
    cfg = plan.cfg
    check_dir = plan.sweep_dir / "trial-check"
    n_sets = max([2, *(len(p.candidates()) for p in plan.params)])
    largest = 1
    plan.final_args = [override("pretrained", cfg.pretrained)]
    for i, exp in enumerate(plan.rounds):
        base = _compose(plan, exp, plan.train_args(exp, check_dir, {}, []), "its fixed overrides")
        parent = base.init_from
        if i == 0 and not parent:
            plan.bases[exp] = None  # from scratch (pretrained=null)
        if parent:
            m = RUN_REF.match(parent)
            if m is None or m.group("exp") not in plan.rounds[:i]:  # a checkpoint from outside the chain
                path = _resolve_parent(plan, exp, parent, pretrained=parent == base.pretrained)
                plan.parents[exp] = [override("init_from", str(path))]
                plan.bases[exp] = str(path)
                if i == 0 and parent == base.pretrained:
                    plan.final_args = [override("pretrained", str(path))]
                elif cfg.final and len(plan.rounds) > 1:
                    raise UserError(
                        f"{plan.where}: final=true trains the rounds with reproduce, which resolves round {exp}'s "
                        f"parent {parent} by name; start the rounds at the round that makes it"
                    )
                elif cfg.final:
                    plan.final_args.append(override("init_from", str(path)))
        largest = max(largest, int(base.trainer.max_steps))
        plan.metrics[exp] = fair_metric(base)
        set_lens = {int(base.model.cell_set_len)}
        for j in range(n_sets):
            values = {p.key: p.candidates()[j % len(p.candidates())] for p in plan.params}
            what = ", ".join(override(k, v) for k, v in values.items())
            composed = _compose(plan, exp, plan.train_args(exp, check_dir, values, []), what, values)
            largest = max(largest, int(composed.trainer.max_steps))
            set_lens.add(int(composed.model.cell_set_len))
            if fair_metric(composed) != plan.metrics[exp]:
                raise UserError(
                    f"{plan.where}: round {exp} with {what} logs another validation loss than with its fixed "
                    "overrides; keep loss.name and checkpoint.monitor fixed (not in params)"
                )
        _check_fair(plan, exp, base, set_lens)
    # more than any round's last step: fold k's round r reports at (k * n_rounds + r) * stride + step
    plan.stride = 10 ** len(str(largest))


def fair_metric(cfg: TrainConfig) -> str:
    """The validation metric a round's trials are compared by: for the energy loss the unbiased energy
    distance (`val/unbiased_loss`, the monitored loss over pairs of distinct cells), whose expectation does not
    depend on `model.cell_set_len` (the logged `val_loss` counts each cell's zero distance to itself, a floor
    that shrinks as 1/cell_set_len: untrained models of set sizes 16 and 64 score 2.83 and 1.21 on the demo);
    for mse (cells paired one to one) `val_loss` itself."""
    return "val/unbiased_loss" if str(cfg.loss.name) == "energy" else "val_loss"


def _check_fair(plan: SweepPlan, exp: str, base: TrainConfig, set_lens: set[int]) -> None:
    """Refuse a search whose trials would be compared on unequal terms: sinkhorn's value depends on the set size
    (no unbiased form is logged), and the unbiased energy needs sets of >= 2 cells."""
    name = str(base.loss.name)
    if name == "sinkhorn" and len(set_lens) > 1:
        raise UserError(
            f"{plan.where}: round {exp} trains with loss.name=sinkhorn, whose validation loss depends on "
            f"model.cell_set_len (searched: {sorted(set_lens)}); fix model.cell_set_len, or use "
            "objective=val_score"
        )
    if name == "energy" and min(set_lens) < 2:
        raise UserError(
            f"{plan.where}: round {exp}: model.cell_set_len={min(set_lens)} leaves no pair of cells for the "
            "unbiased validation loss the trials are compared by; use model.cell_set_len >= 2"
        )


def _compose(
    plan: SweepPlan, exp: str, args: list[str], what: str, values: dict | None = None
) -> TrainConfig:
    cfg = plan.cfg
    try:
        return compose_round(exp, args, data=cfg.data, paths=cfg.paths)
    except UserError as exc:
        msg = str(exc)
        keys = list(values or {})
        culprits = [k for k in keys if f"'{k}'" in msg] or [
            k for k in keys if f"'{k.rsplit('.', 1)[-1]}'" in msg
        ]
        at = f"params.{culprits[0]}" if culprits else f"round {exp} with {what}"
        raise UserError(f"{plan.where}: {at}: {msg}") from None


def _resolve_parent(plan: SweepPlan, exp: str, parent: str, *, pretrained: bool) -> Path:
    how = (
        "or give pretrained=<a checkpoint> (pretrained=null: from scratch)"
        if pretrained
        else "or start the rounds at the round that makes it (rounds: [...])"
    )
    try:
        return resolve_ref(parent, plan.cfg.runs_dir).resolve()
    except UserError as exc:
        raise UserError(
            f"{plan.where}: round {exp} starts from {parent}, outside the chain: {exc}; {how}"
        ) from None
