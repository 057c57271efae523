"""SmoothQuant-style outlier migration on the ONNX graph: ``X W = (X / s) (s W)``.

For an activation ``X`` feeding MatMul/Gemm nodes with an initializer weight (``[K, N]``, or
``[N, K]`` for Gemm with ``transB=1``), per input channel ``j``:
``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``, the weight maximum taken over every such
consumer's row (or column) ``j``. The weights are scaled by ``s``; ``1 / s`` goes

- into the producing LayerNormalization's scale and bias (normalising over the last axis) when
  every consumer of ``X`` is such a MatMul/Gemm: no new op;
- otherwise into a ``Mul(X, 1 / s)`` in front of the smoothed consumers (a residual Add or
  another consumer keeps the unscaled ``X``).

The float model's outputs are unchanged up to float rounding; the quantizers then see ``X / s``,
whose channels are flatter, and ``s W``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qcal_export.errors import RecipeError
from qcal_export.graphs.qdq import Names, all_nodes, drop_if_unused, sort_nodes

SCALE_RANGE = (1e-5, 1e5)
"""Smoothing factors are clamped to this range (dead channels would give 0 or infinity)."""


@dataclass
class Smoothable:
    """A consumer of ``X`` that can take the factors: the node, its weight and the weight
    axis that runs along ``X``'s channels."""

    node: onnx.NodeProto
    weight: str
    axis: int


def smoothable_consumer(node: onnx.NodeProto, tensor: str, weights: dict) -> Smoothable | None:
    """``node`` as a Smoothable consumer of ``tensor``, or None."""
    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[0] != tensor:
        return None
    weight = weights.get(node.input[1])
    if weight is None or len(weight.dims) != 2:
        return None
    attrs = {a.name: a.i for a in node.attribute}
    if node.op_type == "Gemm" and attrs.get("transA", 0):
        return None
    return Smoothable(
        node, weight.name, 1 if node.op_type == "Gemm" and attrs.get("transB", 0) else 0
    )


def smoothing_groups(model: onnx.ModelProto) -> dict[str, list[Smoothable]]:
    """Per activation tensor, its consumers that can take smoothing factors."""
    weights = {t.name: t for t in model.graph.initializer}
    groups: dict[str, list[Smoothable]] = {}
    for node in model.graph.node:
        if node.input and node.input[0] and node.input[0] not in weights:
            found = smoothable_consumer(node, node.input[0], weights)
            if found is not None:
                groups.setdefault(node.input[0], []).append(found)
    return groups


def smooth_model(
    model: onnx.ModelProto, act_amax: dict[str, np.ndarray], alpha: float
) -> tuple[onnx.ModelProto, list[str]]:
    """A smoothed copy of ``model`` (``act_amax``: per-channel max |X| of each group's
    activation, float ``[K]``) and a note per smoothed activation."""
    if not 0.0 < alpha < 1.0:
        raise RecipeError(f"smoothing alpha must lie in (0, 1), not {alpha}")
    smoothed = onnx.ModelProto()
    smoothed.CopyFrom(model)
    graph = smoothed.graph
    weights = {t.name: t for t in graph.initializer}
    names = Names(graph)
    notes = []
    replaced = set()
    for tensor, consumers in smoothing_groups(smoothed).items():
        if tensor not in act_amax:
            continue
        arrays = [numpy_helper.to_array(weights[c.weight]) for c in consumers]
        factors = _factors(act_amax[tensor], consumers, arrays, alpha, tensor)
        for consumer, array in zip(consumers, arrays, strict=True):
            shape = [-1, 1] if consumer.axis == 0 else [1, -1]
            scaled = (array * factors.reshape(shape)).astype(array.dtype)
            name = names.new(f"{consumer.weight}_smoothed")
            graph.initializer.append(numpy_helper.from_array(scaled, name))
            consumer.node.input[1] = name
            replaced.add(consumer.weight)
        how = _fold_into_layernorm(graph, tensor, consumers, factors, weights, names, replaced)
        if how is None:
            how = _insert_mul(graph, tensor, consumers, factors, names, arrays[0].dtype)
        notes.append(f"smoothed {tensor} (alpha {alpha:g}, {len(consumers)} consumers): {how}")
    for name in replaced:
        drop_if_unused(graph, weights[name], "quantized")
    sort_nodes(graph)
    return smoothed, notes


def _factors(amax, consumers, arrays, alpha, tensor) -> np.ndarray:
    channels = np.asarray(amax, dtype=np.float64).reshape(-1)
    weight_max = np.zeros_like(channels)
    for consumer, array in zip(consumers, arrays, strict=True):
        if array.shape[consumer.axis] != channels.size:
            raise RecipeError(
                f"smoothing {tensor}: {channels.size} channels, but weight {consumer.weight} "
                f"has {array.shape[consumer.axis]} along axis {consumer.axis}"
            )
        other = 1 - consumer.axis
        weight_max = np.maximum(weight_max, np.abs(array.astype(np.float64)).max(axis=other))
    low, high = SCALE_RANGE
    a = np.maximum(channels, low) ** alpha
    w = np.maximum(weight_max, low) ** (1.0 - alpha)
    return np.clip(a / w, low, high)


def _fold_into_layernorm(graph, tensor, consumers, factors, weights, names, replaced):
    """Divide the producing LayerNormalization's scale and bias by the factors, if it
    normalises over the last axis and ``tensor`` has no other consumer."""
    users = [n for n in all_nodes(graph) if tensor in n.input]
    producer = next((n for n in graph.node if tensor in n.output), None)
    if producer is None or producer.op_type != "LayerNormalization" or len(users) != len(consumers):
        return None
    if any(o.name == tensor for o in graph.output):
        return None
    axis = next((a.i for a in producer.attribute if a.name == "axis"), -1)
    params = [name for name in producer.input[1:3] if name]
    if axis != -1 or any(p not in weights for p in params) or producer.output[0] != tensor:
        return None
    for slot, name in enumerate(producer.input[1:3], start=1):
        if not name:
            continue
        values = numpy_helper.to_array(weights[name])
        folded = (values / factors).astype(values.dtype)
        new = names.new(f"{name}_smoothed")
        graph.initializer.append(numpy_helper.from_array(folded, new))
        producer.input[slot] = new
        replaced.add(name)
    return f"folded into LayerNormalization {producer.name}"


def _insert_mul(graph, tensor, consumers, factors, names, dtype) -> str:
    inverse = numpy_helper.from_array(
        (1.0 / factors).astype(dtype), names.new(f"{tensor}_unsmooth")
    )
    graph.initializer.append(inverse)
    out = names.new(f"{tensor}_smoothed")
    mul = helper.make_node("Mul", [tensor, inverse.name], [out], name=names.new(f"{out}/Mul"))
    for consumer in consumers:
        consumer.node.input[0] = out
    graph.node.append(mul)
    return f"Mul {mul.name} in front of the consumers"
