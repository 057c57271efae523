"""NVFP4 in the graph: two-level weight dequantization and dynamic activation quantization.

Weights: FLOAT4E2M1 initializer -> ``DequantizeLinear(axis, block_size=16)`` whose scale is
``DequantizeLinear(FP8 block scales, FP32 global scale)``. Activations, portable form (standard
ops, opset 23): block amax by Abs -> Reshape -> ReduceMax, block scale
``fp8(clip(amax / 6 / global_scale))`` by Div -> Clip -> QuantizeLinear(FP8), then
QuantizeLinear -> DequantizeLinear to FLOAT4E2M1 with the dequantized block scales. TensorRT form
(as NVIDIA Model Optimizer writes it): ``trt::TRT_FP4DynamicQuantize(x, global_scale)`` then
``trt::DequantizeLinear`` of the FP8 block scales and of the FP4 values.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from qcal_export.graphs.block_ops import Builder, block_amax
from qcal_export.graphs.qdq import Names, drop_if_unused, make_tensor, qdq_node, rewire
from qcal_export.onnx_io.initializers import initializer_values
from qcal_export.spec.formats import FP8_SUBNORMAL_MIN, NVFP4
from qcal_export.spec.granularity import PerBlock
from qcal_export.spec.plan import ActivationPlan, WeightPlan
from qcal_export.spec.scales import QParams

TRT_DOMAIN = "trt"
TRT_DOMAIN_VERSION = 1
TRT_DYNAMIC_QUANTIZE = "TRT_FP4DynamicQuantize"


def quantize_weight_nvfp4(
    graph: onnx.GraphProto, plan: WeightPlan, q: QParams, mode: str, names: Names, form: str
) -> None:
    """Store the weight as FLOAT4E2M1 behind the two-level DequantizeLinear chain.

    ``mode="qdq"`` keeps the float weight behind QuantizeLinear instead. In the TensorRT form a
    2-D weight blocked along axis 0 (MatMul ``[K, N]``) is stored transposed, blocked along its
    last axis, with a Transpose after the DequantizeLinear, as Model Optimizer writes it.
    """
    tensor = plan.tensor
    init = names.initializer(tensor)
    weight = initializer_values(init).float()
    granularity, block_scales = q.granularity, q.scale.to(torch.float8_e4m3fn)
    transpose = form == "tensorrt" and weight.dim() == 2 and granularity.axis % 2 == 0
    if transpose:
        weight, block_scales = weight.T.contiguous(), block_scales.T.contiguous()
        granularity = PerBlock(-1, granularity.size)
    scale = _block_scale_chain(graph, names, tensor, block_scales, q.global_scale, init.data_type)
    stored = names.new(f"{tensor}_quantized")
    dequantized = names.new(f"{tensor}_dequantized")
    if mode == "quantized":
        effective = NVFP4.effective_scales(block_scales, q.global_scale)
        codes = NVFP4.quantize(weight, granularity.expand(effective, tuple(weight.shape)), None)
        graph.initializer.append(make_tensor(stored, codes, TensorProto.FLOAT4E2M1))
    else:
        source = tensor
        if transpose:
            source = names.new(f"{tensor}_transposed")
            graph.node.append(_transpose(tensor, source, names))
        graph.node.append(
            qdq_node(
                "QuantizeLinear",
                source,
                [scale],
                stored,
                granularity,
                names,
                tensor,
                output_dtype=TensorProto.FLOAT4E2M1,
            )
        )
    graph.node.append(
        qdq_node("DequantizeLinear", stored, [scale], dequantized, granularity, names, tensor)
    )
    if transpose:
        restored = names.new(f"{tensor}_dequantized_transposed")
        graph.node.append(_transpose(dequantized, restored, names))
        dequantized = restored
    rewire(plan.uses, tensor, dequantized, names)
    drop_if_unused(graph, init, mode, names)


def _block_scale_chain(
    graph: onnx.GraphProto,
    names: Names,
    tensor: str,
    block_scales: torch.Tensor,
    global_scale: torch.Tensor,
    float_type: int,
) -> str:
    """Initializers for the FP8 block scales and the global scale, and the DequantizeLinear
    that multiplies them; returns the name of its output (the effective per-block scale)."""
    block_name = names.new(f"{tensor}_block_scale")
    global_name = names.new(f"{tensor}_global_scale")
    graph.initializer.append(make_tensor(block_name, block_scales, TensorProto.FLOAT8E4M3FN))
    graph.initializer.append(make_tensor(global_name, global_scale.reshape(()), float_type))
    effective = names.new(f"{tensor}_scale")
    graph.node.append(
        helper.make_node(
            "DequantizeLinear",
            [block_name, global_name],
            [effective],
            names.new(f"{tensor}_block_scale_DequantizeLinear"),
        )
    )
    return effective


def _transpose(source: str, output: str, names: Names) -> onnx.NodeProto:
    return helper.make_node(
        "Transpose", [source], [output], names.new(f"{source}_Transpose"), perm=[1, 0]
    )


def insert_activation_nvfp4(
    graph: onnx.GraphProto, plan: ActivationPlan, q: QParams, names: Names, form: str
) -> tuple[str, str | None]:
    """Dynamic NVFP4 Q -> DQ of an activation before its planned consumers.

    Returns the name of its global scale initializer, and a note when the TensorRT form was
    asked for but the blocks do not run along the last axis (the only axis
    TRT_FP4DynamicQuantize takes), so the portable form was written.
    """
    tensor, blocks = plan.tensor, plan.blocks
    global_name = names.new(f"{tensor}_global_scale")
    graph.initializer.append(make_tensor(global_name, q.global_scale.reshape(()), plan.elem_type))
    dequantized = names.new(f"{tensor}_dequantized")
    note = None
    if form == "tensorrt" and blocks.axis == blocks.rank - 1:
        nodes = _trt_dynamic(tensor, global_name, dequantized, names)
    else:
        nodes = _portable_dynamic(graph, plan, global_name, dequantized, names)
        if form == "tensorrt":
            note = (
                f"{tensor}: blocks along axis {blocks.axis} of {blocks.rank}, not the last; "
                "written in the portable form"
            )
    rewire(plan.uses, tensor, dequantized, names)
    graph.node.extend(nodes)
    return global_name, note


def _trt_dynamic(tensor: str, global_name: str, output: str, names: Names) -> list[onnx.NodeProto]:
    quantized = names.new(f"{tensor}_fp4")
    block_scales = names.new(f"{tensor}_block_scale")
    effective = names.new(f"{tensor}_scale")
    size = NVFP4.block_size
    return [
        helper.make_node(
            TRT_DYNAMIC_QUANTIZE,
            [tensor, global_name],
            [quantized, block_scales],
            names.new(f"{tensor}_{TRT_DYNAMIC_QUANTIZE}"),
            domain=TRT_DOMAIN,
            axis=-1,
            block_size=size,
            scale_type=TensorProto.FLOAT8E4M3FN,
        ),
        helper.make_node(
            "DequantizeLinear",
            [block_scales, global_name],
            [effective],
            names.new(f"{tensor}_block_scale_DequantizeLinear"),
            domain=TRT_DOMAIN,
        ),
        helper.make_node(
            "DequantizeLinear",
            [quantized, effective],
            [output],
            names.new(f"{tensor}_DequantizeLinear"),
            domain=TRT_DOMAIN,
            axis=-1,
            block_size=size,
        ),
    ]


def _portable_dynamic(
    graph: onnx.GraphProto, plan: ActivationPlan, global_name: str, output: str, names: Names
) -> list[onnx.NodeProto]:
    """Standard-op NVFP4 quantization with block scales computed from each block's amax."""
    tensor, blocks = plan.tensor, plan.blocks
    size, axis = NVFP4.block_size, blocks.axis
    b = Builder(graph, names, tensor, plan.elem_type)
    amax = block_amax(b, blocks, size)
    raw = b.node("Div", [amax, b.const("qmax", np.float32(NVFP4.qmax))], "block_amax_per_qmax")
    raw = b.node("Div", [raw, global_name], "raw_block_scale")
    lo = b.const("scale_min", np.float32(FP8_SUBNORMAL_MIN))
    hi = b.const("scale_max", np.float32(NVFP4.scale_max))
    clipped = b.node("Clip", [raw, lo, hi], "clipped_block_scale")
    unit = b.const("unit_scale", np.float32(1.0))
    fp8_type = TensorProto.FLOAT8E4M3FN
    fp8 = b.node("QuantizeLinear", [clipped, unit], "block_scale", output_dtype=fp8_type)
    effective = b.node("DequantizeLinear", [fp8, global_name], "scale")
    block = {"axis": axis, "block_size": size}
    fp4_type = TensorProto.FLOAT4E2M1
    quantized = b.node("QuantizeLinear", [tensor, effective], "fp4", output_dtype=fp4_type, **block)
    name = names.new(f"{tensor}_DequantizeLinear")
    dequantize = helper.make_node(
        "DequantizeLinear", [quantized, effective], [output], name, **block
    )
    return [*b.nodes, dequantize]


def add_trt_domain(model: onnx.ModelProto) -> None:
    """Import the ``trt`` domain once, for the TensorRT form's custom ops."""
    if not any(entry.domain == TRT_DOMAIN for entry in model.opset_import):
        model.opset_import.append(helper.make_opsetid(TRT_DOMAIN, TRT_DOMAIN_VERSION))
