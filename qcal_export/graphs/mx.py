"""MX in the graph: weights' elements in their type behind ``DequantizeLinear(axis,
block_size=32)`` with a FLOAT8E8M0 scale (opset 24), the output in the weight's own float type
(``mode="qdq"``: the float weight behind ``QuantizeLinear`` with the same scale instead); and
activations quantized at run time, their E8M0 block scales computed in the graph from each
block's amax by the OCP rule, then QuantizeLinear -> DequantizeLinear with those scales.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from qcal_export.graphs.block_ops import Builder, block_amax
from qcal_export.graphs.qdq import Names, drop_if_unused, make_tensor, qdq_node, qparams_tag, rewire
from qcal_export.onnx_io.initializers import initializer_values
from qcal_export.onnx_io.weights import derived_tensor
from qcal_export.spec.mx_formats import MXFormat, e8m0_codes
from qcal_export.spec.plan import ActivationPlan, WeightPlan
from qcal_export.spec.scales import QParams


def quantize_weight_mx(
    graph: onnx.GraphProto, plan: WeightPlan, q: QParams, mode: str, names: Names
) -> None:
    """Store the weight's elements and E8M0 block scales; rewire its uses to the dequantized
    weight. ``q.scale``: float32 powers of two, one per block (the granularity's shape)."""
    tensor, fmt, gran = plan.tensor, q.fmt, q.granularity
    init = names.initializer(tensor)
    scale = names.new(f"{tensor}_scale")
    codes = e8m0_codes(q.scale).numpy().tobytes()
    graph.initializer.append(
        helper.make_tensor(scale, TensorProto.FLOAT8E8M0, list(q.scale.shape), codes, raw=True)
    )
    stored = names.new(f"{tensor}_quantized")
    dequantized = names.new(f"{tensor}_dequantized")
    if mode == "quantized":

        def quantized() -> TensorProto:
            weight = initializer_values(init)
            expanded = gran.expand(q.scale, tuple(weight.shape))
            return make_tensor(stored, fmt.quantize(weight, expanded, None), fmt.onnx_type)

        graph.initializer.append(derived_tensor(stored, init, qparams_tag(q), quantized))
    else:
        graph.node.append(
            qdq_node(
                "QuantizeLinear",
                tensor,
                [scale],
                stored,
                gran,
                names,
                tensor,
                output_dtype=fmt.onnx_type,
            )
        )
    graph.node.append(
        qdq_node(
            "DequantizeLinear",
            stored,
            [scale],
            dequantized,
            gran,
            names,
            tensor,
            output_dtype=init.data_type,
        )
    )
    rewire(plan.uses, tensor, dequantized, names)
    drop_if_unused(graph, init, mode, names)


def insert_activation_mx(
    graph: onnx.GraphProto, plan: ActivationPlan, fmt: MXFormat, names: Names
) -> None:
    """Dynamic MX Q -> DQ of an activation before its planned consumers: per block of 32 along
    ``plan.blocks``, the E8M0 scale ``2^max(floor(log2(amax)) - emax, -127)`` computed in the
    graph (``mx_block_scale``), the elements cast to the format's type with saturation."""
    tensor = plan.tensor
    b = Builder(graph, names, tensor, plan.elem_type)
    scale = mx_block_scale(b, block_amax(b, plan.blocks, fmt.block_size), fmt.emax)
    block = {"axis": plan.blocks.axis, "block_size": fmt.block_size}
    quantized = b.node(
        "QuantizeLinear",
        [tensor, scale],
        "quantized",
        output_dtype=fmt.onnx_type,
        precision=TensorProto.FLOAT,
        **block,
    )
    dequantized = names.new(f"{tensor}_dequantized")
    rewire(plan.uses, tensor, dequantized, names)
    name = names.new(f"{tensor}_DequantizeLinear")
    graph.node.extend(b.nodes)
    graph.node.append(
        helper.make_node(
            "DequantizeLinear",
            [quantized, scale],
            [dequantized],
            name,
            output_dtype=plan.elem_type,
            **block,
        )
    )


def mx_block_scale(b: Builder, amax: str, emax: int) -> str:
    """The OCP shared scale of each block amax as FLOAT8E8M0: ``Cast(round_mode="down")`` of a
    float is ``2^floor(log2(x))`` (2^-127 for 0 and float32 subnormals), so two such Casts
    around an exact ``* 2^-emax`` give ``2^max(floor(log2(amax)) - emax, -127)``.

    The amax is read in float32 (float16 subnormals are normal there), and an infinite amax is
    made NaN first (``x + (x - x)``): a block holding inf or NaN gets a NaN scale, as the
    reference evaluator's Cast and the OCP reference code give it, where ONNX Runtime's
    saturating Cast would give E8M0's largest value.
    """
    if b.float_type != TensorProto.FLOAT:
        amax = b.node("Cast", [amax], "block_amax_float", to=TensorProto.FLOAT)
    nonfinite = b.node("Sub", [amax, amax], "block_amax_nonfinite")
    amax = b.node("Add", [amax, nonfinite], "block_amax_finite_or_nan")
    e8m0 = TensorProto.FLOAT8E8M0
    power = b.node("Cast", [amax], "block_amax_power", to=e8m0, round_mode="down")
    value = b.node("Cast", [power], "block_amax_power_value", to=TensorProto.FLOAT)
    unit = b.const("element_emax", np.float32(2.0**-emax), TensorProto.FLOAT)
    shifted = b.node("Mul", [value, unit], "block_scale_value")
    return b.node("Cast", [shifted], "block_scale", to=e8m0, round_mode="down")
