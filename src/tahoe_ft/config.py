"""A command's config, composed: `compose(command, overrides)` composes `configs/<command>.yaml` with Hydra as the
CLI does and validates it against the command's schema (`SCHEMAS`, below) into its typed dataclass.

The schema itself (every key, its type and default; the enums; `validate`, `checked`, `as_dict`) is
`tahoe_ft.config_schema`; every name there is re-exported here, so `from tahoe_ft.config import TrainConfig` stays
the one import path. Each command's schema is registered in Hydra's ConfigStore as `<command>_schema` and is the
first entry of `configs/<command>.yaml`'s defaults list, so a group file (`data/papalexi.yaml`) or an experiment
file holds only what differs from these defaults. Also here: your own `configs/` beside the shipped ones
(`user_config_dir`, `group_options`), the checks of overrides before Hydra reads them, `check_runs_dir`, and
`compose_round` (a round's config on a typed data set: `reproduce`, `sweep`), whose `experiment_data` merges an
experiment file's `data:` block with those of the files it extends.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tahoe_ft.commands import schemas
from tahoe_ft.config_schema import (
    BackboneConfig,
    BasalMapping,
    CheckConfig,
    CheckpointConfig,
    CompareConfig,
    DataConfig,
    DecoderConfig,
    DemoCheckConfig,
    DemoConfig,
    EncoderConfig,
    EncoderName,
    EvalConfig,
    ExportConfig,
    ExportFormat,
    ExportStateConfig,
    FreezeConfig,
    InputTransform,
    LoggerConfig,
    LossConfig,
    LossName,
    ModelConfig,
    Monitor,
    OptimConfig,
    PathsConfig,
    Precision,
    PredictConfig,
    PredictOutput,
    Profile,
    PrunerName,
    Regime,
    ReproduceConfig,
    SchedConfig,
    SchedName,
    Split,
    SweepConfig,
    SweepObjective,
    SweepSpace,
    TrainConfig,
    TrainerConfig,
    as_dict,
    checked,
    config_error,
    to_object,
    validate,
)
from tahoe_ft.errors import UserError

__all__ = [
    "as_dict",
    "BackboneConfig",
    "BasalMapping",
    "check_experiment_overrides",
    "check_override_syntax",
    "check_runs_dir",
    "CheckConfig",
    "checked",
    "CheckpointConfig",
    "CompareConfig",
    "compose",
    "compose_round",
    "config_dir",
    "config_error",
    "DataConfig",
    "DecoderConfig",
    "DemoCheckConfig",
    "DemoConfig",
    "EncoderConfig",
    "EncoderName",
    "EvalConfig",
    "experiment_data",
    "experiments",
    "ExportConfig",
    "ExportFormat",
    "ExportStateConfig",
    "FreezeConfig",
    "group_options",
    "InputTransform",
    "LoggerConfig",
    "LossConfig",
    "LossName",
    "ModelConfig",
    "Monitor",
    "OptimConfig",
    "PathsConfig",
    "Precision",
    "PredictConfig",
    "PredictOutput",
    "Profile",
    "PrunerName",
    "Regime",
    "register",
    "ReproduceConfig",
    "ROUND_DATA_KEYS",
    "SchedConfig",
    "SchedName",
    "SCHEMAS",
    "searchpath_overrides",
    "Split",
    "SweepConfig",
    "SweepObjective",
    "SweepSpace",
    "to_object",
    "TrainConfig",
    "TrainerConfig",
    "user_config_dir",
    "validate",
]

SCHEMAS: dict[str, type] = schemas(globals())  # each command's config dataclass, by name: tahoe_ft.commands


def config_dir() -> Path:
    """`configs/`: shipped inside the wheel, or at the repo root for an editable install."""
    here = Path(__file__).resolve().parent
    for cand in (here / "configs", here.parent.parent / "configs"):
        if (cand / "train.yaml").is_file():
            return cand
    raise UserError(f"configs/ not found next to {here}; reinstall tahoe-ft")  # pragma: no cover


def user_config_dir() -> Path | None:
    """`configs/` in the folder tahoe-ft runs from, when it exists and is not the shipped one: your own
    experiment files (`configs/experiment/NAME.yaml`, e.g. a sweep's best.yaml), data sets (`configs/data/`)
    and sweep spaces (`configs/sweep/`), found by name beside the shipped ones.

    The `configs/` of a tahoe-ft source tree (a checkout of this repository: `pyproject.toml` names the project
    beside it) is the shipped configs, not yours: run from a checkout with tahoe-ft installed from elsewhere
    (`pip install .`, another checkout), it is left out, not refused for clashing with the installed ones."""
    cand = Path.cwd() / "configs"
    if not cand.is_dir() or cand.resolve() == config_dir().resolve() or _is_source_tree(cand.parent):
        return None
    return cand.resolve()


def _is_source_tree(folder: Path) -> bool:
    """`folder` is a tahoe-ft source tree: its `pyproject.toml` declares the project `tahoe-ft`."""
    import tomllib

    try:
        with open(folder / "pyproject.toml", "rb") as fh:
            name = tomllib.load(fh).get("project", {}).get("name")
    except (OSError, tomllib.TOMLDecodeError):
        return False
    return isinstance(name, str) and name.replace("_", "-").lower() == "tahoe-ft"


def group_options(group: str) -> dict[str, Path]:
    """`{name: file}` of a config group's options (`experiment`, `sweep`, `data`, ...): the shipped ones and
    those of `user_config_dir()`. A file of yours with a shipped option's name is refused (Hydra would take the
    shipped one and ignore yours), unless it is a byte-for-byte copy of the shipped one."""
    found = {p.stem: p for p in (config_dir() / group).glob("*.yaml")}
    user = user_config_dir()
    for path in sorted((user / group).glob("*.yaml")) if user is not None else []:
        if path.stem in found and path.read_bytes() == found[path.stem].read_bytes():
            continue  # a copy of the shipped file: Hydra takes the shipped one, which is the same
        if path.stem in found:
            raise UserError(
                f"{path}: '{path.stem}' is the name of a shipped {group} option, which would be used instead "
                f"of your file; rename it (e.g. {path.stem}-mine.yaml) and pass {group}={path.stem}-mine"
            )
        found[path.stem] = path
    return found


def searchpath_overrides() -> list[str]:
    """The Hydra override that adds `user_config_dir()` to the config search path ([] without one); a file
    there named like a shipped option of its group is refused first (`group_options`)."""
    user = user_config_dir()
    if user is None:
        return []
    for group in sorted(p.name for p in user.iterdir() if p.is_dir() and (config_dir() / p.name).is_dir()):
        group_options(group)
    return [f"hydra.searchpath=[file://{user}]"]


def experiments() -> list[str]:
    """The experiment files: those shipped in `configs/experiment/` (pretrain, 0826, ..., 0908, defaults-best)
    and yours in `./configs/experiment/` (`user_config_dir`)."""
    return sorted(group_options("experiment"))


def register() -> None:
    """Register every command's schema in Hydra's ConfigStore (`<command>_schema`) and the resolvers."""
    from hydra.core.config_store import ConfigStore

    from tahoe_ft import resolvers

    resolvers.register()
    cs = ConfigStore.instance()
    for command, schema in SCHEMAS.items():
        cs.store(name=f"{command}_schema", node=schema)


def check_override_syntax(overrides: list[str]) -> None:
    """Hydra's override grammar reads unquoted values in ASCII only: `data.val_perts=[Ä1,B]` is a bare lexer
    error (`LexerNoViableAltException` and a caret). Such an override is one line that gives it back quoted."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = None
    for a in overrides:
        if a.isascii() or "=" not in a:
            continue
        parser = parser or OverridesParser.create()
        try:
            parser.parse_overrides([a])
        except OverrideParseException:
            raise UserError(_quoted_hint(a)) from None


def _quoted_hint(override: str) -> str:
    """The message for an override whose non-ASCII names Hydra cannot read unquoted: the override with every
    name in double quotes, in single quotes for the shell."""
    key, _, value = override.partition("=")
    value = value.strip()

    def names(text: str) -> list[str]:
        return [n.strip().strip("'\"") for n in text.split(",") if n.strip()]

    if value.startswith("["):  # a list (closed or not)
        fixed = "[" + ", ".join(f'"{n}"' for n in names(value.strip("[]"))) + "]"
    else:  # one name, or a comma sweep of names (-m)
        fixed = ",".join(f'"{n}"' for n in names(value)) or '""'
    return (
        f"cannot read '{override}': names with non-ASCII letters must be quoted on the command line (Hydra's "
        f"grammar reads unquoted names in ASCII only); quote each name and the whole override: {key}='{fixed}'"
    )


def check_experiment_overrides(overrides: list[str]) -> None:
    """`+experiment=NAME` must name a file in configs/experiment/ (one clear line otherwise); an override Hydra
    cannot parse because of a non-ASCII name says how to quote it (`check_override_syntax`)."""
    check_override_syntax(overrides)
    for a in overrides:
        key, _, val = a.lstrip("+~").partition("=")
        if key == "experiment" and val:
            for v in val.split(","):
                if v not in experiments():
                    raise UserError(f"unknown experiment '{v}'; choose one of: {', '.join(experiments())}")
        if key == "sweep" and val:  # `tahoe-ft sweep +sweep=NAME`: a search space in configs/sweep/
            spaces = sorted(group_options("sweep"))
            if val not in spaces:
                raise UserError(
                    f"unknown sweep space '{val}'; choose one of: {', '.join(spaces)} (configs/sweep/)"
                )


def _hydra_compose(command: str, overrides: list[str]) -> DictConfig:
    """`configs/<command>.yaml` composed with `overrides` by Hydra; not yet validated or resolved."""
    import yaml
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    register()
    check_experiment_overrides(overrides)
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name=command):
            return hydra_compose(config_name=command, overrides=[*searchpath_overrides(), *overrides])
    except (HydraException, OmegaConfBaseException) as exc:
        cause = exc.__cause__
        if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
            raise config_error(cause) from None  # a bad value for a key (e.g. not one of an enum's)
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        raise UserError("config: " + "; ".join(lines[:3])) from None
    except AssertionError:  # OmegaConf asserts on a key below a null node (data=custom data.demo.seed=1)
        raise UserError(_below_null(command, overrides)) from None
    except yaml.YAMLError as exc:  # a user's config file (sweep space, experiment) that is not YAML
        mark = getattr(exc, "problem_mark", None)
        where = f"{mark.name}, line {mark.line + 1}" if mark is not None else "a config file"
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{where}: not valid YAML ({what}); fix the file") from None


def _below_null(command: str, overrides: list[str]) -> str:
    """The message for an override of a key whose parent is null in this config (composed with the overrides
    that select config groups: a data group sets `data.demo` only for data=demo)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    groups = [a for a in overrides if "." not in a.lstrip("+~").split("=", 1)[0]]
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name=command):
            cfg = hydra_compose(config_name=command, overrides=[*searchpath_overrides(), *groups])
        for a in overrides:
            parts = a.lstrip("+~").split("=", 1)[0].split(".")
            for i in range(1, len(parts)):
                parent = ".".join(parts[:i])
                if OmegaConf.select(cfg, parent, throw_on_missing=False) is None:
                    return f"config: cannot set '{a}': '{parent}' is null with these config groups; drop it"
    except Exception:  # noqa: BLE001 - only the message is at stake
        pass
    return "config: an override sets a key below a null value (e.g. data.demo.* without data=demo); drop it"


def compose(command: str, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """`configs/<command>.yaml` composed with `overrides` (Hydra syntax), validated, as the command's typed
    schema object (e.g. `compose("train", ["+experiment=0906"])` -> `TrainConfig`)."""
    cfg = to_object(validate(_hydra_compose(command, list(overrides)), SCHEMAS[command]))
    check_runs_dir(command, cfg)
    return cfg


#: what each command writes under runs_dir whatever else it is given: these need a folder they can write (or
#: one they can make)
_MAKES_RUNS_DIR = {
    "train": "a new run folder",
    "eval": "the scores' DE cache (.de_cache)",
    "reproduce": "its rounds",
    "sweep": "its study and trials",
}


def check_runs_dir(command: str, cfg: Any) -> None:
    """`runs_dir=` of a composed command must be a folder (or a path where one can be made) that the command
    can write where it writes there: a file, a path below a file or a folder this user cannot write is one
    line, before anything is read or written (not a traceback from the first `mkdir`)."""
    raw = getattr(cfg, "runs_dir", None)
    if raw is None:
        return
    path = Path(str(raw)).expanduser().absolute()
    existing = path  # the nearest part of the path that exists
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        if existing == path:
            raise UserError(
                f"runs_dir '{raw}' is a file, not a folder; pass runs_dir=<a folder> for tahoe-ft's runs "
                "(default: runs)"
            )
        raise UserError(
            f"runs_dir '{raw}' lies below {existing}, which is a file, so no folder can be made there; pass "
            "runs_dir=<a folder path> (default: runs)"
        )
    what = _MAKES_RUNS_DIR.get(command)
    if command == "predict" and not getattr(cfg, "run_dir", None):
        what = "its prediction (into the run it picks there)"
    elif command == "compare" and not getattr(cfg, "out_dir", None):
        what = "compare.csv and compare.png"
    if what is None or (existing != path and command not in _MAKES_RUNS_DIR):
        return  # writes elsewhere, or reads runs that are not there (the command says so itself)
    if not os.access(existing, os.W_OK | os.X_OK):
        how = f"{'out_dir' if command == 'compare' else 'runs_dir'}=<a folder you can write>"
        raise UserError(
            f"runs_dir '{raw}': {existing} is not writable by this user, and {command} writes {what} there; make "
            f"it writable (chmod u+w {existing}) or pass {how}"
        )


# the keys of a round's config that `compose_round` takes from the typed data, not from Hydra's data group
ROUND_DATA_KEYS = ("data", "paths")


def experiment_data(experiment: str) -> dict[str, Any]:
    """The `data:` block an experiment file sets, its own and that of the experiment files it extends
    (`defaults: [/experiment/0905, _self_]`, as a sweep's best.yaml does), merged in Hydra's order: the
    defaults list in turn, `_self_` where it stands (last when not listed). Called after Hydra has composed
    the same file, which refuses a cycle."""
    spec = OmegaConf.to_container(OmegaConf.load(group_options("experiment")[experiment]))
    entries = list(spec.get("defaults") or [])
    if "_self_" not in entries:
        entries.append("_self_")
    merged = OmegaConf.create({})
    for entry in entries:
        if entry == "_self_":
            merged = OmegaConf.merge(merged, spec.get("data") or {})
        elif isinstance(entry, str) and entry.lstrip("/").startswith("experiment/"):
            parent = entry.lstrip("/").split("/", 1)[1]
            merged = OmegaConf.merge(merged, experiment_data(parent))
        elif isinstance(entry, str) and "/" not in entry:  # a sibling in the experiment group: `- 0905`
            merged = OmegaConf.merge(merged, experiment_data(entry))
    return OmegaConf.to_container(merged)  # type: ignore[return-value]


def compose_round(
    experiment: str, overrides: list[str] | tuple[str, ...], *, data: DataConfig, paths: PathsConfig
) -> TrainConfig:
    """A round's TrainConfig on a typed data set: `compose("train", ["+experiment=EXP", *overrides])` with its
    `data` and `paths` replaced by `data` and `paths` (what `reproduce` trains every round on).

    Precedence for a data key, lowest first: `data`; the experiment file's `data:` block with those of the files
    it extends (`experiment_data`: a round's recipe: its batch size, and the base model's drug set, which
    `pretrain` names in full); an explicit `data.KEY=...`
    or `paths.KEY=...` in `overrides`. A data group (`data=papalexi`) in `overrides` is refused: the data set is
    `data`.
    """
    overrides = list(overrides)
    copied = []
    for a in overrides:
        key = a.lstrip("+~").split("=", 1)[0]
        if key in ROUND_DATA_KEYS:
            raise UserError(
                f"'{a}' selects the data of every round; set the data set itself (reproduce's data=...) instead"
            )
        if key.split(".", 1)[0] in ROUND_DATA_KEYS:
            copied.append(key)
    cfg = _hydra_compose("train", [f"+experiment={experiment}", *overrides])
    data_node = OmegaConf.merge(OmegaConf.structured(data), experiment_data(experiment))
    root = OmegaConf.create({"data": data_node, "paths": OmegaConf.structured(paths)})
    for key in copied:  # Hydra parsed the value; take it from its config
        OmegaConf.update(root, key, OmegaConf.select(cfg, key, throw_on_missing=False), merge=False)
    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.update(OmegaConf.to_container(root, resolve=False, enum_to_str=True))
    return to_object(validate(plain, TrainConfig))
