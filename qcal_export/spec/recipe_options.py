"""Recipes from keyword options: what ``calibrate_onnx``, ``calibrate_torch`` and the CLI build
when they are given no Recipe (formats, methods, method options, exclusions)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qcal_export.errors import RecipeError
from qcal_export.spec.choices import NonFinite, NVFP4Form, Target, TensorKind, WeightsMode
from qcal_export.spec.formats import FORMATS
from qcal_export.spec.methods import DEFAULT_METHOD, HESSIAN, METHOD_OPTIONS, METHODS
from qcal_export.spec.recipe import DEFAULT_TARGET, Recipe, TensorSpec


def build_recipe(
    recipe: Recipe | None,
    *,
    format: str = "int8",
    method: str = DEFAULT_METHOD,
    weight_method: str | None = None,
    weight_format: str | None = None,
    activation_format: str | None = None,
    per_channel_weights: bool = True,
    block_size: int | None = None,
    hessian: bool = False,
    exclude: tuple[str, ...] = (),
    exclude_op_types: tuple[str, ...] = (),
    weights_mode: str = WeightsMode.QUANTIZED,
    nonfinite: str = NonFinite.SKIP,
    nvfp4_form: str = NVFP4Form.PORTABLE,
    target: str | None = None,
    method_options: Mapping[str, float] | None = None,
) -> Recipe:
    """The recipe given, or one built from the keyword options.

    ``format`` applies to weights and activations unless ``weight_format`` /
    ``activation_format`` say otherwise; weight-only formats (int4) and ``activation_format``
    "none" leave activations in float. ``target`` None is ``default_target``'s; int8 under
    target ort gives uint8 activations (``unsigned_activations``). A ``method`` only weights
    take (nvfp4-mse) becomes the weight method, and activations then use max. ``hessian``
    weights the nvfp4-mse sweep by the layer inputs' ``Xᵀ X``.
    ``method_options`` (``percentile``, ``bins``, ``grid``, ...) go to whichever of the two
    methods takes them (see ``methods.METHOD_OPTIONS``).
    """
    if recipe is not None:
        return recipe
    weight_format = weight_format or format
    target = default_target(format, activation_format) if target is None else target
    if unsigned_activations(format, activation_format, target):
        activation_format = "uint8"
    elif activation_format is None:
        weight_only = format in FORMATS and FORMATS[format].weight_only
        activation_format = "none" if weight_only else format
    method, weight_method = _methods(method, weight_method, hessian)
    activation_options, weight_options = split_method_options(
        method_options or {}, method if activation_format != "none" else None, weight_method
    )
    activation = (
        None
        if activation_format == "none"
        else TensorSpec(format=activation_format, method=method, options=activation_options)
    )
    weight = TensorSpec(
        format=weight_format,
        method=weight_method,
        per_channel=per_channel_weights,
        block_size=block_size,
        options={**weight_options, **({HESSIAN: True} if hessian else {})},
    )
    return Recipe(
        activation=activation,
        weight=weight,
        exclude_nodes=tuple(exclude),
        exclude_op_types=tuple(exclude_op_types),
        weights_mode=weights_mode,
        nonfinite=nonfinite,
        nvfp4_form=nvfp4_form,
        target=target,
    )


def _methods(method: str, weight_method: str | None, hessian: bool) -> tuple[str, str]:
    """The activation and weight methods: a weights-only ``method`` (nvfp4-mse) becomes the
    weight method (activations then use the default); RecipeError for a search (auto) on
    weights, or ``hessian`` with a weight method that takes no Hessian."""
    weights_only = method in METHODS and not METHODS[method].applies_to(TensorKind.ACTIVATION)
    if weight_method is None:
        weight_method = method if weights_only else DEFAULT_METHOD
    if weights_only:
        method = DEFAULT_METHOD
    chosen = METHODS.get(weight_method)
    if chosen is not None and chosen.searches:
        raise RecipeError(
            f"method {weight_method} chooses activation methods; give weights another method"
        )
    if hessian and (chosen is None or not chosen.hessian):
        weighted = " or ".join(name for name, m in METHODS.items() if m.hessian)
        raise RecipeError(
            f"hessian weighting needs weight method {weighted}, not {weight_method!r}"
        )
    return method, weight_method


UNSIGNED_ACTIVATIONS_NOTE = (
    "target ort: activations are uint8 (asymmetric, as ONNX Runtime's quantizer makes them: its "
    "x86 8-bit kernels take uint8 activations), weights int8 per channel; "
    "--activation-format int8 keeps activations signed"
)


def default_target(format: str, activation_format: str | None) -> str:
    """The placement for the runtime that runs the activations' format: ``ort`` (ONNX
    Runtime's 8-bit integer kernels) for integer and float activations, ``tensorrt`` for
    floating-point formats (fp8, nvfp4), which TensorRT runs and ONNX Runtime has no kernels
    for: there ORT's placement would only add rounding around element-wise ops."""
    fmt = FORMATS.get(activation_format or format)
    return Target.TENSORRT if fmt is not None and not fmt.integer else DEFAULT_TARGET


def unsigned_activations(format: str, activation_format: str | None, target: str) -> bool:
    """Whether int8 activations become uint8: under target ort with no activation format given,
    as ONNX Runtime's quantizer does, so that every MatMul finds an 8-bit kernel on the CPU."""
    return target == Target.ORT and format == "int8" and activation_format is None


def recipe_notes(recipe: Recipe | None, options: Mapping[str, Any]) -> list[str]:
    """Notes on what ``build_recipe`` chose that the options did not say (uint8 activations
    under target ort); none for a recipe given."""
    fmt, activation_format = options.get("format", "int8"), options.get("activation_format")
    target = options.get("target") or default_target(fmt, activation_format)
    chosen = recipe is None and unsigned_activations(fmt, activation_format, target)
    return [UNSIGNED_ACTIVATIONS_NOTE] if chosen else []


def split_method_options(
    options: Mapping[str, float], activation_method: str | None, weight_method: str
) -> tuple[dict[str, float], dict[str, float]]:
    """``options`` split into the keys each method takes (``METHOD_OPTIONS``); a key both
    take goes to both. RecipeError for a key that neither takes."""
    taken = {
        "activation": METHOD_OPTIONS.get(activation_method, set()) if activation_method else set(),
        "weight": METHOD_OPTIONS.get(weight_method, set()),
    }
    unknown = set(options) - taken["activation"] - taken["weight"]
    if unknown:
        accepted = {
            f"{kind} method {method!r}": sorted(taken[kind])
            for kind, method in (("activation", activation_method), ("weight", weight_method))
            if method
        }
        raise RecipeError(f"method option(s) {sorted(unknown)} fit no method used: {accepted}")
    activation, weight = (
        {k: v for k, v in options.items() if k in taken[kind]} for kind in ("activation", "weight")
    )
    return activation, weight


RECIPE_OPTIONS = (
    "format",
    "method",
    "weight_method",
    "weight_format",
    "activation_format",
    "per_channel_weights",
    "block_size",
    "hessian",
    "exclude",
    "exclude_op_types",
    "weights_mode",
    "nonfinite",
    "nvfp4_form",
    "target",
    "method_options",
)
"""Keyword options of ``calibrate_onnx`` that build the recipe (see ``build_recipe``)."""


def recipe_from_options(recipe: Recipe | None, options: dict[str, Any]) -> Recipe:
    """The recipe given, or one built from ``RECIPE_OPTIONS`` keywords (unknown ones refused)."""
    unknown = set(options) - set(RECIPE_OPTIONS)
    if unknown:
        raise RecipeError(f"unknown option(s) {sorted(unknown)}; known: {list(RECIPE_OPTIONS)}")
    return build_recipe(recipe, **options)
