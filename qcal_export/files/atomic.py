"""Atomic outputs: write to a temporary name beside the target, then rename over it.

Every file gets the mode ``open()`` gives a new file under the process umask (0o666 & ~umask),
whoever writes it; a write that fails (disk full included) raises OutputError naming the file,
and leaves the old file as it was and no temporary file behind.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path

from qcal_export.errors import OutputError


def check_writable(path: str | Path, what: str) -> Path:
    """``path`` as a Path; OutputError naming it if its directory is missing or not writable."""
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
def atomic_path(
    path: str | Path,
    what: str = "output",
    *,
    failures: tuple[type[Exception], ...] = (OSError,),
) -> Iterator[Path]:
    """Yield a temporary path in the target's directory; rename it onto ``path`` on success.

    An interrupted or failed write leaves the old file (or none), never a torn one. The
    temporary file exists (empty, with the umask's mode) when yielded; the writer truncates or
    replaces it. An exception of ``failures`` raised by the writer (an OSError; a library's own
    I/O error type where it wraps one) becomes OutputError("cannot write PATH: reason").
    """
    path = check_writable(path, what)
    tmp, mode = _create_temporary(path)
    try:
        with write_errors(path, failures):
            yield tmp
            os.chmod(tmp, mode)
            fsync(tmp)
            os.replace(tmp, path)
            fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_file(path: str | Path, content: bytes | str, what: str) -> Path:
    """Write ``content`` to ``path`` atomically (see ``atomic_path``); returns the path."""
    data = content.encode() if isinstance(content, str) else content
    with atomic_path(path, what) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return Path(path)


@contextlib.contextmanager
def write_errors(path: Path, failures: tuple[type[Exception], ...] = (OSError,)) -> Iterator[None]:
    """Turn a failed write of ``path`` (disk full, quota, I/O error) into one OutputError line."""
    try:
        yield
    except failures as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise OutputError(f"cannot write {path}: {reason}") from None


def fsync(path: Path) -> None:
    """Flush ``path`` to the disk: a file before its rename, its directory after one (skipped
    where the platform cannot open a directory for that)."""
    directory = path.is_dir()
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        if not directory:
            raise


def _create_temporary(path: Path) -> tuple[Path, int]:
    """A new empty file ``.<name>.<token>.tmp`` beside ``path``, created as ``open()`` creates
    files (0o666 less the umask), and that mode."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        except OSError as e:
            raise OutputError(f"cannot write {path}: {e.strerror}") from None
        mode = os.fstat(fd).st_mode & 0o777
        os.close(fd)
        return tmp, mode


@contextlib.contextmanager
def atomic_dir(folder: str | Path) -> Iterator[Path]:
    """A temporary directory inside ``folder`` (same filesystem) removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=".qcal-", dir=folder) as tmp:
        yield Path(tmp)
