"""MX weights in the graph: elements in their type behind ``DequantizeLinear(axis, block_size=32)``
with a FLOAT8E8M0 scale (opset 24), the output in the weight's own float type.

``mode="qdq"`` keeps the float weight behind ``QuantizeLinear`` to the element type with the same
E8M0 scale instead.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from qcal_export.graphs.qdq import Names, drop_if_unused, make_tensor, qdq_node, qparams_tag, rewire
from qcal_export.onnx_io.initializers import initializer_values
from qcal_export.onnx_io.weights import derived_tensor
from qcal_export.spec.mx_formats import e8m0_codes
from qcal_export.spec.plan import WeightPlan
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
