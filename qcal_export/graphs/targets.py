"""Find what to quantize: per node, the activation inputs and the weight with its channel axis."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import onnx
from onnx import TensorProto, helper

from qcal_export.errors import RecipeError
from qcal_export.recipe import Recipe, TensorSpec

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}
QUANTIZED_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "QLinearMatMul",
    "QLinearConv",
    "MatMulInteger",
    "ConvInteger",
}


@dataclass(frozen=True)
class Use:
    """Input ``index`` of node ``node`` reads the tensor."""

    node: str
    index: int


@dataclass
class ActivationPlan:
    """An activation tensor to capture and quantize before the consumers listed."""

    tensor: str
    spec: TensorSpec
    elem_type: int
    uses: list[Use] = field(default_factory=list)


@dataclass
class WeightPlan:
    """A float initializer to quantize per ``axis`` (None: per tensor) for the consumers listed."""

    tensor: str
    spec: TensorSpec
    axis: int | None
    uses: list[Use] = field(default_factory=list)


@dataclass
class Plan:
    """Everything one calibration quantizes, keyed by tensor name."""

    activations: dict[str, ActivationPlan]
    weights: dict[str, WeightPlan]
    nodes: list[str]
    excluded: list[str]


def _matmul_axis(node: onnx.NodeProto, rank: int) -> int | None:
    return rank - 1 if rank >= 2 else None


def _gemm_axis(node: onnx.NodeProto, rank: int) -> int:
    trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
    return 0 if trans_b else 1


# op type -> (index of the weight input, rule giving its output-channel axis from its rank)
WEIGHT_INPUTS: dict[str, tuple[int, Callable[[onnx.NodeProto, int], int | None]]] = {
    "MatMul": (1, _matmul_axis),
    "Gemm": (1, _gemm_axis),
    "Conv": (1, lambda node, rank: 0),
    "ConvTranspose": (1, lambda node, rank: 1),
}
# op type -> indices of the inputs that are quantized as activations (others stay float)
ACTIVATION_INPUTS: dict[str, tuple[int, ...]] = {
    "MatMul": (0, 1),
    "Gemm": (0, 1),
    "Conv": (0,),
    "ConvTranspose": (0,),
}


def name_nodes(model: onnx.ModelProto) -> None:
    """Name every unnamed node, and every repeat of a name, of the main graph uniquely.

    Explicit first-occurrence names are kept; new names are ``<name or OpType>_<index>``.
    """
    taken = {n.name for n in model.graph.node if n.name}
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        name = f"{node.name or node.op_type}_{i}"
        while name in taken:
            name += "_"
        node.name = name
        taken.add(name)
        seen.add(name)


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor whose type is known after shape inference."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except (onnx.shape_inference.InferenceError, ValueError):
        inferred = model
    graph = inferred.graph
    types = {t.name: t.data_type for t in graph.initializer}
    for info in [*graph.input, *graph.output, *graph.value_info]:
        if info.type.HasField("tensor_type"):
            types[info.name] = info.type.tensor_type.elem_type
    return types


def find_targets(model: onnx.ModelProto, recipe: Recipe) -> Plan:
    """Plan which activations and weights of the main graph get quantized, and how."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    types = tensor_types(model)
    quantized = [n.name for n in graph.node if n.op_type in QUANTIZED_OPS]
    if quantized:
        raise RecipeError(
            f"model is already quantized (nodes {quantized[:3]}...): calibrate the float model"
        )
    plan = Plan({}, {}, [], [])
    for node in graph.node:
        if node.op_type not in recipe.op_types:
            continue
        if recipe.excludes(node.name, node.op_type):
            plan.excluded.append(node.name)
            continue
        act_spec, weight_spec = recipe.specs_for(node.name, node.op_type)
        weight_index, axis_rule = WEIGHT_INPUTS.get(node.op_type, (-1, None))
        added = False
        for index, tensor in enumerate(node.input):
            if not tensor or types.get(tensor) not in FLOAT_TYPES:
                continue
            if tensor in initializers:
                if index == weight_index and weight_spec is not None:
                    rank = len(initializers[tensor].dims)
                    axis = axis_rule(node, rank) if weight_spec.per_channel else None
                    _add_weight(plan, tensor, weight_spec, axis, Use(node.name, index))
                    added = True
            elif act_spec is not None and index in ACTIVATION_INPUTS.get(node.op_type, (index,)):
                _add_activation(plan, tensor, act_spec, types[tensor], Use(node.name, index))
                added = True
        if added:
            plan.nodes.append(node.name)
    return plan


def _add_activation(plan: Plan, tensor: str, spec: TensorSpec, elem_type: int, use: Use) -> None:
    entry = plan.activations.setdefault(tensor, ActivationPlan(tensor, spec, elem_type))
    if entry.spec != spec:
        raise RecipeError(
            f"tensor {tensor!r} feeds node {use.node!r} with spec {spec} but node "
            f"{entry.uses[0].node!r} with {entry.spec}: give both nodes the same activation spec"
        )
    entry.uses.append(use)


def _add_weight(plan: Plan, tensor: str, spec: TensorSpec, axis: int | None, use: Use) -> None:
    entry = plan.weights.setdefault(tensor, WeightPlan(tensor, spec, axis))
    if (entry.spec, entry.axis) != (spec, axis):
        raise RecipeError(
            f"weight {tensor!r} is shared by nodes {entry.uses[0].node!r} and {use.node!r} "
            f"that need different quantization ({entry.spec}, axis {entry.axis} vs {spec}, "
            f"axis {axis}): exclude one or give both the same spec"
        )
    entry.uses.append(use)


def describe_type(elem_type: int) -> str:
    return helper.tensor_dtype_to_string(elem_type).removeprefix("TensorProto.")
