"""The user's config folder (`./configs/`) never clashes with the shipped configs themselves (issue #31).

Installed with `pip install .` (not editable) or from another checkout, tahoe-ft took the repository's own
`configs/` for the user's folder when run from the repository's root, and refused every command: "'custom' is
the name of a shipped data option". A second checkout is simulated here: the shipped `configs/` copied into a
folder beside a `pyproject.toml` that names the project, and the commands run from there in-process.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest_train import TINY_DEMO
from tahoe_ft.cli import main
from tahoe_ft.config import compose, config_dir, experiments, user_config_dir
from tahoe_ft.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def _checkout(root: Path, *, pyproject: bool) -> Path:
    """A copy of the shipped `configs/` in `root` (with the repository's `pyproject.toml`: a source tree)."""
    root.mkdir()
    shutil.copytree(config_dir(), root / "configs")
    if pyproject:
        shutil.copy2(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def test_a_command_runs_from_another_checkout_of_tahoe_ft(tmp_path, monkeypatch, capsys):
    """From the root of another checkout (its configs/ the shipped ones, beside its pyproject.toml), `check`
    runs to the end instead of refusing the checkout's own configs/data/custom.yaml."""
    checkout = _checkout(tmp_path / "checkout", pyproject=True)
    (checkout / "configs" / "data" / "custom.yaml").write_text("name: custom\n# this checkout's version\n")
    monkeypatch.chdir(checkout)
    assert user_config_dir() is None  # a source tree's configs/ are shipped configs, not the user's
    main(["check", f"paths.data_cache={tmp_path / 'cache'}", *TINY_DEMO, "model.cell_set_len=8"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["genes"] == 60 and len(summary["splits"]["test"]["perturbations"]) == 2
    cfg = compose("train", ["+experiment=0905", "data=custom"])
    assert cfg.data.name == "custom" and cfg.experiment == "0905"


def test_copies_of_shipped_files_are_not_the_users(tmp_path, monkeypatch):
    """Without a pyproject.toml the folder is the user's: files identical to the shipped ones are not a clash,
    the user's own files are found beside them, and a different file with a shipped name is still refused."""
    user = _checkout(tmp_path / "screen", pyproject=False)
    (user / "configs" / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - /experiment/0905\n  - _self_\nexperiment: mine\n"
    )
    monkeypatch.chdir(user)
    assert user_config_dir() == (user / "configs").resolve()
    assert "mine" in experiments() and "0905" in experiments()
    assert compose("train", ["+experiment=mine"]).experiment == "mine"
    assert compose("train", ["+experiment=0905", "data=custom"]).experiment == "0905"
    (user / "configs" / "data" / "custom.yaml").write_text("name: custom\npath: mine.h5ad\n")
    with pytest.raises(UserError, match=r"data/custom.yaml: 'custom' is the name of a shipped data option"):
        compose("train", ["+experiment=mine"])


def test_a_pyproject_of_another_project_does_not_hide_the_users_files(tmp_path, monkeypatch):
    user = _checkout(tmp_path / "analysis", pyproject=False)
    (user / "pyproject.toml").write_text('[project]\nname = "my-analysis"\nversion = "0.1"\n')
    (user / "configs" / "data" / "custom.yaml").write_text("name: custom\npath: mine.h5ad\n")
    monkeypatch.chdir(user)
    assert user_config_dir() == (user / "configs").resolve()
    with pytest.raises(UserError, match="is the name of a shipped data option"):
        compose("train", ["+experiment=0905"])
