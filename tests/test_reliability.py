"""Runs that survive kills and repeat exactly: a real `tahoe-ft train` process SIGKILLed at random moments (some
inside checkpoint writes) and resumed each time ends exactly where an uninterrupted run ends; a NaN loss stops
the run and keeps its last good checkpoint; the same config and seed give the same run, workers on."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tahoe_ft
from conftest_train import train_args
from tahoe_ft.config import compose
from tahoe_ft.errors import UserError
from tahoe_ft.fileio import SLOW_WRITE_ENV

REPO = Path(__file__).resolve().parents[1]
TIME_COLUMNS = {"cells_per_s"}


def _csv(run_dir: Path) -> list[dict[str, str]]:
    path = next(run_dir.glob("*_metrics.csv"))
    with open(path, newline="") as fh:
        return [{k: v for k, v in r.items() if k not in TIME_COLUMNS} for r in csv.DictReader(fh)]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _cmd(root: Path, *extra: str) -> list[str]:
    args = train_args(root, "pretrain", steps=36, val_every=4)
    return [sys.executable, "-m", "tahoe_ft.cli", "train", *args, "checkpoint.every_n_steps=4", *extra]


def _env(slow: float | None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    for k in ("TAHOE_FT_DEBUG", "TAHOE_FT_RUN_DIR", "HYDRA_FULL_ERROR", SLOW_WRITE_ENV):
        env.pop(k, None)
    if slow:
        env[SLOW_WRITE_ENV] = str(slow)
    return env


def _first_checkpointed_run(root: Path, proc: subprocess.Popen, timeout: float = 120) -> Path | None:
    """The run folder under root/runs/pretrain once it holds a last.ckpt (None if `proc` ends or time runs out)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        found = [
            p for p in (root / "runs" / "pretrain").glob("2*") if (p / "checkpoints" / "last.ckpt").exists()
        ]
        if found:
            return found[0]
        time.sleep(0.1)
    return None


@pytest.mark.timeout(900)
def test_sigkill_at_random_moments_then_resume_ends_like_an_uninterrupted_run(tmp_path):
    whole = subprocess.run(
        _cmd(tmp_path / "whole"), env=_env(None), capture_output=True, text=True, timeout=600
    )
    assert whole.returncode == 0, whole.stderr[-2000:]
    ref = next(p for p in (tmp_path / "whole" / "runs" / "pretrain").iterdir() if p.name != "latest")

    root = tmp_path / "killed"
    rng = random.Random(0)
    kills, in_write = 0, 0
    run_dir = None
    while kills < 10:
        extra = [] if run_dir is None else ["resume=true", f"run_dir={run_dir}"]
        proc = subprocess.Popen(
            _cmd(root, *extra), env=_env(0.5), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        # wait until this process has something to lose (a checkpoint), then kill it at a random moment
        run_dir = run_dir or _first_checkpointed_run(root, proc)
        if kills % 3 == 2:  # every third kill lands inside a checkpoint write (a temp file not yet renamed)
            deadline = time.time() + 60
            while proc.poll() is None and time.time() < deadline and not _writing(run_dir):
                time.sleep(0.02)
        else:
            time.sleep(rng.uniform(0.5, 4.0))
        if proc.poll() is not None:  # it finished before the kill: the run is done
            break
        writing = _writing(run_dir)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        in_write += writing
    if proc.poll() is None or proc.returncode != 0:
        final = subprocess.run(
            _cmd(root, "resume=true", f"run_dir={run_dir}"), env=_env(None), capture_output=True, text=True
        )
        assert final.returncode == 0, final.stderr[-2000:]
    assert kills >= 10 and in_write >= 1, (kills, in_write)

    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "finished" and info["steps"] == 36 and info["resumed"] >= 1
    # every file under a final name loads
    for p in run_dir.rglob("*"):
        if p.is_file() and not p.name.startswith(".") and "wandb" not in p.parts:
            if p.suffix in (".pt", ".ckpt"):
                torch.load(p, map_location="cpu", weights_only=True)
            elif p.suffix == ".json":
                json.loads(p.read_text())
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    # the final metrics (every step once, time columns aside) and weights equal the uninterrupted run's
    assert _csv(run_dir) == _csv(ref)
    want = json.loads((ref / "run.json").read_text())
    assert (info["best_val_loss"], info["best_step"]) == (want["best_val_loss"], want["best_step"])
    for name in ("best-val.pt", "step-36.pt"):
        a, b = _tensors(run_dir / "checkpoints" / name), _tensors(ref / "checkpoints" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def _writing(run_dir: Path) -> bool:
    return any(p.name.startswith(".") for p in (run_dir / "checkpoints").iterdir())


class _Diverge:
    """Makes the loss NaN from step `at` on (a weight set to NaN: what a diverging run looks like)."""

    def __new__(cls, at: int):
        import lightning as L

        class Diverge(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if trainer.global_step == at:
                    with torch.no_grad():
                        next(pl_module.model.project_out.parameters()).fill_(float("nan"))

        return Diverge()


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = compose("train", train_args(tmp_path, "pretrain", steps=12, val_every=4))
    with pytest.raises(UserError, match="training loss is nan at step 10.*keeps its last good checkpoints"):
        tahoe_ft.train(cfg, callbacks=[_Diverge(at=9)])
    run_dir = next(p for p in (tmp_path / "runs" / "pretrain").iterdir() if p.name != "latest")
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 8
    best = _tensors(run_dir / "checkpoints" / "best-val.pt")
    assert all(torch.isfinite(v).all() for v in best.values())
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


def test_same_config_and_seed_give_the_same_run_with_workers(tmp_path):
    runs = []
    for name in ("a", "b"):
        cfg = compose(
            "train", train_args(tmp_path / name, "pretrain", "data.num_workers=2", steps=10, val_every=5)
        )
        runs.append(tahoe_ft.train(cfg))
    assert _csv(runs[0]) == _csv(runs[1])
    a, b = (_tensors(r / "checkpoints" / "best-val.pt") for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.timeout(300)
def test_sigterm_stops_training_with_a_failure_exit_and_keeps_the_checkpoints(tmp_path):
    """SIGTERM (what a scheduler sends first) ends `tahoe-ft train` with exit status 143, not 0: Lightning turns
    it into a SystemExit without a code, which would tell a job script the run succeeded. The run is marked
    failed, its checkpoints load, and resume=true finishes it."""
    root = tmp_path / "t"
    log_path = tmp_path / "stderr.log"
    with open(log_path, "w") as log:  # a file, not a pipe nobody reads while the run writes to it
        proc = subprocess.Popen(_cmd(root), env=_env(None), stdout=subprocess.DEVNULL, stderr=log)
        run_dir = _first_checkpointed_run(root, proc)
        assert run_dir is not None and proc.poll() is None, "the run ended before it wrote a checkpoint"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    err = log_path.read_text()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM" in err and "resume=true" in err
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"
    torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    final = subprocess.run(
        _cmd(root, "resume=true", f"run_dir={run_dir}"), env=_env(None), capture_output=True, text=True
    )
    assert final.returncode == 0, final.stderr[-2000:]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
