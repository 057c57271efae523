"""A full disk, for real: a child process whose files cannot grow past ``limit`` bytes.

``RLIMIT_FSIZE`` makes every write past the limit fail with EFBIG ("File too large") once the
child ignores SIGXFSZ, as a write to a full disk fails with ENOSPC: the writer sees an OSError
mid-write. The child imports this checkout's qcal_export and writes no bytecode.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import qcal_export

PRELUDE = """
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
"""


def child_env() -> dict[str, str]:
    """The environment of a child that imports this checkout's qcal_export."""
    return {**os.environ, "PYTHONPATH": str(Path(qcal_export.__file__).parents[1])}


def run_with_file_limit(code: str, limit: int) -> subprocess.CompletedProcess[str]:
    """Run ``code`` (Python, indented as in the caller) where no file may pass ``limit`` bytes."""
    source = PRELUDE.format(limit=limit) + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-B", "-c", source],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def run_cli_with_file_limit(argv: list[str], limit: int) -> subprocess.CompletedProcess[str]:
    """``qcal`` with ``argv`` (its main(), in the child) on a disk that holds ``limit`` bytes."""
    code = f"""
        import sys
        from qcal_export.cli import main
        sys.exit(main({argv!r}))
    """
    return run_with_file_limit(code, limit)
