"""The verdict: validation on batches never calibrated on (held out, or --validate-data), or on
the calibration batches where there are too few to hold one out, and said so; the lowest output
cosine against min_cosine, recomputed here with ORT and numpy; exit 3 under strict."""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort
import pytest
from convgemm import make_workdir
from error_lines import assert_one_error_line, good
from mlp import make_mlp

from qcal_export.cli import main
from qcal_export.errors import BelowTargetError, RecipeError
from qcal_export.pipeline.calibrate import calibrate_onnx

CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    return make_mlp(tmp_path_factory.mktemp("mlp"), seq=False) / "mlp.onnx"


def batches(count: int, *, loud: int | None = None) -> list[dict[str, np.ndarray]]:
    """``count`` seeded batches of 4 (``[4, 64]``); batch ``loud`` holds the largest value."""
    rng = np.random.default_rng(5)
    out = [{"x": rng.standard_t(4, (4, 64)).astype(np.float32)} for _ in range(count)]
    if loud is not None:
        out[loud]["x"][0, 0] = 40.0
    return out


def cosine_on(float_model, quantized, feeds: list[dict[str, np.ndarray]]) -> float:
    """Cosine of the quantized model's output to the float model's over ``feeds``, float64."""
    runs = [ort.InferenceSession(str(m), providers=CPU) for m in (float_model, quantized)]
    ref, got = (np.concatenate([r.run(None, f)[0].ravel() for f in feeds]) for r in runs)
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    return float(ref @ got / np.linalg.norm(ref) / np.linalg.norm(got))


def test_validation_holds_out_every_5th_batch(mlp, tmp_path):
    """Batch 4 holds a value 40 beyond the others: held out, it is clipped, and the verdict
    shows what the calibration batches would have hidden."""
    data = batches(12, loud=4)
    out = tmp_path / "q.onnx"
    result = calibrate_onnx(mlp, data, output=out, method="max")
    report = result.report
    assert report["validation"]["batches"] == "held out: every 5th batch (2 batches: 4, 9)"
    assert report["validation"]["held_out"] is True
    calibrated = [b for i, b in enumerate(data) if i % 5 != 4]
    assert float(result.scales["x"].amax) == max(float(np.abs(b["x"]).max()) for b in calibrated)
    assert float(result.scales["x"].amax) < 40.0  # the loud batch 4 was never calibrated on
    want = cosine_on(mlp, out, [data[4], data[9]])
    assert report["output_error"]["y"]["cosine"] == pytest.approx(want, abs=1e-9)
    verdict = report["verdict"]
    assert verdict["status"] == "below target" and verdict["min_cosine"] == 0.99
    assert verdict["line"] == (
        f"verdict: BELOW TARGET (output 'y' cosine {want:.4f} < 0.99 on 2 batches held out from "
        "calibration)"
    )
    assert want < 0.99 < cosine_on(mlp, out, calibrated[:4])  # fitted batches would pass


def test_too_few_batches_validate_on_the_calibration_batches_and_say_so(mlp):
    data = batches(4)
    result = calibrate_onnx(mlp, data, method="max")
    validation, verdict = result.report["validation"], result.report["verdict"]
    assert validation["batches"] == (
        "calibration batches 0-3 (4 batches; too few to hold out: fewer than 5 batches)"
    )
    assert validation["held_out"] is False and verdict["held_out"] is False
    assert "on the 4 batches calibrated on (too few to hold out)" in verdict["line"]
    whole = max(float(np.abs(b["x"]).max()) for b in data)
    assert float(result.scales["x"].amax) == whole


def test_validate_data_is_validated_on_and_all_data_calibrates(mlp, tmp_path):
    data, other = batches(6, loud=4), batches(9)[6:]
    folder = tmp_path / "check"
    folder.mkdir()
    for i, batch in enumerate(other):
        np.savez(folder / f"b{i}.npz", **batch)
    out = tmp_path / "q.onnx"
    result = calibrate_onnx(mlp, data, output=out, method="max", validate_data=folder)
    assert float(result.scales["x"].amax) == 40.0  # nothing of --data held out
    assert result.report["validation"]["batches"] == f"--validate-data {folder} (3 batches)"
    want = cosine_on(mlp, out, other)
    assert result.report["output_error"]["y"]["cosine"] == pytest.approx(want, abs=1e-9)
    assert "on 3 batches of --validate-data" in result.report["verdict"]["line"]


def test_below_target_warns_and_strict_raises_after_writing(mlp, tmp_path, caplog):
    data = batches(6)
    with caplog.at_level(logging.WARNING):
        result = calibrate_onnx(mlp, data, method="max", min_cosine=0.999999)
    verdict = result.report["verdict"]
    assert verdict["status"] == "below target"
    assert verdict["line"].startswith("verdict: BELOW TARGET (output 'y' cosine ")
    assert "< 0.999999 on 1 batch held out from calibration" in verdict["line"]
    assert [r.getMessage() for r in caplog.records] == [verdict["line"]]
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    with pytest.raises(BelowTargetError, match=r"--strict: verdict: BELOW TARGET") as raised:
        calibrate_onnx(
            mlp, data, method="max", min_cosine=0.999999, strict=True, output=out, report=report
        )
    assert raised.value.exit_code == 3
    assert str(raised.value).endswith(f"written: {out}, {report}")
    assert out.exists() and report.exists()


@pytest.mark.parametrize("value", [0, 1.5, -0.1, True, "high", float("nan")])
def test_min_cosine_out_of_range_is_refused(mlp, value):
    with pytest.raises(RecipeError, match=r"min_cosine \(--min-cosine\) must be a number in"):
        calibrate_onnx(mlp, batches(2), min_cosine=value)


def test_the_runtime_at_fault_is_named_and_the_reference_judged(tmp_path_factory):
    """8-bit weight-only MatMuls, which ORT's default optimizations miscompute (test_cli_strict):
    the verdict judges ORT with optimizations off and names the runtime."""
    root = make_mlp(tmp_path_factory.mktemp("seq"), seq=True)
    result = calibrate_onnx(
        root / "mlp.onnx", root / "data", format="int8", activation_format="none"
    )
    validation, verdict = result.report["validation"], result.report["verdict"]
    assert validation["runtime_issue"] is not None
    assert verdict["judged"] == validation["validator"]
    assert verdict["cosine"] == validation["reference"]["y"]["cosine"]
    assert verdict["status"] == "pass"
    line = verdict["line"]
    assert "ORT's optimizations off; onnxruntime (CPUExecutionProvider) at its default" in line
    default = validation["default"]["y"]["cosine"]
    assert f"cosine {default:.4f} there: the runtime is at fault, not the quantization" in line


def test_convgemm_workdir_keeps_its_figures(tmp_path_factory):
    """The shared fixture's 4 batches: too few to hold out, so the error is the one on batches
    0-3 as before, now labelled."""
    w = make_workdir(tmp_path_factory.mktemp("w"))
    result = calibrate_onnx(w / "model.onnx", w / "data", output=w / "q.onnx")
    feeds = [dict(np.load(p)) for p in sorted((w / "data").glob("*.npz"))]
    name = next(iter(result.report["output_error"]))
    want = cosine_on(w / "model.onnx", w / "q.onnx", feeds)
    assert result.report["output_error"][name]["cosine"] == pytest.approx(want, abs=1e-9)
    assert result.report["validation"]["batches"].startswith("calibration batches 0-3")


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        (["--min-cosine", "0"], r"min_cosine \(--min-cosine\) must be a number in \(0, 1\]"),
        (["--min-cosine", "1.01"], r"min_cosine \(--min-cosine\) must be a number in \(0, 1\]"),
        (["--min-cosine", "high"], r"--min-cosine: invalid float value"),
        (["--validate-data", "{tmp}/none"], r"none"),
        (["--validate-data", "{tmp}/v.npz", "-o", "{tmp}/v.npz"], r"-o .*v\.npz is the validat"),
        (["--validate-data", "{tmp}", "--report", "{tmp}/r.npz"], r"\(--validate-data\)"),
    ],
)
def test_bad_verdict_options_are_one_error_line(workdir, tmp_path, capsys, extra, pattern):
    np.savez(tmp_path / "v.npz", **dict(np.load(next((workdir / "data").glob("*.npz")))))
    before = sorted(tmp_path.iterdir())
    argv = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    assert main(["calibrate", *good(workdir, *argv)]) == 2
    assert_one_error_line(capsys.readouterr(), pattern)
    assert sorted(tmp_path.iterdir()) == before


def test_strict_below_target_exits_3_and_the_summary_ends_with_the_verdict(workdir, capsys):
    assert main(["calibrate", *good(workdir)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("verdict: PASS (output ")
    assert main(["calibrate", *good(workdir, "--min-cosine", "1", "--strict")]) == 3
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("qcal: error")]
    assert lines[0].startswith("qcal: error: --strict: verdict: BELOW TARGET (output ")
    assert lines[0].endswith("written: nothing asked") and len(lines) == 1


def test_only_the_batches_validated_are_named(mlp):
    data = batches(12)
    one = calibrate_onnx(mlp, data, method="max", validate_batches=1)
    assert one.report["validation"]["batches"] == "held out: every 5th batch (1 batch: 4)"
    given = calibrate_onnx(mlp, data, method="max", validate_batches=2, validate_data=data[:3])
    assert given.report["validation"]["batches"] == (
        "--validate-data (data given in memory) (2 batches)"
    )
