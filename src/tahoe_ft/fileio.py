"""File helpers shared by every writer: one atomic-write mechanism (temp file + fsync + rename) and file hashes.

Every file that tahoe-ft writes under its final name goes through `atomic_path`: the content is written to a
temp file in the same folder, flushed to disk and renamed over the final name, so a kill at any moment leaves
either the old file or the new one, never half of one. `atomic_write_text` and `atomic_copy` are the common
cases of it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

# seconds every atomic write waits between writing its temp file and renaming it (tests that kill a process
# mid-write set it; unset in normal use)
SLOW_WRITE_ENV = "TAHOE_FT_TEST_SLOW_WRITE"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temp path beside `path`; when the block ends without error, it is fsynced and renamed to `path`.

    Write the whole file to the yielded path (any writer that takes a file name: `torch.save`,
    `AnnData.write_h5ad`, `Trainer.save_checkpoint`, ...). On an exception the temp file is removed and `path`
    is left as it was. `suffix` lets writers that check the file extension (e.g. `.h5ad`) see the right one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        if SLOW_WRITE_ENV in os.environ:  # the kill test widens the window in which a write is in flight
            time.sleep(float(os.environ[SLOW_WRITE_ENV]))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically: readers never see half a file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy `src` to `dst` atomically."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# bytes read from each of three places of a file for its fingerprint (whole files up to 3 x this are hashed)
_PROBE = 1 << 20


def file_fingerprint(path: str | os.PathLike) -> str:
    """A cheap content fingerprint of a data file: sha256 of its size and of 1 MiB at its start, middle and end
    (the whole file when it is smaller than 3 MiB). A screen of many GB is fingerprinted in milliseconds; an
    edit that keeps the size and misses the three probes goes unseen (the fingerprint is a guard against using
    another data set, not an integrity check: `tahoe-ft check` reads every block)."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(p, "rb") as fh:
        if size <= 3 * _PROBE:
            h.update(fh.read())
        else:
            for start in (0, size // 2, size - _PROBE):
                fh.seek(start)
                h.update(fh.read(_PROBE))
    return h.hexdigest()[:16]


def data_fingerprint(paths: list[str | os.PathLike] | tuple[str | os.PathLike, ...]) -> str:
    """One fingerprint for a list of data files (in order): same files, same content -> same fingerprint,
    wherever they lie (the paths themselves are not part of it)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(file_fingerprint(p).encode())
    return h.hexdigest()[:16]
