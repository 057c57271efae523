"""Shared by the benchmark scripts: peak RSS, one measured row per fresh process, versions."""

from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def spawn_row(
    script: str, argv: list[str], result_path: Path, label: dict[str, Any]
) -> dict[str, Any]:
    """Run ``script argv... --json result_path`` in a fresh interpreter; its JSON result.

    On failure: ``label`` plus an ``error`` entry holding the exit code and the output's tail.
    """
    command = [sys.executable, str(Path(script).resolve()), *argv, "--json", str(result_path)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-25:])
        return {**label, "error": f"exit {done.returncode}: {tail}"}
    return json.loads(result_path.read_text())


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    return {
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def failures(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown lines giving each failed row's error (rows with an ``error``), for a table's end."""
    lines: list[str] = []
    for row in rows:
        if "error" in row:
            lines += ["", f"{row['method']} failed:", "", "```", row["error"], "```"]
    return lines
