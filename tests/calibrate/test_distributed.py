"""Two gloo processes (``qcal calibrate --nproc 2``, torch's launcher) against one process on the
same batches: the same scales for every method (max, mse, the histogram methods, the Hessian of
a Hessian-weighted NVFP4 weight sweep), with even and uneven splits and a rank that gets no
batch; a rank that fails stops both with its error, and nothing is written."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from qcal_export.artifacts.scales import load_scales
from qcal_export.pipeline.calibrate import calibrate_onnx


def qcal_nproc(*argv: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "qcal_export.cli", "calibrate", *argv, "--nproc", "2"]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)


def data_dir(workdir, tmp_path, count: int):
    """The first ``count`` of the workdir's batches, in a directory of their own."""
    folder = tmp_path / f"data{count}"
    folder.mkdir()
    for path in sorted((workdir / "data").glob("*.npz"))[:count]:
        shutil.copy(path, folder / path.name)
    return folder


def assert_same_scales(one, two) -> None:
    ours, theirs = load_scales(one)[0], load_scales(two)[0]
    assert ours.keys() == theirs.keys()
    for tensor, s in ours.items():
        assert torch.equal(s.amax, theirs[tensor].amax), tensor
        assert torch.equal(s.scale, theirs[tensor].scale), tensor


@pytest.mark.parametrize(
    ("method", "batches", "extra"),
    [
        ("max", 4, ()),
        ("mse", 4, ()),
        ("percentile", 4, ()),
        ("entropy", 4, ()),
        ("mse", 3, ()),  # uneven: 2 and 1
        ("max", 1, ()),  # rank 1 gets no batch
        ("nvfp4-mse", 3, ("--format", "nvfp4", "--hessian", "--exclude-op-types", "Conv")),
    ],
    ids=["max", "mse", "percentile", "entropy", "mse-uneven", "max-empty-rank", "nvfp4-hessian"],
)
def test_two_processes_give_one_process_scales(workdir, tmp_path, method, batches, extra):
    data = data_dir(workdir, tmp_path, batches)
    argv = [str(workdir / "model.onnx"), "--data", str(data), "--method", method, *extra]
    done = qcal_nproc(*argv, "--scales", str(tmp_path / "two.safetensors"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("output error vs the float model") == 1  # rank 0 reports
    single = tmp_path / "one.safetensors"
    options = {"method": method, "format": "nvfp4" if extra else "int8", "hessian": bool(extra)}
    options["exclude_op_types"] = ("Conv",) if extra else ()
    calibrate_onnx(workdir / "model.onnx", data, scales=single, validate_batches=0, **options)
    assert_same_scales(single, tmp_path / "two.safetensors")


def test_two_processes_give_one_process_gptq_weights(workdir, tmp_path):
    """GPTQ's Hessians summed over two ranks: the same scales and the same rounded weights."""
    data = data_dir(workdir, tmp_path, 3)
    options = {"format": "int4", "activation_format": "none", "weight_method": "gptq"}
    argv = [str(workdir / "model.onnx"), "--data", str(data), "--format", "int4"]
    argv += ["--activation-format", "none", "--weight-method", "gptq"]
    two = tmp_path / "two.onnx"
    done = qcal_nproc(*argv, "--scales", str(tmp_path / "two.safetensors"), "-o", str(two))
    assert done.returncode == 0, done.stderr[-3000:]
    single = tmp_path / "one.safetensors"
    one = tmp_path / "one.onnx"
    calibrate_onnx(workdir / "model.onnx", data, scales=single, output=one, **options)
    assert_same_scales(single, tmp_path / "two.safetensors")
    inits = [
        {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
        for path in (one, two)
    ]
    assert inits[0].keys() == inits[1].keys()
    for name, values in inits[0].items():
        assert np.array_equal(values, inits[1][name]), name


@pytest.mark.cuda
@pytest.mark.skipif(
    torch.cuda.device_count() < 2 or "CUDAExecutionProvider" not in ort.get_available_providers(),
    reason="needs two GPUs and onnxruntime-gpu",
)
def test_two_gpus_give_one_gpu_scales(workdir, tmp_path):
    # Each rank captures on the GPU of its LOCAL_RANK; NCCL carries the merge.
    data = data_dir(workdir, tmp_path, 4)
    argv = [str(workdir / "model.onnx"), "--data", str(data), "--provider", "cuda"]
    done = qcal_nproc(*argv, "--scales", str(tmp_path / "two.safetensors"))
    assert done.returncode == 0, done.stderr[-3000:]
    single = tmp_path / "one.safetensors"
    calibrate_onnx(workdir / "model.onnx", data, scales=single, validate_batches=0, provider="cuda")
    assert_same_scales(single, tmp_path / "two.safetensors")


def test_a_failing_rank_stops_both_with_its_error_and_nothing_is_written(workdir, tmp_path):
    data = data_dir(workdir, tmp_path, 4)
    np.savez(data / "batch_01.npz", x=np.zeros((6, 5, 8, 8), np.float32))  # rank 1's batch
    output = tmp_path / "q.onnx"
    argv = [str(workdir / "model.onnx"), "--data", str(data), "-o", str(output)]
    done = qcal_nproc(*argv)
    assert done.returncode != 0
    assert "qcal: error: rank 1 of 2 failed: batch 1, input 'x': dim 1 is 5" in done.stderr
    assert not output.exists() and not list(tmp_path.glob("*.tmp*"))


def test_one_process_options_are_refused_across_processes(workdir, tmp_path):
    argv = [str(workdir / "model.onnx"), "--data", str(workdir / "data"), "--layer-view"]
    done = qcal_nproc(*argv)
    assert done.returncode != 0 and "run in one process only" in done.stderr
