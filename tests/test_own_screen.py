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
    assert math.isfinite(score["avg_score"]) and 0.0 <= score["avg_score"] <= 1.0
    assert set(score["metrics"]) == {"mae", "discrimination_score_l1", "overlap_at_N"}  # the vcc profile
    panel = score["baselines"]
    assert panel and "ceiling" in panel and "cell_mean" in panel
    assert all(math.isfinite(b["avg_score"]) for b in panel.values())
    # the held-out perturbations of the README's command are the ones scored
    real = ad.read_h5ad(run / "real.h5ad")
    assert set(real.obs["target_gene"]) - {"non-targeting"} == {"IFNGR2", "STAT2", "CD86"}
    assert (runs / "compare.csv").is_file()


# -- the next round (issue #31): run:0905 resolves to the 0905 run of this data and split -----------------------

NEXT = "The next round"
OTHER_SPLIT = ["data=custom", "data.path=screen.h5ad", "data.input_transform=counts",
               "data.val_perts=[CMTM6]", "data.test_perts=[STAT1]", "pretrained=null"]  # fmt: skip


def _copy_runs(src: Path, dst: Path, *, keep: set[str] | None = None) -> None:
    """screen.h5ad and the runs of `src` (only the run ids in `keep`, when given) under `dst`."""
    import shutil

    dst.mkdir()
    os.link(src / "screen.h5ad", dst / "screen.h5ad")
    for run in (src / "runs").glob("*/2*"):
        if keep is None or run.name in keep:
            shutil.copytree(run, dst / "runs" / run.parent.name / run.name, symlinks=True)


def test_the_readme_next_round_chains_onto_the_0905_run_of_its_own_split(own_screen_run, tmp_path):
    """The README's own-screen commands, then a newer 0905 run on another split (it trained on the README's
    test perturbations), then the README's next round: the newer run is passed over, the README's 0905 run is
    the parent. In a folder with only the other split's run, the next round stops in one line."""
    (next_round,) = readme_commands((ROOT / "README.md").read_text(), NEXT)
    assert next_round[:3] == ["tahoe-ft", "train", "+experiment=0906"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
           "TAHOE_FT_CACHE": str(own_screen_run / "cache")}  # fmt: skip
    work = tmp_path / "two_splits"
    _copy_runs(own_screen_run, work)
    (readme_run,) = [p.name for p in (work / "runs" / "0905").glob("2*")]

    def tahoe(*argv: str, cwd: Path = work) -> subprocess.CompletedProcess:
        args = [str(TAHOE_FT), *argv, *SHORT]
        return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)

    other = tahoe("train", "+experiment=0905", *OTHER_SPLIT)
    assert other.returncode == 0, other.stderr[-3000:]
    (other_run,) = [p.name for p in (work / "runs" / "0905").glob("2*") if p.name != readme_run]
    assert (work / "runs" / "0905" / "latest").resolve().name == other_run  # the newest 0905 run

    proc = tahoe(*next_round[1:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((work / "runs" / "0906" / "latest" / "run.json").read_text())
    parent = info["lineage"][0]
    assert (parent["experiment"], parent["run_id"]) == ("0905", readme_run), info["lineage"]
    assert parent["checkpoint"].endswith(f"0905/{readme_run}/checkpoints/best-val.pt")
    assert other_run in proc.stderr  # the log names the run it passed over

    # only the other split's 0905 run: the next round is refused in one line, and no 0906 run is written
    alone = tmp_path / "other_split_only"
    _copy_runs(work, alone, keep={other_run})
    proc = tahoe(*next_round[1:], cwd=alone)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert "no run of '0905'" in lines[0] and "with this split" in lines[0] and other_run in lines[0], lines
    assert "Traceback" not in proc.stderr
    assert not (alone / "runs" / "0906").exists() or not list((alone / "runs" / "0906").glob("2*"))
