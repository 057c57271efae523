"""Q/DQ placement for a deployment target beyond the compute ops' inputs: the outputs and the
inputs of the integer kernels ONNX Runtime fuses, the data-movement ops that keep their input's
scale, and TensorRT's residual Adds and pooling inputs (``op_inputs.PLACEMENTS``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto

from qcal_export.graphs.op_inputs import COMPUTE_OPS, CONV_PRODUCERS, PLACEMENTS
from qcal_export.onnx_io.tensor_types import FLOAT_TYPES, Shape
from qcal_export.onnx_io.weights import to_array
from qcal_export.spec.choices import Target
from qcal_export.spec.formats import get_format
from qcal_export.spec.granularity import PerTensor
from qcal_export.spec.plan import (
    ActivationPlan,
    Plan,
    Use,
    WeightPlan,
    add_activation,
    add_shared,
    add_weight,
)
from qcal_export.spec.recipe import Recipe, TensorSpec

PLACED_OPS = frozenset(
    op
    for placement in PLACEMENTS.values()
    for ops in vars(placement).values()
    for op in ops
    if op not in COMPUTE_OPS
)
"""Op types whose Q/DQ some target's placement decides (not the generic all-inputs rule)."""
SENTINEL = 1e4
"""Magnitude from which a float constant is a sentinel (an attention mask's -10000 or float
minimum standing in for -inf), not a value: one scale over it rounds all else to zero."""
BOUNDED_OPS = frozenset({"Softmax", "Sigmoid", "Tanh", "Erf", "LayerNormalization"})
"""Ops whose output is bounded whatever their input: a sentinel does not pass them."""
NORMALIZATIONS = frozenset(
    {"LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization"}
    | {"SkipLayerNormalization", "SkipSimplifiedLayerNormalization"}
)
"""Ops that normalize their input per token: the residual stream they read carries a few
channels far larger than the rest (which the normalization divides out), so that one scale per
tensor rounds every other channel to a handful of levels."""


@dataclass(frozen=True)
class GraphView:
    """What placement reads of the main graph: types, constants, producers and readers."""

    infos: dict[str, tuple[int, Shape | None]]
    initializers: dict[str, TensorProto]
    producers: dict[str, onnx.NodeProto]
    readers: dict[str, list[Use]]
    outputs: frozenset[str]
    sentinels: frozenset[str]
    nodes: dict[str, onnx.NodeProto]
    stream: frozenset[str]

    @classmethod
    def of(cls, graph: onnx.GraphProto, infos: dict[str, tuple[int, Shape | None]]) -> GraphView:
        readers: dict[str, list[Use]] = {}
        for node in graph.node:
            for index, tensor in enumerate(node.input):
                if tensor:
                    readers.setdefault(tensor, []).append(Use(node.name, index))
        initializers = {t.name: t for t in graph.initializer}
        producers = {out: node for node in graph.node for out in node.output if out}
        return cls(
            infos,
            initializers,
            producers,
            readers,
            frozenset(value.name for value in graph.output),
            _sentinel_tensors(graph, initializers, infos),
            {node.name: node for node in graph.node},
            _residual_stream(graph, producers),
        )

    def is_float(self, tensor: str) -> bool:
        return bool(tensor) and self.infos.get(tensor, (None,))[0] in FLOAT_TYPES

    def elem_type(self, tensor: str) -> int:
        return self.infos[tensor][0]


def place_node(plan: Plan, node: onnx.NodeProto, recipe: Recipe, view: GraphView) -> bool:
    """Add the Q/DQ that ``recipe.target`` places around ``node`` (a compute op's output, or a
    placed op's inputs and outputs) to ``plan``; whether any was added.

    Only per-tensor activation formats (int8, uint8, fp8) are placed beyond the compute ops'
    inputs; block formats (nvfp4) and weight-only recipes keep to those inputs.
    """
    act_spec, weight_spec = recipe.specs_for(node.name, node.op_type)
    if act_spec is None or get_format(act_spec.format).block_size > 1:
        return False
    if any(t in view.sentinels for t in [*node.input, *node.output]):
        plan.sentinel_nodes.append(node.name)
        return False
    rules = PLACEMENTS[recipe.target]
    op = node.op_type
    if recipe.target == Target.ORT and _half_precision(node, view):
        plan.half_nodes.append(node.name)
        return False
    if node.name in view.stream:
        if op in rules.all_inputs | rules.own_output or (
            op in rules.residual and _residual_inputs(node, view)
        ):
            plan.stream_nodes.append(node.name)
        return False
    count = _planned_count(plan)
    if op in rules.all_inputs:
        for index, tensor in enumerate(node.input):
            _quantize_input(plan, node, index, tensor, act_spec, weight_spec, view)
    if op in rules.constant_data and node.input[0] in view.initializers:
        _quantize_input(plan, node, 0, node.input[0], act_spec, weight_spec, view)
    if op in rules.pooling:
        _quantize_input(plan, node, 0, node.input[0], act_spec, None, view)
    if op in rules.residual:
        for index in _residual_inputs(node, view):
            _quantize_input(plan, node, index, node.input[index], act_spec, None, view)
    split_input = node.input[0] if op in rules.share_split else ""
    if split_input not in view.initializers and not plan.is_quantized(split_input):
        _quantize_input(plan, node, 0, split_input, act_spec, None, view)
    if op in rules.own_output:
        for tensor in node.output:
            _quantize_output(plan, node, tensor, act_spec, recipe, view)
    if op in rules.share_output | rules.share_split and _can_share(plan, node.input[0]):
        for tensor in node.output if op in rules.share_split else node.output[:1]:
            uses = _output_uses(node, tensor, act_spec, recipe, view)
            if uses:
                add_shared(plan, tensor, node.input[0], view.elem_type(tensor), uses)
    return _planned_count(plan) != count


def _half_precision(node: onnx.NodeProto, view: GraphView) -> bool:
    """Whether ``node`` computes in float16 or bfloat16: ORT fuses the Q/DQ around it into
    QLinear kernels that take float32 scales only, and then cannot load the model."""
    floats = [t for t in node.output if view.is_float(t)]
    return any(view.elem_type(t) != TensorProto.FLOAT for t in floats)


def _planned_count(plan: Plan) -> int:
    entries = [*plan.activations.values(), *plan.weights.values(), *plan.shared.values()]
    return sum(len(entry.uses) for entry in entries)


def _quantize_input(
    plan: Plan,
    node: onnx.NodeProto,
    index: int,
    tensor: str,
    act_spec: TensorSpec,
    weight_spec: TensorSpec | None,
    view: GraphView,
) -> None:
    """Input ``index`` quantized: a constant per tensor in the activations' format (where the
    recipe quantizes weights), any other float tensor as an activation."""
    if not view.is_float(tensor):
        return
    use = Use(node.name, index)
    if tensor in view.initializers:
        if weight_spec is None:
            return
        init = view.initializers[tensor]
        spec = TensorSpec(format=act_spec.format)
        found = plan.weights.get(tensor)
        if found is not None and (found.spec, found.granularity) != (spec, PerTensor()):
            return
        weight = WeightPlan(tensor, spec, PerTensor(), [use], shape=tuple(init.dims))
        weight.elem_type = init.data_type
        add_weight(plan, weight)
    elif _fits(plan, tensor, act_spec):
        add_activation(plan, ActivationPlan(tensor, act_spec, view.elem_type(tensor)), use)


def _quantize_output(
    plan: Plan,
    node: onnx.NodeProto,
    tensor: str,
    act_spec: TensorSpec,
    recipe: Recipe,
    view: GraphView,
) -> None:
    """Output ``tensor`` of ``node`` quantized for its readers (not a graph output: the
    model's outputs stay float)."""
    uses = _output_uses(node, tensor, act_spec, recipe, view)
    if not uses or not view.is_float(tensor) or not _fits(plan, tensor, act_spec):
        return
    entry = ActivationPlan(tensor, act_spec, view.elem_type(tensor))
    for use in uses:
        add_activation(plan, entry, use)


def _output_uses(
    node: onnx.NodeProto, tensor: str, spec: TensorSpec, recipe: Recipe, view: GraphView
) -> list[Use]:
    """The main-graph readers of ``tensor`` as asked for by ``node``; none for a graph output.

    A reader of a recipe op type that the recipe excludes, or gives another activation spec
    (None: float), reads the float tensor: the recipe's choice for its inputs stands; so does
    an Add of the residual stream (``view.stream``), which stays float.
    """
    if not tensor or tensor in view.outputs:
        return []
    uses = []
    for use in view.readers.get(tensor, []):
        reader = view.nodes[use.node]
        if use.node in view.stream:
            continue
        if reader.op_type in recipe.op_types and (
            recipe.excludes(reader.name, reader.op_type)
            or recipe.specs_for(reader.name, reader.op_type)[0] != spec
        ):
            continue
        uses.append(Use(use.node, use.index, by=node.name))
    return uses


def _fits(plan: Plan, tensor: str, spec: TensorSpec) -> bool:
    """Whether ``tensor`` is unplanned or planned with ``spec`` (a placement never overrides
    another node's spec: the tensor then keeps that one)."""
    found = plan.activations.get(tensor)
    return found is None or found.spec == spec


def _can_share(plan: Plan, tensor: str) -> bool:
    """Whether ``tensor`` is quantized per tensor, so that a data-movement op's output can
    reuse its scale."""
    if not tensor or not plan.is_quantized(tensor):
        return False
    root = plan.root(tensor)
    if root in plan.weights:
        return isinstance(plan.weights[root].granularity, PerTensor)
    activation = plan.activations.get(root)
    return activation is not None and get_format(activation.spec.format).block_size == 1


def _residual_inputs(node: onnx.NodeProto, view: GraphView) -> list[int]:
    """The inputs of an Add that TensorRT does not fuse into the conv producing its other input
    (directly or through a BatchNormalization); none when no input comes from a conv."""
    fused = next((i for i, t in enumerate(node.input) if _from_conv(t, view)), None)
    if fused is None:
        return []
    return [i for i in range(len(node.input)) if i != fused]


def _from_conv(tensor: str, view: GraphView) -> bool:
    producer = view.producers.get(tensor)
    if producer is not None and producer.op_type == "BatchNormalization":
        producer = view.producers.get(producer.input[0])
    return producer is not None and producer.op_type in CONV_PRODUCERS


def _residual_stream(
    graph: onnx.GraphProto, producers: dict[str, onnx.NodeProto]
) -> frozenset[str]:
    """The Add nodes whose output reaches a ``NORMALIZATIONS`` op's input through Adds only:
    the residual stream (a block's output Add, its bias Add, earlier blocks' Adds where no
    normalization sits between), which no target places Q/DQ around."""
    found: set[str] = set()
    pending = [node.input[0] for node in graph.node if node.op_type in NORMALIZATIONS]
    while pending:
        producer = producers.get(pending.pop())
        if producer is None or producer.op_type != "Add" or producer.name in found:
            continue
        found.add(producer.name)
        pending.extend(producer.input)
    return frozenset(found)


def _sentinel_tensors(
    graph: onnx.GraphProto,
    initializers: dict[str, TensorProto],
    infos: dict[str, tuple[int, Shape | None]],
) -> frozenset[str]:
    """Float tensors holding sentinel values: small float constants of magnitude >= SENTINEL
    (or not finite), and what float ops compute from them, up to a ``BOUNDED_OPS`` op."""
    constants = {name: t for name, t in initializers.items() if _size(t) <= 1}
    for node in graph.node:
        if node.op_type in ("Constant", "ConstantOfShape"):
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None and _size(value) <= 1:
                constants[node.output[0]] = value
    found = {
        name
        for name, tensor in constants.items()
        if tensor.data_type in FLOAT_TYPES and _is_sentinel(tensor)
    }
    for node in graph.node:
        if node.op_type not in BOUNDED_OPS and any(t in found for t in node.input):
            found |= {t for t in node.output if infos.get(t, (None,))[0] in FLOAT_TYPES}
    return frozenset(found)


def _size(tensor: TensorProto) -> int:
    return int(np.prod(tensor.dims)) if tensor.dims else 1


def _is_sentinel(tensor: TensorProto) -> bool:
    values = to_array(tensor).astype(np.float64)
    return bool(values.size) and not (np.abs(values) < SENTINEL).all()
