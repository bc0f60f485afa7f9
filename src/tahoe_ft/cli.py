"""`tahoe-ft SUBCOMMAND [overrides]`: compose `configs/<subcommand>.yaml` (Hydra), map the typed config onto the
Python API (`tahoe_ft.api`), print the result (each command's printer: the command table, `tahoe_ft.commands`).
Nothing else happens here.

    tahoe-ft train +experiment=0906 trainer.max_steps=200
    tahoe-ft train -m +experiment=0905 optim.lr=1e-4,3e-4     (a Hydra sweep)
    tahoe-ft predict ckpt=best-val.pt
    tahoe-ft sweep +sweep=genespace n_trials=20 folds=4       (an Optuna recipe search)
    tahoe-ft eval | compare | reproduce | export | export-state | check | demo-check

Bad input is reported as one line (`error: ...`) with exit status 2; set TAHOE_FT_DEBUG=1 (or
HYDRA_FULL_ERROR=1) for the traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from tahoe_ft import commands
from tahoe_ft.errors import UserError

USAGE = commands.usage(
    """Rounds (configs/experiment/): pretrain 0826 0901 0905 0906 0907 0907aux 0908; defaults-best (the Papalexi sweep's 0905).
Any config value can be overridden (key=value, +key=value); -m runs a sweep; --cfg job prints the config."""
)

HYDRA_FLAGS = {"-m", "--multirun", "--cfg", "-c", "--info", "--help", "-h", "--resolve", "--package", "-p"}


# `tahoe-ft NAME` -> its printer (which calls the API function): the command table, `tahoe_ft.commands`
COMMANDS: dict[str, Callable[[Any, list[str]], None]] = {c.name: c.printer for c in commands.COMMANDS}


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
