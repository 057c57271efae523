"""Fixed choices as str enums: the same words on the CLI, in recipes, reports and state files;
a recipe stores its members; a bad value names the field and the choices."""

from __future__ import annotations

import argparse
import json

import pytest

from qcal_export.artifacts.checkpoint import LAYOUT_BY_NAME, LAYOUTS
from qcal_export.calibrators import MaxCalibrator
from qcal_export.cli import build_parser
from qcal_export.errors import CalibrationError, RecipeError
from qcal_export.spec.choices import CheckpointLayout, NonFinite, NVFP4Form, Target, WeightsMode
from qcal_export.spec.formats import INT8
from qcal_export.spec.granularity import PerTensor
from qcal_export.spec.recipe import Recipe, recipe_from_dict

WORDS = {
    NonFinite: ["skip", "error"],
    WeightsMode: ["quantized", "qdq"],
    NVFP4Form: ["portable", "tensorrt"],
    Target: ["ort", "tensorrt"],
    CheckpointLayout: ["modelopt", "compressed-tensors"],
}
OPTIONS = {
    NonFinite: "--nonfinite",
    WeightsMode: "--weights-mode",
    NVFP4Form: "--nvfp4-form",
    Target: "--target",
    CheckpointLayout: "--checkpoint-layout",
}


@pytest.mark.parametrize("choice", list(WORDS))
def test_members_are_their_words_everywhere(choice):
    assert choice.values() == WORDS[choice]
    for member, word in zip(choice, WORDS[choice], strict=True):
        assert member == word and hash(member) == hash(word) and {word: 1}[member] == 1
        assert (str(member), f"{member}", f"{member:>12}", repr(member)) == (
            word,
            word,
            f"{word:>12}",
            repr(word),
        )
        assert json.dumps({"k": member}) == json.dumps({"k": word})
        assert choice.parse(word, "where") is member


@pytest.mark.parametrize("choice", list(OPTIONS))
def test_cli_choices_are_the_enum_values(choice):
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    action = next(
        a for a in sub.choices["calibrate"]._actions if OPTIONS[choice] in a.option_strings
    )
    assert list(action.choices) == WORDS[choice]


def test_a_recipe_holds_members_and_writes_the_words():
    data = {"weights_mode": "qdq", "nonfinite": "error", "nvfp4_form": "tensorrt", "target": "ort"}
    recipe = recipe_from_dict(data)
    assert recipe.weights_mode is WeightsMode.QDQ and recipe.nonfinite is NonFinite.ERROR
    assert recipe.nvfp4_form is NVFP4Form.TENSORRT and recipe.target is Target.ORT
    written = json.loads(json.dumps(recipe.to_dict()))
    assert {key: written[key] for key in data} == data
    assert Recipe().target is Target.ORT and Recipe().nonfinite is NonFinite.SKIP


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("nonfinite", "ignore", "nonfinite must be 'skip' or 'error', not 'ignore'"),
        ("weights_mode", 1, "weights_mode must be 'quantized' or 'qdq', not 1"),
        ("nvfp4_form", None, "nvfp4_form must be 'portable' or 'tensorrt', not None"),
        ("target", "trt", "target must be one of ['ort', 'tensorrt'], not 'trt'"),
    ],
)
def test_a_bad_choice_names_the_field_and_the_words(field, value, message):
    with pytest.raises(RecipeError) as e:
        Recipe(**{field: value})
    assert str(e.value) == message


def test_calibrators_take_the_words_or_the_members():
    assert MaxCalibrator(INT8, PerTensor(), nonfinite="error").nonfinite is NonFinite.ERROR
    with pytest.raises(CalibrationError, match=r"^nonfinite must be 'skip' or 'error', not 'x'$"):
        MaxCalibrator(INT8, PerTensor(), nonfinite="x")


def test_every_checkpoint_layout_has_its_tensors_and_configs():
    assert set(LAYOUT_BY_NAME) == set(CheckpointLayout) and list(LAYOUTS) == WORDS[CheckpointLayout]
    for name, layout in LAYOUT_BY_NAME.items():
        assert layout.name is name
        configs = layout.quant_configs(["fc"], True, [])
        assert configs["config.json"]["quant_method"] == name
