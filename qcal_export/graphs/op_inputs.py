"""Which inputs of each quantized op are its weight and its activations, with their axes: the
weight's output-channel and reduction axes, each activation's reduction axis."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx

from qcal_export.spec.recipe import TensorSpec


def int_attr(node: onnx.NodeProto, name: str) -> int:
    """The int attribute ``name`` of ``node``; 0 where it is absent (transA/transB's default)."""
    return next((a.i for a in node.attribute if a.name == name), 0)


@dataclass(frozen=True)
class WeightAxes:
    """Index of an op's weight input and, from the node and the weight's rank, its
    output-channel axis and its reduction (input-channel) axis; None where there is none."""

    index: int
    channel: Callable[[onnx.NodeProto, int], int | None]
    reduction: Callable[[onnx.NodeProto, int], int | None]


WEIGHT_INPUTS: dict[str, WeightAxes] = {
    "MatMul": WeightAxes(
        1, lambda n, r: r - 1 if r >= 2 else None, lambda n, r: r - 2 if r >= 2 else 0
    ),
    "Gemm": WeightAxes(
        1, lambda n, r: 0 if int_attr(n, "transB") else 1, lambda n, r: int_attr(n, "transB")
    ),
    "Conv": WeightAxes(1, lambda n, r: 0, lambda n, r: 1),
    "ConvTranspose": WeightAxes(1, lambda n, r: 1, lambda n, r: 0),
}


# op type -> {index of an input quantized as an activation: its reduction axis (negative, from
# the end; None: unknown here, as for Conv's channels, which graphs/conv_blocks.py finds)};
# other inputs stay float
ACTIVATION_INPUTS: dict[str, dict[int, Callable[[onnx.NodeProto], int | None]]] = {
    "MatMul": {0: lambda n: -1, 1: lambda n: -2},
    "Gemm": {
        0: lambda n: -2 if int_attr(n, "transA") else -1,
        1: lambda n: -1 if int_attr(n, "transB") else -2,
    },
    "Conv": {0: lambda n: None},
    "ConvTranspose": {0: lambda n: None},
}


def is_activation_input(node: onnx.NodeProto, index: int) -> bool:
    """Whether input ``index`` of ``node`` is quantized as an activation (any input of an op
    without rules in ``ACTIVATION_INPUTS``)."""
    rules = ACTIVATION_INPUTS.get(node.op_type)
    return rules is None or index in rules


def weight_problem(node: onnx.NodeProto, index: int, tensor: str, spec: TensorSpec | None) -> str:
    """Why initializer ``tensor`` (input ``index`` of ``node``) is not quantized as a weight."""
    axes = WEIGHT_INPUTS.get(node.op_type)
    if axes is None:
        return f"initializer {tensor!r} (input {index}): {node.op_type} has no weight input"
    if index != axes.index:
        return (
            f"initializer {tensor!r} is input {index}, but {node.op_type} weights are "
            f"quantized on input {axes.index} only"
        )
    return f"the recipe leaves weights in float ({tensor!r})"


COMPUTE_OPS = frozenset(WEIGHT_INPUTS)
"""Ops with a weight: every target quantizes their weight and activation inputs."""


@dataclass(frozen=True)
class Placement:
    """Where a deployment target places Q/DQ around the ops beyond the compute ops' inputs.

    ``all_inputs``: ops whose integer kernel reads every float input quantized (a constant one
    quantized per tensor like a weight); ``own_output``: ops whose integer kernel writes a
    quantized output, with its own scale; ``share_output``: data-movement ops whose output keeps
    input 0's scale once input 0 is quantized (no requantization); ``share_split``: ops whose
    input 0 is quantized and whose outputs all share its scale; ``constant_data``: ops whose
    input 0 is quantized when it is a constant (an embedding table), the output sharing it;
    ``residual``: Adds whose inputs not produced by a conv get quantized (TensorRT fuses the
    Add into that conv); ``pooling``: ops whose input 0 is quantized.
    """

    all_inputs: frozenset[str] = frozenset()
    own_output: frozenset[str] = frozenset()
    share_output: frozenset[str] = frozenset()
    share_split: frozenset[str] = frozenset()
    constant_data: frozenset[str] = frozenset()
    residual: frozenset[str] = frozenset()
    pooling: frozenset[str] = frozenset()


_ELEMENTWISE = frozenset(
    {"Add", "Mul", "Concat", "Sigmoid", "LeakyRelu", "Softmax", "GlobalAveragePool"}
)
_POOLING = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool"})

PLACEMENTS: dict[str, Placement] = {
    "ort": Placement(
        all_inputs=_ELEMENTWISE,
        own_output=COMPUTE_OPS | _ELEMENTWISE,
        share_output=frozenset(
            {"MaxPool", "AveragePool", "Resize", "Transpose", "Reshape", "Squeeze", "Unsqueeze"}
            | {"Flatten", "Slice", "Gather"}
        ),
        share_split=frozenset({"Split"}),
        constant_data=frozenset({"Gather"}),
    ),
    "tensorrt": Placement(residual=frozenset({"Add"}), pooling=_POOLING),
}
"""ONNX Runtime's QDQ quantizer marks (its op registry: the QLinear and QDQ-fused kernels);
TensorRT's Q/DQ placement recommendations, which Model Optimizer's ONNX quantization follows."""

CONV_PRODUCERS = frozenset({"Conv", "ConvTranspose"})
"""Ops whose output TensorRT fuses a following residual Add into (through a BatchNormalization)."""
