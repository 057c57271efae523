"""``qcal calibrate --scales-in`` with a scales file no export can use (calibrated for another
recipe, or tampered values: nan, zero or negative scales, wrong dtypes and shapes, zero points
out of range), and models with nothing to quantize: one ``qcal: error:`` line naming the file
and tensor or node, exit 2, nothing written. The scales are of convgemm.py's model; the models
with nothing to quantize are one_matmul's.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from error_lines import assert_one_error_line
from onnx import TensorProto, helper, numpy_helper
from safetensors import safe_open
from safetensors.torch import save_file

from qcal_export.cli import main


@pytest.fixture(scope="module")
def scales(workdir) -> Path:
    """An int8 max run's scales file (per-tensor activations, per-axis(0) weights); these
    tests pin target tensorrt, where int8 activations are the default."""
    path = workdir / "errors" / "scales.safetensors"
    path.parent.mkdir()
    argv = ["calibrate", str(workdir / "model.onnx"), "--data", str(workdir / "data")]
    argv += ["--target", "tensorrt"]
    assert main([*argv, "-o", str(path.parent / "q.onnx"), "--scales", str(path)]) == 0
    return path


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            ["--format", "fp8"],
            r"scales\.safetensors: activation 'x' was calibrated as int8 per-tensor, "
            r"the recipe asks for fp8 per-tensor$",
        ),
        (
            ["--no-per-channel-weights"],
            r"scales\.safetensors: weight 'conv\.weight' was calibrated as int8 per-axis\(0\), "
            r"the recipe asks for int8 per-tensor$",
        ),
    ],
    ids=["format", "granularity"],
)
def test_scales_in_that_do_not_fit_the_recipe_exit_2(workdir, scales, capsys, options, message):
    argv = ["calibrate", str(workdir / "model.onnx"), "--scales-in", str(scales)]
    assert main([*argv, "--target", "tensorrt", *options]) == 2
    assert_one_error_line(capsys.readouterr(), message)


@pytest.fixture(scope="module")
def uint8_scales(workdir) -> Path:
    """A uint8 max run's scales file (asymmetric: zero points in [0, 255])."""
    path = workdir / "errors-uint8" / "scales.safetensors"
    path.parent.mkdir()
    argv = ["calibrate", str(workdir / "model.onnx"), "--data", str(workdir / "data")]
    argv += ["--target", "tensorrt"]
    assert main([*argv, "--format", "uint8", "--scales", str(path)]) == 0
    return path


def tampered(source: Path, target: Path, changes: dict[str, torch.Tensor]) -> Path:
    """``source`` rewritten to ``target`` by safetensors' save_file, entries replaced and the
    header kept as it was."""
    with safe_open(str(source), framework="pt") as f:
        metadata = f.metadata()
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open)
    save_file({**tensors, **changes}, str(target), metadata=metadata)
    return target


W = "conv.weight"
# case -> (file: "int8" or "uint8", entries to replace, pattern of the error line after the file)
BAD_SCALES = {
    "nan-scale": (
        "int8",
        {"x.scale": torch.tensor(float("nan"))},
        r"tensor 'x': scale must be positive finite, found nan \(1 of 1\): recalibrate, or fix "
        r"the file$",
    ),
    "zero-scale": ("int8", {"x.scale": torch.tensor(0.0)}, r"'x': scale must be positive"),
    "negative-weight-scale": (
        "int8",
        {f"{W}.scale": torch.tensor([0.1, -0.1, 0.1, 0.1])},
        r"tensor 'conv\.weight': scale must be positive finite, found -0\.1",
    ),
    "int-scale": ("int8", {"x.scale": torch.tensor(1)}, r"'x': scale is int64, not float32$"),
    "fp16-scale": (
        "int8",
        {"x.scale": torch.tensor(0.5, dtype=torch.float16)},
        r"'x': scale is float16, not float32$",
    ),
    "bool-scale": ("int8", {"x.scale": torch.tensor(True)}, r"'x': scale is bool, not float32$"),
    "int8-zero-point-not-0": (
        "int8",
        {"x.zero_point": torch.tensor(5, dtype=torch.int8)},
        r"'x': zero_point 5 does not fit int8: it takes 0 \(symmetric format\)$",
    ),
    "uint8-zero-point-300": (
        "uint8",
        {"x.zero_point": torch.tensor(300, dtype=torch.int16)},
        r"'x': zero_point 300 does not fit uint8: it takes integers in \[0, 255\]$",
    ),
    "amax-shape": (
        "int8",
        {f"{W}.amax": torch.ones(3)},
        r"'conv\.weight': amax has shape \[3\], its scale \[4\]$",
    ),
    "scale-shape-for-the-model": (
        "int8",
        {
            f"{W}.amax": torch.ones(3),
            f"{W}.scale": torch.full((3,), 0.01),
            f"{W}.zero_point": torch.zeros(3, dtype=torch.int8),
        },
        r"weight 'conv\.weight': scale of shape \[3\], but per-axis\(0\) of this model's tensor "
        r"needs \[4\]: recalibrate this model$",
    ),
}


@pytest.mark.parametrize("case", list(BAD_SCALES))
def test_scales_in_with_bad_values_exits_2_naming_file_and_tensor(
    workdir, scales, uint8_scales, tmp_path, capsys, case
):
    source, changes, pattern = BAD_SCALES[case]
    bad = tmp_path / "bad.safetensors"
    tampered(scales if source == "int8" else uint8_scales, bad, changes)
    before = sorted(os.listdir(tmp_path))
    argv = ["calibrate", str(workdir / "model.onnx"), "--scales-in", str(bad)]
    argv += ["-o", str(tmp_path / "q.onnx"), "--format", source, "--target", "tensorrt"]
    assert main(argv) == 2
    assert_one_error_line(capsys.readouterr(), rf"{re.escape(str(bad))}: .*{pattern}")
    assert sorted(os.listdir(tmp_path)) == before  # nothing written


def one_matmul(path: Path, elem_type: int, weight_first: bool = False) -> Path:
    """A MatMul 'mm' of input x and initializer W ([8, 4]; [4, 8] as input 0), of one type."""
    dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    w = np.arange(32, dtype=np.float32).reshape((4, 8) if weight_first else (8, 4)) / 32
    w_init = numpy_helper.from_array(w, "W")
    if elem_type != TensorProto.FLOAT:
        w_init = helper.make_tensor(
            "W", elem_type, w.shape, w.astype(dtype).view(np.uint8).tobytes(), raw=True
        )
    x_shape, y_shape = ([8, "n"], [4, "n"]) if weight_first else (["b", 8], ["b", 4])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["W", "x"] if weight_first else ["x", "W"], ["y"], "mm")],
        "g",
        [helper.make_tensor_value_info("x", elem_type, x_shape)],
        [helper.make_tensor_value_info("y", elem_type, y_shape)],
        [w_init],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(path))
    (path.parent / "d").mkdir()
    np.savez(path.parent / "d" / "b.npz", x=np.ones((8, 3) if weight_first else (2, 8), dtype))
    return path


# case -> (argv after ``calibrate`` from tmp_path, pattern of the error line)
NOTHING_TO_QUANTIZE = {
    "double-model": (
        lambda t: [str(one_matmul(t / "m.onnx", TensorProto.DOUBLE)), "--data", str(t / "d")],
        r"m\.onnx: no node of types .* left to quantize \(excluded: \[\]\): MatMul 'mm': it "
        r"computes in double: ONNX QuantizeLinear takes float, float16 or bfloat16, not double: "
        r"cast the model to float32 to quantize it$",
    ),
    "weight-on-input-0-int4": (
        lambda t: [
            str(one_matmul(t / "m.onnx", TensorProto.FLOAT, weight_first=True)),
            "--data",
            str(t / "d"),
            "--format",
            "int4",
        ],
        r"MatMul 'mm': initializer 'W' is input 0, but MatMul weights are quantized on input 1 "
        r"only; the recipe leaves activations in float \(input 1 'x'\)$",
    ),
    "bfloat16-model-on-the-cpu": (
        lambda t: [str(one_matmul(t / "m.onnx", TensorProto.BFLOAT16)), "--data", str(t / "d")],
        r"ONNX Runtime cannot load .*m\.onnx: .*Could not find an implementation for MatMul\(13\) "
        r"node with name 'mm': .*bfloat16.*: calibrate a float32 or float16 copy of the model, "
        r"or capture on CUDA \(--provider cuda\)$",
    ),
}


@pytest.mark.parametrize("case", list(NOTHING_TO_QUANTIZE))
def test_models_that_cannot_be_quantized_exit_2_saying_why(tmp_path, capsys, case):
    if case.startswith("bfloat16") and "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available")
    make_argv, pattern = NOTHING_TO_QUANTIZE[case]
    argv = make_argv(tmp_path)
    before = sorted(os.listdir(tmp_path))
    assert main(["calibrate", *argv, "-o", str(tmp_path / "q.onnx")]) == 2
    assert_one_error_line(capsys.readouterr(), pattern)
    assert sorted(os.listdir(tmp_path)) == before
