"""``qcal calibrate`` on bad input: one ``qcal: error:`` line naming what is at fault, exit 2,
and nothing written. The model and data are convgemm.py's; the good run is test_cli.py's.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from safetensors import safe_open
from safetensors.torch import save_file

from qcal_export.cli import main


@pytest.fixture(scope="module")
def scales(workdir) -> Path:
    """An int8 max run's scales file (per-tensor activations, per-axis(0) weights)."""
    path = workdir / "errors" / "scales.safetensors"
    path.parent.mkdir()
    argv = ["calibrate", str(workdir / "model.onnx"), "--data", str(workdir / "data")]
    assert main([*argv, "-o", str(path.parent / "q.onnx"), "--scales", str(path)]) == 0
    return path


def bad_recipe(tmp_path: Path) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text("overrides:\n  - nodes: '/fc/*'\n    weights: {format: int8}\n")
    return str(path)


def not_onnx(tmp_path: Path) -> str:
    path = tmp_path / "notes.onnx"
    path.write_text("this is a text file, not an ONNX model\n")
    return str(path)


def output_is_file_parent(tmp_path: Path) -> str:
    (tmp_path / "plain.txt").write_text("x")
    return str(tmp_path / "plain.txt" / "q.onnx")


def good(w: Path, *extra: str) -> list[str]:
    """The good model and data, then ``extra`` options."""
    return [str(w / "model.onnx"), "--data", str(w / "data"), *extra]


# case -> (argv after ``calibrate`` from (workdir, tmp_path), pattern of the error line),
# grouped by what is wrong: an input that is missing or unreadable, an output that cannot
# be written, a run that cannot start
BAD_INPUTS = {
    "missing-model": (
        lambda w, t: [str(t / "missing.onnx"), "--data", str(w / "data")],
        r"model file .*missing\.onnx does not exist$",
    ),
    "not-onnx": (
        lambda w, t: [not_onnx(t), "--data", str(w / "data")],
        r"notes\.onnx is not a readable ONNX model",
    ),
    "missing-data-dir": (
        lambda w, t: [str(w / "model.onnx"), "--data", str(t / "no-data")],
        r"data path .*no-data does not exist$",
    ),
    "missing-recipe-file": (
        lambda w, t: good(w, "--recipe", str(t / "r.yaml")),
        r"recipe file .*r\.yaml does not exist$",
    ),
    "recipe-unknown-key": (
        lambda w, t: good(w, "--recipe", bad_recipe(t)),
        r"recipe file .*recipe\.yaml: overrides\[0\]: unknown key\(s\) \['weights'\]",
    ),
    "missing-scales-in": (
        lambda w, t: [str(w / "model.onnx"), "--scales-in", str(t / "s.safetensors")],
        r"scales file .*s\.safetensors does not exist$",
    ),
}
BAD_OUTPUTS = {
    "output-dir-missing": (
        lambda w, t: good(w, "-o", str(t / "no" / "q.onnx")),
        r"output model .*q\.onnx: directory .*no does not exist; create it first$",
    ),
    "output-under-a-file": (
        lambda w, t: good(w, "-o", output_is_file_parent(t)),
        r"output model .*q\.onnx: directory .*plain\.txt does not exist",
    ),
    "output-is-a-directory": (
        lambda w, t: good(w, "--scales", str(t)),
        r"scales file .* is a directory: give a file name$",
    ),
    "report-dir-missing": (
        lambda w, t: good(w, "--report", str(t / "x" / "r.json")),
        r"report .*r\.json: directory .*x does not exist",
    ),
}
BAD_RUNS = {
    "no-data": (
        lambda w, t: [str(w / "model.onnx"), "-o", str(t / "q.onnx")],
        r"calibration needs data: pass --data",
    ),
    "option-no-method-takes": (
        lambda w, t: good(w, "--option", "percentile=99.9"),
        r"method option\(s\) \['percentile'\] fit no method used: "
        r"\{\"activation method 'max'\": \[\], \"weight method 'max'\": \[\]\}$",
    ),
    "negative-device-id": (
        lambda w, t: good(w, "--device-id", "-1"),
        r"device_id must be a GPU index >= 0, not -1$",
    ),
    "cuda-without-cuda": (
        lambda w, t: good(w, "--provider", "cuda"),
        r"provider 'cuda' requested",
    ),
}
ERRORS = {**BAD_INPUTS, **BAD_OUTPUTS, **BAD_RUNS}


def recipe_file(tmp_path: Path) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text("weight: {format: int8, method: max}\n")
    return str(path)


def link_to(tmp_path: Path, target: Path) -> str:
    (tmp_path / "link.onnx").symlink_to(target)
    return str(tmp_path / "link.onnx")


# an output on an input, or on another output: case -> (argv, pattern), as ERRORS
COLLISIONS = {
    "output-is-the-model": (
        lambda w, t: good(w, "-o", str(w / "model.onnx")),
        r"^qcal: error: -o .*model\.onnx is the input model \(MODEL\): give another path$",
    ),
    "output-is-the-model-through-dot-dot": (
        lambda w, t: good(w, "-o", str(w / "data" / ".." / "model.onnx")),
        r"-o .*data/\.\./model\.onnx is the input model \(MODEL\)",
    ),
    "report-is-the-model-through-a-link": (
        lambda w, t: good(w, "--report", link_to(t, w / "model.onnx")),
        r"--report .*link\.onnx is the input model \(MODEL\)",
    ),
    "state-is-the-model": (
        lambda w, t: good(w, "--state", str(w / "model.onnx")),
        r"--state .*model\.onnx is the input model \(MODEL\)",
    ),
    "output-is-a-data-file": (
        lambda w, t: good(w, "-o", str(w / "data" / "batch_00.npz")),
        r"-o .*batch_00\.npz is a calibration data file in .*data \(--data\)",
    ),
    "scales-would-become-data": (
        lambda w, t: good(w, "--scales", str(w / "data" / "s.npz")),
        r"--scales .*s\.npz lies in the data directory .*data \(--data\), whose \.npz/\.npy "
        r"files are read as batches: give another path$",
    ),
    "report-is-the-recipe": (
        lambda w, t: good(w, "--recipe", recipe_file(t), "--report", str(t / "recipe.yaml")),
        r"--report .*recipe\.yaml is the recipe file \(--recipe\): give another path$",
    ),
    "scales-is-the-report": (
        lambda w, t: good(w, "--scales", str(t / "out"), "--report", str(t / "out")),
        r"--scales .*out and --report .*out are the same file: give each output its own path$",
    ),
    "state-is-the-output": (
        lambda w, t: good(w, "-o", str(t / "q.onnx"), "--state", str(t / "q.onnx")),
        r"-o .*q\.onnx and --state .*q\.onnx are the same file",
    ),
}


def assert_one_error_line(captured, pattern: str) -> None:
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("qcal: error: ")
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in captured.err
    assert captured.out == ""


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input_exits_2_with_one_error_line(workdir, tmp_path, capsys, case):
    if case == "cuda-without-cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available")
    make_argv, pattern = ERRORS[case]
    argv = make_argv(workdir, tmp_path)
    before = sorted(os.listdir(tmp_path))
    assert main(["calibrate", *argv]) == 2
    assert_one_error_line(capsys.readouterr(), pattern)
    assert sorted(os.listdir(tmp_path)) == before  # nothing written


def checksums(*folders: Path) -> dict[Path, str]:
    return {
        p: hashlib.sha256(p.read_bytes()).hexdigest()
        for folder in folders
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("case", list(COLLISIONS))
def test_an_output_on_an_input_or_another_output_exits_2(workdir, tmp_path, capsys, case):
    """Refused before anything runs: the model and every data file keep their checksums, and
    nothing appears in either folder."""
    make_argv, pattern = COLLISIONS[case]
    argv = make_argv(workdir, tmp_path)
    before = checksums(workdir, tmp_path)
    assert main(["calibrate", *argv]) == 2
    assert_one_error_line(capsys.readouterr(), pattern)
    assert checksums(workdir, tmp_path) == before


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
    assert main([*argv, *options]) == 2
    assert_one_error_line(capsys.readouterr(), message)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_output_dir_not_writable_exits_2(workdir, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        argv = ["calibrate", str(workdir / "model.onnx"), "--data", str(workdir / "data")]
        assert main([*argv, "-o", str(locked / "q.onnx")]) == 2
        assert_one_error_line(capsys.readouterr(), r"directory .*locked is not writable")
        assert os.listdir(locked) == []
    finally:
        locked.chmod(0o755)


def test_bad_format_choice_is_argparse_exit_2(workdir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["calibrate", str(workdir / "model.onnx"), "--format", "int3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --format: invalid choice: 'int3'" in err
    assert "Traceback" not in err


# ---- scales files whose values no export can use, and models with nothing to quantize ---------


@pytest.fixture(scope="module")
def uint8_scales(workdir) -> Path:
    """A uint8 max run's scales file (asymmetric: zero points in [0, 255])."""
    path = workdir / "errors-uint8" / "scales.safetensors"
    path.parent.mkdir()
    argv = ["calibrate", str(workdir / "model.onnx"), "--data", str(workdir / "data")]
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
    argv += ["-o", str(tmp_path / "q.onnx"), "--format", source]
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
