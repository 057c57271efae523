"""Planning block formats on Conv and ConvTranspose: activation blocks along the channels (axis
1) for any rank, from the input's shape or the weight's; a node whose channels are unknown, or
whose blocks would straddle its groups, left in float with a note, the run going on."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcal_export.graphs.targets import find_targets
from qcal_export.spec.granularity import PerBlock
from qcal_export.spec.plan import Blocks
from qcal_export.spec.recipe_options import build_recipe

FLOAT = TensorProto.FLOAT
NVFP4 = build_recipe(None, format="nvfp4")
INT4 = build_recipe(None, format="int4", block_size=16)


def conv_node_model(
    op: str, x_shape: list, w_shape: tuple[int, ...], group: int = 1, weight_input: bool = False
) -> onnx.ModelProto:
    """x -> ``op`` (weight ``w``, an initializer or a graph input) -> y, opset 23."""
    w = numpy_helper.from_array(np.ones(w_shape, np.float32), "w")
    inputs = [helper.make_tensor_value_info("x", FLOAT, x_shape)]
    if weight_input:
        inputs.append(helper.make_tensor_value_info("w", FLOAT, [w_shape[0], "c", 3, 3]))
    graph = helper.make_graph(
        [helper.make_node(op, ["x", "w"], ["y"], "conv", group=group)],
        "g",
        inputs,
        [helper.make_tensor_value_info("y", FLOAT, None)],
        initializer=[] if weight_input else [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


@pytest.mark.parametrize(
    ("op", "x_shape", "w_shape", "blocks", "w_axis"),
    [
        ("Conv", ["n", 20, 5, 5], (8, 20, 3, 3), Blocks(1, 4, 20), 1),
        ("Conv", ["n", 20, 9], (8, 20, 3), Blocks(1, 3, 20), 1),
        ("Conv", ["n", 32, 4, 4, 4], (8, 32, 2, 2, 2), Blocks(1, 5, 32), 1),
        ("Conv", ["n", "c", "h", "w"], (8, 20, 3, 3), Blocks(1, 4, 20), 1),
        ("Conv", None, (8, 20, 3, 3), Blocks(1, 4, 20), 1),
        ("ConvTranspose", ["n", 20, 5, 5], (20, 8, 2, 2), Blocks(1, 4, 20), 0),
        ("ConvTranspose", None, (20, 8, 2, 2), Blocks(1, 4, 20), 0),
    ],
    ids=["conv2d", "conv1d", "conv3d", "symbolic-channels", "no-shape", "convt", "convt-no-shape"],
)
def test_nvfp4_blocks_run_along_the_channels(op, x_shape, w_shape, blocks, w_axis):
    """A channel count or rank the input's shape does not give comes from the weight."""
    plan = find_targets(conv_node_model(op, x_shape, w_shape), NVFP4)
    assert plan.activations["x"].blocks == blocks
    assert plan.weights["w"].granularity == PerBlock(w_axis, 16)
    assert plan.nodes == ["conv"] and plan.skipped == {} and plan.notes == []


def test_a_conv_with_unknown_channels_is_left_float_with_a_note():
    """A weight fed at run time and symbolic input channels: nothing tells the channel count."""
    plan = find_targets(
        conv_node_model("Conv", ["n", "c", 5, 5], (8, 20, 3, 3), weight_input=True), NVFP4
    )
    assert plan.activations == {} and plan.weights == {} and plan.nodes == []
    why = "nvfp4 activation 'x': its channel count (axis 1) or its rank is unknown"
    assert plan.skipped["conv"].startswith(f"Conv 'conv': {why}")
    assert plan.notes == [f"Conv 'conv' left in float: {why}, so its blocks cannot be placed"]


@pytest.mark.parametrize(
    ("op", "recipe", "x_channels", "w_shape", "group", "straddles"),
    [
        ("Conv", NVFP4, 32, (8, 16, 3, 3), 2, False),
        ("Conv", NVFP4, 16, (16, 1, 3, 3), 16, True),  # depthwise
        ("Conv", NVFP4, 40, (8, 20, 3, 3), 2, True),
        ("Conv", INT4, 40, (8, 20, 3, 3), 2, False),  # the weight's axis 1 is one group's
        ("ConvTranspose", INT4, 32, (32, 4, 2, 2), 2, False),
        ("ConvTranspose", INT4, 16, (16, 4, 2, 2), 2, True),
        ("ConvTranspose", NVFP4, 16, (16, 4, 2, 2), 2, True),
    ],
)
def test_grouped_convolutions_keep_blocks_inside_a_group(
    op, recipe, x_channels, w_shape, group, straddles
):
    """Input channel ``c`` is in group ``c // (channels / group)``; a block reaching across two
    groups is no block a grouped kernel reads, so the node stays float."""
    plan = find_targets(conv_node_model(op, ["n", x_channels, 6, 6], w_shape, group), recipe)
    if straddles:
        per_group = x_channels // group
        assert plan.nodes == [] and plan.weights == {}
        assert plan.notes == [
            f"{op} 'conv' left in float: group={group} with {per_group} input channel(s) per "
            "group: blocks of 16 along the channels would straddle groups"
        ]
    else:
        assert plan.nodes == ["conv"] and plan.notes == []
        assert plan.weights["w"].granularity == PerBlock(1 if op == "Conv" else 0, 16)
