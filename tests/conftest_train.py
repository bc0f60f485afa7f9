"""Helpers for end-to-end training tests: tiny demo data, a tiny model, a few steps, all on CPU."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import tahoe_ft

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m tahoe_ft.cli ARGS` in a fresh process, without the variables that change its output."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    for key in ("TAHOE_FT_DEBUG", "TAHOE_FT_RUN_DIR", "HYDRA_FULL_ERROR", "TAHOE_FT_VERBOSE"):
        env.pop(key, None)
    return subprocess.run(
        [sys.executable, "-m", "tahoe_ft.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


TINY_DEMO = [
    "data.demo.n_genes=60", "data.demo.n_cell_types=2", "data.demo.n_batches=2", "data.demo.n_perts=8",
    "data.demo.cells_per_pert=20", "data.demo.n_ctrl=60", "data.demo.n_programs=4", "data.demo.state_dim=16",
    "data.demo.pert_feature_dim=8", "data.demo.n_drugs=6", "data.demo.pretrain_cells_per_drug=20",
    "data.demo.pretrain_ctrl=60", "data.demo.n_pretrain_cell_types=2", "data.demo.n_val_perts=2",
    "data.demo.n_test_perts=2",
]  # fmt: skip
RAW_ROUNDS = {"0905", "0906", "0907", "0907aux", "0908"}
TINY_MODEL = [
    "model.hidden_dim=32", "model.cell_set_len=8", "model.backbone.num_hidden_layers=2",
    "model.backbone.num_attention_heads=4", "model.backbone.num_key_value_heads=2", "model.backbone.head_dim=8",
    "model.backbone.intermediate_size=48", "encoder.decoder.hidden_dims=[32]",
]  # fmt: skip


def tiny_args(root: Path, *, steps: int = 6, val_every: int = 3) -> list[str]:
    return [
        *TINY_DEMO,
        "data.batch_size=4",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={val_every}",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "trainer.accelerator=cpu",
        "logger=csv",
        "sched.warmup_steps=3",
        "freeze.warmup_steps=2",
        f"runs_dir={root / 'runs'}",
        f"paths.data_cache={root / 'cache'}",
    ]


def train(root: Path, experiment: str, *extra: str, steps: int = 6, val_every: int = 3) -> Path:
    """Train `experiment` on tiny data through the Python API; return the run directory."""
    return tahoe_ft.train(
        tahoe_ft.compose("train", train_args(root, experiment, *extra, steps=steps, val_every=val_every))
    )


def train_args(root: Path, experiment: str, *extra: str, steps: int = 6, val_every: int = 3) -> list[str]:
    args = [f"+experiment={experiment}", *tiny_args(root, steps=steps, val_every=val_every), *TINY_MODEL]
    if experiment in RAW_ROUNDS:  # encoder.decoder exists only for the SE600M encoder
        args = [a for a in args if not a.startswith("encoder.decoder")]
    return args + list(extra)


def metrics(run_dir: Path) -> list[dict[str, str]]:
    exp = json.loads((run_dir / "run.json").read_text())["experiment"]
    with open(run_dir / f"{exp}_metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def column(rows: list[dict[str, str]], key: str) -> list[tuple[int, float]]:
    return [(int(float(r["step"])), float(r[key])) for r in rows if r.get(key) not in (None, "")]
