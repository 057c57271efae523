"""Outputs survive a process killed while writing them: the old file stays whole.

A child process writes a large output over an existing one; the parent kills it (SIGKILL) as
soon as the child's temporary file appears, then checks that the target still holds the old
bytes and loads. The model and scales writers stage to a temporary name and rename last. A
child writing a model with external data also kills itself after each of save_model's steps:
what is on disk is then wholly the old model or wholly the new one, and it runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from full_disk import child_env
from onnx import TensorProto, helper, numpy_helper

from qcal_export.artifacts.scales import load_scales, save_scales
from qcal_export.onnx_io.model_io import save_model
from qcal_export.spec.formats import INT8
from qcal_export.spec.granularity import PerAxis
from qcal_export.spec.scales import TensorScales

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")

ROWS = 4096


def big_model(columns: int, seed: int) -> onnx.ModelProto:
    """A MatMul with a ``[ROWS, columns]`` float32 weight (64 MiB at 4096 columns)."""
    weight = np.random.default_rng(seed).standard_normal((ROWS, columns), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", ROWS])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", columns])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def big_scales(channels: int, seed: int) -> dict[str, TensorScales]:
    amax = torch.rand(channels, generator=torch.Generator().manual_seed(seed)) + 0.5
    scale, zero_point = INT8.scale_zero_point(-amax, amax)
    entry = TensorScales("w", "weight", "int8", "max", PerAxis(0), amax, scale, zero_point)
    return {"w": entry}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def staged_bytes(folder: Path) -> int:
    """Bytes written so far under ``folder``'s temporary (dot) entries."""
    total = 0
    for entry in folder.iterdir():
        if entry.name.startswith("."):
            files = entry.rglob("*") if entry.is_dir() else [entry]
            total += sum(f.stat().st_size for f in files if f.is_file())
    return total


def kill_while_writing(code: str, folder: Path, target: str) -> bool:
    """Run ``code`` in a child; SIGKILL it once its temporary output holds 1 MiB (mid-write).

    Returns whether the kill landed before the child finished.
    """
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=child_env())
    deadline = time.monotonic() + 60
    staged = 0
    try:
        while time.monotonic() < deadline and child.poll() is None:
            with contextlib.suppress(FileNotFoundError):
                staged = staged_bytes(folder)
            if staged > 1 << 20:
                os.kill(child.pid, signal.SIGKILL)
                child.wait()
                return child.returncode == -signal.SIGKILL
            time.sleep(0.0005)
        return False
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        assert (folder / target).exists()


@pytest.mark.parametrize("external_data", [False, True], ids=["inline", "external-data"])
def test_killed_model_write_leaves_the_old_model(tmp_path, external_data):
    target = tmp_path / "model.onnx"
    save_model(big_model(64, seed=0), target, external_data=external_data)
    before = {p.name: digest(p) for p in tmp_path.iterdir()}
    source = tmp_path.parent / f"{tmp_path.name}-new.onnx"
    onnx.save_model(big_model(4096, seed=1), str(source))
    code = f"""
        import onnx
        from qcal_export.onnx_io.model_io import save_model
        model = onnx.load({str(source)!r})
        save_model(model, {str(target)!r}, external_data={external_data})
    """
    killed = kill_while_writing(code, tmp_path, "model.onnx")
    if not killed:
        pytest.skip("the child finished writing before it could be killed")
    after = {p.name: digest(p) for p in tmp_path.iterdir() if not p.name.startswith(".")}
    assert after == before
    onnx.checker.check_model(str(target), full_check=True)


def test_killed_scales_write_leaves_the_old_scales(tmp_path):
    target = tmp_path / "scales.safetensors"
    save_scales(target, big_scales(8, seed=0), "a" * 64)
    before = digest(target)
    code = f"""
        import torch
        from qcal_export.artifacts.scales import save_scales
        from qcal_export.spec.scales import TensorScales
        from qcal_export.spec.formats import INT8
        from qcal_export.spec.granularity import PerAxis
        amax = torch.rand(1 << 25) + 0.5
        scale, zero_point = INT8.scale_zero_point(-amax, amax)
        entry = TensorScales("w", "weight", "int8", "max", PerAxis(0), amax, scale, zero_point)
        save_scales({str(target)!r}, {{"w": entry}}, "b" * 64)
    """
    if not kill_while_writing(code, tmp_path, "scales.safetensors"):
        pytest.skip("the child finished writing before it could be killed")
    assert digest(target) == before
    scales, header = load_scales(target)
    assert header["model_sha256"] == "a" * 64
    assert torch.equal(scales["w"].amax, big_scales(8, seed=0)["w"].amax)


STEPS = ("data_written", "model_staged", "data_placed", "model_placed", "old_data_removed")


def referenced(path: Path) -> set[str]:
    raw = onnx.load(str(path), load_external_data=False)
    return {
        {e.key: e.value for e in t.external_data}["location"]
        for t in raw.graph.initializer
        if t.data_location == TensorProto.EXTERNAL
    }


def outputs(model: onnx.ModelProto | Path, x: np.ndarray) -> np.ndarray:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("external_data", [True, False], ids=["to-external-data", "to-inline"])
@pytest.mark.parametrize("step", STEPS)
def test_killed_after_each_step_leaves_the_old_model_or_the_new(tmp_path, step, external_data):
    """The old output has external data; the child writes a new model over it (external data
    or inline) and SIGKILLs itself once ``step`` is done. The model file then runs in ONNX
    Runtime as the old model with its old data or as the new one with its new data."""
    target = tmp_path / "model.onnx"
    old, new = big_model(8, seed=0), big_model(8, seed=1)
    save_model(old, target, external_data=True)
    [old_data] = referenced(target)
    old_digests = {name: digest(tmp_path / name) for name in ("model.onnx", old_data)}
    source = tmp_path.parent / f"{tmp_path.name}-new.onnx"
    onnx.save_model(new, str(source))
    code = f"""
        import os, signal
        import onnx
        from qcal_export.onnx_io import model_io

        def kill(step):
            if step == {step!r}:
                os.kill(os.getpid(), signal.SIGKILL)

        model_io.SAVE_STEPS.append(kill)
        model = onnx.load({str(source)!r})
        model_io.save_model(model, {str(target)!r}, external_data={external_data})
    """
    child = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=child_env())
    if step == "data_placed" and not external_data:
        assert child.returncode == 0  # an inline model has no data file to place
        step = "old_data_removed"
    else:
        assert child.returncode == -signal.SIGKILL
    x = np.random.default_rng(2).standard_normal((3, ROWS), dtype=np.float32)
    got = outputs(target, x)
    left = {p.name for p in tmp_path.iterdir() if not p.name.startswith(".")}
    if STEPS.index(step) < STEPS.index("model_placed"):
        np.testing.assert_array_equal(got, outputs(old, x))
        assert {name: digest(tmp_path / name) for name in old_digests} == old_digests
        strays = left - set(old_digests)  # a complete data file nothing references yet
        assert len(strays) == (step == "data_placed")
    else:
        np.testing.assert_array_equal(got, outputs(new, x))
        assert not np.array_equal(got, outputs(old, x))
        new_data = referenced(target)
        assert len(new_data) == external_data and old_data not in new_data
        assert old_data in left if step == "model_placed" else left == {"model.onnx", *new_data}
