"""Shared fixtures and helper modules.

Being here, this file puts tests/ on sys.path (pytest's default ``prepend`` import mode), so the
helper modules in tests/ (convgemm.py, hand_scales.py, error_lines.py) import by plain name from
any folder; a helper used by the tests of one folder only sits in that folder
(calibrators/oracle.py, graphs/qdq_cases.py) and imports by name because pytest puts each test
file's folder on sys.path. A helper shared by two folders sits in tests/ (runtime_cases.py,
placement_models.py). Test modules never import each other: shared cases live in helpers. With
no __init__.py, module names are file names, so every file name under tests/ is unique. The
helpers' asserts are rewritten like the tests'.
"""

from __future__ import annotations

from pathlib import Path

import convgemm
import pytest

pytest.register_assert_rewrite(
    "error_lines", "oracle", "qdq_cases", "shrink_cases", "shrink_oracle"
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """model.onnx (float, opset 17) and data/ (4 .npz batches of 6) in one directory."""
    return convgemm.make_workdir(tmp_path_factory.mktemp("cli"))
