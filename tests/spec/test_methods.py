"""The method registry: each method declared once in spec/methods.py, its calibrator class in
calibrators/__init__.py, and every list, CLI choice and trait test derived from the two."""

from __future__ import annotations

import argparse
import inspect

import pytest
import torch

from qcal_export.calibrate.tensor import calibrate_weight, make_calibrator
from qcal_export.calibrators import CALIBRATORS, MaxCalibrator
from qcal_export.cli import build_parser
from qcal_export.errors import RecipeError
from qcal_export.spec.choices import TensorKind
from qcal_export.spec.granularity import PerAxis, PerTensor
from qcal_export.spec.methods import (
    AUTO,
    HESSIAN,
    METHOD_OPTIONS,
    METHODS,
    NVFP4_MSE,
    MethodSpec,
    method_names,
)
from qcal_export.spec.recipe import Recipe, TensorSpec
from qcal_export.spec.recipe_options import build_recipe


def _choices(command: str, option: str) -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    action = next(a for a in sub.choices[command]._actions if option in a.option_strings)
    return list(action.choices)


def test_every_declared_method_has_its_calibrator_and_every_calibrator_a_declaration():
    own = {name for name, method in METHODS.items() if not method.searches}
    assert set(CALIBRATORS) == own
    for method in METHODS.values():
        assert all(m.name in CALIBRATORS for m in method.among), method.name
        if method.name in CALIBRATORS:
            parameters = inspect.signature(CALIBRATORS[method.name].__init__).parameters
            assert set(method.calibrator_options(dict.fromkeys(method.bounds))) <= set(parameters)


def test_the_traits_callers_test_are_declared():
    assert [name for name, m in METHODS.items() if m.searches] == ["auto"]
    assert [m.name for m in AUTO.among] == ["max", "hist-mse", "percentile", "entropy"]
    assert AUTO.options == {"start", "stop", "step", "percentile", "bins"} | {
        "quantized_bins",
        "max_clipped",
    }
    assert [name for name, m in METHODS.items() if m.hessian] == ["nvfp4-mse"]
    assert NVFP4_MSE.formats == ("nvfp4",) and not NVFP4_MSE.applies_to(TensorKind.ACTIVATION)
    assert {name: m.options for name, m in METHODS.items()} == METHOD_OPTIONS
    assert NVFP4_MSE.calibrator_options({HESSIAN: True, "x": 1}) == {"x": 1}


def test_cli_choices_are_the_declared_methods():
    every = [
        *("max", "mse", "hist-mse", "nvfp4-mse", "mx-mse", "gptq", "shrink-mse", "percentile"),
        *("entropy", "awq", "auto"),
    ]
    assert method_names() == every
    assert _choices("calibrate", "--method") == every
    assert _choices("calibrate", "--weight-method") == every
    weight_only = ("nvfp4-mse", "mx-mse", "gptq", "awq")
    assert _choices("demo", "--methods") == [m for m in every if m not in weight_only]
    assert _choices("demo", "--methods") == method_names(TensorKind.ACTIVATION)


def test_searches_are_refused_as_a_calibrator_with_the_methods_that_are_one():
    spec = TensorSpec("int8", "auto")
    with pytest.raises(RecipeError) as e:
        make_calibrator(spec, PerTensor(), "skip")
    assert str(e.value) == (
        "method auto chooses among activation methods per tensor in calibrate_onnx; give "
        "weights and torch models a method of "
        "['max', 'mse', 'hist-mse', 'nvfp4-mse', 'mx-mse', 'gptq', 'shrink-mse', 'percentile', "
        "'entropy', 'awq']"
    )
    with pytest.raises(RecipeError, match=r"^method auto chooses activation methods; give"):
        build_recipe(None, weight_method="auto")
    with pytest.raises(RecipeError, match=r"^hessian weighting needs weight method nvfp4-mse, not"):
        build_recipe(None, weight_method="mse", hessian=True)


def test_a_method_declared_once_reaches_recipes_options_and_calibration(monkeypatch):
    """A weight-only method added to the registry and mapped to a class is moved to weights by
    build_recipe, refused for activations with its own reason, and calibrated by its class."""
    extra = MethodSpec(
        "max-weights",
        kinds=frozenset({TensorKind.WEIGHT}),
        weight_only_reason="is a weight method here",
    )
    monkeypatch.setitem(METHODS, extra.name, extra)
    monkeypatch.setitem(METHOD_OPTIONS, extra.name, extra.options)
    monkeypatch.setitem(CALIBRATORS, extra.name, MaxCalibrator)
    recipe = build_recipe(None, method="max-weights")
    assert (recipe.activation.method, recipe.weight.method) == ("max", "max-weights")
    with pytest.raises(RecipeError, match=r"^recipe: max-weights is a weight method here$"):
        Recipe(activation=TensorSpec("int8", "max-weights"))
    weight = torch.linspace(-3.0, 5.0, 24).reshape(4, 6)
    found = calibrate_weight("w", weight, recipe.weight, PerAxis(0), "skip")
    expected = weight.abs().amax(1).double() / 127
    assert torch.equal(found.scale.double(), expected.float().double())
