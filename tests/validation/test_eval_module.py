"""--eval-module FILE.py:FUNCTION: a user's task metric run on the validation batches, averaged by
batch size (checked against the same metric computed here with ORT), shown in the report and
the summary; every fault in the file or the function is one ``qcal: error:`` line naming both."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from error_lines import assert_one_error_line, good
from mlp import make_mlp

from qcal_export.cli import main
from qcal_export.errors import RecipeError
from qcal_export.pipeline.calibrate import calibrate_onnx
from qcal_export.validation.eval_module import evaluate, load_metric

CPU = ["CPUExecutionProvider"]
TOP1 = """
import numpy as np

def top1(float_outputs, quantized_outputs):
    a, b = float_outputs["y"], quantized_outputs["y"]
    return {"top1": float((a.argmax(-1) == b.argmax(-1)).mean()),
            "first": float(b.ravel()[0])}
"""


def write(tmp_path, text: str, name: str = "metric.py"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    return make_mlp(tmp_path_factory.mktemp("mlp"), seq=False) / "mlp.onnx"


def test_metric_is_averaged_by_batch_size_over_held_out_batches(mlp, tmp_path):
    rng = np.random.default_rng(8)
    sizes = [4, 4, 4, 4, 3, 4, 4, 4, 4, 9]  # held out: batch 4 (3 rows) and batch 9 (9 rows)
    data = [{"x": rng.standard_t(3, (n, 64)).astype(np.float32)} for n in sizes]
    out = tmp_path / "q.onnx"
    spec = f"{write(tmp_path, TOP1)}:top1"
    result = calibrate_onnx(mlp, data, output=out, eval_module=spec)
    metric = result.report["metric"]
    assert metric["function"] == spec
    assert metric["batches"] == "held out: every 5th batch (2 batches: 4, 9)"
    runs = [ort.InferenceSession(str(m), providers=CPU) for m in (mlp, out)]
    agree, first = [], []
    for i in (4, 9):
        a, b = (r.run(None, data[i])[0] for r in runs)
        agree.append((a.argmax(-1) == b.argmax(-1)).mean())
        first.append(b.ravel()[0])
    assert metric["values"]["top1"] == pytest.approx((3 * agree[0] + 9 * agree[1]) / 12)
    assert metric["values"]["first"] == pytest.approx((3 * first[0] + 9 * first[1]) / 12)
    assert result.report["verdict"]["line"].endswith(
        f"; top1 {metric['values']['top1']:.4g}, first {metric['values']['first']:.4g}"
    )


def test_summary_shows_the_metric_and_ends_with_the_verdict(workdir, tmp_path, capsys):
    metric = write(tmp_path, "def agree(a, b):\n    return 1.0\n")
    code = main(["calibrate", *good(workdir, "--eval-module", f"{metric}:agree")])
    assert code == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert f"taskmetric({metric}:agree):agree1" in "".join(out.split())  # rich wraps at 80
    assert lines[-1].startswith("verdict: PASS (output ")
    assert lines[-1].endswith("on the 4 batches calibrated on (too few to hold out)); agree 1")


RAISES = 'def m(a, b):\n    return a["nope"]\n'
CASES = {
    "not FILE:FUNCTION": (None, "metric.py", r"--eval-module 'metric.py' is not FILE.py"),
    "no file": (
        None,
        "{dir}/none.py:m",
        r"metric module .*none\.py \(--eval-module .*none\.py:m\) does not exist",
    ),
    "import fails": (
        "import not_a_module_qcal\n",
        "{file}:m",
        r"metric module .*metric\.py failed to load: ModuleNotFoundError",
    ),
    "syntax error": (
        "def m(:\n",
        "{file}:m",
        r"metric module .*metric\.py failed to load: SyntaxError",
    ),
    "no function": ("x = 1\n", "{file}:m", r"metric\.py has no function 'm'"),
    "metric raises": (RAISES, "{file}:m", r"metric\.py:m raised on validation batch 0: KeyError"),
    "not a number": (
        "def m(a, b):\n    return 'good'\n",
        "{file}:m",
        r"metric\.py:m returned 'good': it must return a finite number",
    ),
    "nan": ("def m(a, b):\n    return float('nan')\n", "{file}:m", r"metric\.py:m returned nan"),
}


LATE = {"metric raises", "not a number", "nan"}


@pytest.mark.parametrize("case", list(CASES))
def test_faults_are_one_error_line_naming_file_and_function(workdir, tmp_path, capsys, case):
    text, spec, pattern = CASES[case]
    file = write(tmp_path, text) if text is not None else None
    spec = spec.format(dir=tmp_path, file=file)
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    argv = good(workdir, "-o", str(out), "--report", str(report), "--eval-module", spec)
    assert main(["calibrate", *argv]) == 2
    captured = capsys.readouterr()
    if case in LATE:  # found on the validation batches, after the calibration's progress bar
        err = "\n".join(x for x in captured.err.splitlines() if x.startswith("qcal"))
        captured = captured._replace(err=err)
    assert_one_error_line(captured, pattern)
    assert not out.exists() and not report.exists()


def test_changing_keys_are_refused(tmp_path):
    text = "n = []\ndef m(a, b):\n    n.append(1)\n    return {str(len(n)): 1.0}\n"
    metric = load_metric(f"{write(tmp_path, text)}:m")
    with pytest.raises(RecipeError, match=r"returned keys \['2'\] on validation batch 1"):
        evaluate(metric, [({}, {}, 1), ({}, {}, 1)])


def test_report_file_holds_the_metric(workdir, tmp_path):
    metric = write(tmp_path, "def m(a, b):\n    return 0.5\n")
    report = tmp_path / "r.json"
    assert (
        main(["calibrate", *good(workdir, "--report", str(report), "--eval-module", f"{metric}:m")])
        == 0
    )
    saved = json.loads(report.read_text())
    assert saved["metric"]["values"] == {"m": 0.5}
