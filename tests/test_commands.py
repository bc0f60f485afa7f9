"""The command table (`tahoe_ft.commands`): every command has its YAML, its schema, its CLI line, its API function
`tahoe_ft.<name>` taking its config dataclass, and its place in docs/design.md's API list and the README's command
reference; no subpackage of tahoe_ft takes an API function's name."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import typing
from pathlib import Path

import pytest
import yaml

import tahoe_ft
from tahoe_ft import api, cli, config
from tahoe_ft.commands import ALIASES, API, API_EXTRAS, COMMANDS

REPO = Path(__file__).resolve().parents[1]
NAMES = [c.name for c in COMMANDS]


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n{heading}\n")
    end = text.find("\n## ", start + len(heading) + 2)
    return text[start : end if end >= 0 else len(text)]


def test_the_table_is_what_the_cli_the_api_and_the_schemas_hold():
    assert len(NAMES) == len(set(NAMES)) == 10
    assert list(cli.COMMANDS) == NAMES
    assert [cli.COMMANDS[c.name] for c in COMMANDS] == [c.printer for c in COMMANDS]
    assert list(config.SCHEMAS) == NAMES
    assert all(config.SCHEMAS[c.name] is c.config_type for c in COMMANDS)
    assert api.__all__ == list(API) == [*(c.api for c in COMMANDS), "load_checkpoint", "compose"]
    assert tahoe_ft.__all__ == ["UserError", "__version__", *API]
    assert ALIASES == {"eval": "evaluate"}  # the one command whose function has another name


@pytest.mark.parametrize("command", COMMANDS, ids=NAMES)
def test_every_command_has_its_yaml_with_its_schema_first(command):
    path = REPO / "configs" / f"{command.name}.yaml"
    assert path.is_file(), f"{path} missing"
    defaults = yaml.safe_load(path.read_text())["defaults"]
    assert defaults[0] == f"{command.name}_schema"


@pytest.mark.parametrize("command", COMMANDS, ids=NAMES)
def test_every_command_composes_into_its_config_type(command):
    assert type(config.compose(command.name, [])) is command.config_type


@pytest.mark.parametrize("command", COMMANDS, ids=NAMES)
def test_every_command_is_in_the_usage(command, capsys):
    cli.main(["--help"])
    out = capsys.readouterr().out
    assert out == cli.USAGE + "\n"
    assert out.splitlines()[0].startswith("usage: tahoe-ft {" + ",".join(NAMES) + "} ")
    assert re.search(rf"^  {re.escape(command.name)} +\S", out, re.M), out
    for what, example in command.usage:
        assert re.search(rf"  {re.escape(what)}: +{re.escape(example)}$", out, re.M)
        assert example.startswith(f"tahoe-ft {command.name}")


@pytest.mark.parametrize("command", COMMANDS, ids=NAMES)
def test_every_command_is_tahoe_ft_name_taking_its_config_type(command):
    fn = getattr(tahoe_ft, command.name.replace("-", "_"))
    assert fn is getattr(tahoe_ft, command.api) is getattr(api, command.api)
    assert callable(fn)
    first = next(iter(inspect.signature(fn).parameters.values()))
    annotation = eval(first.annotation, vars(config))  # api.py's annotations are strings (PEP 563)
    assert command.config_type in (annotation, *typing.get_args(annotation)), first.annotation
    # the name still answers after the CLI's imports of every subpackage (the package `tahoe_ft.search` was
    # `tahoe_ft.sweep`, which shadowed the function once imported)
    importlib.import_module("tahoe_ft.search.outputs")
    assert getattr(tahoe_ft, command.name.replace("-", "_")) is fn


def test_the_api_functions_that_are_no_command():
    assert API_EXTRAS == ("load_checkpoint", "compose")
    assert tahoe_ft.compose is config.compose
    assert callable(tahoe_ft.load_checkpoint)


def test_no_subpackage_takes_an_api_name():
    modules = {m.name for m in pkgutil.iter_modules(tahoe_ft.__path__)}
    assert "search" in modules and "commands" in modules
    assert not modules & {*API, *ALIASES}


def test_design_md_lists_every_api_function():
    text = (REPO / "docs" / "design.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `api.py` |"))
    listed = re.findall(r"`(\w+)`", row.split("(re-exported")[0])
    assert listed == list(API)


@pytest.mark.parametrize("command", COMMANDS, ids=NAMES)
def test_the_readme_command_reference_has_every_command(command):
    reference = _section((REPO / "README.md").read_text(), "## Command reference")
    assert re.search(rf"^tahoe-ft {re.escape(command.name)}( |$)", reference, re.M)


def test_an_unknown_command_names_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["evaluate"])
    assert exc.value.code == 2
    assert (
        capsys.readouterr().err.strip()
        == f"error: unknown command 'evaluate'; choose one of: {', '.join(NAMES)}"
    )
