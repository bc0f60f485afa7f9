"""The command table: every `tahoe-ft` command declared once, and what the CLI, the API and the schemas derive
from it.

A command `NAME` is `tahoe-ft NAME` (`cli.COMMANDS`, `cli.USAGE`), `configs/NAME.yaml` composed into its config
dataclass (`config.SCHEMAS[NAME]`, by the class's name in `tahoe_ft.config`), the API function `tahoe_ft.API`
(`api.__all__` and `tahoe_ft`'s lazy exports, with `load_checkpoint` and `compose`, the API functions that are no
command) that takes that dataclass, and a printer: what the CLI prints of the function's result. Adding a command
is a row here, its function in `api.py`, its dataclass in the schema and its YAML file; `tests/test_commands.py`
checks that each row has all of them and that docs/design.md and the README list it.

This module imports nothing of tahoe-ft's at import time (`import tahoe_ft` reads the table; `tahoe_ft.config`
reads it to build `SCHEMAS`): the printers import the API when they run, `Command.config_type` when it is read.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Printer = Callable[[Any, list[str]], None]


@dataclass(frozen=True)
class Command:
    name: str  # `tahoe-ft NAME`, configs/NAME.yaml, config.SCHEMAS[NAME]
    config: str  # the config dataclass's name in tahoe_ft.config
    api: str  # the function: tahoe_ft.api.API, re-exported as tahoe_ft.API
    printer: Printer  # called by the CLI with the composed config and the command line's arguments
    usage: tuple[tuple[str, str], ...]  # (what, example) lines of `tahoe-ft --help`

    @property
    def attr(self) -> str:
        """The command's name as a Python name: `tahoe_ft.<attr>` is its API function (`export-state` ->
        `export_state`; `eval` is `tahoe_ft.eval` and `tahoe_ft.evaluate`, the name that does not shadow the
        builtin under `from tahoe_ft import *`)."""
        return self.name.replace("-", "_")

    @property
    def config_type(self) -> type:
        from tahoe_ft import config

        return getattr(config, self.config)


def _print(obj: Any) -> None:
    print(json.dumps(obj, default=str))


# -- printers: the API's return value, printed (the API logs, never prints) ----------------------------------


def _print_train(cfg, args: list[str]) -> None:
    from tahoe_ft import api
    from tahoe_ft.runs import read_run_info

    run_dir = api.train(cfg)
    info = read_run_info(run_dir)
    _print(
        {
            "run_dir": str(run_dir),
            "best_val_loss": info.get("best_val_loss"),
            "best_step": info.get("best_step"),
        }
    )


def _print_predict(cfg, args: list[str]) -> None:
    from tahoe_ft import api

    _print({"run_dir": str(api.predict(cfg))})


def _print_eval(cfg, args: list[str]) -> None:
    from tahoe_ft import api
    from tahoe_ft.evaluation.logs import quiet_console
    from tahoe_ft.evaluation.report import score_table
    from tahoe_ft.evaluation.run import resolve_files
    from tahoe_ft.runs import PredictRecord

    files = resolve_files(cfg)  # the run, once: the table names its score.json
    with quiet_console(cfg.verbose):  # the libraries' logs go to <run>/eval/eval.log (verbose=true: here too)
        score = api.evaluate(dataclasses.replace(cfg, run_dir=str(files.run_dir)))
    eval_dir = files.eval_dir
    # a run's prediction is named by its round; files from elsewhere by the prediction's file name
    ours = PredictRecord.read(files.run_dir) is not None
    label = f"round ({files.run_dir.parent.name})" if ours else files.pred.name
    print(score_table(score, eval_dir / "score.json", label=label))
    print(f"log: {eval_dir / 'eval.log'}")


def _print_compare(cfg, args: list[str]) -> None:
    from tahoe_ft import api

    api.compare(cfg)


def _print_reproduce(cfg, args: list[str]) -> None:
    from tahoe_ft import api

    _print(api.reproduce(cfg))  # every round trains on cfg.data (data=..., data.*, paths.*)


def _print_sweep(cfg, args: list[str]) -> None:
    from tahoe_ft import api

    space = cfg.sweep
    if space is not None and not space.name:  # the study is named after its space file (+sweep=NAME)
        chosen = [a.split("=", 1)[1] for a in args if a.lstrip("+").startswith("sweep=")]
        if chosen:
            cfg = dataclasses.replace(cfg, sweep=dataclasses.replace(space, name=chosen[-1]))
    from tahoe_ft.search.outputs import console_report

    print(console_report(api.sweep(cfg)))  # a short table; the whole summary is in sweep.json


def _print_export(cfg, args: list[str]) -> None:
    from tahoe_ft import api

    _print({"submission": str(api.export(cfg))})


def _print_export_state(cfg, args: list[str]) -> None:
    from tahoe_ft import api

    _print({"run_folder": str(api.export_state(cfg))})


def _print_check(cfg, args: list[str]) -> None:
    from tahoe_ft import api

    print(json.dumps(api.check(cfg), indent=2))


def _print_demo_check(cfg, args: list[str]) -> None:
    from tahoe_ft import api
    from tahoe_ft.datasets.demo_check import report

    print(report(api.demo_check(cfg)))


# -- the table, in `tahoe-ft --help`'s order ------------------------------------------------------------------

COMMANDS: tuple[Command, ...] = (
    Command(
        "train",
        "TrainConfig",
        "train",
        _print_train,
        (("train one round", "tahoe-ft train +experiment=0906"),),
    ),
    Command(
        "predict",
        "PredictConfig",
        "predict",
        _print_predict,
        (("predict held-out perts", "tahoe-ft predict ckpt=best-val.pt"),),
    ),
    Command("eval", "EvalConfig", "evaluate", _print_eval, (("score with cell-eval", "tahoe-ft eval"),)),
    Command(
        "compare", "CompareConfig", "compare", _print_compare, (("all evaluated runs", "tahoe-ft compare"),)
    ),
    Command(
        "reproduce",
        "ReproduceConfig",
        "reproduce",
        _print_reproduce,
        (("the whole case study", "tahoe-ft reproduce"),),
    ),
    Command(
        "sweep",
        "SweepConfig",
        "sweep",
        _print_sweep,
        (("recipe search (Optuna)", "tahoe-ft sweep +sweep=genespace n_trials=20 folds=4"),),
    ),
    Command(
        "export",
        "ExportConfig",
        "export",
        _print_export,
        (
            ("a VCC submission (.vcc)", "tahoe-ft export exp=0908"),
            (
                "the 2026 upload file",
                "tahoe-ft export exp=0908 format=vcc2026  (after predict output=counts)",
            ),
        ),
    ),
    Command(
        "export-state",
        "ExportStateConfig",
        "export_state",
        _print_export_state,
        (("an upstream run folder", "tahoe-ft export-state exp=0908 out=st_0908"),),
    ),
    Command(
        "check",
        "CheckConfig",
        "check",
        _print_check,
        (("validate a data set", "tahoe-ft check data=custom data.path=screen.h5ad"),),
    ),
    Command(
        "demo-check",
        "DemoCheckConfig",
        "demo_check",
        _print_demo_check,
        (("oracles on the demo data", "tahoe-ft demo-check seeds=[0,1,2]"),),
    ),
)

BY_NAME: dict[str, Command] = {c.name: c for c in COMMANDS}

# the API functions that are no command: a checkpoint loaded, a command's config composed from configs/
API_EXTRAS: tuple[str, ...] = ("load_checkpoint", "compose")

# every API function's name: api.__all__, and tahoe_ft's lazy exports
API: tuple[str, ...] = (*(c.api for c in COMMANDS), *API_EXTRAS)

# names of tahoe_ft that are a command's API function under the command's own name (`tahoe_ft.eval`), beside API
ALIASES: dict[str, str] = {c.attr: c.api for c in COMMANDS if c.attr != c.api}


def usage(footer: str) -> str:
    """`tahoe-ft --help`: the commands, a line each (what, example), then `footer`."""
    width = max(len(c.name) for c in COMMANDS) + 2
    what = max(len(w) for c in COMMANDS for w, _ in c.usage) + 3
    lines = [f"usage: tahoe-ft {{{','.join(c.name for c in COMMANDS)}}} [key=value ...]", ""]
    for c in COMMANDS:
        for i, (w, example) in enumerate(c.usage):
            lines.append(f"  {c.name if i == 0 else '':<{width}}{w + ':':<{what}}{example}")
    return "\n".join([*lines, "", footer])


def schemas(namespace: dict[str, Any]) -> dict[str, type]:
    """Each command's config dataclass, looked up by name in `namespace` (`tahoe_ft.config`'s globals(), so
    that `config` builds SCHEMAS without importing itself)."""
    return {c.name: namespace[c.config] for c in COMMANDS}
