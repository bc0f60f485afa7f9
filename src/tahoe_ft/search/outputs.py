"""What a sweep leaves in its folder when it ends: `trials.csv` (Optuna's trials_dataframe), `best.yaml` (the
best trial as an experiment file) and the plots (optimization history, parameter importances, objective
against each parameter).

`best.yaml` is the last round's experiment file with the space's fixed overrides and the best parameters on
top: `defaults: [/experiment/<round>, _self_]` (plus `override /<group>: <choice>` for a config group the space
sets), `experiment: <NAME>-best`, the sweep's `step_scale` (so `${scaled:N}` step counts are the trials'), and
the values. tahoe-ft finds experiment files by name in `configs/experiment/` of the folder it runs from
(`config.user_config_dir`) beside the shipped ones, so it trains once copied there:
`mkdir -p configs/experiment; cp <sweep>/best.yaml configs/experiment/<NAME>-best.yaml;
tahoe-ft train +experiment=<NAME>-best data=...`.
"""

from __future__ import annotations

import logging
import textwrap
import warnings
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from tahoe_ft.config import DataConfig, config_dir
from tahoe_ft.fileio import atomic_path, atomic_write_text
from tahoe_ft.search.plan import SweepPlan
from tahoe_ft.search.space import override

log = logging.getLogger(__name__)


def write_outputs(plan: SweepPlan, study: Any) -> dict[str, Any]:
    """trials.csv, best.yaml (when a trial completed) and the plots; returns their paths."""
    from optuna.trial import TrialState

    out: dict[str, Any] = {}
    d = plan.sweep_dir
    frame = study.trials_dataframe()
    with atomic_path(d / "trials.csv", suffix=".csv") as tmp:
        frame.to_csv(tmp, index=False)
    out["trials_csv"] = str(d / "trials.csv")
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if complete:
        best = study.best_trial
        atomic_write_text(d / "best.yaml", best_yaml(plan, best.number, best.value, best.params))
        out["best_yaml"] = str(d / "best.yaml")
    else:
        log.info("sweep: no trial completed yet; best.yaml is written once one does")
    out["plots"] = plots(study, d, n_complete=len(complete))
    return out


def best_yaml(plan: SweepPlan, number: int, value: float, params: dict[str, Any]) -> str:
    """The best trial as an experiment file (see the module docstring)."""
    exp = plan.rounds[-1]
    groups = {p.stem for p in config_dir().iterdir() if p.is_dir()}
    body: dict[str, Any] = {}
    group_choices: list[tuple[str, Any]] = []
    items = [(a.lstrip("+").split("=", 1)[0], _parsed_value(a)) for a in plan.overrides]
    items += list(params.items())
    for key, val in items:
        if "." not in key and key in groups:
            group_choices.append((key, val))
        else:
            node = body
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = val
    name = f"{plan.name}-best"
    cfg = plan.cfg
    head = OmegaConf.to_yaml(
        OmegaConf.create(
            {
                "experiment": name,
                "description": f"sweep {plan.name}: trial {number} ({cfg.objective} {value:.6g}), round {exp}",
                "step_scale": cfg.step_scale,
            }
        )
    )
    chain = [
        f"#   tahoe-ft train +experiment={r} step_scale={cfg.step_scale} "
        + " ".join([*plan.overrides, *(override(k, v) for k, v in params.items())])
        for r in plan.rounds[:-1]
    ]
    lines = [
        "# @package _global_",
        f"# tahoe-ft sweep {plan.name}: the best trial, {number}, {cfg.objective} = {value!r} (mean over the",
        f"# folds' validation perturbations; study {plan.storage_url}).",
        f"# Round {exp}'s recipe (configs/experiment/{exp}.yaml) with the space's fixed overrides and the best",
        "# parameters. Train it once copied into configs/experiment/ of the folder you run tahoe-ft from",
        "# (experiments are found by name there, beside the shipped ones):",
        f"#   mkdir -p configs/experiment; cp {plan.sweep_dir / 'best.yaml'} configs/experiment/{name}.yaml",
        f"#   tahoe-ft train +experiment={name} data=...",
        f"# Its runs go to runs/{name}/. step_scale is the sweep's, so the rounds' ${{scaled:N}} step counts are the",
        "# trials'.",
    ]
    if cfg.train_overrides:
        text = f"Not included: the sweep's train_overrides {list(cfg.train_overrides)}."
        lines += ["# " + ln for ln in textwrap.wrap(text, 106, break_on_hyphens=False)]
    if chain:
        lines += [
            f"# Its parent is round {plan.rounds[-2]}: train the chain's earlier rounds first, e.g.",
            *chain,
        ]
    lines += ["defaults:", f"  - /experiment/{exp}", "  - _self_"]
    lines += [f"  - override /{g}: {_yaml_scalar(v)}" for g, v in group_choices]
    lines += ["", head.rstrip("\n")]
    if body:
        lines.append(OmegaConf.to_yaml(OmegaConf.create(body)).rstrip("\n"))
    return "\n".join(lines) + "\n"


def _parsed_value(item: str) -> Any:
    """The value of a Hydra override `key=value`, as Hydra parses it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([item])[0]
    return parsed.value()


def _yaml_scalar(v: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.create({"v": v})).split(":", 1)[1].strip()


def plots(study: Any, out_dir: Path, *, n_complete: int) -> list[str]:
    """history.png, importances.png (with >= 2 complete trials) and slice.png (objective against each
    parameter), with Optuna's matplotlib backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm

    written: list[str] = []
    if n_complete == 0:
        log.info("sweep: no complete trial, no plots")
        return written
    makers = [("history.png", ovm.plot_optimization_history), ("slice.png", ovm.plot_slice)]
    if n_complete >= 2:
        makers.insert(1, ("importances.png", ovm.plot_param_importances))
    else:
        log.info(
            "sweep: parameter importances need >= 2 complete trials (have %d): importances.png skipped",
            n_complete,
        )
    # matplotlib's "Using categorical units ..." line for a choice() parameter: the slice plot is meant so
    logging.getLogger("matplotlib.category").setLevel(logging.WARNING)
    for file, make in makers:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna's ExperimentalWarning for the matplotlib backend
                axes = make(study)
        except Exception as exc:  # noqa: BLE001 - a plot Optuna cannot draw (e.g. one distinct value) is skipped
            log.info(
                "sweep: %s not drawn: %s", file, str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            )
            continue
        panels = list(axes.flat) if hasattr(axes, "flat") else [axes]
        fig = panels[0].figure
        if len(panels) > 1:  # the slice plot: one panel per parameter, and a colour bar
            fig.set_size_inches(3.2 * len(panels) + 1.6, 4.2)
        with atomic_path(out_dir / file, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(str(out_dir / file))
    return written


def train_command(plan: SweepPlan) -> list[str]:
    """The shell commands that train the best recipe (best.yaml) on the sweep's data, from the folder tahoe-ft
    runs from."""
    cfg = plan.cfg
    name = f"{plan.name}-best"
    data = [f"data={cfg.data.name}"]
    if cfg.data.name == "custom" and cfg.data.path:
        data.append(f"data.path={cfg.data.path}")
        for key in ("pert_col", "control_pert", "cell_type_col", "batch_col"):
            value = getattr(cfg.data, key)
            if value != getattr(DataConfig(), key):
                data.append(f"data.{key}={value}")
    base = plan.bases.get(plan.rounds[0]) if plan.rounds else None
    first = [] if len(plan.rounds) > 1 else [f"pretrained={base if base else 'null'}"]
    return [
        f"mkdir -p configs/experiment && cp {plan.sweep_dir / 'best.yaml'} configs/experiment/{name}.yaml",
        " ".join(["tahoe-ft train", f"+experiment={name}", *first, *data])
        + ("  # after the chain's earlier rounds: see best.yaml" if len(plan.rounds) > 1 else ""),
    ]


def console_report(summary: dict[str, Any], width: int = 100) -> str:
    """What `tahoe-ft sweep` prints at the end: the trial counts, the best trials (number, objective,
    parameters), the command that trains the winner, the final score's place; everything else is in
    sweep.json."""
    n = summary.get("trials", {})
    lines = [
        f"sweep {summary['study']}: {n.get('complete', 0)} complete, {n.get('pruned', 0)} pruned, "
        f"{n.get('fail', 0)} failed trial(s); objective {summary['objective']} ({summary['direction']})",
    ]
    top = summary.get("top") or []
    if top:
        lines.append(f"{'trial':>7}  {summary['objective']:>10}  parameters")
        for t in top:
            params = " ".join(f"{k}={_short(v)}" for k, v in t["params"].items()) or "-"
            head = f"{t['number']:>7}  {t['value']:>10.5g}  "
            wrapped = textwrap.wrap(params, max(20, width - len(head)), break_on_hyphens=False) or ["-"]
            lines.append(head + wrapped[0])
            lines += [" " * len(head) + w for w in wrapped[1:]]
        lines.append("train the best recipe:")
        lines += [f"  {c}" for c in summary.get("train_command") or []]
    else:
        lines.append("no trial completed yet: run more trials (n_trials=...)")
    final = summary.get("final")
    if final:
        lines.append(
            f"final test set scored (look {final.get('look')}, trial {final.get('trial')}): "
            f"{final.get('compare_csv')}"
        )
    lines.append(f"everything else: {Path(summary['sweep_dir']) / 'sweep.json'}")
    return "\n".join(lines)


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
