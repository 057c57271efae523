"""Calibrate a plan's tensors: one calibrator per tensor, fed by capture (activations) or by
the initializer itself (weights), and their decisions turned into TensorScales.

Methods that need an initial range take a max pass first. NVFP4 tensors get two-level scales:
a global scale, and FP8 block scales (weights) or none (activations: the graph computes them).
A Hessian-weighted nvfp4-mse weight sweep takes ``H`` from its layer's input activations,
accumulated during the first capture pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import onnx
import torch
from onnx import TensorProto

from qcal_export.artifacts.scales import TensorScales
from qcal_export.calibrators import CALIBRATORS, Calibrator, MaxCalibrator
from qcal_export.calibrators.nvfp4_mse import BlockHessian
from qcal_export.distributed import Ranks
from qcal_export.errors import CalibrationError, DataError, RecipeError
from qcal_export.formats import (
    AMAX_FLOOR,
    NVFP4,
    SCALE_LIMITS,
    NVFP4Format,
    floor_zero,
    get_format,
    type_name,
)
from qcal_export.granularity import Granularity, PerBlock, PerTensor, PerTensorGroup
from qcal_export.graphs.qdq import initializer_values
from qcal_export.graphs.targets import ActivationPlan, Plan, WeightPlan
from qcal_export.recipe import AUTO_METHODS, METHOD_OPTIONS, METHODS, TensorSpec
from qcal_export.resume import Progress, StateFile, Stateful, restore_all

Collector = Callable[[torch.Tensor], None]
SCALE_TYPES = {torch.float16: TensorProto.FLOAT16, torch.bfloat16: TensorProto.BFLOAT16}
"""A weight's scale type by its dtype (float32 otherwise): the exported scale has its type."""


class CapturePass(Protocol):
    """Streams the data once, calling every collector of a tensor with each captured value;
    returns the number of batches. ``label`` names the pass; the first ``skip`` batches are
    passed over (a resumed run holds them already); ``after_batch(done)`` follows each batch."""

    def __call__(
        self,
        collectors: dict[str, list[Collector]],
        label: str,
        *,
        skip: int = 0,
        after_batch: Callable[[int], None] | None = None,
    ) -> int: ...


def make_calibrator(
    spec: TensorSpec, granularity: Granularity, nonfinite: str, **extra: object
) -> Calibrator:
    """The calibrator a spec names, for one tensor of the given export granularity.

    ``extra`` are constructor arguments that are data, not options (a weight's Hessian).
    """
    if spec.method == "auto":
        raise RecipeError(
            "method auto chooses among activation methods per tensor in calibrate_onnx; "
            f"give weights and torch models a method of {[m for m in METHODS if m != 'auto']}"
        )
    kind = CALIBRATORS[spec.method]
    fmt = get_format(spec.format)
    options = {k: v for k, v in spec.options.items() if k != "hessian"}
    granularity = kind.granularity_for(fmt, granularity)
    return kind(fmt, granularity, nonfinite=nonfinite, **options, **extra)


def activation_granularity(plan: ActivationPlan) -> Granularity:
    """Per tensor; for block formats per tensor seen as its blocks (the graph's own blocks)."""
    if plan.blocks is None:
        return PerTensor()
    return PerTensorGroup(plan.blocks.axis, get_format(plan.spec.format).block_size)


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


@dataclass
class ActivationResult:
    """Scales per activation (for a method ``auto`` one its choice replaces: max's), each
    ``auto`` activation's candidates by method, pass counts and the Hessians asked for."""

    scales: dict[str, TensorScales]
    batches_per_pass: list[int]
    hessians: dict[str, torch.Tensor] = field(default_factory=dict)
    candidates: dict[str, dict[str, TensorScales]] = field(default_factory=dict)


def candidate_specs(tensor: str, spec: TensorSpec) -> list[tuple[str, TensorSpec]]:
    """(key, spec) of each calibrator an activation gets: its own, or under ``auto`` one per
    candidate method (key ``tensor#method``), each with the options that method takes."""
    if spec.method != "auto":
        return [(tensor, spec)]
    return [
        (
            f"{tensor}#{method}",
            dataclasses.replace(spec, method=method, options=_options(spec, method)),
        )
        for method in AUTO_METHODS
    ]


def _options(spec: TensorSpec, method: str) -> dict[str, float]:
    return {k: v for k, v in spec.options.items() if k in METHOD_OPTIONS.get(method, ())}


def calibrate_activations(
    plan: Plan,
    capture: CapturePass,
    nonfinite: str,
    state: StateFile | None = None,
    resume: bool = False,
    ranks: Ranks | None = None,
) -> ActivationResult:
    """Calibrate the planned activations (and accumulate the Hessians weights ask for).

    ``state`` saves the calibrators every few batches; with ``resume`` the run continues from
    what it saved, and the state file is removed once both passes are done. With ``ranks``
    (several processes, each capturing its shard) the states are merged after each pass.
    """
    ranks = ranks or Ranks()
    specs = {
        key: (t, spec)
        for t, a in plan.activations.items()
        for key, spec in candidate_specs(t, a.spec)
    }
    cals = {
        key: make_calibrator(spec, activation_granularity(plan.activations[t]), nonfinite)
        for key, (t, spec) in specs.items()
    }
    firsts = {key: first_pass_calibrator(cal) for key, cal in cals.items()}
    hessians = {t: BlockHessian() for t in hessian_inputs(plan)}
    collectors = _collectors(firsts, specs)
    for tensor, accumulator in hessians.items():
        collectors.setdefault(tensor, []).append(named_collector(tensor, accumulator.collect))
    firsts_state: dict[str, Stateful] = {f"first/{t}": c for t, c in firsts.items()}
    firsts_state.update({f"hessian/{t}": h for t, h in hessians.items()})
    progress = state.resume() if state is not None and resume else None
    counts = []
    if collectors:
        first = partial(_first_pass, capture, collectors, firsts_state, state, progress)
        counts.append(ranks.run_pass(first, firsts_state))
    second = second_pass(cals, firsts)
    if second:
        seconds_state = {f"second/{t}": c for t, c in second.items()}
        skip = 0
        if progress is not None and progress.pass_number == 2 and progress.batches:
            restore_all(seconds_state, progress.snapshots)
            skip = progress.batches
        collectors = _collectors(second, specs)
        saver = state.saver(2, seconds_state) if state is not None else None
        pass_2 = partial(capture, collectors, "pass 2", skip=skip, after_batch=saver)
        counts.append(ranks.run_pass(pass_2, seconds_state))
    if state is not None:
        state.finish()
    types = {t: a.elem_type for t, a in plan.activations.items()}
    scales, candidates = _activation_scales(cals, specs, types)
    found = {t: h.hessian for t, h in hessians.items() if h.hessian is not None}
    return ActivationResult(scales, counts, found, candidates)


def _collectors(
    cals: dict[str, Calibrator], specs: dict[str, tuple[str, TensorSpec]]
) -> dict[str, list[Collector]]:
    """Per captured tensor, the collect of every calibrator it feeds."""
    collectors: dict[str, list[Collector]] = {}
    for key, cal in cals.items():
        tensor = specs[key][0]
        collectors.setdefault(tensor, []).append(named_collector(tensor, cal.collect))
    return collectors


def _activation_scales(
    cals: dict[str, Calibrator],
    specs: dict[str, tuple[str, TensorSpec]],
    types: dict[str, int],
) -> tuple[dict[str, TensorScales], dict[str, dict[str, TensorScales]]]:
    """Scales per activation and, for ``auto`` ones, per candidate method (their scales stand
    at the first candidate's until the choice); ``types``: each activation's ONNX type."""
    scales, candidates = {}, {}
    for key, cal in cals.items():
        tensor, spec = specs[key]
        found = tensor_scales(
            tensor, "activation", spec, cal, PerTensor(), scale_type=types[tensor]
        )
        if key == tensor:
            scales[tensor] = found
        else:
            candidates.setdefault(tensor, {})[spec.method] = found
    scales.update({t: c[AUTO_METHODS[0]] for t, c in candidates.items()})
    return scales, candidates


def _first_pass(
    capture: CapturePass,
    collectors: dict[str, list[Collector]],
    objects: dict[str, Stateful],
    state: StateFile | None,
    progress: Progress | None,
) -> int:
    """Run (or resume, or restore a finished) first pass; returns its number of batches."""
    if progress is not None and progress.pass_number == 2:
        restore_all(objects, progress.first_pass)
        return progress.first_pass_batches
    skip = 0
    if progress is not None:
        restore_all(objects, progress.snapshots)
        skip = progress.batches
    saver = state.saver(1, objects) if state is not None else None
    count = capture(collectors, "pass 1", skip=skip, after_batch=saver)
    if state is not None:
        state.end_first_pass(objects, count)
    return count


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


def hessian_inputs(plan: Plan) -> list[str]:
    """Activations whose ``Xᵀ X`` blocks a Hessian-weighted weight sweep needs."""
    return sorted(
        {
            w.hessian_input
            for w in plan.weights.values()
            if w.spec.options.get("hessian") and w.hessian_input
        }
    )


def calibrate_weights(
    model: onnx.ModelProto,
    plan: Plan,
    nonfinite: str,
    hessians: dict[str, torch.Tensor] | None = None,
) -> dict[str, TensorScales]:
    """Calibrate every planned weight from its initializer with its planned granularity."""
    initializers = {t.name: t for t in model.graph.initializer}
    scales = {}
    for tensor, weight in plan.weights.items():
        values = initializer_values(initializers[tensor])
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
    extra = {} if hessian is None else {"hessian": hessian}
    cal = make_calibrator(spec, granularity, nonfinite, **extra)
    first = first_pass_calibrator(cal)
    first.collect(values)
    if second_pass({name: cal}, {name: first}):
        cal.collect(values)
    scale_type = SCALE_TYPES.get(values.dtype, TensorProto.FLOAT)
    scales = tensor_scales(name, "weight", spec, cal, granularity, values, scale_type)
    if spec.options.get("hessian") and hessian is None:
        scales.notes.append("no layer input to weight by: plain squared error")
    return scales


def _weight_hessian(weight: WeightPlan, hessians: dict[str, torch.Tensor]) -> torch.Tensor | None:
    if not weight.spec.options.get("hessian") or weight.hessian_input is None:
        return None
    return hessians.get(weight.hessian_input)


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
    if isinstance(fmt, NVFP4Format):
        return _nvfp4_scales(cal, bound, granularity, values, common, scale_type)
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


def _nvfp4_scales(
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
    global_scale = NVFP4.global_scale(global_amax, smallest)
    if global_amax > 0:
        raw = NVFP4.global_scale(global_amax, 0.0)[None]
        common["notes"] += scale_notes(raw, scale_type, NVFP4.global_floor(smallest))
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
    block_scales = NVFP4.block_scales(block_amax, global_scale).float()
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


def relative_weight_errors(
    model: onnx.ModelProto, scales: Iterable[TensorScales]
) -> dict[str, float]:
    """Per weight, ``||dequantize(quantize(W)) - W|| / ||W||`` (float64) with its scales."""
    initializers = {t.name: t for t in model.graph.initializer}
    errors = {}
    for s in scales:
        if s.kind != "weight" or s.name not in initializers:
            continue
        weight = initializer_values(initializers[s.name]).float()
        dequantized = s.fake_quant_weight(weight)
        norm = float(weight.double().norm())
        diff = float((dequantized.double() - weight.double()).norm())
        errors[s.name] = diff / norm if norm else diff
    return errors
