"""GPTQ on a plan's weights: each weight rounded column by column on its layer input's Hessian,
its initializer then replaced by the rounded (dequantized) values.

The export quantizes the replaced weight with the scales GPTQ used, which gives back exactly
GPTQ's codes; the float reference for validation is the model file, never the replaced copy.
A weight without a Hessian (no MatMul/Gemm input, or no batch seen) is rounded to nearest.
"""

from __future__ import annotations

import logging

import onnx
import torch
from onnx import TensorProto

from qcal_export.calibrate.decisions import tensor_scales
from qcal_export.calibrate.tensor import SCALE_TYPES, make_calibrator
from qcal_export.calibrators import FullHessian, MaxCalibrator
from qcal_export.errors import CalibrationError, DataError
from qcal_export.onnx_io.initializers import initializer_values, replace_values
from qcal_export.onnx_io.weights import store_embedded
from qcal_export.spec.formats import SCALE_LIMITS, get_format
from qcal_export.spec.methods import METHODS
from qcal_export.spec.plan import Plan, WeightPlan
from qcal_export.spec.scales import TensorScales

log = logging.getLogger(__name__)


def gptq_weights(plan: Plan) -> dict[str, WeightPlan]:
    """The planned weights whose method rounds them with a full Hessian (GPTQ)."""
    return {t: w for t, w in plan.weights.items() if METHODS[w.spec.method].full_hessian}


def compensate_weights(
    model: onnx.ModelProto,
    plan: Plan,
    nonfinite: str,
    hessians: dict[str, FullHessian],
    device: torch.device | None = None,
) -> dict[str, TensorScales]:
    """Scales of the plan's GPTQ weights, each weight's initializer in ``model`` replaced by
    its compensated values (in its own dtype), one weight at a time on ``device`` (the host
    where None). ``hessians``: full ``Xᵀ X`` by layer input.

    A Hessian summed over fewer rows than the layer has inputs is singular: GPTQ then fits the
    calibration rows, which can leave other data worse off than round to nearest; the weight's
    record and the log say so."""
    initializers = {t.name: t for t in model.graph.initializer}
    scales = {}
    for tensor, weight in gptq_weights(plan).items():
        init = initializers[tensor]
        values = initializer_values(init)
        if device is not None:
            values = values.to(device)
        accumulated = hessians.get(weight.hessian_input) if weight.hessian_input else None
        hessian = accumulated.hessian if accumulated is not None else None
        scales[tensor], compensated = compensate_weight(tensor, values, weight, nonfinite, hessian)
        if accumulated is not None and accumulated.rows < accumulated.hessian.shape[0]:
            scales[tensor].notes.append(few_rows_note(accumulated))
            log.warning("%s: %s", tensor, scales[tensor].notes[-1])
        if compensated is not None:
            replace_values(init, compensated)
    if scales:
        store_embedded(model)
    return scales


def compensate_weight(
    name: str,
    values: torch.Tensor,
    weight: WeightPlan,
    nonfinite: str,
    hessian: torch.Tensor | None,
) -> tuple[TensorScales, torch.Tensor | None]:
    """GPTQ on one weight (graph shape, any device): its scales and its compensated values
    (``values``' dtype), or round-to-nearest scales and None without a Hessian or a 2-D weight.

    The notes give the relative weight change and the layer output error ``tr(dW H dWᵀ)`` on
    the calibration inputs, GPTQ's beside round to nearest's (max ranges).
    """
    spec, granularity = weight.spec, weight.granularity
    scale_type = SCALE_TYPES.get(values.dtype, TensorProto.FLOAT)
    nearest = MaxCalibrator(get_format(spec.format), granularity, nonfinite=nonfinite)
    nearest.collect(values)
    if hessian is None or values.dim() != 2:
        scales = tensor_scales(name, "weight", spec, nearest, granularity, values, scale_type)
        why = "a 2-D weight" if hessian is not None else "its layer input (a MatMul/Gemm A)"
        scales.notes.append(f"gptq: no Hessian of {why}: rounded to nearest (max ranges)")
        return scales, None
    floor = SCALE_LIMITS[scale_type][0]
    cal = make_calibrator(
        spec,
        granularity,
        nonfinite,
        hessian=hessian,
        reduction_axis=weight.reduction_axis,
        scale_floor=floor,
    )
    try:
        cal.collect(values)
    except CalibrationError as e:
        raise DataError(f"weight {name!r} (gptq): {e}") from None
    scales = tensor_scales(name, "weight", spec, cal, granularity, values, scale_type)
    compensated = cal.compensated_weight()
    rtn = tensor_scales(name, "weight", spec, nearest, granularity, values, scale_type)
    nearest_values = rtn.fake_quant_weight(values)
    axis = cal.k_axis
    scales.notes.append(error_note(values, compensated, nearest_values, hessian, axis))
    return scales, compensated.to(values.dtype)


def few_rows_note(accumulated: FullHessian) -> str:
    """Why a weight's GPTQ may do worse than round to nearest off the calibration data."""
    return (
        f"gptq: its Hessian sums {accumulated.rows} input rows for "
        f"{accumulated.hessian.shape[0]} inputs, so it is singular and the compensation fits "
        "the calibration data: calibrate on more tokens than that (many times more is "
        "better), or raise percdamp"
    )


def output_error(
    weight: torch.Tensor, rounded: torch.Tensor, hessian: torch.Tensor, axis: int
) -> float:
    """``||X dW||² / ||X W||²`` on the inputs whose ``Xᵀ X`` is ``hessian`` (float64), for a
    2-D weight whose ``axis`` runs along X's last axis."""
    w = weight.double() if axis == 1 else weight.double().T
    diff = rounded.double() if axis == 1 else rounded.double().T
    diff = diff - w
    h = hessian.to(device=w.device, dtype=torch.float64)
    total = float(((w @ h) * w).sum())
    error = float(((diff @ h) * diff).sum())
    return error / total if total > 0 else error


def error_note(
    values: torch.Tensor,
    compensated: torch.Tensor,
    nearest: torch.Tensor,
    hessian: torch.Tensor,
    axis: int,
) -> str:
    """The relative weight change and layer output error of GPTQ and of round to nearest."""
    norm = float(values.double().norm()) or 1.0
    change = [float((v.double() - values.double()).norm()) / norm for v in (compensated, nearest)]
    errors = [output_error(values, v, hessian, axis) for v in (compensated, nearest)]
    return (
        f"gptq: relative weight change {change[0]:.3g} (round to nearest {change[1]:.3g}); "
        f"relative layer output error on the calibration inputs {errors[0]:.3g} "
        f"(round to nearest {errors[1]:.3g})"
    )
