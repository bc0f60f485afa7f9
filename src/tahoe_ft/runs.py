"""Run directories: `runs/<experiment>/<timestamp>/`, the `latest` pointer, and `run:EXP/FILE` references.

A run directory is never reused: a new run always gets a fresh timestamped folder (created with
`mkdir(exist_ok=False)`), so a rerun cannot overwrite an earlier one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

from tahoe_ft.errors import UserError
from tahoe_ft.fileio import atomic_write_text

RUN_REF = re.compile(r"^run:(?P<exp>[^/]+)(?:/(?P<file>.+))?$")
_RUN_ID = re.compile(r"^\d{8}-\d{6}(-\d+)?$")


def new_run_dir(runs_dir: str | Path, experiment: str) -> Path:
    """Create and return a fresh `runs_dir/experiment/<YYYYmmdd-HHMMSS[-n]>` directory."""
    base = Path(runs_dir) / experiment
    base.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        name = stamp if n == 0 else f"{stamp}-{n}"
        path = base / name
        try:
            path.mkdir(exist_ok=False)
        except FileExistsError:
            continue
        return path
    raise UserError(f"could not create a new run directory under {base}")  # pragma: no cover


def set_latest(run_dir: Path) -> None:
    """Point `runs/<experiment>/latest` at `run_dir` (a relative symlink, replaced atomically)."""
    link = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(run_dir.name, tmp)
    os.replace(tmp, link)


def list_runs(runs_dir: str | Path, experiment: str) -> list[Path]:
    """Run directories of an experiment, oldest first (by their timestamped names)."""
    base = Path(runs_dir) / experiment
    if not base.is_dir():
        return []
    return sorted(p for p in base.iterdir() if p.is_dir() and not p.is_symlink() and _RUN_ID.match(p.name))


def newest_run(runs_dir: str | Path, experiment: str, *, need: str | None = None) -> Path:
    """The newest run of `experiment` (that contains `need`, if given), or a UserError."""
    runs = list_runs(runs_dir, experiment)
    if need is not None:
        runs = [r for r in runs if (r / need).exists()]
    if not runs:
        what = f" with {need}" if need else ""
        raise UserError(
            f"no run of experiment '{experiment}'{what} under {Path(runs_dir).resolve()}; "
            f"train it first: tahoe-ft train +experiment={experiment}"
        )
    return runs[-1]


def resolve_ref(ref: str, runs_dir: str | Path) -> Path:
    """Resolve `run:EXP/FILE` (newest run of EXP holding checkpoints/FILE) or a plain path.

    `run:EXP` alone means `run:EXP/best-val.pt`. A plain path must exist.
    """
    m = RUN_REF.match(ref)
    if m:
        exp, file = m.group("exp"), m.group("file") or "best-val.pt"
        rel = file if "/" in file else f"checkpoints/{file}"
        return newest_run(runs_dir, exp, need=rel) / rel
    path = Path(ref).expanduser()
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}; give a path or run:EXPERIMENT/best-val.pt")
    return path


def read_run_info(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "run.json"
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to `path` through a temp file and a rename, so readers never see half a file."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=str))


def update_run_info(run_dir: Path, **fields: Any) -> dict[str, Any]:
    info = read_run_info(run_dir)
    info.update(fields)
    write_json_atomic(run_dir / "run.json", info)
    return info


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


@dataclass(frozen=True)
class PredictRecord:
    """`predict.json`: what `predict` wrote into a run directory, and what `eval` and `export` read back.

    One declaration of the file's fields: `predict` builds one and calls `write`; readers call
    `PredictRecord.read(run_dir)` (None when the folder has no prediction record, e.g. files from elsewhere).
    """

    checkpoint: str
    checkpoint_step: int | None
    split: str
    n_groups: int
    n_pred_cells: int
    n_control_cells: int
    n_genes: int
    pert_col: str
    control_pert: str
    cell_type_col: str
    data_paths: list[str]
    seed: int
    # held-out perturbation -> the one whose features predicted it in pred_shuffled.h5ad ({} without shuffle)
    shuffle: dict[str, str] = field(default_factory=dict)
    # basal draws re-centred on the cell type's control mean (records written before this option: False)
    recentre_basal: bool = False
    # "log1p", or "counts": the count files too (records written before this option: log1p)
    output: str = "log1p"
    # with output=counts: the count files (log1p file -> its twin), where the real counts came from, the target
    # sum and library sizes used (tahoe_ft.prediction.counts_out); {} otherwise
    counts: dict = field(default_factory=dict)

    FILE: ClassVar[str] = "predict.json"

    def write(self, run_dir: str | Path) -> Path:
        path = Path(run_dir) / self.FILE
        write_json_atomic(path, dataclasses.asdict(self))
        return path

    @classmethod
    def read(cls, run_dir: str | Path) -> PredictRecord | None:
        path = Path(run_dir) / cls.FILE
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text())
            known = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in raw.items() if k in known})
        except (ValueError, TypeError) as exc:
            raise UserError(
                f"{path} is not a prediction record ({exc}); run tahoe-ft predict again for this run"
            ) from None


def git_commit() -> str | None:
    """The commit of tahoe-ft's own repository (with `-dirty` when it has changes), or None when the package
    is not a checkout (installed from a wheel) or git is missing."""
    import tahoe_ft

    here = Path(tahoe_ft.__file__).resolve().parent

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True, timeout=20)

    try:
        if git("ls-files", "--error-unmatch", "__init__.py").returncode != 0:
            return None  # not tracked here: an installed copy inside some other repository
        head = git("rev-parse", "HEAD")
        if head.returncode != 0 or not head.stdout.strip():
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict[str, Any]:
    """What a run's numbers may depend on beyond its config and seed: the code (tahoe-ft's version and commit),
    torch's version, its CPU thread count and the GPU, if any. (On the CPU, 40 steps of round 0905 on the demo
    gave bit-identical weights at 1 and 2 threads; a GPU run does not repeat a CPU one.)"""
    import torch

    import tahoe_ft

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "tahoe_ft": str(getattr(tahoe_ft, "__version__", "unknown")),
        "commit": git_commit(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
    }
