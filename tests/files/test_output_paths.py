"""No output lands on an input or on another output, a full disk loses nothing, and every output
gets the mode ``open()`` gives: real files through calibrate_onnx and ``qcal calibrate``.

A refused run must leave every file as it was: the tests compare the sha256 of everything under
the folder before and after. The full disk is RLIMIT_FSIZE in a child process (full_disk.py).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from convgemm import data_batches, run_model
from full_disk import run_cli_with_file_limit
from mlp import make_mlp

from qcal_export.calibrate.resume import StateFile
from qcal_export.cli import main
from qcal_export.errors import OutputError
from qcal_export.pipeline.calibrate import calibrate_onnx
from qcal_export.spec.recipe import load_recipe


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder``: a file's sha256, a link's target, or "dir"."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            found[str(path)] = f"-> {os.readlink(path)}"
        else:
            found[str(path)] = sha256(path) if path.is_file() else "dir"
    return found


@pytest.fixture
def w(workdir, tmp_path) -> Path:
    """A copy of the convgemm model and its data/ that a test may try to overwrite."""
    return Path(shutil.copytree(workdir, tmp_path / "w"))


@pytest.fixture
def mlp(tmp_path) -> Path:
    """The MLP (Gemm) whose up and down layers take NVFP4, with its data/."""
    root = tmp_path / "m"
    root.mkdir()
    return make_mlp(root, seq=False)


def refused(pattern: str, folder: Path, model: Path, data: object, **kwargs: object) -> None:
    """calibrate_onnx raises OutputError matching ``pattern``; nothing under ``folder`` changed."""
    before = snapshot(folder)
    with pytest.raises(OutputError, match=pattern):
        calibrate_onnx(model, data, validate_batches=0, **kwargs)
    assert snapshot(folder) == before


def external_copy(w: Path, name: str, location: str) -> Path:
    """``w/name``: the model with every initializer in ``w/location``."""
    model = onnx.load(str(w / "model.onnx"))
    onnx.save_model(
        model, str(w / name), save_as_external_data=True, location=location, size_threshold=0
    )
    return w / name


# ---- an output on an input ----------------------------------------------------------------------

SPELLINGS = {
    "same": lambda w: w / "model.onnx",
    "dot-dot": lambda w: w / "data" / ".." / "model.onnx",
    "relative": lambda w: Path("model.onnx"),  # the test runs in w
    "symlink": lambda w: link(w / "link.onnx", w / "model.onnx"),
    "symlinked-folder": lambda w: link(w.parent / "alias", w) / "model.onnx",
    "hard-link": lambda w: hard_link(w / "hard.onnx", w / "model.onnx"),
}
OPTIONS = {"output": "-o", "scales": "--scales", "report": "--report", "state": "--state"}


def link(path: Path, target: Path) -> Path:
    path.symlink_to(target)
    return path


def hard_link(path: Path, target: Path) -> Path:
    os.link(target, path)
    return path


@pytest.mark.parametrize("spelling", list(SPELLINGS))
@pytest.mark.parametrize("option", list(OPTIONS))
def test_an_output_on_the_input_model_is_refused(w, monkeypatch, option, spelling):
    monkeypatch.chdir(w)
    target = SPELLINGS[spelling](w)
    pattern = rf"^{OPTIONS[option]} .*\.onnx is the input model \(MODEL\): give another path$"
    refused(pattern, w.parent, w / "model.onnx", w / "data", **{option: target})


def test_the_model_given_through_a_link_is_protected_too(w):
    model = link(w / "link.onnx", w / "model.onnx")
    refused(r"^-o .*model\.onnx is the input model", w, model, w / "data", output=w / "model.onnx")
    refused(r"^-o .*link\.onnx is the input model", w, model, w / "data", output=model)


def test_an_output_on_the_input_models_external_data_is_refused(w):
    model = external_copy(w, "ext.onnx", "weights.bin")
    pattern = r"^--report .*weights\.bin is external data of the input model .*ext\.onnx \(MODEL\)"
    refused(pattern, w, model, w / "data", report=w / "weights.bin")
    refused(r"^-o .*weights\.bin is external", w, model, w / "data", output=w / "weights.bin")


def test_an_input_data_file_named_as_the_output_names_its_data_survives(w):
    """The input keeps its weights in q.onnx.data, as an earlier release named the data of an
    output q.onnx; an old q.onnx refers to that file too. Writing q.onnx gives the new model a
    data file of its own and removes none that the input reads."""
    model = external_copy(w, "model-ext.onnx", "q.onnx.data")
    shutil.copy(model, w / "q.onnx")
    before = {p: sha256(w / p) for p in ("model-ext.onnx", "q.onnx.data")}
    x = data_batches(w)[0]
    want = run_model(model, x)
    calibrate_onnx(model, w / "data", output=w / "q.onnx", weights_mode="qdq", validate_batches=0)
    assert {p: sha256(w / p) for p in before} == before
    np.testing.assert_array_equal(run_model(model, x), want)
    written = onnx.load(str(w / "q.onnx"), load_external_data=False)
    [location] = {
        e.value for t in written.graph.initializer for e in t.external_data if e.key == "location"
    }
    assert re.fullmatch(r"q\.onnx\.[0-9a-f]{12}\.data", location)
    assert np.abs(run_model(w / "q.onnx", x) - want).max() < 0.1 * np.abs(want).max()


# ---- outputs in the data, on the scales read, on the recipe ---------------------------------


def test_an_output_that_would_be_read_as_data_is_refused(w):
    data = w / "data"
    refused(
        r"^-o .*batch_00\.npz is a calibration data file in .*data \(--data\)",
        w,
        w / "model.onnx",
        data,
        output=data / "batch_00.npz",
    )
    refused(
        r"^--state .*new\.npy lies in the data directory .*data \(--data\), whose .npz/.npy, "
        r"image and .txt files are read as batches: give another path$",
        w,
        w / "model.onnx",
        data,
        state=data / "new.npy",
    )
    one = data / "batch_01.npz"
    pattern = r"^--scales .*batch_01\.npz is the calibration data \(--data\)"
    refused(pattern, w, w / "model.onnx", one, scales=one)


def test_a_report_in_the_data_directory_is_not_data(w):
    before = snapshot(w / "data")
    calibrate_onnx(w / "model.onnx", w / "data", report=w / "data" / "r.json", validate_batches=0)
    after = snapshot(w / "data")
    assert set(after) - set(before) == {str(w / "data" / "r.json")}
    assert {k: after[k] for k in before} == before


def test_the_scales_read_and_the_recipe_file_are_inputs(w):
    scales = w / "s.safetensors"
    calibrate_onnx(w / "model.onnx", w / "data", scales=scales, validate_batches=0)
    refused(
        r"^--scales .*s\.safetensors is the scales file read \(--scales-in\): give another path$",
        w,
        w / "model.onnx",
        w / "data",
        scales_in=scales,
        scales=scales,
    )
    recipe = w / "recipe.yaml"
    recipe.write_text("weight: {format: int8, method: max, per_channel: false}\n")
    refused(
        r"^--report .*recipe\.yaml is the recipe file \(--recipe\): give another path$",
        w,
        w / "model.onnx",
        w / "data",
        recipe=recipe,
        report=recipe,
    )
    result = calibrate_onnx(w / "model.onnx", w / "data", recipe=str(recipe), validate_batches=0)
    assert result.report["recipe"] == load_recipe(recipe).to_dict()
    assert result.scales["fc.weight"].axis is None  # per tensor, as the file says


# ---- two outputs on one file, and the checkpoint directory ------------------------------------


def test_two_outputs_on_one_file_are_refused(w, tmp_path):
    out = tmp_path / "out"
    (out / "ck").mkdir(parents=True)
    cases = [  # (outputs, the two named in the error line)
        ({"scales": out / "x", "report": out / "x"}, r"--scales .*x and --report .*x"),
        (
            {"output": out / "q.onnx", "state": out / "q.onnx"},
            r"-o .*q\.onnx and --state .*q\.onnx",
        ),
        (
            {"scales": out / "s", "report": link(out / "r", out / "s")},
            r"--scales .*s and --report .*r",
        ),
        (
            {"output": out / "ck" / "config.json", "checkpoint": out / "ck"},
            r"-o .*config\.json and --checkpoint .*ck \(its .*ck/config\.json\)",
        ),
    ]
    for outputs, named in cases:
        pattern = rf"^{named} are the same file: give each output its own path$"
        refused(pattern, tmp_path, w / "model.onnx", w / "data", **outputs)


def test_a_checkpoint_that_would_overwrite_an_input_is_refused(w):
    """A checkpoint writes model.safetensors, config.json and hf_quant_config.json into its
    directory (or into DIR/<layout> for several layouts): one of those being an input is a
    collision, the directory holding inputs is not."""
    several = ("modelopt", "compressed-tensors")
    for folder, layouts in ((w / "ck", ("modelopt",)), (w / "ck" / "compressed-tensors", several)):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}\n")
        refused(
            r"^--checkpoint .*ck \(its .*config\.json\) is the recipe file \(--recipe\)",
            w,
            w / "model.onnx",
            w / "data",
            recipe=folder / "config.json",
            checkpoint=w / "ck",
            checkpoint_layouts=layouts,
        )


def test_a_checkpoint_in_the_models_folder_leaves_the_model_and_data(mlp):
    inputs = {p: sha256(p) for p in [mlp / "mlp.onnx", *sorted((mlp / "data").iterdir())]}
    result = calibrate_onnx(
        mlp / "mlp.onnx",
        mlp / "data",
        format="nvfp4",
        exclude=("/head/*",),
        checkpoint=mlp,
        validate_batches=0,
    )
    assert {p: sha256(p) for p in inputs} == inputs
    assert result.checkpoint_paths == {"modelopt": mlp}
    assert {"model.safetensors", "config.json", "hf_quant_config.json"} <= set(os.listdir(mlp))


# ---- a full disk ------------------------------------------------------------------------------

FULL_DISK = {
    # case -> (options after MODEL --data DATA, the file that cannot be written)
    "model": (lambda w, t: ["-o", str(t / "q.onnx")], "q.onnx"),
    "model-external-data": (
        lambda w, t: ["-o", str(t / "q.onnx"), "--weights-mode", "qdq"],
        "q.onnx",
    ),
    "scales": (lambda w, t: ["--scales", str(t / "q.safetensors")], "q.safetensors"),
    "report": (lambda w, t: ["--report", str(t / "r.json")], "r.json"),
    "state": (lambda w, t: ["--state", str(t / "s.state"), "--state-every", "1"], "s.state"),
    "checkpoint": (
        lambda w, t: ["--checkpoint", str(t / "ck"), "--format", "nvfp4", "--exclude", "/head/*"],
        "ck/model.safetensors",
    ),
}


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE")
@pytest.mark.parametrize("case", list(FULL_DISK))
def test_a_full_disk_is_one_error_line_and_the_old_output_stays(w, tmp_path, request, case):
    """Each output written over an old one where files stop at 512 bytes (all of these are
    larger): exit 2, one error line naming the file, the old output and its folder as they were
    (no temporary file), the inputs untouched."""
    make_options, failing = FULL_DISK[case]
    out = tmp_path / "out"
    out.mkdir()
    if case == "checkpoint":
        mlp = request.getfixturevalue("mlp")
        inputs = [str(mlp / "mlp.onnx"), "--data", str(mlp / "data")]
    elif case == "model-external-data":
        inputs = [str(external_copy(w, "ext.onnx", "weights.bin")), "--data", str(w / "data")]
    else:
        inputs = [str(w / "model.onnx"), "--data", str(w / "data")]
    argv = ["calibrate", *inputs, *make_options(w, out), "--validate-batches", "0"]
    if case == "state":
        (out / "s.state").write_bytes(b"an old state file")
    else:
        assert main(argv) == 0  # the old output
    before = snapshot(tmp_path)
    child = run_cli_with_file_limit(argv, 512)
    assert child.returncode == 2, child.stderr
    errors = [line for line in child.stderr.splitlines() if line.startswith("qcal:")]
    assert errors == [child.stderr.splitlines()[-1]]
    assert re.fullmatch(rf"qcal: error: cannot write .*{failing}: .*File too large.*", errors[0])
    assert "Traceback" not in child.stderr
    assert snapshot(tmp_path) == before


# ---- permissions ------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o027, 0o002])
def test_every_output_gets_the_mode_open_gives(w, mlp, tmp_path, umask):
    out = tmp_path / "out"
    out.mkdir()
    model = external_copy(w, "ext.onnx", "weights.bin")
    previous = os.umask(umask)
    try:
        argv = ["calibrate", str(model), "--data", str(w / "data"), "--weights-mode", "qdq"]
        outputs = ["-o", str(out / "q.onnx"), "--scales", str(out / "s")]
        outputs += ["--report", str(out / "r")]
        assert main([*argv, *outputs]) == 0
        argv = ["calibrate", str(mlp / "mlp.onnx"), "--data", str(mlp / "data"), "--format"]
        assert main([*argv, "nvfp4", "--exclude", "/head/*", "--checkpoint", str(out / "ck")]) == 0
        StateFile(out / "calib.state", {}, every=1).save(1, 1, {})
    finally:
        os.umask(previous)
    written = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    data = [p for p in written if p.suffix == ".data"]
    assert len(data) == 1 and str(data[0]).startswith("q.onnx.")
    assert len(written) == 8  # q.onnx, its data, s, r, calib.state and the checkpoint's three
    modes = {str(p): oct((out / p).stat().st_mode & 0o777) for p in written}
    assert modes == {str(p): oct(0o666 & ~umask) for p in written}
