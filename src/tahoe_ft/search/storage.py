"""Where a study lives: an Optuna RDB storage (any SQLAlchemy URL; default a SQLite file in the sweep folder),
checked before anything is written, opened with Optuna's heartbeat, and cleared of trials whose process died.

A trial records the host and pid of its process (user attrs `host`, `pid`). When a sweep starts, every RUNNING
trial of this host whose process is gone is marked FAIL, so a killed run's trial neither counts nor blocks; a
trial of another machine is failed by Optuna's heartbeat (`heartbeat_s`: no heartbeat for 4 intervals).
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import stat
import warnings
from pathlib import Path

from tahoe_ft.errors import UserError

log = logging.getLogger(__name__)

HOST, PID = "host", "pid"


def default_url(sweep_dir: Path) -> str:
    return f"sqlite:///{(sweep_dir / 'study.db').resolve()}"


def check_storage(url: str, *, default: bool) -> None:
    """The URL parses, its driver loads, and the database can be opened; creates nothing (a SQLite file that
    does not exist yet needs only its folder, which the default URL's sweep folder gets later)."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

    how = "give an SQLAlchemy URL Optuna accepts, e.g. storage=sqlite:///study.db or postgresql://host/db"
    try:
        parsed = make_url(url)
        parsed.get_dialect()
    except (NoSuchModuleError, ImportError) as exc:  # NoSuchModuleError is an ArgumentError: first
        raise UserError(
            f"storage={url!r}: no SQLAlchemy driver for '{parsed.drivername}' ({_first_line(exc)}); install it "
            f"or {how}"
        ) from None
    except (ArgumentError, ValueError) as exc:
        raise UserError(f"storage={url!r} is not a database URL ({_first_line(exc)}); {how}") from None
    if parsed.get_backend_name() == "sqlite":
        db = parsed.database or ""
        if db in ("", ":memory:") or db.startswith("file:"):
            raise UserError(f"storage={url!r}: an in-memory study cannot be resumed; {how}")
        path = Path(db)
        if path.exists():
            _check_sqlite_file(url, path)
        elif not default and not path.parent.is_dir():
            raise UserError(f"storage={url!r}: folder {path.parent} does not exist; create it or {how}")
        return
    try:
        engine = create_engine(parsed)
        try:
            with engine.connect():
                pass
        finally:
            engine.dispose()
    except SQLAlchemyError as exc:
        raise UserError(f"storage={url!r} cannot be opened ({_first_line(exc)}); {how}") from None


def _check_sqlite_file(url: str, path: Path) -> None:
    if not path.is_file():
        raise UserError(f"storage={url!r}: {path} is not a file; name a SQLite file")
    # a study writes every trial (and its heartbeat) into the file, and SQLite its journal beside it; the mode
    # bits count too, as a user's "keep this": root may write any file, and would silently
    if not path.stat().st_mode & stat.S_IWUSR or not os.access(path, os.W_OK):
        raise UserError(
            f"storage={url!r}: {path} is read-only, and a sweep writes every trial into it; make it writable "
            f"(chmod u+w {path}) or give another storage=..."
        )
    if not os.access(path.parent, os.W_OK):
        raise UserError(
            f"storage={url!r}: folder {path.parent} is read-only, and SQLite writes its journal there; make it "
            "writable or give another storage=..."
        )
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            con.execute("select name from sqlite_master").fetchall()
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise UserError(
            f"storage={url!r}: {path} is not a SQLite database ({exc}); name another file"
        ) from None


def open_storage(url: str, heartbeat_s: int):
    """Optuna's RDBStorage with its heartbeat on (tables created on first use)."""
    import optuna

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # the heartbeat's
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=int(heartbeat_s), grace_period=4 * int(heartbeat_s)
            )
    except Exception as exc:  # noqa: BLE001 - any driver's failure to open is the user's URL
        raise UserError(f"storage={url!r} cannot be opened as an Optuna study ({_first_line(exc)})") from None


def mark_process(trial) -> None:
    """Record which process runs `trial` (read by `fail_dead_trials`)."""
    trial.set_user_attr(HOST, socket.gethostname())
    trial.set_user_attr(PID, os.getpid())


def fail_dead_trials(study, storage) -> list[int]:
    """Mark FAIL every RUNNING trial of this host whose process is gone; return their numbers."""
    from optuna.trial import TrialState

    host = socket.gethostname()
    failed = []
    study_id = storage.get_study_id_from_name(study.study_name)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = t.user_attrs.get(PID)
        if t.user_attrs.get(HOST) != host or not isinstance(pid, int) or pid == os.getpid() or _alive(pid):
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        storage.set_trial_user_attr(
            trial_id, "fail_reason", f"its process (pid {pid} on {host}) ended mid-trial"
        )
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
        failed.append(t.number)
    if failed:
        log.info("sweep: trial(s) %s were left running by a process that is gone: marked FAIL", failed)
    return failed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:  # a zombie (ended, not yet reaped by its parent) is gone too
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
