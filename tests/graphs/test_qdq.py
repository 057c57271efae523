"""QDQ export against ONNX Runtime: the exported model computes what the calibrated formats say.

The oracle is float32 torch: fake-quantize the activation (per tensor) and the weight (per axis
on the planned axis, or per tensor) with the same scales and zero points, then apply the op. The
exported model runs in a real onnxruntime session (CPUExecutionProvider) and must agree to a few
float32 ulps per accumulated term.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from qdq_cases import (
    ATOL,
    FLOAT,
    RTOL,
    broadcast,
    count,
    initializers,
    make_case,
    make_model,
    plan_and_scales,
    recipe_for,
    run,
    tensor_scales,
)

from qcal_export.graphs.export import export_qdq
from qcal_export.graphs.targets import find_targets
from qcal_export.spec.formats import FORMATS
from qcal_export.spec.recipe import Override, Recipe, TensorSpec

# export against the torch oracle ----------------------------------------------------------------

OPS = ["MatMul", "Gemm0", "Gemm1", "Conv", "ConvTranspose"]
PLANNED_AXIS = {"MatMul": 1, "Gemm0": 1, "Gemm1": 0, "Conv": 0, "ConvTranspose": 1}


@pytest.mark.parametrize("mode", ["quantized", "qdq"])
@pytest.mark.parametrize("per_channel", [True, False], ids=["per-axis", "per-tensor"])
@pytest.mark.parametrize("fmt_name", ["int8", "uint8", "fp8"])
@pytest.mark.parametrize("op", OPS)
def test_export_equals_fake_quant_oracle(op, fmt_name, per_channel, mode):
    case = make_case(op)
    fmt = FORMATS[fmt_name]
    plan, scales, axis = plan_and_scales(case, recipe_for(fmt_name, per_channel, mode))
    assert axis == (PLANNED_AXIS[op] if per_channel else None)
    (y_float,) = run(case.model, {"x": case.x})

    result = export_qdq(case.model, plan, scales, mode)
    qdq = result.model
    onnx.checker.check_model(qdq, full_check=True)
    (y,) = run(qdq, {"x": case.x})

    s_x, s_w = scales["x"], scales["w"]
    xq = fmt.fake_quant(torch.from_numpy(case.x), s_x.scale, s_x.zero_point)
    w = torch.from_numpy(case.w)
    w_scale = broadcast(s_w.scale, axis, w.ndim)
    w_zero_point = broadcast(s_w.zero_point, axis, w.ndim)
    wq = fmt.fake_quant(w, w_scale, w_zero_point)
    expected = case.apply(xq, wq).numpy()
    assert y.shape == expected.shape == y_float.shape
    np.testing.assert_allclose(y, expected, rtol=RTOL, atol=ATOL)
    # the oracle is not the float model: quantization visibly changed the output
    assert np.abs(y - y_float).max() > 100 * ATOL
    # the shrunk activation range saturates: values beyond it are clipped
    assert (xq.abs() < torch.from_numpy(np.abs(case.x))).any()

    # opset: fp8 needs 19; int formats are fine at 17, per axis or not
    assert result.opset_from == 17
    assert result.opset_to == (19 if fmt_name == "fp8" else 17)
    assert qdq.opset_import[0].version == result.opset_to

    inits = initializers(qdq)
    assert count(qdq, "DequantizeLinear") == 2
    dq_w = next(n for n in qdq.graph.node if n.output[0] == "w_dequantized")
    assert [a.i for a in dq_w.attribute if a.name == "axis"] == ([] if axis is None else [axis])
    assert inits[dq_w.input[1]].data_type == FLOAT
    assert int(np.prod(inits[dq_w.input[1]].dims)) == s_w.scale.numel()
    assert inits[dq_w.input[2]].data_type == fmt.onnx_type
    if mode == "quantized":
        assert count(qdq, "QuantizeLinear") == 1
        assert "w" not in inits
        stored = inits[dq_w.input[0]]
        assert stored.data_type == fmt.onnx_type
        assert list(stored.dims) == list(case.w.shape)
        expected_bytes = fmt.quantize(w, w_scale, w_zero_point).view(torch.uint8).numpy()
        assert numpy_helper.to_array(stored).tobytes() == expected_bytes.tobytes()
    else:
        assert count(qdq, "QuantizeLinear") == 2
        assert inits["w"].data_type == FLOAT
        q_w = next(n for n in qdq.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "w")
        assert q_w.output[0] == dq_w.input[0]
    for name in ("w", "bias"):
        if name in inits:
            assert inits[name].data_type == FLOAT
    if case.bias is not None:
        assert np.array_equal(numpy_helper.to_array(inits["bias"]), case.bias)
        assert qdq.graph.node[-1].input[2] == "bias"  # bias untouched, no DQ in front


@pytest.mark.parametrize("fmt_name", ["int8", "uint8", "fp8"])
def test_scale_and_zero_point_have_the_export_shape(fmt_name):
    """Exposes a bug: qdq.py ``make_tensor`` ends in ``np.ascontiguousarray(array)``, which
    returns at least 1-D, so a per-tensor scale (shape []) is written with dims [1].

    ONNX wants a scalar scale for per-tensor Q/DQ (and the design says the ONNX scale shape of
    per-tensor is []); worse, for fp8 the zero point (written raw) keeps dims [] while its scale
    gets [1], so scale and zero point of one DequantizeLinear differ in shape.
    """
    case = make_case("Gemm1")
    plan, scales, _ = plan_and_scales(case, recipe_for(fmt_name, True))
    qdq = export_qdq(case.model, plan, scales, "quantized").model
    dims = {t.name: list(t.dims) for t in qdq.graph.initializer}
    assert (dims["w_scale"], dims["w_zero_point"]) == ([6], [6])
    assert (dims["x_scale"], dims["x_zero_point"]) == ([], [])


@pytest.mark.parametrize("fmt_name", ["int8", "uint8", "fp8"])
@pytest.mark.parametrize("op", ["MatMul", "Conv"])
def test_quantized_and_qdq_weights_give_the_same_output(op, fmt_name):
    """QuantizeLinear in ORT and fmt.quantize store the same values: outputs are bit-equal."""
    case = make_case(op, seed=1)
    outputs = []
    for mode in ("quantized", "qdq"):
        work = onnx.ModelProto()
        work.CopyFrom(case.model)
        plan, scales, _ = plan_and_scales(case, recipe_for(fmt_name, True, mode))
        outputs.append(run(export_qdq(work, plan, scales, mode).model, {"x": case.x})[0])
    assert np.array_equal(outputs[0], outputs[1])


def test_dynamic_batch_survives_export():
    case = make_case("Conv")
    plan, scales, axis = plan_and_scales(case, recipe_for("int8", True))
    qdq = export_qdq(case.model, plan, scales, "quantized").model
    for batch in (1, 5):
        x = np.random.default_rng(batch).normal(0, 1, (batch, 4, 5, 5)).astype(np.float32)
        (y,) = run(qdq, {"x": x})
        fmt = FORMATS["int8"]
        xq = fmt.fake_quant(torch.from_numpy(x), scales["x"].scale, scales["x"].zero_point)
        w = torch.from_numpy(case.w)
        wq = fmt.fake_quant(w, broadcast(scales["w"].scale, axis, 4), torch.tensor(0.0))
        np.testing.assert_allclose(y, case.apply(xq, wq).numpy(), rtol=RTOL, atol=ATOL)
    assert qdq.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "b"


def test_shared_activation_and_weight_kept_for_an_excluded_node():
    """x feeds three MatMuls (one QDQ pair); w is also read by an excluded node, so the float
    initializer stays and that node keeps reading it."""
    rng = np.random.default_rng(3)
    w = rng.normal(0, 1, (8, 8)).astype(np.float32)
    v = rng.normal(0, 1, (8, 5)).astype(np.float32)
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["a"], "mm_a"),
            helper.make_node("MatMul", ["x", "v"], ["b"], "mm_b"),
            helper.make_node("MatMul", ["x", "w"], ["c"], "float/mm_c"),
        ],
        {"x": ["b", 8]},
        {"a": ["b", 8], "b": ["b", 5], "c": ["b", 8]},
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(v, "v")],
    )
    x = rng.normal(0, 1, (4, 8)).astype(np.float32)
    plan = find_targets(model, Recipe(exclude_nodes=("float/*",)))
    assert [u.node for u in plan.activations["x"].uses] == ["mm_a", "mm_b"]
    scales = {
        "x": tensor_scales("x", "activation", "int8", x, None),
        "w": tensor_scales("w", "weight", "int8", w, 1),
        "v": tensor_scales("v", "weight", "int8", v, 1),
    }
    qdq = export_qdq(model, plan, scales, "quantized").model
    inits = initializers(qdq)
    assert "w" in inits and inits["w"].data_type == FLOAT  # still read by float/mm_c
    assert "v" not in inits
    assert inits["w_quantized"].data_type == TensorProto.INT8
    assert count(qdq, "QuantizeLinear") == 1 and count(qdq, "DequantizeLinear") == 3
    a, b, c = run(qdq, {"x": x})
    fmt = FORMATS["int8"]
    xq = fmt.fake_quant(torch.from_numpy(x), scales["x"].scale, torch.tensor(0.0))

    def wq(t, s):
        return fmt.fake_quant(torch.from_numpy(t), s.scale.reshape(1, -1), torch.tensor(0.0))

    np.testing.assert_allclose(a, (xq @ wq(w, scales["w"])).numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(b, (xq @ wq(v, scales["v"])).numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(c, x @ w, rtol=RTOL, atol=ATOL)


def test_mixed_formats_by_override():
    """One node fp8, the next int8 per tensor, the last left float: the opset goes to 19."""
    rng = np.random.default_rng(5)
    ws = [rng.normal(0, 1, (6, 6)).astype(np.float32) for _ in range(3)]
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "w0"], ["h0"], "fp8/mm"),
            helper.make_node("MatMul", ["h0", "w1"], ["h1"], "int8/mm"),
            helper.make_node("MatMul", ["h1", "w2"], ["y"], "float/mm"),
        ],
        {"x": ["b", 6]},
        {"y": ["b", 6]},
        [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(ws)],
    )
    recipe = Recipe(
        overrides=(
            Override(
                "fp8/*", activation=TensorSpec("fp8"), weight=TensorSpec("fp8", per_channel=True)
            ),
            Override("int8/*", activation=TensorSpec("int8"), weight=TensorSpec("int8")),
            Override("float/*"),
        )
    )
    plan = find_targets(model, recipe)
    x = rng.normal(0, 1, (3, 6)).astype(np.float32)
    fp8, int8 = FORMATS["fp8"], FORMATS["int8"]
    zero = torch.tensor(0.0)
    s_x = tensor_scales("x", "activation", "fp8", x, None)
    s_w0 = tensor_scales("w0", "weight", "fp8", ws[0], 1)
    xq = fp8.fake_quant(torch.from_numpy(x), s_x.scale, zero)
    h0 = xq @ fp8.fake_quant(torch.from_numpy(ws[0]), s_w0.scale.reshape(1, -1), zero)
    s_h0 = tensor_scales("h0", "activation", "int8", h0.numpy(), None)
    s_w1 = tensor_scales("w1", "weight", "int8", ws[1], None)
    h1 = int8.fake_quant(h0, s_h0.scale, zero) @ int8.fake_quant(
        torch.from_numpy(ws[1]), s_w1.scale, zero
    )
    expected = (h1 @ torch.from_numpy(ws[2])).numpy()
    scales = {"x": s_x, "w0": s_w0, "h0": s_h0, "w1": s_w1}
    result = export_qdq(model, plan, scales, "quantized")
    assert (result.opset_from, result.opset_to) == (17, 19)
    inits = initializers(result.model)
    assert inits["w0_quantized"].data_type == TensorProto.FLOAT8E4M3FN
    assert inits["w1_quantized"].data_type == TensorProto.INT8
    assert inits["w2"].data_type == FLOAT and "w0" not in inits and "w1" not in inits
    (y,) = run(result.model, {"x": x})
    np.testing.assert_allclose(y, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("mode", ["quantized", "qdq"])
@pytest.mark.parametrize("op", ["MatMul", "Gemm1", "Conv"])
def test_a_weight_listed_as_a_graph_input_loses_its_input_entry(op, mode):
    """An initializer also listed as a graph input (keep_initializers_as_inputs) is exported
    as a constant: no input of its name is left to feed, and the outputs equal those of the
    same model without the listing. The bias stays an input."""
    case = make_case(op, seed=2)
    outputs = []
    for listed in (True, False):
        work = onnx.ModelProto()
        work.CopyFrom(case.model)
        if listed:
            work.graph.input.extend(
                helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                for t in work.graph.initializer
            )
        plan, scales, _ = plan_and_scales(case, recipe_for("int8", True, mode))
        qdq = export_qdq(work, plan, scales, mode).model
        inputs = [value.name for value in qdq.graph.input]
        assert inputs == (["x", "bias"] if listed and case.bias is not None else ["x"])
        outputs.append(run(qdq, {"x": case.x})[0])
    assert np.array_equal(outputs[0], outputs[1])
