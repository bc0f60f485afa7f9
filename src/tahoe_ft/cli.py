"""`tahoe-ft SUBCOMMAND [overrides]`: compose `configs/<subcommand>.yaml` (Hydra), map the typed config onto the
Python API (`tahoe_ft.api`), print the result. Nothing else happens here.

    tahoe-ft train +experiment=0906 trainer.max_steps=200
    tahoe-ft train -m +experiment=0905 optim.lr=1e-4,3e-4     (a Hydra sweep)
    tahoe-ft predict ckpt=best-val.pt
    tahoe-ft sweep +sweep=genespace n_trials=20 folds=4       (an Optuna recipe search)
    tahoe-ft eval | compare | reproduce | export | export-state | check | demo-check

Bad input is reported as one line (`error: ...`) with exit status 2; set TAHOE_FT_DEBUG=1 (or
HYDRA_FULL_ERROR=1) for the traceback.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from tahoe_ft.errors import UserError

USAGE = """usage: tahoe-ft {train,predict,eval,compare,reproduce,sweep,export,export-state,check,demo-check} [key=value ...]

  train      train one round:            tahoe-ft train +experiment=0906
  predict    predict held-out perts:     tahoe-ft predict ckpt=best-val.pt
  eval       score with cell-eval:       tahoe-ft eval
  compare    all evaluated runs:         tahoe-ft compare
  reproduce  the whole case study:       tahoe-ft reproduce
  sweep      recipe search (Optuna):     tahoe-ft sweep +sweep=genespace n_trials=20 folds=4
  export     a VCC submission (.vcc):    tahoe-ft export exp=0908
             the 2026 upload file:       tahoe-ft export exp=0908 format=vcc2026  (after predict output=counts)
  export-state  an upstream run folder:  tahoe-ft export-state exp=0908 out=st_0908
  check      validate a data set:        tahoe-ft check data=custom data.path=screen.h5ad
  demo-check oracles on the demo data:   tahoe-ft demo-check seeds=[0,1,2]

Rounds (configs/experiment/): pretrain 0826 0901 0905 0906 0907 0907aux 0908; defaults-best (the Papalexi sweep's 0905).
Any config value can be overridden (key=value, +key=value); -m runs a sweep; --cfg job prints the config."""

HYDRA_FLAGS = {"-m", "--multirun", "--cfg", "-c", "--info", "--help", "-h", "--resolve", "--package", "-p"}


def _print(obj: Any) -> None:
    print(json.dumps(obj, default=str))


def _train(cfg, args: list[str]) -> None:
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


def _predict(cfg, args: list[str]) -> None:
    from tahoe_ft import api

    _print({"run_dir": str(api.predict(cfg))})


def _eval(cfg, args: list[str]) -> None:
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


def _compare(cfg, args: list[str]) -> None:
    from tahoe_ft import api

    api.compare(cfg)


def _reproduce(cfg, args: list[str]) -> None:
    from tahoe_ft import api

    _print(api.reproduce(cfg))  # every round trains on cfg.data (data=..., data.*, paths.*)


def _sweep(cfg, args: list[str]) -> None:
    from tahoe_ft import api

    space = cfg.sweep
    if space is not None and not space.name:  # the study is named after its space file (+sweep=NAME)
        chosen = [a.split("=", 1)[1] for a in args if a.lstrip("+").startswith("sweep=")]
        if chosen:
            cfg = dataclasses.replace(cfg, sweep=dataclasses.replace(space, name=chosen[-1]))
    from tahoe_ft.search.outputs import console_report

    print(console_report(api.sweep(cfg)))  # a short table; the whole summary is in sweep.json


def _export(cfg, args: list[str]) -> None:
    from tahoe_ft import api

    _print({"submission": str(api.export(cfg))})


def _export_state(cfg, args: list[str]) -> None:
    from tahoe_ft import api

    _print({"run_folder": str(api.export_state(cfg))})


def _check(cfg, args: list[str]) -> None:
    from tahoe_ft import api

    print(json.dumps(api.check(cfg), indent=2))


def _demo_check(cfg, args: list[str]) -> None:
    from tahoe_ft import api
    from tahoe_ft.datasets.demo_check import report

    print(report(api.demo_check(cfg)))


COMMANDS: dict[str, Callable[[Any, list[str]], None]] = {
    "train": _train,
    "predict": _predict,
    "eval": _eval,
    "compare": _compare,
    "reproduce": _reproduce,
    "sweep": _sweep,
    "export": _export,
    "export-state": _export_state,
    "check": _check,
    "demo-check": _demo_check,
}


def _debug() -> bool:
    return os.environ.get("TAHOE_FT_DEBUG") == "1" or os.environ.get("HYDRA_FULL_ERROR") == "1"


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric", "numba", "wandb", "h5py"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _run_hydra_app(command: str, args: list[str]) -> None:
    """Hydra's own app for sweeps (`-m`) and its introspection flags (`--cfg`, `--info`, `--help`)."""
    import hydra
    from omegaconf import DictConfig

    from tahoe_ft import config

    config.register()
    config.check_experiment_overrides(args)

    def task(cfg: DictConfig) -> None:
        try:
            typed = config.to_object(config.validate(cfg, config.SCHEMAS[command]))
            config.check_runs_dir(command, typed)
            COMMANDS[command](typed, args)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None

    sys.argv = [f"tahoe-ft {command}", *config.searchpath_overrides(), *args]
    hydra.main(config_path=str(config.config_dir()), config_name=command, version_base="1.3")(task)()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, args = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command '{command}'; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        raise SystemExit(2)
    _setup_logging()
    try:
        if any(a in HYDRA_FLAGS for a in args):
            _run_hydra_app(command, args)
        else:
            from tahoe_ft.config import compose

            COMMANDS[command](compose(command, args), args)
    except UserError as exc:
        if _debug():
            raise
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":  # pragma: no cover
    main()
