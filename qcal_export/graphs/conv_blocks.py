"""Blocks along the channels of a Conv or ConvTranspose: where its block-format activation's
blocks run (axis 1 of NCHW, any rank), or why the node stays in float."""

from __future__ import annotations

import onnx
from onnx import TensorProto

from qcal_export.graphs.op_inputs import int_attr
from qcal_export.onnx_io.tensor_types import Shape
from qcal_export.spec.formats import get_format
from qcal_export.spec.plan import Blocks
from qcal_export.spec.recipe import TensorSpec

CONV_OPS = frozenset({"Conv", "ConvTranspose"})


def conv_channels(
    node: onnx.NodeProto,
    infos: dict[str, tuple[int, Shape | None]],
    initializers: dict[str, TensorProto],
) -> tuple[int | None, int | None]:
    """(rank, input channel count) of a Conv/ConvTranspose input, from its shape or else from
    the weight initializer (Conv ``[Cout, Cin/group, k...]``, ConvTranspose ``[Cin, Cout/group,
    k...]``, both of the input's rank); None where neither says."""
    shape = infos.get(node.input[0], (None, None))[1]
    rank = len(shape) if shape is not None else None
    channels = shape[1] if shape is not None and len(shape) > 1 else None
    weight = initializers.get(node.input[1]) if len(node.input) > 1 else None
    if weight is not None and len(weight.dims) >= 3:
        rank = rank or len(weight.dims)
        if not isinstance(channels, int):
            group = int_attr(node, "group") or 1
            channels = weight.dims[1] * group if node.op_type == "Conv" else weight.dims[0]
    return rank, channels if isinstance(channels, int) else None


def conv_blocking_problem(
    node: onnx.NodeProto,
    act_spec: TensorSpec | None,
    weight_spec: TensorSpec | None,
    infos: dict[str, tuple[int, Shape | None]],
    initializers: dict[str, TensorProto],
) -> str | None:
    """Why the Conv/ConvTranspose ``node`` cannot have its blocks along the input channels:
    the channel count or rank unknown (block-format activation), or, with ``group`` > 1, blocks
    that would straddle two groups' channels (which no grouped kernel reads as one block);
    None when it can."""
    sizes = []
    if act_spec is not None and get_format(act_spec.format).block_size > 1:
        sizes.append(get_format(act_spec.format).block_size)
        rank, channels = conv_channels(node, infos, initializers)
        if rank is None or channels is None:
            return (
                f"{act_spec.format} activation {node.input[0]!r}: its channel count (axis 1) "
                "or its rank is unknown, so its blocks cannot be placed"
            )
    if weight_spec is not None and weight_spec.block_size and node.op_type == "ConvTranspose":
        sizes.append(weight_spec.block_size)
    group = int_attr(node, "group") or 1
    if group == 1 or not sizes:
        return None
    _, channels = conv_channels(node, infos, initializers)
    per_group = None if channels is None else channels // group
    straddling = [size for size in sizes if per_group is None or per_group % size]
    if not straddling:
        return None
    return (
        f"group={group} with {per_group if per_group is not None else 'unknown'} input "
        f"channel(s) per group: blocks of {straddling[0]} along the channels would straddle "
        "groups"
    )


def conv_activation_blocks(
    node: onnx.NodeProto,
    infos: dict[str, tuple[int, Shape | None]],
    initializers: dict[str, TensorProto],
) -> Blocks:
    """The blocks of a Conv/ConvTranspose input: along axis 1 (the channels), whose count and
    rank ``conv_blocking_problem`` found known."""
    rank, channels = conv_channels(node, infos, initializers)
    return Blocks(1, rank, channels)
