"""QDQ forms that ONNX Runtime's default graph optimizations run as written: the same standard
QuantizeLinear/DequantizeLinear math, laid out so that two of ORT's CPU rewrites (through 1.32
at least) that miscompute the plain form do not match it.

Both passes edit ``graph`` in place after Q/DQ insertion and return notes for the report.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qcal_export.graphs.qdq import Names
from qcal_export.spec.formats import get_format
from qcal_export.spec.plan import Plan

EIGHT_BIT = {TensorProto.INT8, TensorProto.UINT8}
SIXTEEN_BIT = {TensorProto.INT16, TensorProto.UINT16}
ZERO_POINT_FREE_OPSET = 21
"""QuantizeLinear takes its output type from ``output_dtype`` instead of a zero point since 21."""


def shield_matmul_weights(graph: onnx.GraphProto, names: Names) -> list[str]:
    """A Reshape to the weight's own shape between an 8-bit weight's DequantizeLinear and its
    MatMul, where ORT's CPU rewrites would compute the MatMul unlike its graph: the weight is
    block-quantized or not 2-D and the other input is dequantized from 8 bits, or the other
    input is dequantized from 16 bits.

    ORT's QDQSelectorActionTransformer turns ``DQ(A), DQ(B) -> MatMul`` into MatMulIntegerToFloat
    (QLinearMatMul with a Q after) whatever B's scale layout; those kernels take per-tensor or
    per-column scales of a 2-D B only, and fail at run time on block scales or a 3-D B. Where A
    is not 8-bit it turns ``DQ(B) -> MatMul`` into MatMulNBits, which at its default accuracy
    level (4) quantizes A to int8: 16-bit activations would lose their 8 extra bits there. With
    the Reshape, B is no DequantizeLinear output and the selectors leave the MatMul alone.
    """
    producers = {out: node for node in graph.node for out in node.output}
    initializers = {t.name: t for t in graph.initializer}
    shielded: dict[int, list[str]] = {8: [], 16: []}
    for node in list(graph.node):
        if node.op_type != "MatMul":
            continue
        a, b = (producers.get(tensor) for tensor in node.input[:2])
        if _stored_type(b, producers, initializers) not in EIGHT_BIT:
            continue
        dims = _stored_dims(b, producers, initializers)
        if dims is None:
            continue
        a_type = _stored_type(a, producers, initializers)
        if a_type in SIXTEEN_BIT:
            shielded[16].append(_reshape_weight(graph, names, node, b.output[0], dims))
        elif a_type in EIGHT_BIT and (len(dims) != 2 or _block_size(b)):
            shielded[8].append(_reshape_weight(graph, names, node, b.output[0], dims))
    notes = []
    if shielded[8]:
        notes.append(
            f"MatMul {shielded[8]}: a Reshape to the weight's own shape follows its "
            "block-quantized or not 2-D 8-bit weight's DequantizeLinear, so that ONNX Runtime's "
            "MatMulIntegerToFloat fusion (per-tensor or per-column 2-D weights only) does not "
            "take the MatMul"
        )
    if shielded[16]:
        notes.append(
            f"MatMul {shielded[16]}: a Reshape to the weight's own shape follows its 8-bit "
            "weight's DequantizeLinear, so that ONNX Runtime's MatMulNBits fusion (which "
            "quantizes the 16-bit activations to int8 at its default accuracy level 4) does not "
            "take the MatMul"
        )
    return notes


def _reshape_weight(
    graph: onnx.GraphProto, names: Names, node: onnx.NodeProto, weight: str, dims: list[int]
) -> str:
    """``weight`` -> Reshape(its own ``dims``) -> ``node``'s input 1; returns ``node``'s name."""
    shape = names.new(f"{weight}_shape")
    reshaped = names.new(f"{weight}_reshaped")
    graph.initializer.append(numpy_helper.from_array(np.array(dims, np.int64), shape))
    graph.node.append(
        helper.make_node("Reshape", [weight, shape], [reshaped], names.new(f"{node.name}_weight"))
    )
    node.input[1] = reshaped
    return node.name


def fp8_after_relu(graph: onnx.GraphProto, plan: Plan) -> list[str]:
    """The planned fp8 activations that a Relu produces."""
    producers = {out: node.op_type for node in graph.node for out in node.output}
    return [
        tensor
        for tensor, activation in plan.activations.items()
        if get_format(activation.spec.format).onnx_type == TensorProto.FLOAT8E4M3FN
        and producers.get(tensor) == "Relu"
    ]


def drop_zero_points(graph: onnx.GraphProto, tensors: list[str]) -> list[str]:
    """The QuantizeLinear of each of ``tensors`` without its zero point (0), its type in
    ``output_dtype`` instead (opset 21).

    ORT's ReluQuantFusion (in Level2_RuleBasedTransformer) drops a Relu before a QuantizeLinear
    whose constant zero point is int8 -128 or uint8 0, and also for any other zero point type:
    fp8 activations then keep their negative values. Without a zero point the rule passes by.
    """
    initializers = {t.name: t for t in graph.initializer}
    changed = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in tensors:
            continue
        if len(node.input) < 3 or node.input[2] not in initializers:
            continue
        node.attribute.append(
            helper.make_attribute("output_dtype", initializers[node.input[2]].data_type)
        )
        del node.input[2]
        changed.append(node.input[0])
    if not changed:
        return []
    return [
        f"fp8 activations {changed} after a Relu: QuantizeLinear without zero point (output_dtype, "
        "opset 21), so that ONNX Runtime's ReluQuantFusion does not drop the Relu"
    ]


def _stored_type(
    dq: onnx.NodeProto | None,
    producers: dict[str, onnx.NodeProto],
    initializers: dict[str, TensorProto],
) -> int | None:
    """The element type a DequantizeLinear reads (from its initializer, or its
    QuantizeLinear's zero point or ``output_dtype``); None for any other node."""
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    source = dq.input[0]
    if source in initializers:
        return initializers[source].data_type
    q = producers.get(source)
    if q is None or q.op_type != "QuantizeLinear":
        return None
    if len(q.input) > 2 and q.input[2] in initializers:
        return initializers[q.input[2]].data_type
    return next((a.i for a in q.attribute if a.name == "output_dtype"), None)


def _stored_dims(
    dq: onnx.NodeProto,
    producers: dict[str, onnx.NodeProto],
    initializers: dict[str, TensorProto],
) -> list[int] | None:
    """The shape of the weight a DequantizeLinear reads (stored quantized, or float behind a
    QuantizeLinear); None where no initializer holds it."""
    source = dq.input[0]
    q = producers.get(source)
    if source not in initializers and q is not None and q.op_type == "QuantizeLinear":
        source = q.input[0]
    weight = initializers.get(source)
    return None if weight is None else list(weight.dims)


def _block_size(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "block_size"), 0)
