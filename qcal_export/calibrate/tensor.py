"""Calibrate one tensor: its calibrator from a spec, a max pass first where the method needs an
initial range, and the weights of a plan calibrated from their initializers.

A Hessian-weighted nvfp4-mse weight sweep takes ``H`` from its layer's input activations,
accumulated during the activations' first capture pass (``activation_calibration``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import onnx
import torch
from onnx import TensorProto

from qcal_export.calibrate.decisions import tensor_scales
from qcal_export.calibrators import CALIBRATORS, Calibrator, MaxCalibrator
from qcal_export.errors import CalibrationError, DataError, RecipeError
from qcal_export.onnx_io.initializers import initializer_values
from qcal_export.spec.formats import get_format
from qcal_export.spec.granularity import Granularity
from qcal_export.spec.methods import HESSIAN, METHODS
from qcal_export.spec.plan import Plan, WeightPlan
from qcal_export.spec.recipe import TensorSpec
from qcal_export.spec.scales import TensorScales

Collector = Callable[[torch.Tensor], None]


SCALE_TYPES = {torch.float16: TensorProto.FLOAT16, torch.bfloat16: TensorProto.BFLOAT16}
"""A weight's scale type by its dtype (float32 otherwise): the exported scale has its type."""


def make_calibrator(
    spec: TensorSpec, granularity: Granularity, nonfinite: str, **extra: object
) -> Calibrator:
    """The calibrator a spec names, for one tensor of the given export granularity.

    ``extra`` are constructor arguments that are data, not options (a weight's Hessian).
    """
    method = METHODS[spec.method]
    if method.searches:
        own = [name for name, m in METHODS.items() if not m.searches]
        raise RecipeError(
            f"method {method.name} chooses among activation methods per tensor in "
            f"calibrate_onnx; give weights and torch models a method of {own}"
        )
    kind = CALIBRATORS[method.name]
    fmt = get_format(spec.format)
    options = method.calibrator_options(spec.options)
    granularity = kind.granularity_for(fmt, granularity)
    return kind(fmt, granularity, nonfinite=nonfinite, **options, **extra)


def first_pass_calibrator(cal: Calibrator) -> Calibrator:
    """A max calibrator when ``cal`` needs an initial range, else ``cal`` itself."""
    if cal.needs_initial_range:
        return MaxCalibrator(cal.fmt, cal.granularity, nonfinite=cal.nonfinite)
    return cal


def second_pass(
    cals: dict[str, Calibrator], firsts: dict[str, Calibrator]
) -> dict[str, Calibrator]:
    """The calibrators that take a second pass, their initial range set from the first.

    A tensor whose first pass saw no value keeps an empty calibrator (its scales get floored).
    """
    second = {}
    for tensor, cal in cals.items():
        found = firsts[tensor].compute_range() if firsts[tensor] is not cal else None
        if found is not None:
            cal.set_initial_range(*found)
            second[tensor] = cal
    return second


def named_collector(tensor: str, collect: Collector) -> Collector:
    """``collect`` with a calibrator's fault (a non-finite value under nonfinite="error")
    raised as a DataError naming the tensor."""

    def run(value: torch.Tensor) -> None:
        try:
            collect(value)
        except CalibrationError as e:
            raise DataError(
                f"activation {tensor!r}: {e}; fix the data or the model, or count and skip "
                "them with --nonfinite skip (nonfinite='skip')"
            ) from None

    return run


def calibrate_weights(
    model: onnx.ModelProto,
    plan: Plan,
    nonfinite: str,
    hessians: dict[str, torch.Tensor] | None = None,
    device: torch.device | None = None,
) -> dict[str, TensorScales]:
    """Calibrate every planned weight from its initializer with its planned granularity, one
    weight at a time, on ``device`` (the host where None: a GPU runs the kernels' sweeps);
    but GPTQ's, which ``gptq_weights.compensate_weights`` rounds and rewrites."""
    initializers = {t.name: t for t in model.graph.initializer}
    scales = {}
    for tensor, weight in plan.weights.items():
        if METHODS[weight.spec.method].full_hessian:
            continue
        values = _on(initializer_values(initializers[tensor]), device)
        hessian = _weight_hessian(weight, hessians or {})
        scales[tensor] = calibrate_weight(
            tensor, values, weight.spec, weight.granularity, nonfinite, hessian
        )
    return scales


def calibrate_weight(
    name: str,
    values: torch.Tensor,
    spec: TensorSpec,
    granularity: Granularity,
    nonfinite: str,
    hessian: torch.Tensor | None = None,
) -> TensorScales:
    """Calibrate one weight from its values (any device), with a max pass first if needed.

    ``hessian`` (``[ceil(cin / 16), 16, 16]``) weights a Hessian-weighted nvfp4-mse sweep.
    """
    if METHODS[spec.method].full_hessian:
        raise RecipeError(
            f"weight {name!r}: method {spec.method} runs in calibrate_onnx, on the layer inputs "
            "it captures; give this weight another method"
        )
    extra = {} if hessian is None else {"hessian": hessian}
    cal = make_calibrator(spec, granularity, nonfinite, **extra)
    first = first_pass_calibrator(cal)
    first.collect(values)
    if second_pass({name: cal}, {name: first}):
        cal.collect(values)
    scale_type = SCALE_TYPES.get(values.dtype, TensorProto.FLOAT)
    scales = tensor_scales(name, "weight", spec, cal, granularity, values, scale_type)
    if spec.options.get(HESSIAN) and hessian is None:
        scales.notes.append("no layer input to weight by: plain squared error")
    return scales


def _weight_hessian(weight: WeightPlan, hessians: dict[str, torch.Tensor]) -> torch.Tensor | None:
    if not weight.spec.options.get(HESSIAN) or weight.hessian_input is None:
        return None
    return hessians.get(weight.hessian_input)


def relative_weight_errors(
    model: onnx.ModelProto, scales: Iterable[TensorScales], device: torch.device | None = None
) -> dict[str, float]:
    """Per weight, ``||dequantize(quantize(W)) - W|| / ||W||`` (float64) with its scales, one
    weight at a time on ``device`` (the host where None). GPTQ's weights are left out: the
    model holds them already rounded; their notes compare them with the original."""
    initializers = {t.name: t for t in model.graph.initializer}
    errors = {}
    for s in scales:
        if s.kind != "weight" or s.name not in initializers or METHODS[s.method].full_hessian:
            continue
        weight = _on(initializer_values(initializers[s.name]), device).float()
        norm, diff = _norms(weight, s.fake_quant_weight(weight))
        errors[s.name] = diff / norm if norm else diff
    return errors


def _on(values: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    return values if device is None else values.to(device)


def _norms(weight: torch.Tensor, dequantized: torch.Tensor) -> tuple[float, float]:
    """``||W||`` and ``||dequantized - W||`` in float64, a slice of rows at a time (a weight
    in float64 is twice its float32 size)."""
    rows = weight.reshape(-1, weight.shape[-1]) if weight.dim() else weight.reshape(1, 1)
    fq = dequantized.reshape(rows.shape)
    step = max(1, (1 << 22) // max(1, rows.shape[1]))
    norm_sq = diff_sq = 0.0
    for start in range(0, rows.shape[0], step):
        exact = rows[start : start + step].double().reshape(-1)
        norm_sq += float(torch.dot(exact, exact))
        diff = fq[start : start + step].double().reshape(-1).sub_(exact)
        diff_sq += float(torch.dot(diff, diff))
    return math.sqrt(norm_sq), math.sqrt(diff_sq)
