"""A new user following only the README's own-screen section, on the Papalexi file written out as a plain .h5ad,
gets a scored run with the baseline panel and the ceiling beside it: the test runs exactly the README's commands.

The commands are the one ```bash block under the README heading "Fine-tune on your own screen". Only
`trainer.max_steps` and `trainer.val_check_interval` are appended to `tahoe-ft train`, so the round is short.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import anndata as ad
import pytest

ROOT = Path(__file__).resolve().parents[1]
TAHOE_FT = Path(sys.executable).with_name("tahoe-ft")
SECTION = "Fine-tune on your own screen"
SHORT = ["trainer.max_steps=20", "trainer.val_check_interval=10"]  # appended to `train` only


def readme_commands(readme: str, section: str = SECTION) -> list[list[str]]:
    """The argv of every command in the first ```bash block under the heading `section`."""
    m = re.search(rf"^#+ {re.escape(section)}\s*$", readme, flags=re.M)
    assert m, f"README.md has no heading {section!r}"
    block = re.search(r"^```bash\n(.*?)^```", readme[m.end() :], flags=re.M | re.S)
    assert block, f"no ```bash block under {section!r}"
    text = block.group(1).replace("\\\n", " ")  # continuation lines
    lines = [ln.strip() for ln in text.splitlines()]
    return [shlex.split(ln) for ln in lines if ln and not ln.startswith("#")]


def test_readme_block_is_parsed_into_commands():
    readme = '# T\n## Fine-tune on your own screen\ntext\n```bash\n# c\ntahoe-ft a x=1 \\\n    "y=[1,2]"\ntahoe-ft b\n```\n'
    assert readme_commands(readme) == [["tahoe-ft", "a", "x=1", "y=[1,2]"], ["tahoe-ft", "b"]]
    with pytest.raises(AssertionError, match="no heading"):
        readme_commands("# T\n```bash\ntahoe-ft a\n```\n")


@pytest.fixture(scope="module")
def commands() -> list[list[str]]:
    return readme_commands((ROOT / "README.md").read_text())


def test_the_section_is_only_tahoe_ft_commands_in_order(commands):
    assert all(c[0] == "tahoe-ft" for c in commands), commands
    assert [c[1] for c in commands] == ["check", "train", "predict", "eval", "compare"]
    train = commands[1]
    assert "data.path=screen.h5ad" in train and "data=custom" in train


@pytest.fixture(scope="module")
def own_screen_run(tmp_path_factory, commands) -> Path:
    from tahoe_ft.datasets.embedded import papalexi_path

    work = tmp_path_factory.mktemp("own_screen")
    # the Papalexi screen as a user would have it: one plain, uncompressed .h5ad named as in the README
    ad.read_h5ad(papalexi_path(work / "cache")).write_h5ad(work / "screen.h5ad")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
        "TAHOE_FT_CACHE": str(work / "cache"),
    }
    for argv in commands:
        argv = [str(TAHOE_FT), *argv[1:], *(SHORT if argv[1] == "train" else [])]
        proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{shlex.join(argv)} -> {proc.returncode}\n{proc.stderr[-3000:]}"
        if argv[1] == "check":
            assert not (work / "runs").exists(), "tahoe-ft check wrote a run"
    return work


def test_readme_own_screen_commands_give_a_scored_run_beside_the_panel(own_screen_run):
    runs = own_screen_run / "runs"
    run_dirs = [p for p in runs.iterdir() if p.is_dir() and (p / "latest").exists()]
    assert len(run_dirs) == 1, run_dirs
    run = (run_dirs[0] / "latest").resolve()
    for name in ("checkpoints/best-val.pt", "pred.h5ad", "real.h5ad", "predict.json", "init_report.json"):
        assert (run / name).is_file(), name
    score = json.loads((run / "eval" / "score.json").read_text())
    assert math.isfinite(score["avg_score"])
    panel = score["baselines"]
    assert panel and "ceiling" in panel and "cell_mean" in panel
    assert all(math.isfinite(b["avg_score"]) for b in panel.values())
    # the held-out perturbations of the README's command are the ones scored
    real = ad.read_h5ad(run / "real.h5ad")
    assert set(real.obs["target_gene"]) - {"non-targeting"} == {"IFNGR2", "STAT2", "CD86"}
    assert (runs / "compare.csv").is_file()
