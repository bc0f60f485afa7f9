"""The case study in one call (`tahoe-ft reproduce`, `tahoe_ft.reproduce`).

demo data -> pretrain (the ST-Tahoe stand-in) -> 0826 -> 0901 and 0905 -> 0906 -> 0907 -> 0908 -> predict ->
eval -> compare. Every stage is the Python API call a user would make (`tahoe_ft.train(compose("train",
["+experiment=0906"]))`, `tahoe_ft.predict(exp="0906")`, ...), so the runs it leaves behind are ordinary runs,
each with its own wandb run; parents are resolved by name.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from tahoe_ft.config import ReproduceConfig
from tahoe_ft.runs import write_json_atomic

log = logging.getLogger(__name__)


def experiment_name(e: object) -> str:
    """An experiment name; `0905` typed unquoted on the command line arrives as the integer 905."""
    s = str(e)
    return s.zfill(4) if s.isdigit() else s


def stages(cfg: ReproduceConfig) -> list[tuple[str, str]]:
    """(command, experiment) in the order they run."""
    plan = [("train", experiment_name(e)) for e in cfg.experiments]
    plan += [("predict", experiment_name(e)) for e in cfg.evaluate]
    plan += [("eval", experiment_name(e)) for e in cfg.evaluate]
    plan.append(("compare", ""))
    return plan


def reproduce(cfg: ReproduceConfig, *, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Run every stage in this process; return {"wall_time_s", "stages": [...], "compare_csv"}.

    `overrides` (Hydra syntax: `data=papalexi`, `data.demo.n_genes=...`, `paths.data_cache=...`) go to every
    round's train config, after `step_scale` and `runs_dir` and before `cfg.train_overrides`.
    """
    from tahoe_ft import api

    console = Console(stderr=True)
    plan = stages(cfg)
    t0 = time.perf_counter()
    timings = []
    for i, (cmd, exp) in enumerate(plan, 1):
        label = f"{cmd} {exp}".strip()
        console.rule(f"[bold]reproduce [{i}/{len(plan)}] {label}  (elapsed {time.perf_counter() - t0:.0f} s)")
        ts = time.perf_counter()
        if cmd == "train":
            args = [f"+experiment={exp}", f"step_scale={cfg.step_scale}", f"runs_dir={cfg.runs_dir}"]
            api.train(api.compose("train", [*args, *overrides, *cfg.train_overrides]))
        elif cmd == "predict":
            api.predict("best-val.pt", exp=exp, runs_dir=cfg.runs_dir)
        elif cmd == "eval":
            api.evaluate(exp=exp, runs_dir=cfg.runs_dir, profile=cfg.profile, num_threads=cfg.num_threads)
        else:
            api.compare(cfg.runs_dir)
        timings.append({"stage": label, "seconds": round(time.perf_counter() - ts, 1)})
    wall = time.perf_counter() - t0
    summary = {
        "wall_time_s": round(wall, 1),
        "stages": timings,
        "compare_csv": str(Path(cfg.runs_dir) / "compare.csv"),
    }
    write_json_atomic(Path(cfg.runs_dir) / "reproduce.json", summary)
    console.rule(f"[bold green]reproduce finished in {wall / 60:.1f} min")
    return summary
