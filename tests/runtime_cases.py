"""The models that ONNX Runtime 1.32's default optimizations fail on or miscompute in their plain
QDQ form, shared by test_validate.py and test_ort_forms.py: the float models, their plain QDQ
forms built here by hand (scales from the data, numpy), and the float64 error of that QDQ math.

(a) MatMul with an 8-bit block-quantized weight, (b) MatMul with a 3-D per-channel weight (both:
ORT's MatMulIntegerToFloat fusion fails at run time), (c) Conv -> Relu -> fp8 Q/DQ -> Conv (ORT's
ReluQuantFusion drops the Relu).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

FLOAT = TensorProto.FLOAT
K, N, BLOCK = 64, 48, 32
CHANNELS = 8


@dataclass
class RuntimeCase:
    """A float model, its plain QDQ form, the batches, and the float64 outputs of both."""

    float_model: onnx.ModelProto
    qdq_model: onnx.ModelProto
    batches: list[dict[str, np.ndarray]]
    float_outputs: list[np.ndarray]
    qdq_outputs: list[np.ndarray]

    def rel_l2(self) -> float:
        """Relative L2 error of the QDQ math over all batches, in float64."""
        pairs = zip(self.float_outputs, self.qdq_outputs, strict=True)
        diff = sum(float(((q - f) ** 2).sum()) for f, q in pairs)
        norm = sum(float((f**2).sum()) for f in self.float_outputs)
        return (diff / norm) ** 0.5


def quantize(values: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, signed: bool):
    """ONNX QuantizeLinear to 8 bits (float32 division, round half to even, saturate)."""
    low, high = (-128, 127) if signed else (0, 255)
    q = np.rint(values.astype(np.float32) / scale.astype(np.float32)) + zero_point
    return np.clip(q, low, high).astype(np.int8 if signed else np.uint8)


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
    return ((q.astype(np.float32) - zero_point.astype(np.float32)) * scale).astype(np.float32)


def qparams(low: np.ndarray, high: np.ndarray, signed: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of a range: symmetric int8, or asymmetric uint8 with 0 in range."""
    if signed:
        scale = np.maximum(np.abs(low), np.abs(high)) / 127
        return scale.astype(np.float32), np.zeros(scale.shape, np.int8)
    low, high = np.minimum(low, 0), np.maximum(high, 0)
    scale = ((high - low) / 255).astype(np.float32)
    return scale, np.clip(np.rint(-low / scale), 0, 255).astype(np.uint8)


def matmul_case(signed: bool, batched_weight: bool) -> RuntimeCase:
    """(a) ``x [b, K] @ w [K, N]`` with w int8/uint8 in blocks of 32 along K; or (b)
    ``x [2, b, K] @ w [2, K, N]`` with w per channel (axis 2). x per tensor, same type."""
    rng = np.random.default_rng(0)
    lead = (2,) if batched_weight else ()
    w = rng.standard_normal((*lead, K, N)).astype(np.float32)
    batches = [{"x": rng.standard_normal((*lead, 4, K)).astype(np.float32)} for _ in range(3)]
    xs = np.stack([b["x"] for b in batches])
    x_scale, x_zero = qparams(xs.min(), xs.max(), signed)
    if batched_weight:
        w_scale, w_zero = qparams(w.min(axis=(0, 1)), w.max(axis=(0, 1)), signed)
        expand = w_scale, w_zero
        attributes = {"axis": 2}
    else:
        blocks = w.reshape(K // BLOCK, BLOCK, N)
        w_scale, w_zero = qparams(blocks.min(axis=1), blocks.max(axis=1), signed)
        expand = np.repeat(w_scale, BLOCK, axis=0), np.repeat(w_zero, BLOCK, axis=0)
        attributes = {"axis": 0, "block_size": BLOCK}
    w_q = quantize(w, *expand, signed)
    x_info = helper.make_tensor_value_info("x", FLOAT, [*lead, "b", K])
    y_info = helper.make_tensor_value_info("y", FLOAT, [*lead, "b", N])
    float_graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], "mm")],
        "matmul",
        [x_info],
        [y_info],
        [numpy_helper.from_array(w, "w")],
    )
    qdq_graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"], "x_q"),
            helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"], "x_dq"),
            helper.make_node(
                "DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w_dq"], "w_dq", **attributes
            ),
            helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"], "mm"),
        ],
        "matmul_qdq",
        [x_info],
        [y_info],
        [
            numpy_helper.from_array(np.float32(x_scale), "x_scale"),
            numpy_helper.from_array(x_zero.reshape(()), "x_zero"),
            numpy_helper.from_array(w_q, "w_q"),
            numpy_helper.from_array(w_scale, "w_scale"),
            numpy_helper.from_array(w_zero, "w_zero"),
        ],
    )
    w_dq = dequantize(w_q, *expand).astype(np.float64)
    float_outputs, qdq_outputs = [], []
    for batch in batches:
        x = batch["x"]
        float_outputs.append(x.astype(np.float64) @ w.astype(np.float64))
        x_dq = dequantize(quantize(x, x_scale, x_zero, signed), x_scale, x_zero)
        qdq_outputs.append(x_dq.astype(np.float64) @ w_dq)
    opset = 17 if batched_weight else 21
    return RuntimeCase(
        model(float_graph, 17), model(qdq_graph, opset), batches, float_outputs, qdq_outputs
    )


def conv_relu_fp8_case() -> RuntimeCase:
    """(c) ``Conv(3 -> 8) -> Relu -> fp8 Q/DQ -> Conv(8 -> 8)``, float weights, the fp8 scale
    from the Relu output's amax over the batches, zero point 0."""
    rng = np.random.default_rng(1)
    w1 = rng.standard_normal((CHANNELS, 3, 3, 3)).astype(np.float32) / 3
    w2 = rng.standard_normal((CHANNELS, CHANNELS, 3, 3)).astype(np.float32) / 8
    b1 = rng.standard_normal(CHANNELS).astype(np.float32) / 4
    batches = [{"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)} for _ in range(3)]
    torch_w = [torch.from_numpy(w).double() for w in (w1, w2)]

    def first(x: np.ndarray) -> torch.Tensor:
        return F.conv2d(
            torch.from_numpy(x).double(), torch_w[0], torch.from_numpy(b1).double(), padding=1
        ).relu()

    amax = max(float(first(b["x"]).max()) for b in batches)
    scale = np.float32(amax / 448)
    conv = {"pads": [1, 1, 1, 1]}
    x_info = helper.make_tensor_value_info("x", FLOAT, ["b", 3, 8, 8])
    y_info = helper.make_tensor_value_info("y", FLOAT, ["b", CHANNELS, 8, 8])
    weights = [
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(b1, "b1"),
        numpy_helper.from_array(w2, "w2"),
    ]
    head = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], "conv1", **conv),
        helper.make_node("Relu", ["c1"], ["r"], "relu"),
    ]
    float_graph = helper.make_graph(
        [*head, helper.make_node("Conv", ["r", "w2"], ["y"], "conv2", **conv)],
        "conv",
        [x_info],
        [y_info],
        weights,
    )
    qdq_graph = helper.make_graph(
        [
            *head,
            helper.make_node("QuantizeLinear", ["r", "r_scale", "r_zero"], ["r_q"], "r_q"),
            helper.make_node("DequantizeLinear", ["r_q", "r_scale", "r_zero"], ["r_dq"], "r_dq"),
            helper.make_node("Conv", ["r_dq", "w2"], ["y"], "conv2", **conv),
        ],
        "conv_qdq",
        [x_info],
        [y_info],
        [
            *weights,
            numpy_helper.from_array(scale, "r_scale"),
            helper.make_tensor("r_zero", TensorProto.FLOAT8E4M3FN, [], [0.0]),
        ],
    )
    float_outputs, qdq_outputs = [], []
    for batch in batches:
        relu = first(batch["x"])
        float_outputs.append(F.conv2d(relu, torch_w[1], padding=1).numpy())
        codes = (relu.float() / torch.tensor(scale)).clamp(-448, 448).to(torch.float8_e4m3fn)
        relu_dq = codes.float() * torch.tensor(scale)
        qdq_outputs.append(F.conv2d(relu_dq.double(), torch_w[1], padding=1).numpy())
    return RuntimeCase(
        model(float_graph, 19), model(qdq_graph, 19), batches, float_outputs, qdq_outputs
    )


def model(graph: onnx.GraphProto, opset: int) -> onnx.ModelProto:
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 10 if opset >= 21 else 9
    onnx.checker.check_model(proto, full_check=True)
    return proto
