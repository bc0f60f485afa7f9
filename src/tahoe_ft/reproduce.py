"""`tahoe-ft reproduce`: the whole case study in one command.

demo data -> pretrain (the ST-Tahoe stand-in) -> 0826 -> 0901 and 0905 -> 0906 -> 0907 -> 0908 -> predict ->
eval -> compare. Every stage is the same sub-command a user would run by hand (`tahoe-ft train
+experiment=0906` ...), so the runs it leaves behind are ordinary runs; parents are resolved by name.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from omegaconf import DictConfig
from rich.console import Console

from tahoe_ft.runs import write_json_atomic

log = logging.getLogger(__name__)

# overrides forwarded from `reproduce` to every stage (data selection and caches)
_FORWARD = ("data", "paths")


def _forwarded(args: list[str]) -> list[str]:
    out = []
    for a in args:
        key = a.lstrip("+~").split("=", 1)[0]
        if key.split(".")[0] in _FORWARD:
            out.append(a)
    return out


def _name(e: object) -> str:
    """An experiment name; `0905` typed unquoted on the command line arrives as the integer 905."""
    s = str(e)
    return s.zfill(4) if s.isdigit() else s


def stages(cfg: DictConfig) -> list[tuple[str, str]]:
    """(command, experiment) in the order they run."""
    plan = [("train", _name(e)) for e in cfg.experiments]
    plan += [("predict", _name(e)) for e in cfg.evaluate]
    plan += [("eval", _name(e)) for e in cfg.evaluate]
    plan.append(("compare", ""))
    return plan


def reproduce(cfg: DictConfig, args: list[str] | None = None) -> dict:
    """Run every stage in-process; return {"wall_time_s", "stages": [...], "compare_csv"}."""
    from tahoe_ft.cli import run

    console = Console(stderr=True)
    fwd = _forwarded(args or [])
    common = [f"runs_dir={cfg.runs_dir}"]
    plan = stages(cfg)
    t0 = time.perf_counter()
    timings = []
    for i, (cmd, exp) in enumerate(plan, 1):
        label = f"{cmd} {exp}".strip()
        console.rule(f"[bold]reproduce [{i}/{len(plan)}] {label}  (elapsed {time.perf_counter() - t0:.0f} s)")
        ts = time.perf_counter()
        if cmd == "train":
            run(
                "train",
                [
                    f"+experiment={exp}",
                    f"step_scale={cfg.step_scale}",
                    *common,
                    *fwd,
                    *list(cfg.train_overrides),
                ],
            )
        elif cmd == "predict":
            run("predict", [f"exp={exp}", *common, *[a for a in fwd if a.startswith("paths")]])
        elif cmd == "eval":
            run(
                "eval",
                [
                    f"exp={exp}",
                    f"profile={cfg.profile}",
                    f"num_threads={cfg.num_threads}",
                    *common,
                    *[a for a in fwd if a.startswith("paths")],
                ],
            )
        else:
            run("compare", [f"runs_dir={cfg.runs_dir}"])
        timings.append({"stage": label, "seconds": round(time.perf_counter() - ts, 1)})
    wall = time.perf_counter() - t0
    summary = {
        "wall_time_s": round(wall, 1),
        "stages": timings,
        "compare_csv": str(Path(cfg.runs_dir) / "compare.csv"),
    }
    write_json_atomic(Path(cfg.runs_dir) / "reproduce.json", summary)
    console.rule(f"[bold green]reproduce finished in {wall / 60:.1f} min")
    print(json.dumps(summary))
    return summary
