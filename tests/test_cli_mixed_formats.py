"""``qcal calibrate --formats F1,F2,.. --target-cosine C``: the mixed-format search from the
command line on convgemm.py's Conv + Gemm model, and the lists and options it refuses (one
``qcal: error:`` line, exit 2, nothing written). The search itself is tested against a brute
force in analysis/test_mixed_formats.py.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from convgemm import CPU, data_batches, run_model
from error_lines import assert_one_error_line, good

from qcal_export.cli import main
from qcal_export.errors import RecipeError
from qcal_export.graphs.fp4_emulation import runnable_form
from qcal_export.pipeline.calibrate import calibrate_onnx
from qcal_export.validation.output_error import ErrorTally

TARGET = ("--target-cosine", "0.99", "--holdout-every", "2")
"""The workdir's 4 batches: every 2nd held out for the target."""


def test_mixed_formats_write_a_model_of_those_formats_and_report_them(workdir, tmp_path, capsys):
    out, report = tmp_path / "mixed.onnx", tmp_path / "report.json"
    argv = good(workdir, "--formats", "nvfp4,fp8,int8", *TARGET)
    assert main(["calibrate", *argv, "-o", str(out), "--report", str(report)]) == 0
    section = json.loads(report.read_text())["mixed_formats"]
    assert section["formats"] == ["nvfp4", "fp8", "int8", "float"]
    assert [row["unit"] for row in section["units"]] == ["/conv/Conv", "/fc/Gemm"]
    chosen = {row["unit"]: row["format"] for row in section["units"]}
    assert section["heldout_exported"]["cosine"] >= 0.99
    model = onnx.load(out)
    stored = {t.name: t.data_type for t in model.graph.initializer}
    element = {"nvfp4": onnx.TensorProto.FLOAT4E2M1, "fp8": onnx.TensorProto.FLOAT8E4M3FN}
    element["int8"] = onnx.TensorProto.INT8
    for row in section["units"]:
        if row["format"] != "float":
            (weight,) = row["weights"]
            assert stored[f"{weight}_quantized"] == element[row["format"]]
    session = ort.InferenceSession(runnable_form(model).SerializeToString(), providers=CPU)
    error = ErrorTally(["y"])
    for x in data_batches(workdir)[1::2]:  # the held-out batches
        error.add([run_model(workdir / "model.onnx", x)], session.run(["y"], {"x": x}))
    exported = section["heldout_exported"]["cosine"]
    assert error.worst()["cosine"] == pytest.approx(exported, abs=1e-6)
    printed = capsys.readouterr().out
    assert "mixed formats" in printed
    for unit, fmt in chosen.items():
        assert any(unit in line and fmt in line for line in printed.splitlines())
    bits = section["bits"]
    assert f"{bits['per_weight']:.2f} bits per weight" in " ".join(printed.split())


LISTS = [
    (("--formats", "int8,int8", *TARGET), r"formats \(--formats\) int8,int8: int8 is listed twice"),
    (("--formats", "nvfp4,bogus", *TARGET), r"unknown format 'bogus'; choose among"),
    (("--formats", "fp8,float", *TARGET), r"float is always the last level; leave it out"),
    (("--formats", ",", *TARGET), r"name one format or more"),
    (("--formats", "nvfp4,int8"), r"searches for an output-error target: give --target-cosine"),
    (
        ("--formats", "nvfp4,int8", "--target", "ort", *TARGET),
        r"nvfp4 and int8 quantize different tensors under target ort .*give --target tensorrt",
    ),
    (
        ("--formats", "int4,int8", *TARGET),
        r"int4 and int8 quantize different tensors .*--activation-format none",
    ),
    (("--formats", "int8,fp8", "--method", "auto", *TARGET), r"give another method than auto"),
    (("--formats", "int8,fp8", "--weight-format", "int8", *TARGET), r"give no --weight-format"),
    (("--formats", "int8,fp8", "--state", "STATE", *TARGET), r"give no --state"),
    (("--formats", "nvfp4,fp8", "--checkpoint", "CKPT", *TARGET), r"give no --checkpoint"),
]


@pytest.mark.parametrize(("flags", "pattern"), LISTS)
def test_bad_format_lists_exit_2_with_one_error_line(workdir, tmp_path, capsys, flags, pattern):
    paths = {"STATE": str(tmp_path / "s.json"), "CKPT": str(tmp_path / "ckpt")}
    flags = tuple(paths.get(f, f) for f in flags)
    out = tmp_path / "q.onnx"
    assert main(["calibrate", *good(workdir, *flags), "-o", str(out)]) == 2
    assert_one_error_line(capsys.readouterr(), pattern)
    assert list(tmp_path.iterdir()) == []


def test_saved_scales_or_a_recipe_cannot_go_with_formats(workdir, tmp_path, capsys):
    scales = tmp_path / "s.safetensors"
    assert main(["calibrate", *good(workdir, "--scales", str(scales), "--format", "fp8")]) == 0
    capsys.readouterr()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("weight: {format: int8}\n")
    for flag, value, pattern in (
        ("--scales-in", scales, r"calibrates every format listed: give no saved scales"),
        ("--recipe", recipe, r"builds each format's recipe: give no recipe \(--recipe\)"),
    ):
        argv = good(workdir, "--formats", "fp8,int8", flag, str(value), *TARGET)
        assert main(["calibrate", *argv, "-o", str(tmp_path / "q.onnx")]) == 2
        assert_one_error_line(capsys.readouterr(), pattern)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml", "s.safetensors"]


def test_api_takes_a_list_and_refuses_what_is_no_list(workdir):
    with pytest.raises(RecipeError, match=r"formats \(--formats\) must be a list"):
        calibrate_onnx(workdir / "model.onnx", None, formats=8, target_cosine=0.9)
    result = calibrate_onnx(
        workdir / "model.onnx",
        [{"x": x} for x in data_batches(workdir)],
        formats=["fp8", "int8"],
        target_cosine=0.9,
        holdout_every=2,
        validate_batches=0,
    )
    assert {row["format"] for row in result.report["mixed_formats"]["units"]} == {"fp8"}
    assert np.isfinite(result.report["mixed_formats"]["bits"]["per_weight"])
