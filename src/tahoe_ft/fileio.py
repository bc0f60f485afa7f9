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


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


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
