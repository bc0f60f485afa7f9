"""`tahoe-ft SUBCOMMAND [overrides]`: each sub-command is a Hydra app over `configs/<subcommand>.yaml`.

    tahoe-ft train +experiment=0906 trainer.max_steps=200
    tahoe-ft train -m +experiment=0905 optim.lr=1e-4,3e-4     (a Hydra sweep)
    tahoe-ft predict ckpt=best-val.pt
    tahoe-ft eval | compare | reproduce

Bad input is reported as one line (`error: ...`) with exit status 2; set TAHOE_FT_DEBUG=1 (or
HYDRA_FULL_ERROR=1) for the traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from tahoe_ft.errors import UserError

COMMANDS = {
    "train": "tahoe_ft.train:train",
    "predict": "tahoe_ft.predict:predict",
    "eval": "tahoe_ft.commands:run_eval",
    "compare": "tahoe_ft.commands:run_compare",
    "reproduce": "tahoe_ft.reproduce:reproduce",
    "export": "tahoe_ft.commands:run_export",
    "check": "tahoe_ft.commands:run_check",
}
SCHEMAS = {
    "train": "TrainConfig",
    "predict": "PredictConfig",
    "eval": "EvalConfig",
    "compare": "CompareConfig",
    "reproduce": "ReproduceConfig",
    "export": "ExportConfig",
    "check": "CheckConfig",
}
USAGE = """usage: tahoe-ft {train,predict,eval,compare,reproduce,export,check} [key=value ...]

  train      train one round:            tahoe-ft train +experiment=0906
  predict    predict held-out perts:     tahoe-ft predict ckpt=best-val.pt
  eval       score with cell-eval:       tahoe-ft eval
  compare    all evaluated runs:         tahoe-ft compare
  reproduce  the whole case study:       tahoe-ft reproduce
  export     a VCC submission (.vcc):    tahoe-ft export exp=0908
  check      validate a data set:        tahoe-ft check data=custom data.path=screen.h5ad

Rounds (configs/experiment/): pretrain 0826 0901 0905 0906 0907 0908.
Any config value can be overridden (key=value, +key=value); -m runs a sweep; --cfg job prints the config."""


def config_dir() -> Path:
    """`configs/`: shipped inside the wheel, or at the repo root for an editable install."""
    here = Path(__file__).resolve().parent
    for cand in (here / "configs", here.parent.parent / "configs"):
        if (cand / "train.yaml").is_file():
            return cand
    raise UserError(f"configs/ not found next to {here}; reinstall tahoe-ft")  # pragma: no cover


def _debug() -> bool:
    return os.environ.get("TAHOE_FT_DEBUG") == "1" or os.environ.get("HYDRA_FULL_ERROR") == "1"


def _target(command: str) -> Callable[[DictConfig], object]:
    import importlib

    mod, fn = COMMANDS[command].split(":")
    return getattr(importlib.import_module(mod), fn)


def _check_experiment(args: list[str]) -> None:
    """`+experiment=NAME` must name a file in configs/experiment/ (one clear line otherwise)."""
    for a in args:
        key, _, val = a.lstrip("+~").partition("=")
        if key == "experiment" and val:
            names = sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))
            for v in val.split(","):
                if v not in names:
                    raise UserError(f"unknown experiment '{v}'; choose one of: {', '.join(names)}")


def _compose(command: str, args: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from tahoe_ft import config as schemas
    from tahoe_ft import resolvers

    resolvers.register()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name=command):
            cfg = compose(config_name=command, overrides=args)
    except (HydraException, OmegaConfBaseException) as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        raise UserError("config: " + "; ".join(lines[:3])) from None
    return schemas.validate(cfg, getattr(schemas, SCHEMAS[command]))


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric", "numba", "wandb", "h5py"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run(command: str, args: list[str]) -> object:
    """Compose `configs/<command>.yaml` with `args` and run the command (the Python entry the CLI uses)."""
    from tahoe_ft import resolvers

    resolvers.register()
    _check_experiment(args)
    cfg = _compose(command, args)
    if command == "reproduce":  # forwards data=/paths. overrides to every stage
        return _target(command)(cfg, args)
    return _target(command)(cfg)


def _run_multirun(command: str, args: list[str]) -> None:
    """Hydra's own app for sweeps (`-m`) and its introspection flags (`--cfg`, `--info`, `--help`)."""
    import hydra

    from tahoe_ft import config as schemas
    from tahoe_ft import resolvers

    resolvers.register()

    def task(cfg: DictConfig) -> None:
        try:
            _target(command)(schemas.validate(cfg, getattr(schemas, SCHEMAS[command])))
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None

    sys.argv = [f"tahoe-ft {command}", *args]
    hydra.main(config_path=str(config_dir()), config_name=command, version_base="1.3")(task)()


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
    hydra_flags = {
        "-m",
        "--multirun",
        "--cfg",
        "-c",
        "--info",
        "--help",
        "-h",
        "--resolve",
        "--package",
        "-p",
    }
    try:
        if any(a in hydra_flags for a in args):
            _check_experiment(args)
            _run_multirun(command, args)
        else:
            run(command, args)
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
