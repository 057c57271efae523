"""``qcal calibrate --strict`` where ONNX Runtime's default optimizations miscompute the written
model (8-bit weight-only MatMuls, which ORT's MatMulNBits runs with int8 activations): one
``qcal:`` warning line naming the optimizer, one ``qcal: error: --strict:`` line, exit code 3,
and the outputs written; without ``--strict`` the same warning and exit code 0. Run as a real
process, so that stderr is what a user sees."""

from __future__ import annotations

import json
import subprocess
import sys

import onnx
import pytest
from mlp import make_mlp


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    return make_mlp(tmp_path_factory.mktemp("mlp"), seq=True)


def qcal(*argv: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "qcal_export.cli", "calibrate", *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "default"])
def test_strict_exits_3_after_writing(mlp, tmp_path, strict):
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    argv = [str(mlp / "mlp.onnx"), "--data", str(mlp / "data"), "--format", "int8"]
    argv += ["--activation-format", "none", "-o", str(out), "--report", str(report)]
    done = qcal(*argv, *(["--strict"] if strict else []))
    lines = [line for line in done.stderr.splitlines() if line.startswith("qcal: ")]
    assert "Traceback" not in done.stderr
    warning = lines[0]
    assert "the runtime, not the scales, is at fault" in warning
    assert "QDQSelectorActionTransformer" in warning and "MatMulNBits" in warning
    assert onnx.load(str(out)).graph.node
    issue = json.loads(report.read_text())["validation"]["runtime_issue"]
    assert issue["message"] == warning.removeprefix("qcal: ")
    if strict:
        assert done.returncode == 3
        assert len(lines) == 2
        assert lines[1].startswith("qcal: error: --strict: onnxruntime (CPUExecutionProvider)")
        assert lines[1].endswith(f"written: {out}, {report}")
    else:
        assert done.returncode == 0
        assert len(lines) == 1
        assert "relL2,optimizationsoff" in "".join(done.stdout.split())  # rich wraps cells
