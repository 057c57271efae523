"""``qcal calibrate`` with an output on an input (the model, a data file, the recipe; through
``..`` or a link) or on another output: refused before anything runs, one ``qcal: error:`` line,
exit 2, every input keeping its checksum. The model and data are convgemm.py's.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from error_lines import assert_one_error_line, good

from qcal_export.cli import main


def recipe_file(tmp_path: Path) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text("weight: {format: int8, method: max}\n")
    return str(path)


def link_to(tmp_path: Path, target: Path) -> str:
    (tmp_path / "link.onnx").symlink_to(target)
    return str(tmp_path / "link.onnx")


# an output on an input, or on another output: case -> (argv, pattern), as in test_cli_errors.py
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
        r"--scales .*s\.npz lies in the data directory .*data \(--data\), whose \.npz/\.npy, "
        r"image and \.txt files are read as batches: give another path$",
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
