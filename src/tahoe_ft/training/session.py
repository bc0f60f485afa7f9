"""Where a training run lives, so the recipe does not have to know: a fresh run directory, the run being
resumed (`resume=true`, refused when a setting it depends on changed), or — in a process that Lightning's DDP
launcher started — rank 0's run directory.

Nothing is written before `RunSession.start`: a command refused while the data or the model are checked
leaves no run directory behind. `RunSession.running` marks the run failed or finished (with its wall time
summed over resumed segments) and closes its wandb run, so the next round in the same process (`reproduce`, a
sweep) gets a wandb run of its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from tahoe_ft.checkpoints.io import safe_load
from tahoe_ft.config import TrainConfig
from tahoe_ft.errors import UserError
from tahoe_ft.fileio import atomic_write_text
from tahoe_ft.runs import (
    environment,
    new_run_dir,
    newest_run,
    now_iso,
    read_run_info,
    set_latest,
    update_run_info,
    write_json_atomic,
)

log = logging.getLogger(__name__)

# Settings a resumed run must keep: changing them mid-run would be silently ignored or inconsistent.
RESUME_FIXED = (
    "optim", "sched", "loss", "freeze", "trainer.max_steps", "model", "encoder", "seed", "checkpoint.monitor",
)  # fmt: skip
# Lightning's DDP launcher re-runs the command in one process per extra device; those processes must use the
# run directory of the process the user started (inherited through this variable), not create their own.
RUN_DIR_ENV = "TAHOE_FT_RUN_DIR"


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume_compatible(saved: dict[str, Any], now: dict[str, Any], run_dir: Path) -> None:
    """Refuse `resume=true` when a RESUME_FIXED setting differs from the run's saved config."""
    a, b = _flat(saved), _flat(now)
    changed = sorted(
        k
        for k in set(a) | set(b)
        if any(k == f or k.startswith(f + ".") for f in RESUME_FIXED) and a.get(k) != b.get(k)
    )
    if changed:
        k = changed[0]
        raise UserError(
            f"resume=true refuses changed settings in {run_dir}: {k} was {a.get(k)!r}, now {b.get(k)!r}"
            + (f" (+{len(changed) - 1} more)" if len(changed) > 1 else "")
            + "; resume with the run's own config, or start a new run with init_from=<its checkpoint>"
        )


def is_ddp_worker() -> bool:
    """A process started by Lightning's DDP launcher (local rank > 0, or another node)."""
    return os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0"


def _worker_run_dir() -> Path:
    shared = os.environ.get(RUN_DIR_ENV)
    if not shared:
        raise UserError(
            "this is a DDP worker process but the run directory of rank 0 is unknown; on several nodes set "
            f"{RUN_DIR_ENV}=<a run directory on a shared file system> on every node"
        )
    return Path(shared)


def epoch_position(last_ckpt: Path) -> tuple[int, int, int]:
    """(epoch, batches of it already trained, global step) of a last.ckpt, from Lightning's own loop state."""
    ck = safe_load(last_ckpt)
    progress = ck["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]
    return int(ck["epoch"]), int(progress["completed"]), int(ck["global_step"])


@dataclass
class RunSession:
    """The run directory of one `train` call and what it continues."""

    cfg: TrainConfig
    resolved: dict[str, Any]
    worker: bool
    run_dir: Path | None = None  # known up front when resuming or in a DDP worker
    last_ckpt: Path | None = None  # the last.ckpt a resumed run continues from
    prior: dict[str, Any] = field(default_factory=dict)  # run.json before this segment

    @classmethod
    def plan(cls, cfg: TrainConfig, resolved: dict[str, Any]) -> RunSession:
        """Decide where the run lives (and check a resume) before anything is read or written."""
        session = cls(cfg, resolved, worker=is_ddp_worker())
        if session.worker:
            session.run_dir = _worker_run_dir()
        elif cfg.resume:
            session.run_dir = (
                Path(cfg.run_dir)
                if cfg.run_dir
                else newest_run(cfg.runs_dir, cfg.experiment, need="checkpoints/last.ckpt")
            )
        if cfg.resume:
            assert session.run_dir is not None
            session.last_ckpt = session.run_dir / "checkpoints" / "last.ckpt"
            if not session.last_ckpt.is_file():
                raise UserError(
                    f"resume=true: {session.last_ckpt} does not exist; start a new run without resume=true"
                )
            saved = OmegaConf.to_container(OmegaConf.load(session.run_dir / f"{cfg.experiment}_config.yaml"))
            check_resume_compatible(saved, resolved, session.run_dir)  # type: ignore[arg-type]
        return session

    @property
    def writes(self) -> bool:
        """Rank 0 writes the run's files; DDP workers only train."""
        return not self.worker

    def start(self, manifest: dict[str, Any], parent: Path | None) -> Path:
        """Create a fresh run directory (config, manifest, run.json, `latest`), or reopen the resumed one."""
        cfg = self.cfg
        if self.run_dir is None:
            self.run_dir = new_run_dir(cfg.runs_dir, cfg.experiment)
            atomic_write_text(
                self.run_dir / f"{cfg.experiment}_config.yaml", OmegaConf.to_yaml(self.resolved)
            )
            write_json_atomic(
                self.run_dir / "manifest.json", {k: v for k, v in manifest.items() if k != "pert_matrix"}
            )
            update_run_info(
                self.run_dir,
                experiment=cfg.experiment,
                run_id=self.run_dir.name,
                status="running",
                started=now_iso(),
                parent=str(parent) if parent else None,
                data_fingerprint=manifest.get("data_fingerprint"),
                split_id=manifest.get("split_id"),
                # the ancestors, parent first (the checkpoints' manifests also hold what each trained on)
                lineage=[
                    {k: v for k, v in e.items() if k != "trained"} | {"checked": e.get("trained") is not None}
                    for e in manifest.get("lineage") or []
                ],
                description=cfg.description,
                wall_time_s=0.0,
                steps=0,
                best_val_loss=None,
                best_step=None,
                environment=environment(),
            )
            set_latest(self.run_dir)
            if parent is None:
                write_json_atomic(
                    self.run_dir / "init_report.json", {"source": None, "note": "trained from scratch"}
                )
        elif self.writes:  # resumed: temp files of writes a kill interrupted are never under a final name
            for stale in (self.run_dir / "checkpoints").glob(".*"):
                stale.unlink(missing_ok=True)
        self.prior = read_run_info(self.run_dir)
        if self.writes and self.cfg.resume:
            env, before = environment(), self.prior.get("environment")
            if before and env != before:  # kept: the run's later steps ran here
                changed = sorted(k for k in env if env[k] != before.get(k))
                log.warning(
                    "resuming %s in another environment (%s); run.json keeps both",
                    self.run_dir,
                    ", ".join(f"{k} {before.get(k)} -> {env[k]}" for k in changed),
                )
                update_run_info(self.run_dir, resumed_environment=env)
        os.environ[RUN_DIR_ENV] = str(self.run_dir)  # inherited by DDP worker processes
        return self.run_dir

    @contextlib.contextmanager
    def failing(self) -> Iterator[None]:
        """Between `start` and `running`: a run that dies there (loading the parent's weights, fitting the
        prior, building the trainer) is marked failed with the error's one line, not left "running"."""
        try:
            yield
        except BaseException as exc:
            if self.writes and self.run_dir is not None:
                update_run_info(self.run_dir, status="failed", error=error_line(exc))
            raise

    def write_init_report(self, report: dict[str, Any]) -> None:
        if self.writes and self.run_dir is not None:
            write_json_atomic(self.run_dir / "init_report.json", report)

    @contextlib.contextmanager
    def running(self, trainer: Any, policy: Any) -> Iterator[None]:
        """Around `fit`: run.json says failed (and keeps the time spent) or finished with the best val loss;
        the run's wandb run is closed either way."""
        assert self.run_dir is not None
        start = time.perf_counter()
        wall0 = float(self.prior.get("wall_time_s") or 0.0)
        try:
            yield
        except BaseException as exc:
            if self.writes:
                update_run_info(
                    self.run_dir,
                    status="failed",
                    error=error_line(exc),
                    wall_time_s=wall0 + time.perf_counter() - start,
                )
            _finish_wandb(trainer, exit_code=1)
            from lightning.pytorch.utilities.exceptions import SIGTERMException

            if isinstance(exc, SIGTERMException):  # a SystemExit without a code: the process would exit 0
                log.error(
                    "training stopped by SIGTERM at step %d: %s is marked failed; continue it with resume=true",
                    trainer.global_step,
                    self.run_dir,
                )
                raise SystemExit(128 + signal.SIGTERM) from None
            raise
        _finish_wandb(trainer, exit_code=0)
        if not trainer.is_global_zero:
            return
        resumed = int(self.prior.get("resumed", 0)) + (1 if self.cfg.resume else 0)
        update_run_info(
            self.run_dir,
            status="finished",
            finished=now_iso(),
            wall_time_s=wall0 + time.perf_counter() - start,
            steps=trainer.global_step,
            # null, not Infinity (not JSON), when no validation loss was ever finite (see final.pt)
            best_val_loss=policy.best_val if policy.best_step >= 0 else None,
            best_step=policy.best_step if policy.best_step >= 0 else None,
            resumed=resumed,
        )
        if policy.best_step >= 0:
            log.info(
                "run finished: %s (best val_loss %.5f at step %d)",
                self.run_dir,
                policy.best_val,
                policy.best_step,
            )
        else:
            log.info("run finished: %s (no validation loss; checkpoints/final.pt)", self.run_dir)


def error_line(exc: BaseException) -> str:
    """The one line run.json keeps of the error a run died of."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip().rstrip(":")


def _finish_wandb(trainer: Any, *, exit_code: int) -> None:
    """Close this run's wandb run: Lightning's WandbLogger otherwise hands it to the next round in the process."""
    from lightning.pytorch.loggers import WandbLogger

    for lg in trainer.loggers:
        if isinstance(lg, WandbLogger) and getattr(lg, "_experiment", None) is not None:
            lg.experiment.finish(exit_code=exit_code)
            lg._experiment = None
