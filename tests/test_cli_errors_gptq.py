"""``qcal calibrate --weight-method gptq`` with input it cannot use (no data for the Hessians, a
format GPTQ does not round, options out of range, a list of formats, saved scales): one
``qcal: error:`` line naming the option or file, exit 2, nothing written; a good run writes
the model, its report notes GPTQ's output error beside round to nearest's, and the Conv weight
(no MatMul/Gemm input) is rounded to nearest with a note."""

from __future__ import annotations

import json
import os
import re

import pytest
from error_lines import assert_one_error_line, good

from qcal_export.cli import main

INT4 = ("--format", "int4", "--activation-format", "none", "--weight-method", "gptq")
CASES = {
    "no-data": (
        lambda w, t: [str(w / "model.onnx"), *INT4, "-o", str(t / "q.onnx")],
        r"weight method gptq needs data \(the inputs of the layers it rounds\): pass --data$",
    ),
    "nvfp4": (
        lambda w, t: good(w, "--format", "nvfp4", "--weight-method", "gptq"),
        r"method 'gptq' needs format int4 or uint4 or int8 or uint8, not 'nvfp4'$",
    ),
    "percdamp-out-of-range": (
        lambda w, t: good(w, *INT4, "--option", "percdamp=2"),
        r"method 'gptq' option percdamp=2 is out of range: it must be a finite number in \[0, 1\]",
    ),
    "lazy-block-zero": (
        lambda w, t: good(w, *INT4, "--option", "lazy_block=0"),
        r"option lazy_block=0 is out of range: it must be an integer in \[1, 65536\]$",
    ),
    "on-activations": (
        lambda w, t: good(
            w, "--method", "max", "--weight-method", "max", "--option", "act_order=1"
        ),
        r"method option\(s\) \['act_order'\] fit no method used",
    ),
    "with-formats": (
        lambda w, t: good(
            w, "--formats", "int4,uint4", *INT4[2:], "--target-cosine", "0.9", "-o", str(t / "q")
        ),
        r"--formats\) compares formats on the same float weights, which gptq rewrites: give "
        r"another --weight-method$",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_gptq_input_exits_2_with_one_error_line(workdir, tmp_path, capsys, case):
    make_argv, pattern = CASES[case]
    before = sorted(os.listdir(tmp_path))
    assert main(["calibrate", *make_argv(workdir, tmp_path)]) == 2
    assert_one_error_line(capsys.readouterr(), pattern)
    assert sorted(os.listdir(tmp_path)) == before


def test_gptq_run_notes_its_error_and_refuses_its_scales_later(workdir, tmp_path, capsys):
    out, scales, report = tmp_path / "q.onnx", tmp_path / "s.safetensors", tmp_path / "r.json"
    argv = ["calibrate", *good(workdir, *INT4), "-o", str(out), "--scales", str(scales)]
    assert main([*argv, "--report", str(report)]) == 0
    rows = {r["tensor"]: r for r in json.loads(report.read_text())["tensors"]}
    gemm_note = next(n for n in rows["fc.weight"]["notes"] if "layer output error" in n)
    found = re.search(
        r"output error on the calibration inputs (\S+) \(round to nearest (\S+)\)", gemm_note
    )
    assert found and float(found[1]) <= float(found[2]), gemm_note
    assert "weight_rel_error" not in rows["fc.weight"]
    assert any("rounded to nearest" in note for note in rows["conv.weight"]["notes"])
    capsys.readouterr()
    again = ["calibrate", *good(workdir, *INT4), "--scales-in", str(scales)]
    assert main([*again, "-o", str(tmp_path / "again.onnx")]) == 2
    assert_one_error_line(
        capsys.readouterr(),
        r"s\.safetensors: weight 'conv\.weight' was calibrated with gptq, whose rounded weights "
        r"the scales file does not hold: calibrate again with --data instead of --scales-in$",
    )
    assert not (tmp_path / "again.onnx").exists()
