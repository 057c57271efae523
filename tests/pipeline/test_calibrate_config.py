"""calibrate_onnx with a CalibrationConfig: the same scales, bit for bit, as the keyword form,
whether the config is built in Python, read back from YAML or changed by keywords."""

from __future__ import annotations

import pytest
import torch

from qcal_export import CalibrationConfig, calibrate_onnx, load_config
from qcal_export.errors import RecipeError

OPTIONS = {
    "method": "percentile",
    "weight_method": "mse",
    "method_options": {"percentile": 99.0},
    "max_batches": 3,
    "batch_size": 2,
    "validate_batches": 0,
    "provider": "cpu",
}


def assert_same_scales(found: dict, expected: dict) -> None:
    assert found.keys() == expected.keys()
    for name, entry in expected.items():
        assert torch.equal(found[name].scale, entry.scale), name
        assert torch.equal(found[name].amax, entry.amax), name
        assert (found[name].zero_point is None) == (entry.zero_point is None), name
        if entry.zero_point is not None:
            assert torch.equal(found[name].zero_point, entry.zero_point), name


@pytest.fixture(scope="module")
def by_keywords(workdir):
    return calibrate_onnx(workdir / "model.onnx", workdir / "data", **OPTIONS)


def test_a_config_gives_the_keyword_forms_scales(workdir, by_keywords, tmp_path):
    config = CalibrationConfig.from_options(**OPTIONS)
    result = calibrate_onnx(workdir / "model.onnx", workdir / "data", config)
    assert_same_scales(result.scales, by_keywords.scales)
    assert result.report["recipe"] == by_keywords.report["recipe"]

    (tmp_path / "calibrate.yaml").write_text(config.to_yaml())
    saved = load_config(tmp_path / "calibrate.yaml")
    again = calibrate_onnx(workdir / "model.onnx", workdir / "data", config=saved)
    assert_same_scales(again.scales, by_keywords.scales)


def test_keywords_change_the_config_given(workdir, by_keywords, tmp_path):
    config = CalibrationConfig.from_options(**{**OPTIONS, "max_batches": 1})
    report = tmp_path / "report.json"
    result = calibrate_onnx(
        workdir / "model.onnx", workdir / "data", config, max_batches=3, report=report
    )
    assert_same_scales(result.scales, by_keywords.scales)
    assert result.report_path == report and report.is_file()


def test_an_unknown_keyword_is_one_recipe_error_naming_it(workdir):
    with pytest.raises(RecipeError, match=r"unknown option\(s\) \['methd'\]"):
        calibrate_onnx(workdir / "model.onnx", workdir / "data", methd="mse")
    with pytest.raises(RecipeError, match=r"unknown option\(s\) \['methd'\]"):
        calibrate_onnx(workdir / "model.onnx", workdir / "data", CalibrationConfig(), methd="mse")
    with pytest.raises(RecipeError, match=r"config must be a CalibrationConfig, not dict"):
        calibrate_onnx(workdir / "model.onnx", workdir / "data", {"method": "mse"})
