"""CalibrationConfig: plain data (dict, YAML, JSON) and back unchanged, every option checked when
built with the message the run gave before, and the ``calibrate`` flags one for one with the
config's options."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

from qcal_export import CalibrationConfig, ImageOptions, RandomOptions, TextOptions, load_config
from qcal_export.cli import build_parser
from qcal_export.cli_args import config_from_args
from qcal_export.errors import DataError, RecipeError
from qcal_export.spec.choices import NVFP4Form, Target
from qcal_export.spec.config import GROUPS, option_fields, option_names
from qcal_export.spec.recipe import Override, Recipe, TensorSpec

FULL = {
    "outputs": {
        "output": "q.onnx",
        "scales": "s.safetensors",
        "report": "r.json",
        "html": "r.html",
        "checkpoint": "ckpt",
        "checkpoint_layouts": ["modelopt", "compressed-tensors"],
        "int4_layout": "matmulnbits",
        "trt_calib_table": "t.cache",
        "trt_calib_form": "ort-json",
        "trt_calib_version": "8.6.1",
    },
    "quantization": {
        "recipe": None,
        "format": "nvfp4",
        "weight_format": "nvfp4",
        "activation_format": "fp8",
        "method": "percentile",
        "weight_method": "nvfp4-mse",
        "block_size": 16,
        "hessian": True,
        "nvfp4_form": "tensorrt",
        "target": "ort",
        "method_options": {"percentile": 99.9},
        "per_channel_weights": False,
        "exclude": ["/fc/*"],
        "exclude_op_types": ["Conv"],
        "weights_mode": "qdq",
        "nonfinite": "error",
        "scales_in": None,
    },
    "data": {"batch_size": 3, "max_batches": 7},
    "capture": {"provider": "cpu", "device_id": 1},
    "validation": {
        "validate_batches": 2,
        "validate_data": "held",
        "min_cosine": 0.95,
        "eval_module": "metric.py:score",
        "strict": True,
    },
    "accuracy": {
        "layer_view": True,
        "target_cosine": None,
        "target_rel_l2": 0.05,
        "formats": ["nvfp4", "fp8"],
        "holdout_every": 3,
        "view_batches": 2,
        "auto_samples": 2,
        "smooth": 0.5,
    },
    "state": {"state": "calib.state", "state_every": 10, "resume": True},
}


def test_every_option_is_in_the_full_example():
    assert {g: set(v) for g, v in FULL.items()} == {
        g: {f.name for f in dataclasses.fields(cls)} for g, cls in GROUPS.items()
    }


def test_dict_to_config_to_dict_is_unchanged():
    config = CalibrationConfig.from_dict(FULL)
    assert config.to_dict() == FULL
    assert config.quantization.exclude == ("/fc/*",)  # lists come back as the tuples held
    assert CalibrationConfig().to_dict() == CalibrationConfig.from_dict({}).to_dict()


def test_yaml_and_json_text_round_trip(tmp_path):
    config = CalibrationConfig.from_dict(FULL)
    assert yaml.safe_load(config.to_yaml()) == FULL
    assert CalibrationConfig.from_yaml(config.to_yaml()) == config
    (tmp_path / "c.yaml").write_text(config.to_yaml())
    (tmp_path / "c.json").write_text(json.dumps(config.to_dict()))
    assert load_config(tmp_path / "c.yaml") == config
    assert load_config(tmp_path / "c.json") == config


def test_enum_choices_write_as_plain_strings_and_read_back(tmp_path):
    # Choices given as string enums (Target, NVFP4Form, ...) are written as their strings.
    config = CalibrationConfig.from_options(target=Target.ORT, nvfp4_form=NVFP4Form.TENSORRT)
    text = config.to_yaml()
    assert "!!python" not in text
    written = yaml.safe_load(text)["quantization"]
    assert (written["target"], written["nvfp4_form"]) == ("ort", "tensorrt")
    (tmp_path / "c.yaml").write_text(text)
    assert load_config(tmp_path / "c.yaml").to_dict() == config.to_dict()


def test_a_recipe_object_round_trips_as_its_dict():
    recipe = Recipe(
        activation=TensorSpec(format="fp8", method="mse"),
        weight=TensorSpec(format="int4", block_size=32),
        overrides=(Override(nodes="/fc/*", activation=None),),
        exclude_nodes=("/conv/Conv",),
    )
    config = CalibrationConfig.from_options(recipe=recipe, output=Path("q.onnx"))
    plain = config.to_dict()
    assert plain["outputs"]["output"] == "q.onnx"
    back = CalibrationConfig.from_yaml(config.to_yaml())
    assert back.quantization.recipe == recipe
    assert back.quantization.build() == recipe
    assert back.to_dict() == plain


def test_flat_keywords_land_in_their_groups():
    flat = {name: value for group in FULL.values() for name, value in group.items()}
    flat["exclude"], flat["exclude_op_types"] = ("/fc/*",), ("Conv",)
    flat["checkpoint_layouts"] = ("modelopt", "compressed-tensors")
    assert CalibrationConfig.from_options(**flat) == CalibrationConfig.from_dict(FULL)
    assert len(option_names()) == sum(len(dataclasses.fields(c)) for c in GROUPS.values())
    changed = CalibrationConfig.from_dict(FULL).replace(output="other.onnx", max_batches=2)
    assert changed.outputs.output == "other.onnx" and changed.data.max_batches == 2
    assert changed.quantization == CalibrationConfig.from_dict(FULL).quantization
    with pytest.raises(RecipeError, match="needs format nvfp4, not 'int8'"):
        changed.replace(format="int8", weight_format=None)  # checked again


CHECKS = {
    "max_batches": (
        {"max_batches": 0},
        r"max_batches \(--batches\) must be an integer >= 1, not 0",
    ),
    "batch_size": ({"batch_size": 1.5}, r"batch_size \(--batch-size\) must be an integer >= 1"),
    "validate_batches": (
        {"validate_batches": -1},
        r"validate_batches \(--validate-batches\) must be an integer >= 0, not -1",
    ),
    "min_cosine": (
        {"min_cosine": 1.5},
        r"min_cosine \(--min-cosine\) must be a number in \(0, 1\]",
    ),
    "holdout_every": (
        {"holdout_every": 1},
        r"holdout_every \(--holdout-every\) must be an integer >= 2, not 1",
    ),
    "view_batches": ({"view_batches": 0}, r"view_batches \(--view-batches\) must be an integer"),
    "smooth": ({"smooth": 1.0}, r"smooth \(the SmoothQuant alpha\) must be a number in \(0, 1\)"),
    "two-targets": (
        {"target_cosine": 0.9, "target_rel_l2": 0.1},
        r"^give one output-error target: target_cosine or target_rel_l2$",
    ),
    "target_cosine": ({"target_cosine": 1.5}, r"target_cosine=1\.5 is out of range"),
    "target_rel_l2": ({"target_rel_l2": float("inf")}, r"target_rel_l2=inf is out of range"),
    "formats": ({"formats": "int8,int8"}, r"formats \(--formats\) int8,int8: int8 is listed twice"),
    "resume": ({"resume": True}, r"^resume needs the state file to resume from: pass state=PATH"),
    "int4_layout": (
        {"int4_layout": "nbits"},
        r"^int4_layout \(--int4-layout\) must be 'qdq' or 'matmulnbits', not 'nbits'$",
    ),
    "trt_calib_form": (
        {"trt_calib_form": "cache"},
        r"^trt_calib_form \(--trt-calib-form\) must be one of \['tensorrt', 'ort-flatbuffers'",
    ),
    "trt_calib_version": ({"trt_calib_version": "8601"}, r"^--trt-calib-version must be a"),
    "smooth-scales_in": ({"smooth": 0.5, "scales_in": "s.safetensors"}, r"calibrate again"),
    "hessian": ({"hessian": True}, r"hessian weighting needs weight method nvfp4-mse, not 'max'"),
    "method-option": ({"method_options": {"bins": 9}}, r"method option\(s\) \['bins'\] fit no"),
    "unknown": ({"formt": "fp8"}, r"unknown option\(s\) \['formt'\]; known: \['output'"),
}


@pytest.mark.parametrize("case", CHECKS)
def test_a_bad_option_is_refused_when_the_config_is_built(case):
    options, message = CHECKS[case]
    with pytest.raises(RecipeError, match=message):
        CalibrationConfig.from_options(**options)


def test_state_every_stays_a_data_error():
    with pytest.raises(DataError, match=r"^state_every \(--state-every\) must be a positive"):
        CalibrationConfig.from_options(state="s.state", state_every=0)


def test_bad_plain_data_names_the_key(tmp_path):
    with pytest.raises(RecipeError, match=r"unknown config group\(s\) \['output'\]"):
        CalibrationConfig.from_dict({"output": {}})
    with pytest.raises(RecipeError, match=r"unknown option\(s\) \['fromat'\] in config group"):
        CalibrationConfig.from_dict({"quantization": {"fromat": "fp8"}})
    with pytest.raises(RecipeError, match=r"recipe: unknown key"):
        CalibrationConfig.from_dict({"quantization": {"recipe": {"activatoin": {}}}})
    (tmp_path / "bad.yaml").write_text("data: {max_batches: 0}\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml: max_batches \(--batches\) must be"):
        load_config(tmp_path / "bad.yaml")
    batches = CalibrationConfig.from_options(validate_data=lambda: iter(()))
    assert batches.record()["validation"]["validate_data"] == "<function>"
    with pytest.raises(RecipeError, match=r"^validate_data holds a function, which a config"):
        batches.to_dict()


# ---- the command line and the config: one flag per option, one option per flag ----------------

NOT_CONFIG = {"help", "model", "data", "data_module", "nproc"}
"""Flags that are no config option: the model and data are calibrate_onnx's own arguments, and
--nproc starts the processes that each run the config."""
DATA_FORM_FLAGS = {
    ImageOptions: {"input_size", "mean", "std", "layout", "channels", "resize"},
    TextOptions: {"tokenizer", "max_length"},
    RandomOptions: {"input_shape"},
}
"""Flags that build the data's options (calibrate_onnx's ``data_options``)."""


def calibrate_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["calibrate"]


def test_every_config_option_has_one_flag_and_every_flag_one_option():
    actions = calibrate_parser()._actions
    dests = [a.dest for a in actions]
    options = [f.name for _, f in option_fields()]
    for name in options:
        assert dests.count(name) == 1, name
    data_forms = set().union(*DATA_FORM_FLAGS.values())
    assert set(dests) == set(options) | NOT_CONFIG | data_forms
    for cls, flags in DATA_FORM_FLAGS.items():  # each data form flag is a field of its options
        fields = {f.name for f in dataclasses.fields(cls)}
        assert {re.sub("input_shape", "input_shapes", f) for f in flags} <= fields, cls
    for _, option in option_fields():
        action = next(a for a in actions if a.dest == option.name)
        flags = list(option.metadata["cli"]["flags"])
        assert action.option_strings[: len(flags)] == flags  # (and --no-... for a boolean)
        assert action.help == option.metadata["cli"].get("help")


def test_flags_build_the_config_the_keywords_build():
    bare = calibrate_parser().parse_args(["m.onnx"])
    assert config_from_args(bare) == CalibrationConfig()
    argv = ["m.onnx", "-o", "q.onnx", "--scales", "s.safetensors", "--report", "r.json"]
    argv += ["--html", "r.html"]
    argv += ["--checkpoint", "ckpt", "--checkpoint-layout", "modelopt", "compressed-tensors"]
    argv += ["--int4-layout", "matmulnbits", "--trt-calib-table", "t.cache"]
    argv += ["--trt-calib-form", "ort-json", "--trt-calib-version", "8.6.1"]
    argv += ["--format", "nvfp4", "--weight-format", "nvfp4", "--activation-format", "fp8"]
    argv += ["--method", "percentile", "--weight-method", "nvfp4-mse", "--block-size", "16"]
    argv += ["--hessian", "--nvfp4-form", "tensorrt", "--target", "ort"]
    argv += ["--option", "percentile=99.9", "--no-per-channel-weights"]
    argv += ["--exclude", "/fc/*", "--exclude-op-types", "Conv", "--weights-mode", "qdq"]
    argv += ["--nonfinite", "error", "--batch-size", "3", "--batches", "7"]
    argv += ["--provider", "cpu", "--device-id", "1", "--validate-batches", "2"]
    argv += ["--validate-data", "held", "--min-cosine", "0.95", "--eval-module", "metric.py:score"]
    argv += ["--strict", "--layer-view", "--target-rel-l2", "0.05", "--holdout-every", "3"]
    argv += ["--view-batches", "2", "--auto-samples", "2", "--smooth", "0.5"]
    argv += ["--formats", "nvfp4,fp8"]
    argv += ["--state", "calib.state", "--state-every", "10", "--resume"]
    config = config_from_args(calibrate_parser().parse_args(argv))
    assert config.to_dict() == FULL
