"""NVFP4 and int4 block graphs: the exported DequantizeLinear chains and the in-graph dynamic
activation quantization, run by the ONNX reference evaluator (FP4) or ONNX Runtime (int4),
element for element against the formats' fake-quantization and a float64 brute force."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from qdq_cases import run

from qcal_export.graphs.nvfp4 import insert_activation_nvfp4, quantize_weight_nvfp4
from qcal_export.graphs.qdq import Names, quantize_weight, sort_nodes
from qcal_export.spec.formats import INT4, NVFP4, UINT4
from qcal_export.spec.granularity import PerBlock
from qcal_export.spec.plan import ActivationPlan, Blocks, Use, WeightPlan
from qcal_export.spec.recipe import TensorSpec
from qcal_export.spec.scales import QParams
from qcal_export.validation.reference import ReferenceRunner

FLOAT = TensorProto.FLOAT
E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def e2m1_oracle(y: np.ndarray) -> np.ndarray:
    """Nearest E2M1 value by exhaustive search in float64, ties to the even code, saturating."""
    distance = np.abs(np.abs(y.astype(np.float64))[..., None] - E2M1)
    code = np.argmin(distance + (np.arange(8) % 2) * 1e-12, axis=-1)
    return np.sign(y) * E2M1[code]


def identity_model(shape: list, opset: int = 23, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"], "id")],
        "g",
        [] if initializers else [helper.make_tensor_value_info("x", FLOAT, shape)],
        [helper.make_tensor_value_info("y", FLOAT, shape)],
        initializer=list(initializers),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def weight_params(w: torch.Tensor, axis: int, seed: int) -> QParams:
    """NVFP4 QParams with arbitrary (not default) FP8 block scales, as nvfp4-mse picks them."""
    granularity = PerBlock(axis, 16)
    global_scale = NVFP4.global_scale(w.abs().max())
    stat = granularity.unflatten(
        granularity.groups(w).abs().amax(-1), granularity.stat_shape(tuple(w.shape))
    )
    default = NVFP4.block_scales(stat, global_scale).view(torch.uint8)
    shift = torch.from_numpy(np.random.default_rng(seed).integers(-3, 4, default.shape))
    codes = (default.int() + shift).clamp(1, 126).to(torch.uint8)
    scales = codes.view(torch.float8_e4m3fn).float()
    return QParams(NVFP4, scales, torch.zeros_like(scales), granularity, global_scale)


@pytest.mark.parametrize("mode", ["quantized", "qdq"])
@pytest.mark.parametrize("form", ["portable", "tensorrt"])
@pytest.mark.parametrize(("shape", "axis"), [((40, 24), 0), ((24, 40), 1), ((2, 48, 8), 1)])
def test_weight_chain_equals_brute_force(shape, axis, form, mode):
    w = torch.from_numpy(np.random.default_rng(0).standard_t(3, shape).astype(np.float32))
    model = identity_model(list(shape), initializers=[numpy_helper.from_array(w.numpy(), "x")])
    q = weight_params(w, axis, seed=1)
    plan = WeightPlan("x", TensorSpec(format="nvfp4"), q.granularity, [Use("id", 0)])
    quantize_weight_nvfp4(model.graph, plan, q, mode, Names(model.graph), form)
    sort_nodes(model.graph)
    onnx.checker.check_model(model, full_check=True)
    initializers = {t.name: t for t in model.graph.initializer}
    if mode == "quantized":
        assert "x" not in initializers
        assert initializers["x_quantized"].data_type == TensorProto.FLOAT4E2M1
    assert initializers["x_block_scale"].data_type == TensorProto.FLOAT8E4M3FN
    (got,) = ReferenceEvaluator(model).run(None, {})
    # float64 brute force of the same definition (float32 effective scales and division)
    eff = (q.scale * q.global_scale).numpy().astype(np.float32)
    eff = np.repeat(eff, 16, axis=axis).take(range(shape[axis]), axis=axis)
    want = (e2m1_oracle(w.numpy() / eff) * eff).astype(np.float32)
    np.testing.assert_array_equal(got, want)
    effective = NVFP4.effective_scales(q.scale, q.global_scale)
    expanded = q.granularity.expand(effective, shape)
    np.testing.assert_array_equal(got, NVFP4.round_e2m1(w / expanded) * expanded)


def activation_model(length: int | str, form: str, global_amax: float) -> onnx.ModelProto:
    """x [b, 3, length] -> dynamic NVFP4 Q/DQ (blocks on the last axis) -> Identity."""
    model = identity_model(["b", 3, length])
    known = length if isinstance(length, int) else None
    plan = ActivationPlan(
        "x", TensorSpec(format="nvfp4"), FLOAT, [Use("id", 0)], Blocks(2, 3, known)
    )
    scale = NVFP4.global_scale(torch.tensor(global_amax))
    q = QParams(NVFP4, scale, torch.zeros(()), PerBlock(2, 16), scale)
    insert_activation_nvfp4(model.graph, plan, q, Names(model.graph), form)
    if form == "tensorrt":
        model.opset_import.append(helper.make_opsetid("trt", 1))
    sort_nodes(model.graph)
    return model


@pytest.mark.parametrize("form", ["portable", "tensorrt"])
@pytest.mark.parametrize("length", [48, 40, "k"])
def test_dynamic_activation_quantization_equals_fake_quant(length, form):
    width = 40 if length == "k" else length
    x = np.random.default_rng(2).standard_t(3, (2, 3, width)).astype(np.float32)
    x[0, 0, :16] = 0.0  # an all-zero block keeps the smallest scale and stays zero
    global_amax = float(np.abs(x).max()) * 0.8  # some blocks saturate their FP8 scale
    model = activation_model(length, form, global_amax)
    onnx.checker.check_model(model, full_check=True)
    (got,) = ReferenceRunner(model).run(["y"], {"x": x})
    global_scale = NVFP4.global_scale(torch.tensor(global_amax))
    padded = torch.nn.functional.pad(torch.from_numpy(x), (0, -width % 16))
    want = NVFP4.fake_quant(padded, global_scale, torch.zeros(()))[..., :width]
    np.testing.assert_array_equal(got, want.numpy())
    # float64 brute force: block amax, FP8 rounding by nearest representable, E2M1 by search
    blocks = padded.numpy().reshape(2, 3, -1, 16)
    fp8 = torch.arange(1, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    raw = np.clip(np.abs(blocks).max(-1) / np.float32(6) / global_scale.numpy(), 2.0**-9, 448)
    nearest = fp8[np.abs(raw[..., None].astype(np.float64) - fp8).argmin(-1)]
    eff = (nearest * global_scale.numpy()).astype(np.float32)[..., None]
    brute = (e2m1_oracle(blocks / eff) * eff).reshape(2, 3, -1)[..., :width]
    np.testing.assert_array_equal(got, brute.astype(np.float32))
    assert not got[0, 0, :16].any()


def test_tensorrt_form_is_model_optimizers_op():
    model = activation_model(48, "tensorrt", 3.0)
    quantize, scale_dq, value_dq = (n for n in model.graph.node if n.domain == "trt")
    assert (quantize.op_type, scale_dq.op_type, value_dq.op_type) == (
        "TRT_FP4DynamicQuantize",
        "DequantizeLinear",
        "DequantizeLinear",
    )
    attrs = {a.name: a.i for a in quantize.attribute}
    assert attrs == {"axis": -1, "block_size": 16, "scale_type": TensorProto.FLOAT8E4M3FN}
    assert {a.name: a.i for a in value_dq.attribute} == {"axis": -1, "block_size": 16}
    assert quantize.input[0] == "x" and scale_dq.input[0] == quantize.output[1]
    assert list(value_dq.input) == [quantize.output[0], scale_dq.output[0]]
    global_scale = next(t for t in model.graph.initializer if t.name == quantize.input[1])
    assert numpy_helper.to_array(global_scale) == np.float32(3.0) / np.float32(6 * 448)


@pytest.mark.parametrize("fmt", [INT4, UINT4])
@pytest.mark.parametrize("block", [16, 32])
def test_int4_block_weights_run_in_onnxruntime(fmt, block):
    """Packed INT4/UINT4 -> DequantizeLinear(axis, block_size) at opset 21, in ORT."""
    rng = np.random.default_rng(3)
    w = torch.from_numpy(rng.normal(0, 1, (40, 6)).astype(np.float32))
    w[:, 0] += 1.5  # an asymmetric range for uint4
    granularity = PerBlock(0, block)
    groups = granularity.groups(w)
    stat_shape = granularity.stat_shape(tuple(w.shape))
    amin = granularity.unflatten(groups.amin(-1), stat_shape)
    amax = granularity.unflatten(groups.amax(-1), stat_shape)
    scale, zero_point = fmt.scale_zero_point(amin, amax)
    model = identity_model(
        [40, 6], opset=21, initializers=[numpy_helper.from_array(w.numpy(), "x")]
    )
    plan = WeightPlan("x", TensorSpec(format=fmt.name), granularity, [Use("id", 0)])
    q = QParams(fmt, scale, zero_point, granularity)
    quantize_weight(model.graph, plan, q, "quantized", Names(model.graph))
    sort_nodes(model.graph)
    onnx.checker.check_model(model, full_check=True)
    stored = next(t for t in model.graph.initializer if t.name == "x_quantized")
    assert stored.data_type == fmt.onnx_type and len(stored.raw_data) == 40 * 6 // 2
    expanded = (granularity.expand(scale, (40, 6)), granularity.expand(zero_point, (40, 6)))
    ints = numpy_helper.to_array(stored).astype(np.int64)
    np.testing.assert_array_equal(ints, fmt.quantize(w, *expanded).numpy())
    (got,) = run(model, {})
    np.testing.assert_array_equal(got, fmt.fake_quant(w, *expanded).numpy())
    assert ints.min() >= fmt.qmin and ints.max() <= fmt.qmax
