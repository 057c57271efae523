"""``qcal calibrate`` on bad input: one ``qcal: error:`` line naming what is at fault, exit 2,
and nothing written. The model and data are convgemm.py's; the good run is test_cli.py's.
Outputs on inputs are test_cli_errors_paths.py's; scales files and models no export can use,
test_cli_errors_models.py's.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from error_lines import assert_one_error_line, good

from qcal_export.cli import main


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


def data_file(tmp_path: Path, name: str, damage: str) -> str:
    """A data directory holding one batch file ``name``, damaged: ``truncate``d to half,
    ``crc`` (a flipped byte inside the stored array), or ``empty``."""
    directory = tmp_path / "bad-data"
    directory.mkdir()
    path = directory / name
    x = np.arange(6 * 3 * 8 * 8, dtype=np.float32).reshape(6, 3, 8, 8)
    (np.savez if name.endswith(".npz") else np.save)(path, x)
    data = bytearray(path.read_bytes())
    if damage == "crc":
        data[len(data) // 2] ^= 0xFF
    path.write_bytes(
        {"truncate": bytes(data[: len(data) // 2]), "crc": bytes(data)}.get(damage, b"")
    )
    return str(directory)


def recipe(tmp_path: Path, text: str | bytes) -> str:
    path = tmp_path / "recipe.yaml"
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return str(path)


def damaged_state(tmp_path: Path) -> str:
    path = tmp_path / "calib.state"
    path.write_bytes(b"PK\x03\x04 not the zip archive torch.save writes")
    return str(path)


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
    "truncated-npz": (
        lambda w, t: [str(w / "model.onnx"), "--data", data_file(t, "a.npz", "truncate")],
        r"cannot read data file .*a\.npz: BadZipFile: File is not a zip file$",
    ),
    "bad-crc-npz": (
        lambda w, t: [str(w / "model.onnx"), "--data", data_file(t, "a.npz", "crc")],
        r"cannot read data file .*a\.npz: BadZipFile: Bad CRC-32 for file 'arr_0\.npy'$",
    ),
    "empty-npy": (
        lambda w, t: [str(w / "model.onnx"), "--data", data_file(t, "a.npy", "empty")],
        r"cannot read data file .*a\.npy: EOFError: No data left in file$",
    ),
    "recipe-not-utf8": (
        lambda w, t: good(w, "--recipe", recipe(t, b"weight: {format: \xff}\n")),
        r"recipe file .*recipe\.yaml is not UTF-8 text \(invalid start byte at byte 17\)$",
    ),
    "recipe-format-a-list": (
        lambda w, t: good(w, "--recipe", recipe(t, "activation: {format: [int8]}\n")),
        r"recipe\.yaml: activation: unknown format \['int8'\]: choose one of \['fp8', ",
    ),
    "recipe-options-a-number": (
        lambda w, t: good(w, "--recipe", recipe(t, "weight: {method: mse, options: 5}\n")),
        r"recipe\.yaml: weight: options must be a mapping of option: number, not 5$",
    ),
    "recipe-per-channel-a-string": (
        lambda w, t: good(w, "--recipe", recipe(t, "weight: {per_channel: 'no'}\n")),
        r"recipe\.yaml: weight: per_channel must be true or false, not 'no'$",
    ),
    "recipe-overrides-a-number": (
        lambda w, t: good(w, "--recipe", recipe(t, "overrides: 5\n")),
        r"recipe\.yaml: overrides must be a list of mappings, not 5$",
    ),
    "recipe-nodes-a-number": (
        lambda w, t: good(w, "--recipe", recipe(t, "overrides: [{nodes: 5}]\n")),
        r"overrides\[0\]: override nodes must be a name pattern \(a string\), not 5$",
    ),
    "recipe-op-types-a-number": (
        lambda w, t: good(w, "--recipe", recipe(t, "op_types: 5\n")),
        r"recipe\.yaml: op_types must be a list of strings, not 5$",
    ),
    "recipe-option-out-of-range": (
        lambda w, t: good(
            w, "--recipe", recipe(t, "activation: {method: percentile, options: {bins: 1}}")
        ),
        r"activation: method 'percentile' option bins=1 is out of range: it must be an integer "
        r"in \[2, 65536\]$",
    ),
    "damaged-state": (
        lambda w, t: good(w, "--state", damaged_state(t), "--resume"),
        r"state file .*calib\.state is damaged \(.*\): delete it$",
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
    "option-nan": (
        lambda w, t: good(w, "--method", "mse", "--option", "start=nan"),
        r"method 'mse' option start=nan is out of range: it must be a finite number in "
        r"\(0, 1000\]$",
    ),
    "option-inf": (
        lambda w, t: good(w, "--method", "mse", "--option", "stop=inf"),
        r"method 'mse' option stop=inf is out of range",
    ),
    "option-a-billion-candidates": (
        lambda w, t: good(w, "--method", "mse", "--option", "step=1e-9"),
        r"mse options start=0\.25, stop=4\.0, step=1e-09 give more than 1000 candidates: "
        r"raise step or narrow start\.\.stop$",
    ),
    "option-bins-huge": (
        lambda w, t: good(w, "--method", "percentile", "--option", "bins=1e10"),
        r"method 'percentile' option bins=10000000000 is out of range: it must be an integer "
        r"in \[2, 65536\]$",
    ),
    "option-percentile-101": (
        lambda w, t: good(w, "--method", "percentile", "--option", "percentile=101"),
        r"option percentile=101 is out of range: it must be a finite number in \(0, 100\]$",
    ),
    "option-grid-0": (
        lambda w, t: good(w, "--method", "shrink-mse", "--option", "grid=0"),
        r"method 'shrink-mse' option grid=0 is out of range: it must be a finite number > 0$",
    ),
    "option-norm-negative": (
        lambda w, t: good(w, "--method", "shrink-mse", "--option", "norm=-1"),
        r"option norm=-1 is out of range: it must be a finite number in \(0, 16\]$",
    ),
    "option-quantized-bins-over-the-window": (
        lambda w, t: good(
            w, "--method", "entropy", "--option", "bins=64", "--option", "quantized_bins=129"
        ),
        r"entropy option quantized_bins=129 is out of range: a window of at most 2 \* bins = "
        r"128 bins",
    ),
    "option-auto-bins-over-entropy": (
        lambda w, t: good(w, "--method", "auto", "--option", "bins=8192"),
        r"method 'entropy' option bins=8192 is out of range: it must be an integer in \[2, 4999\]$",
    ),
    "batch-size-0": (
        lambda w, t: good(w, "--batch-size", "0"),
        r"batch_size \(--batch-size\) must be an integer >= 1, not 0$",
    ),
    "batch-size-negative": (
        lambda w, t: good(w, "--batch-size", "-3"),
        r"batch_size \(--batch-size\) must be an integer >= 1, not -3$",
    ),
    "batches-0": (
        lambda w, t: good(w, "--batches", "0"),
        r"max_batches \(--batches\) must be an integer >= 1, not 0$",
    ),
    "validate-batches-negative": (
        lambda w, t: good(w, "--validate-batches", "-1"),
        r"validate_batches \(--validate-batches\) must be an integer >= 0, not -1$",
    ),
    "view-batches-0": (
        lambda w, t: good(w, "--layer-view", "--view-batches", "0"),
        r"view_batches \(--view-batches\) must be an integer >= 1, not 0$",
    ),
    "holdout-every-1": (
        lambda w, t: good(w, "--target-cosine", "0.99", "--holdout-every", "1"),
        r"holdout_every \(--holdout-every\) must be an integer >= 2, not 1$",
    ),
    "state-every-0": (
        lambda w, t: good(w, "--state", str(t / "s.state"), "--state-every", "0"),
        r"state_every \(--state-every\) must be a positive number of batches, not 0$",
    ),
    "block-size-1": (
        lambda w, t: good(w, "--format", "int4", "--block-size", "1"),
        r"block_size must be an integer >= 2 and <= 4096, not 1$",
    ),
    "block-size-huge": (
        lambda w, t: good(w, "--format", "int4", "--block-size", "100000"),
        r"block_size must be an integer >= 2 and <= 4096, not 100000$",
    ),
    "smooth-nan": (
        lambda w, t: good(w, "--smooth", "nan"),
        r"smooth \(the SmoothQuant alpha\) must be a number in \(0, 1\), not nan$",
    ),
    "smooth-above-1": (
        lambda w, t: good(w, "--smooth", "1.5"),
        r"smooth \(the SmoothQuant alpha\) must be a number in \(0, 1\), not 1\.5$",
    ),
    "target-cosine-nan": (
        lambda w, t: good(w, "--target-cosine", "nan"),
        r"target_cosine=nan is out of range: it must be in \(0, 1\]$",
    ),
    "target-cosine-above-1": (
        lambda w, t: good(w, "--target-cosine", "1.01"),
        r"target_cosine=1\.01 is out of range: it must be in \(0, 1\]$",
    ),
    "target-rel-l2-negative": (
        lambda w, t: good(w, "--target-rel-l2", "-0.1"),
        r"target_rel_l2=-0\.1 is out of range: it must be finite and > 0$",
    ),
    "nproc-0": (
        lambda w, t: good(w, "--nproc", "0"),
        r"argument --nproc: '0' is not an integer >= 1 \(see `qcal calibrate --help`\)$",
    ),
    "format-not-a-choice": (
        lambda w, t: good(w, "--format", "int3"),
        r"argument --format: invalid choice: 'int3' \(choose from .*\) "
        r"\(see `qcal calibrate --help`\)$",
    ),
    "target-not-a-choice": (
        lambda w, t: good(w, "--target", "trt"),
        r"argument --target: invalid choice: 'trt' \(choose from .*\) "
        r"\(see `qcal calibrate --help`\)$",
    ),
    "batches-not-a-number": (
        lambda w, t: good(w, "--batches", "few"),
        r"argument --batches: invalid int value: 'few' \(see `qcal calibrate --help`\)$",
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


def test_usage_errors_are_one_line_too(capsys):
    """argparse's own errors (no command, no model) are the same one line, exit 2."""
    assert main([]) == 2
    assert_one_error_line(capsys.readouterr(), r"required: command \(see `qcal --help`\)$")
    assert main(["calibrate"]) == 2
    assert_one_error_line(capsys.readouterr(), r"required: model \(see `qcal calibrate --help`\)$")


def test_help_exits_0(capsys):
    assert main(["calibrate", "--help"]) == 0
    assert "--option KEY=VALUE" in capsys.readouterr().out
