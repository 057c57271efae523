"""Shared fixtures and helper modules.

Being here, this file puts tests/ on sys.path (pytest's default ``prepend`` import mode), so the
helper modules in tests/ (convgemm.py, hand_scales.py, error_lines.py) import by plain name;
helper modules next to the tests that use them (calibrators/oracle.py, graphs/qdq_cases.py)
import by name because pytest puts each test file's folder on sys.path. Their asserts are
rewritten like the tests'.
"""

from __future__ import annotations

from pathlib import Path

import convgemm
import pytest

pytest.register_assert_rewrite("error_lines", "oracle", "qdq_cases")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """model.onnx (float, opset 17) and data/ (4 .npz batches of 6) in one directory."""
    return convgemm.make_workdir(tmp_path_factory.mktemp("cli"))
