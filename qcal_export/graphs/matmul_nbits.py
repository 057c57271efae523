"""4-bit block weights of MatMul nodes as ONNX Runtime's ``com.microsoft.MatMulNBits``.

The layout is the contrib op's schema (ONNX Runtime's docs/ContribOperators.md, and the schema
registered in onnxruntime 1.32): ``B`` uint8 ``[N, k_blocks, block_size / 2]``, each block's
codes along K packed two per byte, element ``2i`` in the low nibble; ``scales`` in A's float
type, ``[N * k_blocks]``; ``zero_points`` uint8, packed the same way per row of N,
``[N * ceil(k_blocks / 2)]``, and when absent 8 (``2 ** (bits - 1)``). The op dequantizes
``(code - zero_point) * scale``: a signed int4 code ``q`` is stored as ``q + 8`` with the
default zero point, a uint4 code as it is with its zero point. Flat ``scales`` and
``zero_points`` are what onnxruntime's own ``matmul_nbits_quantizer`` writes.
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx
import torch
from onnx import TensorProto, helper

from qcal_export.graphs.qdq import Names, drop_if_unused, make_tensor, qparams_tag
from qcal_export.onnx_io.initializers import initializer_values
from qcal_export.onnx_io.weights import derived_tensor
from qcal_export.spec.formats import pack_nibbles
from qcal_export.spec.granularity import PerBlock
from qcal_export.spec.plan import Plan, WeightPlan
from qcal_export.spec.scales import QParams, TensorScales

MS_DOMAIN = "com.microsoft"
BITS = 4
DEFAULT_ZERO_POINT = 2 ** (BITS - 1)
"""The zero point MatMulNBits uses when its ``zero_points`` input is absent."""

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16}
"""Float types of A (and of the scales) that onnxruntime's CPU MatMulNBits kernel takes."""


def nbits_unfit(plan: WeightPlan, q: QParams, names: Names) -> str | None:
    """Why the 4-bit weight ``plan`` cannot be a MatMulNBits ``B`` (None: it can): a 2-D
    ``[K, N]`` float32/float16 initializer in 4-bit blocks along K of a power-of-two size of 16
    or more, read only as input 1 of MatMul nodes."""
    init = names.initializer(plan.tensor)
    granularity = q.granularity
    if len(init.dims) != 2:
        return f"a {len(init.dims)}-D weight (MatMulNBits takes a 2-D [K, N] one)"
    if not (isinstance(granularity, PerBlock) and granularity.axis % 2 == 0):
        return f"{granularity.describe()} (MatMulNBits takes blocks along K, axis 0)"
    size = granularity.size
    if size < 16 or size & (size - 1):
        return f"block size {size} (MatMulNBits takes a power of two of 16 or more)"
    if init.data_type not in FLOAT_TYPES:
        return "a weight of a type other than float32 or float16"
    readers = {(names.node(use.node).op_type, use.index) for use in plan.uses}
    if readers != {("MatMul", 1)}:
        return "read by other nodes than as input 1 of a MatMul"
    return None


def quantize_weight_nbits(
    graph: onnx.GraphProto, plan: WeightPlan, q: QParams, names: Names
) -> list[str]:
    """Replace each MatMul reading the weight ``plan`` by a MatMulNBits over its 4-bit codes
    (``nbits_unfit`` said it can); returns the MatMul nodes' names.

    The codes are QuantizeLinear's (``q.fmt.quantize``) of the float weight, so that the op
    dequantizes to exactly the values the QDQ form's DequantizeLinear gives.
    """
    tensor = plan.tensor
    init = names.initializer(tensor)
    k, n = init.dims
    size = q.granularity.size
    blocks = -(-k // size)
    offset = DEFAULT_ZERO_POINT if q.fmt.signed else 0
    packed = names.new(f"{tensor}_nbits")

    def packed_codes() -> TensorProto:
        weight = initializer_values(init).float()
        padded = torch.nn.functional.pad(weight, (0, 0, 0, blocks * size - k))
        shape = tuple(padded.shape)
        scale = q.granularity.expand(q.scale, shape)
        zero_point = q.granularity.expand(q.zero_point, shape)
        codes = q.fmt.quantize(padded, scale, zero_point).to(torch.int16) + offset
        by_row = pack_nibbles(codes.T.reshape(n, blocks, size)).reshape(n, blocks, size // 2)
        return make_tensor(packed, by_row, TensorProto.UINT8)

    tag = f"nbits{qparams_tag(q)}"
    graph.initializer.append(derived_tensor(packed, init, tag, packed_codes))
    inputs = [packed, names.new(f"{tensor}_nbits_scales")]
    graph.initializer.append(make_tensor(inputs[1], q.scale.T.reshape(-1), init.data_type))
    if not q.fmt.symmetric:
        inputs.append(names.new(f"{tensor}_nbits_zero_points"))
        graph.initializer.append(_packed_zero_points(inputs[2], q))
    nodes = list(dict.fromkeys(use.node for use in plan.uses))
    for name in nodes:
        node = names.node(name)  # edited in place: its name and output stay
        a = node.input[0]
        node.op_type, node.domain = "MatMulNBits", MS_DOMAIN
        del node.input[:]
        node.input.extend([a, *inputs])
        attributes = {"K": k, "N": n, "bits": BITS, "block_size": size}
        node.attribute.extend(helper.make_attribute(key, v) for key, v in attributes.items())
    drop_if_unused(graph, init, "quantized", names)
    return nodes


def _packed_zero_points(name: str, q: QParams) -> TensorProto:
    """The zero points ``[k_blocks, N]`` as MatMulNBits packs them: per row of N, two blocks
    a byte (an odd count padded), ``[N * ceil(k_blocks / 2)]``."""
    rows = q.fmt.encode_zero_point(q.zero_point).T
    if rows.shape[1] % 2:
        rows = torch.nn.functional.pad(rows, (0, 1))
    return make_tensor(name, pack_nibbles(rows), TensorProto.UINT8)


def add_ms_domain(model: onnx.ModelProto) -> None:
    """Import the ``com.microsoft`` domain (version 1) once, for MatMulNBits."""
    if not any(entry.domain == MS_DOMAIN for entry in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def write_nbits(
    model: onnx.ModelProto, plan: Plan, scales: Mapping[str, TensorScales], names: Names
) -> tuple[set[str], list[str]]:
    """Each 4-bit block weight of ``plan`` that fits (``nbits_unfit``) as MatMulNBits; returns
    those weights, and a note for each 4-bit weight left to the QDQ form, saying why."""
    written, notes = set(), []
    for tensor, weight in plan.weights.items():
        q = scales[tensor].qparams()
        if not (q.fmt.integer and q.fmt.bits == BITS):
            continue
        unfit = nbits_unfit(weight, q, names)
        if unfit is None:
            quantize_weight_nbits(model.graph, weight, q, names)
            written.add(tensor)
        else:
            notes.append(f"{q.fmt.name} weight {tensor!r} stays QDQ, not MatMulNBits: {unfit}")
    if written:
        add_ms_domain(model)
    return written, notes
