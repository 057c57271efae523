"""A calibrator's decision as TensorScales: scale and zero point in the tensor's format, with
notes on floored, subnormal or skipped values.

NVFP4 tensors get two-level scales: a global scale, and FP8 block scales (weights) or none
(activations: the graph computes them). A scale below the smallest positive value of its export
type is floored there, never exported as 0.
"""

from __future__ import annotations

import torch
from onnx import TensorProto

from qcal_export.calibrators import Calibrator
from qcal_export.spec.formats import (
    AMAX_FLOOR,
    SCALE_LIMITS,
    NVFP4Format,
    floor_zero,
    get_format,
    type_name,
)
from qcal_export.spec.granularity import Granularity, PerBlock
from qcal_export.spec.recipe import TensorSpec
from qcal_export.spec.scales import TensorScales


def tensor_scales(
    name: str,
    kind: str,
    spec: TensorSpec,
    cal: Calibrator,
    granularity: Granularity,
    values: torch.Tensor | None = None,
    scale_type: int = TensorProto.FLOAT,
) -> TensorScales:
    """Turn a calibrator's decision into scales, with notes on floored or skipped values.

    ``values`` (weights) give NVFP4 block amaxes when the calibrator chose only a global amax.
    ``scale_type``: the ONNX type the scale is exported in (the tensor's own float type); a
    scale below its smallest positive value is floored there, never exported as 0.
    """
    fmt = get_format(spec.format)
    notes = []
    found = cal.compute_range()
    if found is None:
        shape = cal.stat_shape or ()
        found = (torch.zeros(shape), torch.zeros(shape))
        notes.append("no values collected: amax floored")
    amin, amax = (t.float().cpu() for t in found)
    bound = torch.maximum(amin.abs(), amax.abs())
    if not notes and bool((bound == 0).any()):
        notes.append(f"zero range: amax floored to {AMAX_FLOOR:g}")
    if cal.nonfinite_count:
        notes.append(f"{cal.nonfinite_count} non-finite values skipped")
    common = dict(name=name, kind=kind, format=spec.format, method=spec.method)
    common.update(granularity=granularity, options=dict(spec.options), notes=notes)
    floor = SCALE_LIMITS[scale_type][0]
    if fmt.two_level:
        return _two_level_scales(fmt, cal, bound, granularity, values, common, scale_type)
    scale, zero_point = fmt.scale_zero_point(amin, amax, floor)
    raw, _ = fmt.scale_zero_point(amin, amax, 0.0)
    notes += scale_notes(raw[bound > 0], scale_type)
    return TensorScales(
        amax=floor_zero(bound),
        min=None if fmt.symmetric else amin,
        max=None if fmt.symmetric else amax,
        scale=scale,
        zero_point=zero_point,
        **common,
    )


def scale_notes(scales: torch.Tensor, scale_type: int, floor: float | None = None) -> list[str]:
    """Notes on scales (of non-zero ranges, as computed before any floor) that are below
    ``floor`` (default: the smallest positive ``scale_type``; floored there) or subnormal."""
    smallest, normal = SCALE_LIMITS[scale_type]
    floor = smallest if floor is None else floor
    name = type_name(scale_type)
    notes = []
    below = scales[scales < floor]
    if below.numel():
        what = (
            f"the smallest positive {name}"
            if floor == smallest
            else f"where the smallest FP8 block scale times it is the smallest positive {name}"
        )
        notes.append(f"{_some(below)} below {floor:.3g}, {what}: floored there")
    subnormal = scales[(scales >= floor) & (scales < normal)]
    if subnormal.numel():
        notes.append(
            f"{_some(subnormal)} subnormal in {name} (below {normal:.3g}): ONNX Runtime's "
            "Q/DQ kernels compute with subnormal scales exactly; a runtime or fused kernel that "
            "flushes denormals to zero reads them as 0"
        )
    return notes


def _some(scales: torch.Tensor) -> str:
    if scales.numel() == 1:
        return f"scale {float(scales[0]):.3g}"
    return f"{scales.numel()} scales (the smallest {float(scales.min()):.3g})"


def _two_level_scales(
    fmt: NVFP4Format,
    cal: Calibrator,
    bound: torch.Tensor,
    granularity: Granularity,
    values: torch.Tensor | None,
    common: dict,
    scale_type: int,
) -> TensorScales:
    """Global scale, and for block granularities the FP8 block scales of the block amaxes."""
    global_amax = cal.compute_global_amax()
    global_amax = bound.max() if global_amax is None else global_amax.float().cpu()
    smallest = SCALE_LIMITS[scale_type][0]
    global_scale = fmt.global_scale(global_amax, smallest)
    if global_amax > 0:
        raw = fmt.global_scale(global_amax, 0.0)[None]
        common["notes"] += scale_notes(raw, scale_type, fmt.global_floor(smallest))
    if not isinstance(granularity, PerBlock):
        return TensorScales(
            amax=floor_zero(global_amax),
            scale=global_scale,
            zero_point=torch.zeros(()),
            global_scale=global_scale,
            **common,
        )
    block_amax = bound
    if bound.dim() == 0 and values is not None:
        block_amax = block_amaxes(values.float(), granularity).cpu()
    block_scales = fmt.block_scales(block_amax, global_scale).float()
    return TensorScales(
        amax=floor_zero(block_amax),
        scale=block_scales,
        zero_point=torch.zeros_like(block_scales),
        global_scale=global_scale,
        **common,
    )


def block_amaxes(values: torch.Tensor, granularity: PerBlock) -> torch.Tensor:
    """Abs-max of every block of ``values``, in the export shape."""
    stat = granularity.groups(values).abs().amax(-1)
    return granularity.unflatten(stat, granularity.stat_shape(tuple(values.shape)))
