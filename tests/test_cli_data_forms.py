"""``qcal calibrate`` on the data forms users have (an image folder, a text file with a local
tokenizer, ``--data random``, ``--data-module``), and each misuse as one ``qcal: error:`` line,
exit 2, nothing written; ``qcal inspect`` lists the model's inputs first."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from data_forms import image_model, save, text_model, tokenizer_dir, write_images
from error_lines import assert_one_error_line

from qcal_export.capture.random_data import NO_ACCURACY
from qcal_export.cli import main

MODULE = (
    "import numpy as np\n\ndef feeds():\n    return [{'x': np.ones((2, 3, 8, 8), np.float32)}]\n"
)


@pytest.fixture(scope="module")
def forms(tmp_path_factory) -> Path:
    """image.onnx [n, 3, 8, 8] + images/ (5 PNG/JPEG); text.onnx + texts.txt; calib.py."""
    root = tmp_path_factory.mktemp("forms")
    save(image_model(["n", 3, 8, 8]), root / "image.onnx")
    write_images(root / "images", [(20, 10), (8, 8), (10, 30), (5, 4), (12, 9)])
    save(text_model(), root / "text.onnx")
    (root / "texts.txt").write_text("one text\nanother, longer text here\na third\n")
    (root / "calib.py").write_text(MODULE)
    return root


def test_image_folder_run(forms, tmp_path, capsys):
    argv = [str(forms / "image.onnx"), "--data", str(forms / "images"), "--batch-size", "2"]
    argv += ["--mean", "0.485", "0.456", "0.406", "--std", "0.229", "0.224", "0.225"]
    argv += ["--layout", "nchw", "--resize", "crop", "--report", str(tmp_path / "r.json")]
    assert main(["calibrate", *argv, "-o", str(tmp_path / "q.onnx")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["batches_per_pass"] == [3]
    assert report["data"]["source"].startswith("5 images in ")
    assert (tmp_path / "q.onnx").is_file()


def test_text_file_run(forms, tmp_path):
    argv = [str(forms / "text.onnx"), "--data", str(forms / "texts.txt")]
    argv += ["--tokenizer", str(tokenizer_dir()), "--max-length", "16", "-o", str(tmp_path / "q")]
    assert main(["calibrate", *argv, "--report", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["batches_per_pass"] == [1]
    assert report["data"] == {
        "source": f"3 texts in {forms / 'texts.txt'} (max 16 tokens) (calibration split)",
        "random": False,
    }


def test_random_run_warns_and_notes_that_it_gives_no_accuracy(forms, tmp_path, capsys, caplog):
    argv = [str(forms / "text.onnx"), "--data", "random", "--input-shape", "input_ids=2,8"]
    argv += ["--input-shape", "attention_mask=2,8", "--input-shape", "token_type_ids=2,8"]
    assert main(["calibrate", *argv, "--batches", "3", "--report", str(tmp_path / "r.json")]) == 0
    assert NO_ACCURACY in caplog.messages
    assert "note: random data (--data random)" in capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["batches_per_pass"] == [3] and report["data"]["random"] is True


def test_data_module_run(forms, tmp_path):
    argv = [str(forms / "image.onnx"), "--data-module", f"{forms / 'calib.py'}:feeds"]
    assert main(["calibrate", *argv, "--report", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["batches_per_pass"] == [1]


def test_inspect_lists_the_inputs_first(forms, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["inspect", str(forms / "text.onnx")]) == 0
    out = capsys.readouterr().out
    assert out.index("inputs") < out.index("quantizable nodes")
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        line = next(line for line in out.splitlines() if f" {name} " in line)
        assert "int64" in line and "[?, ?]" in line


def unreadable_images(t: Path) -> str:
    folder = t / "broken"
    write_images(folder, [(8, 8), (8, 8)])
    (folder / "img_01.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return str(folder)


# case -> (argv after ``calibrate`` from (forms, tmp_path), pattern of the error line)
BAD = {
    "image-and-text-options": (
        lambda f, t: (
            [
                str(f / "image.onnx"),
                "--data",
                str(f / "images"),
                "--mean",
                "0.5",
                "--tokenizer",
                str(t),
            ]
        ),
        r"options of different data forms given together: \['--mean', '--tokenizer'\]$",
    ),
    "input-shape-without-random": (
        lambda f, t: [str(f / "image.onnx"), "--data", str(f / "images"), "--input-shape", "x=1"],
        r"--input-shape applies to --data random only$",
    ),
    "random-with-image-options": (
        lambda f, t: [str(f / "image.onnx"), "--data", "random", "--std", "2"],
        r"--data random takes --input-shape only, not \['--std'\]$",
    ),
    "data-and-data-module": (
        lambda f, t: [str(f / "image.onnx"), "--data", "x", "--data-module", "m.py:f"],
        r"argument --data-module: not allowed with argument --data",
    ),
    "module-and-image-options": (
        lambda f, t: [str(f / "image.onnx"), "--data-module", "m.py:f", "--layout", "nhwc"],
        r"--data-module makes its own feeds: drop \['--layout'\]$",
    ),
    "module-missing-function": (
        lambda f, t: [str(f / "image.onnx"), "--data-module", f"{f / 'calib.py'}:batches"],
        r"data module .*calib\.py has no function 'batches' \(--data-module .*calib.py:batches\)$",
    ),
    "module-missing-file": (
        lambda f, t: [str(f / "image.onnx"), "--data-module", f"{t / 'gone.py'}:feeds"],
        r"data module .*gone\.py \(--data-module .*gone\.py:feeds\) does not exist$",
    ),
    "text-without-tokenizer": (
        lambda f, t: [str(f / "text.onnx"), "--data", str(f / "texts.txt")],
        r"texts\.txt holds texts: pass --tokenizer DIR",
    ),
    "tokenizer-missing": (
        lambda f, t: (
            [str(f / "text.onnx"), "--data", str(f / "texts.txt"), "--tokenizer", str(t / "tok")]
        ),
        r"tokenizer directory .*tok \(--tokenizer\) does not exist$",
    ),
    "images-wrong-layout": (
        lambda f, t: [str(f / "image.onnx"), "--data", str(f / "images"), "--layout", "nhwc"],
        r"input x float32\[\?, 3, 8, 8\] read as nhwc has 8 channels; images give 1",
    ),
    "images-for-a-text-model": (
        lambda f, t: [str(f / "text.onnx"), "--data", str(f / "images")],
        r"feed one input, but the model has inputs \['input_ids int64\[\?, \?\]', ",
    ),
    "unreadable-image": (
        lambda f, t: [str(f / "image.onnx"), "--data", unreadable_images(t), "--batch-size", "2"],
        r"batch 0 \(files img_00\.png\.\.img_01\.jpg\): cannot read image .*img_01\.jpg: ",
    ),
    "random-symbolic-dims": (
        lambda f, t: [str(f / "text.onnx"), "--data", "random"],
        r"input input_ids int64\[\?, \?\] has symbolic dims: pass --input-shape input_ids=1,N",
    ),
    "input-size-odd": (
        lambda f, t: [str(f / "image.onnx"), "--data", str(f / "images"), "--input-size", "8"],
        r"argument --input-size: expected 2 arguments",
    ),
    "output-becomes-an-image": (
        lambda f, t: (
            [str(f / "image.onnx"), "--data", str(f / "images"), "-o", str(f / "images" / "q.png")]
        ),
        r"-o .*q\.png lies in the data directory .*images \(--data\), whose \.npz/\.npy, image and",
    ),
    "report-onto-the-text-file": (
        lambda f, t: (
            [
                str(f / "text.onnx"),
                "--data",
                str(f / "texts.txt"),
                "--tokenizer",
                str(tokenizer_dir()),
                "--report",
                str(f / "texts.txt"),
            ]
        ),
        r"--report .*texts\.txt is the calibration data \(--data\): give another path$",
    ),
    "output-onto-the-module": (
        lambda f, t: (
            [
                str(f / "image.onnx"),
                "--data-module",
                f"{f / 'calib.py'}:feeds",
                "-o",
                str(f / "calib.py"),
            ]
        ),
        r"-o .*calib\.py is the data module \(--data-module\): give another path$",
    ),
}


def checksums(folder: Path) -> dict[Path, str]:
    return {
        p: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("case", list(BAD))
def test_bad_data_forms_exit_2_with_one_line(forms, tmp_path, capsys, case):
    make_argv, pattern = BAD[case]
    argv = make_argv(forms, tmp_path)
    before = checksums(forms), checksums(tmp_path)
    assert main(["calibrate", *argv]) == 2
    assert_one_error_line(capsys.readouterr(), pattern)
    assert (checksums(forms), checksums(tmp_path)) == before


def test_an_output_into_the_tokenizer_directory_is_refused(forms, tmp_path, capsys):
    """Checked on a copy of the tokenizer: the refusal comes before anything is written."""
    import shutil

    tok = tmp_path / "tok"
    shutil.copytree(tokenizer_dir(), tok, ignore=shutil.ignore_patterns("*.safetensors"))
    argv = [str(forms / "text.onnx"), "--data", str(forms / "texts.txt"), "--tokenizer", str(tok)]
    before = checksums(tok)
    assert main(["calibrate", *argv, "-o", str(tok / "tokenizer.json")]) == 2
    assert_one_error_line(
        capsys.readouterr(),
        r"-o .*tokenizer\.json is a file of the tokenizer .*tok \(--tokenizer\): give another",
    )
    assert checksums(tok) == before
