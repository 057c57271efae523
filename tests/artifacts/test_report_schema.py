"""The JSON report's schema (qcal_export/artifacts/report_schema.json, package data): valid
itself, and every report of a real run validates against it, sections and bounds included."""

from __future__ import annotations

import json
from importlib import resources

import pytest
from report_runs import RUNS, run_report

from qcal_export.artifacts.report import SCHEMA_VERSION

jsonschema = pytest.importorskip("jsonschema")


@pytest.fixture(scope="module")
def schema() -> dict:
    text = resources.files("qcal_export.artifacts").joinpath("report_schema.json").read_text()
    found = json.loads(text)
    jsonschema.Draft202012Validator.check_schema(found)
    return found


@pytest.fixture(scope="module")
def reports(workdir, tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("reports")
    return {name: run_report(workdir, out, name) for name in RUNS}


@pytest.mark.parametrize("name", list(RUNS))
def test_real_reports_validate(schema, reports, name):
    report = reports[name]
    jsonschema.validate(report, schema, cls=jsonschema.Draft202012Validator)
    version = schema["properties"]["schema_version"]["const"]
    assert report["schema_version"] == SCHEMA_VERSION == version


def test_sections_of_the_accuracy_steps_are_there(reports):
    auto = reports["auto"]
    for key in ("smoothing", "method_choice", "layers", "precision"):
        assert key in auto, key
    detail = auto["activations"]
    quantized = {r["tensor"] for r in auto["tensors"] if r["kind"] == "activation"}
    assert quantized and quantized <= set(detail)
    for tensor, found in detail.items():
        assert set(found["ranges"]) == set(auto["method_choice"][tensor]["output_rel_l2"])
        assert "hist-mse" in found["mse_loss"] and sum(found["histogram"]["counts"]) > 0


def test_activation_detail_of_a_max_run_and_an_mse_run(reports):
    mse = reports["mse"]
    rows = {r["tensor"]: r for r in mse["tensors"] if r["kind"] == "activation"}
    for tensor, found in mse["activations"].items():
        loss = found["mse_loss"]["mse"]
        assert loss["amax"][loss["best"]] == pytest.approx(rows[tensor]["amax"], rel=1e-6)
        assert found["ranges"]["mse"]["amax"] == pytest.approx(rows[tensor]["amax"])
        assert found["histogram"] is not None


def test_block_scaled_weights_get_a_grid(reports):
    for name in ("nvfp4", "int4"):
        weights = [r for r in reports[name]["tensors"] if r["kind"] == "weight"]
        assert weights and all("block_scales" in r for r in weights), name
        assert reports[name]["activations"] == {}


def test_a_run_without_report_keeps_no_detail(workdir):
    from qcal_export.pipeline.calibrate import calibrate_onnx

    result = calibrate_onnx(workdir / "model.onnx", workdir / "data", validate_batches=0)
    assert result.report["activations"] == {}
