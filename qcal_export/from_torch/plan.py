"""The QDQ plan of a torch export: exactly the nodes of the mapped modules, with the modules'
scales laid out as the graph stores each tensor.

A Linear weight exported transposed (``W.T``) takes its scales transposed: per-axis(0) of
``W [out, in]`` is per-axis(1) of ``W.T``, per-block amaxes ``[out, in / b]`` become
``[in / b, out]``. An ONNX tensor several modules quantize (q, k and v read one input; an
output that is the next module's input) gets one QDQ pair with the widest of their ranges.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import onnx
import torch

from qcal_export.capture.torch_hooks import ModuleTarget, scale_key
from qcal_export.errors import RecipeError, ScalesError
from qcal_export.from_torch.node_map import ModuleMap, NodeMatch
from qcal_export.graphs.export import check_scales_match
from qcal_export.graphs.op_inputs import ACTIVATION_INPUTS
from qcal_export.graphs.targets import find_targets
from qcal_export.onnx_io.tensor_types import FLOAT_TYPES, tensor_types
from qcal_export.spec.formats import floor_zero, get_format
from qcal_export.spec.granularity import Granularity, PerAxis, PerBlock
from qcal_export.spec.plan import ActivationPlan, Plan, Use
from qcal_export.spec.recipe import Override, Recipe, TensorSpec
from qcal_export.spec.scales import TensorScales


@dataclass
class MappedPlan:
    """The plan, the scales by ONNX tensor name, per module what it became (for the report),
    the module outputs left in float with the reason, and notes on merged ranges."""

    plan: Plan
    scales: dict[str, TensorScales]
    modules: dict[str, dict[str, Any]]
    outputs_not_exported: dict[str, str]
    notes: list[str]


def plan_mapped(
    model: onnx.ModelProto,
    module_map: ModuleMap,
    targets: list[ModuleTarget],
    scales: Mapping[str, TensorScales],
) -> MappedPlan:
    """Plan the mapped modules' nodes of ``model`` and lay out their ``scales`` for it."""
    specs = _specs(targets)
    node_inputs, sources = _activation_inputs(model, module_map, scales)
    overrides = []
    for module, matches in module_map.mapped.items():
        weight_key = scale_key(module, "weight")
        weight = specs[weight_key] if weight_key in scales else None
        for match in matches:
            tensor = node_inputs.get(match.node)
            activation = specs[sources[tensor][0]] if tensor else None
            overrides.append(Override(_exact(match.node), (match.op_type,), activation, weight))
    # TensorRT's placement puts nothing beyond the overridden nodes' inputs: those the modules read
    only = Recipe(activation=None, weight=None, overrides=tuple(overrides), target="tensorrt")
    plan = find_targets(model, only)
    laid_out = _weight_scales(plan, module_map, scales)
    outputs, skipped = _plan_outputs(model, plan, module_map, specs, sources)
    notes = []
    for tensor, keys in sources.items():
        if tensor not in plan.activations:
            notes.append(
                f"{keys} ({tensor!r}): its type is unknown to shape inference: not quantized"
            )
            continue
        laid_out[tensor], note = widest(tensor, {k: scales[k] for k in keys})
        if note:
            notes.append(note)
    check_scales_match(plan, laid_out, "the torch calibration")
    rows = {
        module: {
            "nodes": [m.node for m in matches],
            "weight": matches[0].weight,
            "transposed": matches[0].transposed,
            "inputs": sorted({node_inputs[m.node] for m in matches if m.node in node_inputs}),
            "output": outputs.get(module),
        }
        for module, matches in module_map.mapped.items()
    }
    return MappedPlan(plan, laid_out, rows, skipped, notes)


def _specs(targets: list[ModuleTarget]) -> dict[str, TensorSpec]:
    specs = {}
    for t in targets:
        for what, spec in (("input", t.activation), ("output", t.output), ("weight", t.weight)):
            if spec is not None:
                specs[scale_key(t.name, what)] = spec
    return specs


def _activation_inputs(
    model: onnx.ModelProto, module_map: ModuleMap, scales: Mapping[str, TensorScales]
) -> tuple[dict[str, str], dict[str, list[str]]]:
    """({node: its activation input}, {activation tensor: the input scales quantizing it})."""
    initializers = {t.name for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    node_inputs: dict[str, str] = {}
    sources: dict[str, list[str]] = {}
    for module, matches in module_map.mapped.items():
        key = scale_key(module, "input")
        for match in matches:
            tensor = _activation_input(nodes[match.node], match, initializers)
            if tensor is not None and key in scales:
                node_inputs[match.node] = tensor
                sources.setdefault(tensor, []).append(key)
    return node_inputs, sources


def _activation_input(node: onnx.NodeProto, match: NodeMatch, initializers: set[str]) -> str | None:
    """The node's activation input besides the module's weight (None: a constant)."""
    rules = ACTIVATION_INPUTS.get(node.op_type, {})
    found = [
        t
        for i, t in enumerate(node.input)
        if i in rules and i != match.weight_index and t and t not in initializers
    ]
    return found[0] if len(found) == 1 else None


def _exact(name: str) -> str:
    """An fnmatch pattern matching ``name`` alone."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _weight_scales(
    plan: Plan, module_map: ModuleMap, scales: Mapping[str, TensorScales]
) -> dict[str, TensorScales]:
    laid_out: dict[str, TensorScales] = {}
    for module, matches in module_map.mapped.items():
        key = scale_key(module, "weight")
        for match in matches:
            if key in scales and match.weight in plan.weights and match.weight not in laid_out:
                granularity = plan.weights[match.weight].granularity
                laid_out[match.weight] = relayout(
                    scales[key], match.weight, match.transposed, granularity
                )
    return laid_out


def relayout(
    entry: TensorScales, name: str, transposed: bool, granularity: Granularity
) -> TensorScales:
    """Weight scales for the initializer ``name``, stored as the module's weight or (2-D) its
    transpose; ScalesError if the graph reads it with another granularity."""
    expected = entry.granularity
    if transposed and isinstance(expected, PerAxis):
        expected = PerAxis(1 - expected.axis)
    elif transposed and isinstance(expected, PerBlock):
        expected = PerBlock(1 - expected.axis, expected.size)
    if expected != granularity:
        raise ScalesError(
            f"weight {name!r}: the scales of {entry.name!r} are {entry.granularity.describe()} "
            f"of the module's weight, the graph reads it {granularity.describe()}"
        )
    if not transposed:
        return replace(entry, name=name)

    def flip(t: torch.Tensor | None) -> torch.Tensor | None:
        return t.T.contiguous() if t is not None and t.dim() == 2 else t

    return replace(
        entry,
        name=name,
        granularity=granularity,
        amax=flip(entry.amax),
        scale=flip(entry.scale),
        zero_point=flip(entry.zero_point),
        min=flip(entry.min),
        max=flip(entry.max),
    )


def widest(name: str, entries: Mapping[str, TensorScales]) -> tuple[TensorScales, str | None]:
    """One tensor's scales from several modules' (same format): the widest range, and a note
    when they differed. RecipeError when their formats differ."""
    first = next(iter(entries.values()))
    formats = {e.format for e in entries.values()}
    if len(formats) > 1:
        raise RecipeError(
            f"ONNX tensor {name!r} is {sorted(entries)} at once, with formats {sorted(formats)}: "
            "give these modules the same activation (and output) format"
        )
    same = all(
        torch.equal(e.scale, first.scale) and torch.equal(e.zero_point, first.zero_point)
        for e in entries.values()
    )
    if same:
        return replace(first, name=name, notes=list(first.notes)), None
    lows = [e.min if e.min is not None else -e.amax for e in entries.values()]
    highs = [e.max if e.max is not None else e.amax for e in entries.values()]
    low, high = torch.stack(lows).min(), torch.stack(highs).max()
    fmt = get_format(first.format)
    scale, zero_point = fmt.scale_zero_point(low, high)
    merged = replace(
        first,
        name=name,
        amax=floor_zero(torch.maximum(low.abs(), high.abs())),
        min=None if fmt.symmetric else low,
        max=None if fmt.symmetric else high,
        scale=scale,
        zero_point=zero_point,
        global_scale=None if first.global_scale is None else scale,
        notes=[*first.notes, f"widest range of {sorted(entries)}"],
    )
    return merged, f"{sorted(entries)} share ONNX tensor {name!r}: the widest range is used"


def _plan_outputs(
    model: onnx.ModelProto,
    plan: Plan,
    module_map: ModuleMap,
    specs: Mapping[str, TensorSpec],
    sources: dict[str, list[str]],
) -> tuple[dict[str, str], dict[str, str]]:
    """Add the mapped modules' outputs to ``plan`` (and ``sources``): ({module: tensor},
    {module: why its output is not quantized})."""
    types = tensor_types(model)
    graph_outputs = {o.name for o in model.graph.output}
    readers: dict[str, list[Use]] = {}
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            readers.setdefault(name, []).append(Use(node.name, index))
    exported, skipped = {}, {}
    for module, matches in module_map.mapped.items():
        key = scale_key(module, "output")
        if key not in specs:
            continue
        for match in matches:
            tensor = match.output
            problem = _output_problem(match, graph_outputs, readers, types)
            shared = plan.activations.get(tensor) if problem is None else None
            if shared is not None and shared.spec.format != specs[key].format:
                problem = (
                    f"its output {tensor!r} is also an input quantized as {shared.spec.format} "
                    "(one QDQ pair per tensor): give both the same format"
                )
            if problem is not None:
                skipped[module] = problem
                continue
            entry = plan.activations.setdefault(
                tensor, ActivationPlan(tensor, specs[key], types[tensor])
            )
            entry.uses.extend([u for u in readers[tensor] if u not in entry.uses])
            sources.setdefault(tensor, []).append(key)
            exported[module] = tensor
    return exported, skipped


def _output_problem(
    match: NodeMatch,
    graph_outputs: set[str],
    readers: Mapping[str, list[Use]],
    types: Mapping[str, int],
) -> str | None:
    """Why the module output after ``match`` cannot get a QDQ pair; None if it can."""
    tensor = match.output
    if tensor is None:
        return f"no tensor after its bias found behind node {match.node!r}"
    if tensor in graph_outputs:
        return f"its output {tensor!r} is a graph output: a QDQ pair there would rename it"
    if tensor not in readers:
        return f"no node reads its output {tensor!r}"
    if types.get(tensor) not in FLOAT_TYPES:
        return f"the type of its output {tensor!r} is unknown to shape inference"
    return None
