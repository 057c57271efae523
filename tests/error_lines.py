"""The one ``qcal: error:`` line a refused ``qcal calibrate`` prints, and the good run's
arguments the bad-input cases start from: shared by test_cli_errors*.py and test_bad_input.py.
"""

from __future__ import annotations

import re
from pathlib import Path


def good(w: Path, *extra: str) -> list[str]:
    """The good model and data, then ``extra`` options."""
    return [str(w / "model.onnx"), "--data", str(w / "data"), *extra]


def assert_one_error_line(captured, pattern: str) -> None:
    """stderr is one ``qcal: error:`` line matching ``pattern``, no traceback; stdout empty."""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("qcal: error: ")
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in captured.err
    assert captured.out == ""
