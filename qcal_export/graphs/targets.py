"""Find what to quantize: per node, the activation inputs and the weight with its channel axis."""

from __future__ import annotations

import onnx
from onnx import TensorProto

from qcal_export.errors import ModelError, RecipeError
from qcal_export.graphs.conv_blocks import CONV_OPS, conv_activation_blocks, conv_blocking_problem
from qcal_export.graphs.op_inputs import (
    ACTIVATION_INPUTS,
    WEIGHT_INPUTS,
    int_attr,
    is_activation_input,
    weight_problem,
)
from qcal_export.graphs.placement import PLACED_OPS, SENTINEL, GraphView, place_node
from qcal_export.onnx_io.tensor_types import FLOAT_TYPES, Shape, tensor_infos, type_problem
from qcal_export.spec.formats import get_format
from qcal_export.spec.granularity import Granularity, PerAxis, PerBlock, PerTensor
from qcal_export.spec.plan import (
    ActivationPlan,
    Blocks,
    Plan,
    SharedActivation,
    Use,
    WeightPlan,
    add_activation,
    add_weight,
    without_nodes,
)
from qcal_export.spec.recipe import Recipe, TensorSpec

QUANTIZED_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "QLinearMatMul",
    "QLinearConv",
    "MatMulInteger",
    "ConvInteger",
}

__all__ = [
    "ActivationPlan",
    "Blocks",
    "Plan",
    "SharedActivation",
    "Use",
    "WeightPlan",
    "find_targets",
    "name_nodes",
    "skipped_reasons",
    "subgraph_nodes",
    "without_nodes",
]


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


def find_targets(model: onnx.ModelProto, recipe: Recipe) -> Plan:
    """Plan which activations and weights of the main graph get quantized, and how: the inputs
    of the compute ops (and of op types the recipe adds), then what ``recipe.target`` places
    around them and around the ops it knows (``placement``), in graph order.

    An initializer that is also a graph input (``keep_initializers_as_inputs`` exports) is a
    weight like any other: exporters mean it as one, though ONNX lets a run override it.
    """
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    infos = tensor_infos(model)
    _refuse_quantized(graph)
    plan = Plan({}, {}, [], [], subgraph_nodes(graph, set(recipe.op_types) - PLACED_OPS))
    view = GraphView.of(graph, infos)
    if plan.float_subgraph_nodes:
        plan.notes.append(
            f"{len(plan.float_subgraph_nodes)} node(s) inside subgraphs (If/Loop/Scan bodies) "
            f"left in float: {plan.float_subgraph_nodes}; only the main graph is quantized"
        )
    for node in graph.node:
        if node.op_type not in recipe.op_types:
            continue
        if recipe.excludes(node.name, node.op_type):
            plan.excluded.append(node.name)
        elif node.op_type in PLACED_OPS:
            if place_node(plan, node, recipe, view):
                plan.nodes.append(node.name)
        else:
            _plan_compute_node(plan, node, recipe, view, infos, initializers)
    _note_sentinels_and_overridable(plan, graph, recipe)
    return plan


def _refuse_quantized(graph: onnx.GraphProto) -> None:
    quantized = [n.name for n in graph.node if n.op_type in QUANTIZED_OPS]
    if quantized:
        raise ModelError(
            f"model is already quantized (nodes {quantized[:3]}...): calibrate the float model"
        )


def _plan_compute_node(
    plan: Plan,
    node: onnx.NodeProto,
    recipe: Recipe,
    view: GraphView,
    infos: dict[str, tuple[int, Shape | None]],
    initializers: dict[str, TensorProto],
) -> None:
    """Plan one compute node's inputs and what the target places around it; say in ``plan``
    why it stays float, or which of its inputs do."""
    added, why, faults = _plan_node(plan, node, recipe, infos, initializers)
    added = place_node(plan, node, recipe, view) or added
    where = f"{node.op_type} {node.name!r}"
    if not added:
        plan.skipped[node.name] = f"{where}: {'; '.join(why or ['no float input'])}"
    if faults and added:
        plan.notes.append(f"{where}: {'; '.join(faults)}: that input stays float")
        plan.partial[node.name] = "; ".join(faults)
    elif faults:
        plan.notes.append(f"{where} left in float: {'; '.join(faults)}")
    if added:
        plan.nodes.append(node.name)


def _note_sentinels_and_overridable(plan: Plan, graph: onnx.GraphProto, recipe: Recipe) -> None:
    """The plan's closing notes: nodes left without Q/DQ for their sentinel values or as the
    residual stream (``placement_notes``), and weights that are also graph inputs."""
    if plan.sentinel_nodes:
        plan.placement_notes.append(
            f"{len(plan.sentinel_nodes)} node(s) read or write sentinel values (|x| >= "
            f"{SENTINEL:g}, an attention mask's stand-in for -inf): no {recipe.target} Q/DQ "
            f"around them, whose scale would round all other values to zero: "
            f"{plan.sentinel_nodes[:5]}"
        )
    if plan.stream_nodes:
        plan.placement_notes.append(
            f"{len(plan.stream_nodes)} Add node(s) of the residual stream feeding a "
            f"normalization: no {recipe.target} Q/DQ around them (a few channels there are far "
            f"larger than the rest; one scale per tensor would round the others away): "
            f"{plan.stream_nodes[:5]}"
        )
    if plan.half_nodes:
        plan.placement_notes.append(
            f"{len(plan.half_nodes)} float16/bfloat16 node(s): no ort Q/DQ around them beyond "
            f"the compute ops' inputs (ONNX Runtime fuses such Q/DQ into QLinear kernels that "
            f"take float32 scales only, and then cannot load the model): {plan.half_nodes[:5]}"
        )
    overridable = sorted(set(plan.weights) & {value.name for value in graph.input})
    if overridable:
        plan.notes.append(
            f"weight initializer(s) {overridable} are also graph inputs (an export with "
            "keep_initializers_as_inputs): calibrated as constant weights; the quantized model "
            "no longer lists them as inputs"
        )


def _plan_node(
    plan: Plan,
    node: onnx.NodeProto,
    recipe: Recipe,
    infos: dict[str, tuple[int, Shape | None]],
    initializers: dict[str, TensorProto],
) -> tuple[bool, list[str], list[str]]:
    """Add ``node``'s quantizable inputs to ``plan``: (whether any was added, why each input it
    could quantize was left in float, the reasons of those that are no recipe's choice)."""
    act_spec, weight_spec = recipe.specs_for(node.name, node.op_type)
    if node.op_type in CONV_OPS:
        problem = conv_blocking_problem(node, act_spec, weight_spec, infos, initializers)
        if problem is not None:
            return False, [problem], [problem]
    axes = WEIGHT_INPUTS.get(node.op_type)
    added, why, faults = False, [], []
    for index, tensor in enumerate(node.input):
        is_weight = tensor in initializers and axes is not None and index == axes.index
        if not tensor or not (is_weight or is_activation_input(node, index)):
            continue
        elem_type = infos.get(tensor, (None,))[0]
        if elem_type not in FLOAT_TYPES:
            why.append(type_problem(tensor, elem_type))
            if node.op_type in ACTIVATION_INPUTS:
                faults.append(why[-1])
        elif tensor in initializers:
            weight = _weight_plan(node, index, initializers[tensor], weight_spec)
            if weight is None:
                why.append(weight_problem(node, index, tensor, weight_spec))
                if not is_weight and axes is not None:
                    faults.append(why[-1])
                continue
            weight.hessian_input = _hessian_input(node, infos, initializers)
            add_weight(plan, weight)
            added = True
        elif act_spec is None:
            why.append(f"the recipe leaves activations in float (input {index} {tensor!r})")
        else:
            blocks = _activation_blocks(node, index, tensor, act_spec, infos, initializers)
            entry = ActivationPlan(tensor, act_spec, elem_type, blocks=blocks)
            add_activation(plan, entry, Use(node.name, index))
            added = True
    return added, list(dict.fromkeys(why)), list(dict.fromkeys(faults))


def skipped_reasons(plan: Plan, limit: int = 3) -> str:
    """The first ``limit`` of ``plan.skipped``'s reasons, for a one-line error."""
    reasons = list(plan.skipped.values())
    more = f" (and {len(reasons) - limit} more node(s))" if len(reasons) > limit else ""
    return "; ".join(reasons[:limit]) + more


def subgraph_nodes(graph: onnx.GraphProto, op_types: set[str], prefix: str = "") -> list[str]:
    """Nodes of ``op_types`` inside the subgraphs of ``graph``'s nodes, at any depth, named
    ``<owner node>/<attribute>/<node or OpType_index>``."""
    found = []
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else attr.graphs:
                where = f"{prefix}{node.name or node.op_type}/{attr.name}/"
                found += [
                    f"{where}{n.name or f'{n.op_type}_{i}'}"
                    for i, n in enumerate(sub.node)
                    if n.op_type in op_types
                ]
                found += subgraph_nodes(sub, op_types, where)
    return found


def _weight_plan(
    node: onnx.NodeProto, index: int, init: TensorProto, spec: TensorSpec | None
) -> WeightPlan | None:
    """The plan for initializer input ``index`` of ``node`` if it is the op's weight."""
    axes = WEIGHT_INPUTS.get(node.op_type)
    if spec is None or axes is None or index != axes.index:
        return None
    rank = len(init.dims)
    granularity: Granularity = PerTensor()
    if spec.block_size is not None:
        granularity = PerBlock(axes.reduction(node, rank), spec.block_size)
    elif spec.per_channel and axes.channel(node, rank) is not None:
        granularity = PerAxis(axes.channel(node, rank))
    return WeightPlan(
        init.name,
        spec,
        granularity,
        [Use(node.name, index)],
        shape=tuple(init.dims),
        elem_type=init.data_type,
        reduction_axis=axes.reduction(node, rank),
    )


def _hessian_input(
    node: onnx.NodeProto, infos: dict[str, tuple[int, Shape | None]], initializers: dict
) -> str | None:
    """The activation whose last axis is the weight's reduction axis (MatMul A, Gemm A)."""
    if node.op_type not in ("MatMul", "Gemm") or int_attr(node, "transA"):
        return None
    tensor = node.input[0]
    return None if tensor in initializers or tensor not in infos else tensor


def _activation_blocks(
    node: onnx.NodeProto,
    index: int,
    tensor: str,
    spec: TensorSpec,
    infos: dict[str, tuple[int, Shape | None]],
    initializers: dict[str, TensorProto],
) -> Blocks | None:
    """Where the blocks of a block-format activation run (a Conv's: along the channels, which
    ``conv_blocking_problem`` found known); RecipeError if that is unknown."""
    if get_format(spec.format).block_size == 1:
        return None
    if node.op_type in CONV_OPS:
        return conv_activation_blocks(node, infos, initializers)
    rule = ACTIVATION_INPUTS.get(node.op_type, {}).get(index)
    axis = rule(node) if rule else None
    shape = infos.get(tensor, (None, None))[1]
    if axis is None or shape is None or len(shape) < -axis:
        raise RecipeError(
            f"{spec.format} activation {tensor!r} (input {index} of node {node.name!r}): its "
            f"reduction axis or its rank is unknown; exclude the node (or op type {node.op_type})"
        )
    return Blocks(axis % len(shape), len(shape), shape[axis])
