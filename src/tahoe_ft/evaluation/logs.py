"""Where an evaluation's output goes: everything into `<run>/eval/eval.log`, the console kept for a person.

cell-eval, pdex, polars, anndata and friends log a line per file and per step, warn through `warnings`, and
draw tqdm bars on stderr: about a thousand lines for one round with its panel. `capture(log_file)` (used by
`evaluation.run.evaluate_run`) sends all of that to the log file while it runs: a file handler on the root
logger (INFO, whatever the root level was; the handlers already there keep seeing only what they saw
before), Python warnings as log records, and `sys.stdout` / `sys.stderr` (prints, progress bars) into the
file. Logging handlers that were already set up keep writing to the streams they were given.

`quiet_console()` (the CLI's `tahoe-ft eval`) keeps the console to tahoe-ft's own messages: the libraries'
records, and tahoe-ft's evaluation INFO lines, go to the log file only. `tahoe-ft eval verbose=true`
(`EvalConfig.verbose`; or the environment variable `TAHOE_FT_VERBOSE=1`) lifts it: the records reach the console
as well, and prints and progress bars stay there (`capture(..., console=True)`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

VERBOSE_ENV = "TAHOE_FT_VERBOSE"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def verbose(asked: bool = False) -> bool:
    """Whether the person asked for the libraries' output on the console: `asked` (`EvalConfig.verbose`) or
    `TAHOE_FT_VERBOSE=1`."""
    return asked or os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false", "no")


class _AtLeast(logging.Filter):
    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


class _OwnMessages(logging.Filter):
    """tahoe-ft's records (its evaluation's at WARNING and above) and anything at ERROR or above."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        if not record.name.startswith("tahoe_ft"):
            return False
        return record.levelno >= logging.WARNING or not record.name.startswith("tahoe_ft.evaluation")


class _Renamed(logging.Filter):
    """Records that name the staging folder `old` name `new` instead (where the files end up). cell-eval's
    warning that an output folder "already exists, potential overwrite occurring" is dropped: every folder
    evaluation gives cell-eval is one tahoe-ft made for it (the staging folder, the panel's cache folders),
    and nothing of the user's is in them (kept with `keep_all`: verbose, the libraries' records as they are)."""

    def __init__(self, old: Path, new: Path, *, keep_all: bool = False) -> None:
        super().__init__()
        self.old, self.new, self.keep_all = str(old), str(new), keep_all

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a record whose arguments do not fit its format: as it is
            return True
        overwrite = record.name.startswith("cell_eval") and "potential overwrite occurring" in message
        if overwrite and not self.keep_all:
            return False
        if self.old not in message:
            return True
        record.msg, record.args = message.replace(self.old, self.new), None
        return True


@contextlib.contextmanager
def _filtered(handlers: list[logging.Handler], flt: logging.Filter) -> Iterator[None]:
    for h in handlers:
        h.addFilter(flt)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(flt)


@contextlib.contextmanager
def capture(
    log_file: str | os.PathLike, *, console: bool = False, staged: tuple[Path, Path] | None = None
) -> Iterator[Path]:
    """Log records (INFO and up), warnings, prints and progress bars of the block go into `log_file`
    (appended to); with `console`, prints and progress bars stay on stdout / stderr instead. `staged`: (the
    staging folder, the folder its files are moved to): the records name the latter (`_Renamed`)."""
    path = Path(log_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    before = list(root.handlers)
    old_level = root.level
    with open(path, "a", buffering=1, encoding="utf-8") as stream:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter(_FORMAT))
        handler.setLevel(logging.INFO)
        with contextlib.ExitStack() as stack:
            if old_level > logging.INFO:  # the existing handlers keep their threshold
                stack.enter_context(_filtered(before, _AtLeast(old_level)))
                root.setLevel(logging.INFO)
            root.addHandler(handler)
            if staged is not None:
                stack.enter_context(_filtered([*before, handler], _Renamed(*staged, keep_all=console)))
            already = getattr(logging, "_warnings_showwarning", None) is not None
            logging.captureWarnings(True)
            try:
                with contextlib.ExitStack() as streams:
                    if not console:
                        streams.enter_context(contextlib.redirect_stdout(stream))
                        streams.enter_context(contextlib.redirect_stderr(stream))
                    yield path
            finally:
                if not already:
                    logging.captureWarnings(False)
                root.removeHandler(handler)
                root.setLevel(old_level)
                stream.flush()


@contextlib.contextmanager
def quiet_console(asked: bool = False) -> Iterator[None]:
    """Keep the libraries' log records off the console handlers (they still reach `capture`'s file);
    nothing changes when `verbose(asked)` (`EvalConfig.verbose`, `TAHOE_FT_VERBOSE=1`)."""
    if verbose(asked):
        yield
        return
    with _filtered(list(logging.getLogger().handlers), _OwnMessages()):
        yield
