"""The ops that compute an activation's block amax in the graph (Abs -> Pad -> Reshape ->
ReduceMax), for the formats whose block scales the graph computes at run time (NVFP4, MX).

Shapes: ``x`` of rank r, blocks of ``size`` along ``axis``; the amax has ``x``'s shape with
``shape[axis]`` replaced by ``ceil(shape[axis] / size)`` (a partial last block padded with 0).
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from qcal_export.graphs.qdq import Names, make_tensor
from qcal_export.spec.plan import Blocks


class Builder:
    """Appends nodes and constants named after one tensor; ``node`` returns the output name."""

    def __init__(self, graph: onnx.GraphProto, names: Names, tensor: str, float_type: int):
        self.graph, self.names, self.tensor, self.float_type = graph, names, tensor, float_type
        self.nodes: list[onnx.NodeProto] = []

    def const(self, base: str, values: np.ndarray | float, elem_type: int | None = None) -> str:
        name = self.names.new(f"{self.tensor}_{base}")
        elem_type = self.float_type if elem_type is None else elem_type
        self.graph.initializer.append(make_tensor(name, torch.as_tensor(values), elem_type))
        return name

    def ints(self, base: str, values: list[int]) -> str:
        return self.const(base, np.array(values, dtype=np.int64), TensorProto.INT64)

    def node(self, op: str, inputs: list[str], base: str, **attributes: int | str) -> str:
        out = self.names.new(f"{self.tensor}_{base}")
        name = self.names.new(f"{self.tensor}_{op}")
        self.nodes.append(helper.make_node(op, inputs, [out], name, **attributes))
        return out


def block_amax(b: Builder, blocks: Blocks, size: int) -> str:
    """The abs-max of each block of ``size`` of ``b.tensor`` along ``blocks.axis``, in its
    float type; dynamic shapes read with Shape, a partial last block padded with zeros."""
    axis = blocks.axis
    source = b.node("Abs", [b.tensor], "abs")
    pads = block_padding(b, blocks, source, size)
    if pads is not None:
        source = b.node("Pad", [source, pads], "padded")
    head = b.node("Shape", [source], "head_shape", end=axis)
    tail = b.node("Shape", [source], "tail_shape", start=axis + 1)
    shape = b.node("Concat", [head, b.ints("block_dims", [-1, size]), tail], "block_shape", axis=0)
    grouped = b.node("Reshape", [source, shape], "blocks")
    return b.node(
        "ReduceMax", [grouped, b.ints("block_axis", [axis + 1])], "block_amax", keepdims=0
    )


def block_padding(b: Builder, blocks: Blocks, source: str, size: int) -> str | None:
    """The Pad ``pads`` input that makes the blocks' axis a multiple of ``size``: a constant
    when its length is static (None when no padding is needed), else computed from Shape."""
    rank, axis = blocks.rank, blocks.axis
    if blocks.length is not None:
        pad = -blocks.length % size
        if not pad:
            return None
        pads = [0] * (2 * rank)
        pads[rank + axis] = pad
        return b.ints("pads", pads)
    length = b.node("Shape", [source], "length", start=axis, end=axis + 1)
    block = b.ints("block_size", [size])
    short = b.node("Sub", [block, b.node("Mod", [length, block], "remainder")], "short")
    pad = b.node("Mod", [short, block], "pad")
    before, after = (
        b.ints("pads_before", [0] * (rank + axis)),
        b.ints("pads_after", [0] * (rank - axis - 1)),
    )
    return b.node("Concat", [before, pad, after], "pads", axis=0)
