"""SmoothQuant-style outlier migration on the ONNX graph: ``X W = (X / s) (s W)``.

For an activation ``X`` feeding MatMul/Gemm nodes with an initializer weight (``[K, N]``, or
``[N, K]`` for Gemm with ``transB=1``), per input channel ``j``:
``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``, the weight maximum taken over every such
consumer's row (or column) ``j``. The weights are scaled by ``s``; ``1 / s`` goes

- into the producer when every reader of ``X`` takes the factors: a LayerNormalization's scale
  and bias (normalising over the last axis), or a MatMul/Gemm's weight along its output
  channels (and its bias, also through an Add of one): no new op;
- otherwise into a ``Mul(X, 1 / s)`` in front of the smoothed consumers (a residual Add or
  another consumer keeps the unscaled ``X``).

The float model's outputs are unchanged up to float rounding; the quantizers then see ``X / s``,
whose channels are flatter, and ``s W``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qcal_export.errors import RecipeError
from qcal_export.graphs.qdq import Names, all_nodes, drop_if_unused, sort_nodes
from qcal_export.onnx_io.weights import store_embedded, to_array

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

    def rule(tensor, consumers, current):
        if tensor not in act_amax:
            return None
        arrays = [current(c) for c in consumers]
        return consumers, _factors(act_amax[tensor], consumers, arrays, alpha, tensor)

    smoothed, folds = fold_factors(model, rule)
    notes = [
        f"smoothed {tensor} (alpha {alpha:g}, {count} consumers): {how}"
        for tensor, count, how in folds
    ]
    return smoothed, notes


FactorRule = Callable[
    [str, list[Smoothable], Callable[[Smoothable], np.ndarray]],
    tuple[list[Smoothable], np.ndarray] | None,
]
"""Given an activation, its smoothable consumers and their weights' current values, the
consumers to scale and the factors ``s`` (``[K]``), or None to leave it."""


def fold_factors(
    model: onnx.ModelProto, rule: FactorRule
) -> tuple[onnx.ModelProto, list[tuple[str, int, str]]]:
    """A copy of ``model`` with ``X W = (X / s) (s W)`` applied where ``rule`` gives factors
    (smoothing, AWQ): ``s W`` into the consumers' weights, ``1 / s`` folded into the producer
    or a Mul; per activation folded, (tensor, consumers, how)."""
    smoothed = onnx.ModelProto()
    smoothed.CopyFrom(model)
    graph = smoothed.graph
    weights = {t.name: t for t in graph.initializer}
    replace = _Replacer(graph, weights, Names(graph))
    folds = []
    for tensor, found in smoothing_groups(smoothed).items():
        # A weight an earlier group changed (this consumer produced its activation) counts
        # as it now is: the current input, not the name found at the start.
        chosen = rule(tensor, found, lambda c: to_array(weights[c.node.input[1]]))
        if chosen is None:
            continue
        consumers, factors = chosen
        dtype = to_array(weights[consumers[0].node.input[1]]).dtype
        for consumer in consumers:
            shape = [-1, 1] if consumer.axis == 0 else [1, -1]
            replace(consumer.node, 1, partial(np.multiply, factors.reshape(shape)))
        how = _fold(graph, tensor, consumers, factors, weights, replace)
        if how is None:
            how = _insert_mul(graph, tensor, consumers, factors, replace.names, dtype)
        folds.append((tensor, len(consumers), how))
    for name in replace.replaced:
        drop_if_unused(graph, weights[name], "quantized", replace.names)
    sort_nodes(graph)
    store_embedded(smoothed)
    return smoothed, folds


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


def _fold(graph, tensor, consumers, factors, weights, replace) -> str | None:
    """Divide the producer's parameters by the factors where ``tensor`` is read only by the
    smoothed consumers: a LayerNormalization over the last axis (scale and bias), or a
    MatMul/Gemm with a weight (its output channels), possibly through an Add of a bias."""
    if not _only_read_by(graph, tensor, len(consumers)):
        return None
    producer = _producer(graph, tensor)
    if producer is None:
        return None
    if producer.op_type == "LayerNormalization":
        axis = next((a.i for a in producer.attribute if a.name == "axis"), -1)
        params = [(slot, n) for slot, n in enumerate(producer.input[1:3], start=1) if n]
        if axis != -1 or any(n not in weights for _, n in params):
            return None
        for slot, _ in params:
            replace(producer, slot, lambda v: v / factors)
        return f"folded into LayerNormalization {producer.name}"
    if producer.op_type == "Add":
        bias = next((i for i, n in enumerate(producer.input) if n in weights), None)
        if bias is None or _channels(weights[producer.input[bias]]) != factors.size:
            return None
        matmul = _producer(graph, producer.input[1 - bias])
        if matmul is None or not _only_read_by(graph, matmul.output[0], 1):
            return None
        if not _fold_into_matmul(matmul, factors, weights, replace):
            return None
        replace(producer, bias, lambda v: v / factors.reshape(v.shape))
        return f"folded into {matmul.op_type} {matmul.name} and the bias of {producer.name}"
    if _fold_into_matmul(producer, factors, weights, replace):
        return f"folded into {producer.op_type} {producer.name}"
    return None


def _fold_into_matmul(node, factors, weights, replace) -> bool:
    """Divide a MatMul/Gemm's weight (and a Gemm's bias) along its output channels."""
    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
        return False
    weight = weights.get(node.input[1])
    attrs = {a.name: a.i for a in node.attribute}
    if weight is None or len(weight.dims) != 2 or node.input[0] in weights:
        return False
    axis = 0 if node.op_type == "Gemm" and attrs.get("transB", 0) else 1
    bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 else ""
    if weight.dims[axis] != factors.size:
        return False
    if bias and (bias not in weights or _channels(weights[bias]) != factors.size):
        return False
    shape = [-1, 1] if axis == 0 else [1, -1]
    replace(node, 1, lambda v: v / factors.reshape(shape))
    if bias:
        replace(node, 2, lambda v: v / factors.reshape(v.shape))
    return True


class _Replacer:
    """Replaces a node's initializer input by a transformed copy (other readers keep the
    original, dropped at the end if nothing reads it any more); ``weights`` follows."""

    def __init__(self, graph, weights, names):
        self.graph, self.weights, self.names = graph, weights, names
        self.replaced: set[str] = set()

    def __call__(self, node, slot, transform) -> None:
        name = node.input[slot]
        values = to_array(self.weights[name])
        new = self.names.new(f"{name.removesuffix('_smoothed')}_smoothed")
        changed = transform(values.astype(np.float64)).astype(values.dtype)
        tensor = numpy_helper.from_array(changed, new)
        self.graph.initializer.append(tensor)
        self.weights[new] = tensor
        node.input[slot] = new
        self.replaced.add(name)


def _only_read_by(graph, tensor: str, count: int) -> bool:
    """Whether ``count`` nodes read ``tensor`` (subgraphs included) and it is no graph output."""
    readers = sum(tensor in n.input for n in all_nodes(graph))
    return readers == count and all(o.name != tensor for o in graph.output)


def _producer(graph, tensor: str):
    return next((n for n in graph.node if tensor in n.output), None)


def _channels(init) -> int:
    """Entries of a bias-like initializer whose dims are all 1 but the last; 0 otherwise."""
    dims = list(init.dims)
    return dims[-1] if dims and all(d == 1 for d in dims[:-1]) else 0


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
