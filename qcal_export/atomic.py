"""Atomic outputs: write to a temporary name beside the target, then rename over it."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from qcal_export.errors import OutputError


def check_writable(path: str | Path, what: str) -> Path:
    """``path`` resolved; OutputError naming it if its directory is missing or not writable."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise OutputError(f"{what} {path} is a directory: give a file name")
    if not folder.is_dir():
        raise OutputError(f"{what} {path}: directory {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"{what} {path}: directory {folder} is not writable")
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path, what: str = "output") -> Iterator[Path]:
    """Yield a temporary path in the target's directory; rename it onto ``path`` on success.

    An interrupted or failed write leaves the old file (or none), never a torn one.
    """
    path = check_writable(path, what)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(folder: str | Path) -> Iterator[Path]:
    """A temporary directory inside ``folder`` (same filesystem) removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=".qcal-", dir=folder) as tmp:
        yield Path(tmp)
