"""``build_recipe``: the keyword options of ``calibrate_onnx`` and the CLI become a Recipe."""

from __future__ import annotations

import argparse

import pytest

from qcal_export.cli import method_option
from qcal_export.errors import RecipeError
from qcal_export.spec.recipe import Recipe
from qcal_export.spec.recipe_options import (
    UNSIGNED_ACTIVATIONS_NOTE,
    build_recipe,
    recipe_notes,
    split_method_options,
)


def test_method_options_go_to_the_method_that_takes_them():
    recipe = build_recipe(
        None,
        method="percentile",
        weight_method="shrink-mse",
        method_options={"percentile": 99.9, "bins": 4096, "grid": 200, "norm": 2.0},
    )
    assert dict(recipe.activation.options) == {"percentile": 99.9, "bins": 4096}
    assert dict(recipe.weight.options) == {"grid": 200, "norm": 2.0}


def test_an_option_both_methods_take_goes_to_both():
    recipe = build_recipe(
        None, method="entropy", weight_method="percentile", method_options={"bins": 512}
    )
    assert recipe.activation.options == {"bins": 512}
    assert recipe.weight.options == {"bins": 512}


def test_hessian_and_method_options_merge_for_weights():
    recipe = build_recipe(
        None,
        format="nvfp4",
        method="mse",
        weight_method="nvfp4-mse",
        hessian=True,
        method_options={"step": 0.05},
    )
    assert recipe.weight.options == {"hessian": True}
    assert recipe.activation.options == {"step": 0.05}


def test_weight_only_formats_give_activation_options_to_no_one():
    with pytest.raises(
        RecipeError,
        match=r"\['percentile'\] fit no method used: "
        r"\{\"weight method 'max'\": \[\]\}",
    ):
        build_recipe(None, format="int4", method="percentile", method_options={"percentile": 99.0})


def test_split_rejects_unknown_keys_and_names_what_each_method_takes():
    with pytest.raises(RecipeError, match=r"\['gird'\] .*'shrink-mse'\": \['averaging_constant'"):
        split_method_options({"gird": 10}, "shrink-mse", "max")


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("percentile=99.99", ("percentile", 99.99)),
        ("bins=4096", ("bins", 4096)),
        ("norm=2.0", ("norm", 2.0)),
        ("step=1e-2", ("step", 0.01)),
    ],
)
def test_cli_method_option_parses_numbers(text, parsed):
    key, value = method_option(text)
    assert (key, value) == parsed
    assert type(value) is type(parsed[1])


@pytest.mark.parametrize("text", ["percentile", "=3", "bins=many"])
def test_cli_method_option_rejects_non_numbers(text):
    with pytest.raises(argparse.ArgumentTypeError, match="is not KEY=NUMBER"):
        method_option(text)


@pytest.mark.parametrize(
    ("options", "activation", "weight", "target"),
    [
        ({}, "uint8", "int8", "ort"),
        ({"format": "int8"}, "uint8", "int8", "ort"),
        ({"activation_format": "int8"}, "int8", "int8", "ort"),
        ({"target": "tensorrt"}, "int8", "int8", "tensorrt"),
        ({"format": "uint8"}, "uint8", "uint8", "ort"),
        ({"format": "fp8"}, "fp8", "fp8", "tensorrt"),
        ({"format": "nvfp4"}, "nvfp4", "nvfp4", "tensorrt"),
        ({"format": "fp8", "target": "ort"}, "fp8", "fp8", "ort"),
        ({"format": "int8", "activation_format": "fp8"}, "fp8", "int8", "tensorrt"),
        ({"format": "int4"}, None, "int4", "ort"),
    ],
)
def test_int8_under_target_ort_defaults_activations_to_uint8(options, activation, weight, target):
    """As ONNX Runtime's quantize_static: uint8 activations (its x86 8-bit kernels take them),
    int8 weights per channel; an explicit activation format or target tensorrt keeps int8. The
    default target is the runtime of the activations' format: tensorrt for fp8 and nvfp4."""
    recipe = build_recipe(None, **options)
    assert recipe.target == target
    assert (recipe.activation.format if recipe.activation else None) == activation
    assert (recipe.weight.format, recipe.weight.per_channel) == (weight, True)
    chosen = options.get("format", "int8") == "int8" and activation == "uint8"
    assert recipe_notes(None, options) == ([UNSIGNED_ACTIVATIONS_NOTE] if chosen else [])


def test_a_recipe_given_is_taken_as_it_is_and_gets_no_note():
    recipe = Recipe(target="ort")
    assert build_recipe(recipe) is recipe
    assert recipe.activation.format == "int8"
    assert recipe_notes(recipe, {}) == []
