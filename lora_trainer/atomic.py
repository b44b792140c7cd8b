"""Writing files and folders so that readers see the old one or the new one, never half of one.

Both write beside the destination under a hidden temporary name and rename it over the destination only once
everything is written. Nothing is ever deleted first: a failed or interrupted write leaves the old version.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replaced_atomically(path: Path) -> Iterator[Path]:
    """A temp file beside `path` to write; it becomes `path` in one step if the block ends without error.

    On any error, or Ctrl-C, the temp file is removed and an existing `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; LoRAs and logs get the usual permissions
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)  # still there only if the write or the rename did not happen


@contextmanager
def folder_replaced_atomically(path: Path) -> Iterator[Path]:
    """A temp folder beside `path` to fill; it becomes `path` if the block ends without error.

    A folder cannot be renamed over a non-empty one, so an existing `path` is first renamed aside, the new
    folder renamed in, and only then the old one removed; if the second rename fails the old one is put back.
    On any error, or Ctrl-C, the temp folder is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700 folders
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old)  # an empty folder is replaced by a rename
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # still there only if the write or the rename did not happen
