"""QDQ export against ONNX Runtime: the exported model computes what the calibrated formats say.

The oracle is float32 torch: fake-quantize the activation (per tensor) and the weight (per axis
on the planned axis, or per tensor) with the same scales and zero points, then apply the op. The
exported model runs in a real onnxruntime session (CPUExecutionProvider) and must agree to a few
float32 ulps per accumulated term.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from qcal_export.artifacts.scales import TensorScales
from qcal_export.errors import ModelError, ScalesError
from qcal_export.formats import FORMATS
from qcal_export.graphs.export import check_scales_match, export_qdq
from qcal_export.graphs.qdq import raise_opset, sort_nodes
from qcal_export.graphs.targets import find_targets
from qcal_export.recipe import Override, Recipe, TensorSpec

FLOAT = TensorProto.FLOAT
BATCH = 3
RTOL = ATOL = 1e-5


# models ---------------------------------------------------------------------------------------


@dataclass
class Case:
    """A one-node model with its float weight/bias and how torch computes the node."""

    model: onnx.ModelProto
    x: np.ndarray
    w: np.ndarray
    bias: np.ndarray | None
    op: str
    trans_b: int = 0

    def apply(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else torch.from_numpy(self.bias)
        if self.op == "MatMul":
            return torch.matmul(x, w)
        if self.op == "Gemm":
            return F.linear(x, w if self.trans_b else w.T, bias)
        if self.op == "Conv":
            return F.conv2d(x, w, bias, padding=1, groups=2)
        return F.conv_transpose2d(x, w, bias, stride=2, padding=1, output_padding=1)


def make_model(
    nodes: list[onnx.NodeProto],
    inputs: dict[str, list],
    outputs: dict[str, list],
    initializers: list[TensorProto],
    opset: int = 17,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, FLOAT, s) for n, s in outputs.items()],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def make_case(op: str, opset: int = 17, seed: int = 0) -> Case:
    """MatMul [b, 3, 8] x [8, 6]; Gemm [b, 8] x [6, 8]^T or [8, 6]; Conv 4->6 (groups 2);
    ConvTranspose 4->6 stride 2; all with a dynamic batch."""
    rng = np.random.default_rng(seed)
    trans_b = int(op == "Gemm1")
    op_type = op.rstrip("01")
    x_shape, w_shape, y_shape, attrs = {
        "MatMul": ([BATCH, 3, 8], (8, 6), ["b", 3, 6], {}),
        "Gemm": ([BATCH, 8], (6, 8) if trans_b else (8, 6), ["b", 6], {"transB": trans_b}),
        "Conv": ([BATCH, 4, 5, 5], (6, 2, 3, 3), ["b", 6, 5, 5], {"pads": [1] * 4, "group": 2}),
        "ConvTranspose": (
            [BATCH, 4, 4, 4],
            (4, 6, 3, 3),
            ["b", 6, 8, 8],
            {"pads": [1] * 4, "strides": [2, 2], "output_padding": [1, 1]},
        ),
    }[op_type]
    x = rng.normal(0, 1, x_shape).astype(np.float32)
    # magnitudes spread over 16x, and an offset so uint8 zero points are not all 0 or 128
    w = rng.normal(0.2, 0.5, w_shape) * 2.0 ** rng.uniform(-2, 2, w_shape)
    w = w.astype(np.float32)
    bias = None if op_type == "MatMul" else rng.normal(0, 1, y_shape[1]).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w")]
    inputs = ["x", "w"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "bias"))
        inputs.append("bias")
    model = make_model(
        [helper.make_node(op_type, inputs, ["y"], "node", **attrs)],
        {"x": ["b", *x_shape[1:]]},
        {"y": y_shape},
        inits,
        opset,
    )
    return Case(model, x, w, bias, op_type, trans_b)


def weight_axis_reduce(w: torch.Tensor, axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) per index of ``axis`` (shape [C]) or of the whole tensor (shape [])."""
    if axis is None:
        return w.min(), w.max()
    rows = w.movedim(axis, 0).reshape(w.shape[axis], -1)
    return rows.min(dim=1).values, rows.max(dim=1).values


def tensor_scales(
    name: str, kind: str, fmt_name: str, values: np.ndarray, axis: int | None, shrink: float = 1.0
) -> TensorScales:
    """Scales by hand: the format's scale/zero point for the (shrunk) range of ``values``."""
    fmt = FORMATS[fmt_name]
    amin, amax = weight_axis_reduce(torch.from_numpy(values), axis)
    amin, amax = amin * shrink, amax * shrink
    scale, zero_point = fmt.scale_zero_point(amin, amax)
    return TensorScales(
        name=name,
        kind=kind,
        format=fmt_name,
        method="max",
        axis=axis,
        amax=torch.maximum(amin.abs(), amax.abs()),
        scale=scale,
        zero_point=zero_point,
        min=None if fmt.symmetric else amin,
        max=None if fmt.symmetric else amax,
    )


def broadcast(t: torch.Tensor, axis: int | None, rank: int) -> torch.Tensor:
    if axis is None:
        return t
    return t.reshape([-1 if i == axis else 1 for i in range(rank)])


def run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def count(model: onnx.ModelProto, op_type: str) -> int:
    return sum(n.op_type == op_type for n in model.graph.node)


def initializers(model: onnx.ModelProto) -> dict[str, TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def recipe_for(fmt_name: str, per_channel: bool, mode: str = "quantized") -> Recipe:
    return Recipe(
        activation=TensorSpec(fmt_name),
        weight=TensorSpec(fmt_name, per_channel=per_channel),
        weights_mode=mode,
    )


def plan_and_scales(case: Case, recipe: Recipe):
    plan = find_targets(case.model, recipe)
    assert list(plan.activations) == ["x"] and list(plan.weights) == ["w"]
    axis = plan.weights["w"].axis
    fmt_name = recipe.activation.format
    scales = {
        "x": tensor_scales("x", "activation", fmt_name, case.x, None, shrink=0.8),
        "w": tensor_scales("w", "weight", recipe.weight.format, case.w, axis),
    }
    return plan, scales, axis


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


def test_new_names_do_not_collide_with_existing_tensors():
    """The graph already holds ``x_scale``, ``w_quantized`` and a node ``x_QuantizeLinear``."""
    rng = np.random.default_rng(4)
    w = rng.normal(0, 1, (4, 3)).astype(np.float32)
    x_scale = np.full((1, 3), 2.0, np.float32)
    w_quantized = np.full((1, 3), -1.0, np.float32)
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], "mm"),
            helper.make_node("Mul", ["h", "x_scale"], ["x_QuantizeLinear"], "x_QuantizeLinear"),
            helper.make_node("Add", ["x_QuantizeLinear", "w_quantized"], ["y"], "x_dequantized"),
        ],
        {"x": ["b", 4]},
        {"y": ["b", 3]},
        [
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(x_scale, "x_scale"),
            numpy_helper.from_array(w_quantized, "w_quantized"),
        ],
    )
    x = rng.normal(0, 1, (2, 4)).astype(np.float32)
    plan = find_targets(model, Recipe())
    scales = {
        "x": tensor_scales("x", "activation", "int8", x, None),
        "w": tensor_scales("w", "weight", "int8", w, 1),
    }
    qdq = export_qdq(model, plan, scales, "quantized").model
    names = [n.name for n in qdq.graph.node]
    assert len(set(names)) == len(names)
    inits = initializers(qdq)
    assert np.array_equal(numpy_helper.to_array(inits["x_scale"]), x_scale)
    assert np.array_equal(numpy_helper.to_array(inits["w_quantized"]), w_quantized)
    (y,) = run(qdq, {"x": x})
    fmt = FORMATS["int8"]
    xq = fmt.fake_quant(torch.from_numpy(x), scales["x"].scale, torch.tensor(0.0))
    wq = fmt.fake_quant(torch.from_numpy(w), scales["w"].scale.reshape(1, -1), torch.tensor(0.0))
    np.testing.assert_allclose(y, (xq @ wq).numpy() * 2.0 - 1.0, rtol=RTOL, atol=ATOL)


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


# opsets -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "opset", "fmt_name", "per_channel", "expected"),
    [
        ("Conv", 11, "int8", True, 13),  # per axis needs 13; Conv unchanged 11 -> 13
        ("Conv", 11, "int8", False, 11),  # per tensor int8 is fine at 11
        ("MatMul", 11, "uint8", True, 13),  # MatMul changed 9 -> 13: the converter runs
        ("Gemm1", 12, "int8", True, 13),
        ("ConvTranspose", 17, "fp8", False, 19),
        ("MatMul", 19, "fp8", True, 19),
        ("MatMul", 21, "int8", True, 21),
    ],
)
def test_opset_raised_only_as_far_as_needed(op, opset, fmt_name, per_channel, expected):
    case = make_case(op, opset=opset)
    fmt = FORMATS[fmt_name]
    plan, scales, axis = plan_and_scales(case, recipe_for(fmt_name, per_channel))
    result = export_qdq(case.model, plan, scales, "quantized")
    assert (result.opset_from, result.opset_to) == (opset, expected)
    assert [(e.domain, e.version) for e in result.model.opset_import] == [("", expected)]
    onnx.checker.check_model(result.model, full_check=True)
    (y,) = run(result.model, {"x": case.x})
    xq = fmt.fake_quant(torch.from_numpy(case.x), scales["x"].scale, scales["x"].zero_point)
    w = torch.from_numpy(case.w)
    w_zero_point = broadcast(scales["w"].zero_point, axis, w.ndim)
    wq = fmt.fake_quant(w, broadcast(scales["w"].scale, axis, w.ndim), w_zero_point)
    np.testing.assert_allclose(y, case.apply(xq, wq).numpy(), rtol=RTOL, atol=ATOL)


def reduce_mean_model(opset: int) -> onnx.ModelProto:
    return make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], "mm"),
            helper.make_node("ReduceMean", ["h"], ["m"], "mean", axes=[1], keepdims=1),
            helper.make_node("Sub", ["h", "m"], ["y"], "center"),
        ],
        {"x": ["b", 4]},
        {"y": ["b", 5]},
        [numpy_helper.from_array(np.arange(20, dtype=np.float32).reshape(4, 5) / 10, "w")],
        opset,
    )


def test_raise_opset_converts_ops_that_changed():
    """ReduceMean took ``axes`` as an attribute until opset 18, as an input since."""
    model = reduce_mean_model(17)
    x = np.random.default_rng(6).normal(0, 1, (3, 4)).astype(np.float32)
    (before,) = run(model, {"x": x})
    raised = raise_opset(model, 19)
    assert raised.opset_import[0].version == 19
    assert raised.ir_version >= 9
    onnx.checker.check_model(raised, full_check=True)
    mean = next(n for n in raised.graph.node if n.op_type == "ReduceMean")
    assert len(mean.input) == 2 and not any(a.name == "axes" for a in mean.attribute)
    (after,) = run(raised, {"x": x})
    h = x @ (np.arange(20, dtype=np.float32).reshape(4, 5) / 10)
    np.testing.assert_allclose(before, h - h.mean(axis=1, keepdims=True), rtol=1e-5, atol=1e-5)
    assert np.array_equal(after, before)


def test_raise_opset_only_bumps_the_number_when_no_op_changed():
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], "mm"),
            helper.make_node("Relu", ["h"], ["y"], "relu"),
        ],
        {"x": ["b", 4]},
        {"y": ["b", 5]},
        [numpy_helper.from_array(np.ones((4, 5), np.float32), "w")],
    )
    graph_before = model.graph.SerializeToString()
    raised = raise_opset(model, 19)
    assert raised.opset_import[0].version == 19 and raised.ir_version >= 9
    assert raised.graph.SerializeToString() == graph_before
    onnx.checker.check_model(raised, full_check=True)
    x = np.arange(8, dtype=np.float32).reshape(2, 4) - 3
    (y,) = run(raised, {"x": x})
    np.testing.assert_array_equal(y, np.maximum(x @ np.ones((4, 5), np.float32), 0))

    same = raise_opset(raised, 13)  # already high enough: untouched
    assert same.opset_import[0].version == 19
    assert same.graph.SerializeToString() == graph_before


# sort_nodes -------------------------------------------------------------------------------------


def diamond_model() -> onnx.ModelProto:
    """x -> relu -> {mm_a, mm_b} -> add -> {sig, tanh} -> mul; an If that reads ``t`` only from
    inside its branches (outer scope)."""
    then_graph = helper.make_graph(
        [helper.make_node("Neg", ["t"], ["then_out"], "then_neg")],
        "then",
        [],
        [helper.make_tensor_value_info("then_out", FLOAT, None)],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Identity", ["t"], ["else_out"], "else_id")],
        "else",
        [],
        [helper.make_tensor_value_info("else_out", FLOAT, None)],
    )
    rng = np.random.default_rng(7)
    return make_model(
        [
            helper.make_node("Relu", ["x"], ["r"], "relu"),
            helper.make_node("MatMul", ["r", "wa"], ["a"], "mm_a"),
            helper.make_node("MatMul", ["r", "wb"], ["b"], "mm_b"),
            helper.make_node("Add", ["a", "b"], ["s"], "add"),
            helper.make_node("Sigmoid", ["s"], ["g"], "sig"),
            helper.make_node("Tanh", ["s"], ["t"], "tanh"),
            helper.make_node("Mul", ["g", "t"], ["y"], "mul"),
            helper.make_node("Constant", [], ["flag"], "flag", value_float=1.0),
            helper.make_node("Cast", ["flag"], ["cond"], "cast", to=TensorProto.BOOL),
            helper.make_node(
                "If", ["cond"], ["z"], "if", then_branch=then_graph, else_branch=else_graph
            ),
        ],
        {"x": ["b", 4]},
        {"y": ["b", 4], "z": ["b", 4]},
        [
            numpy_helper.from_array(rng.normal(0, 1, (4, 4)).astype(np.float32), "wa"),
            numpy_helper.from_array(rng.normal(0, 1, (4, 4)).astype(np.float32), "wb"),
        ],
    )


@pytest.mark.parametrize("seed", range(8))
def test_sort_nodes_restores_topological_order(seed):
    model = diamond_model()
    x = np.random.default_rng(seed).normal(0, 1, (3, 4)).astype(np.float32)
    expected = run(model, {"x": x})
    nodes = list(model.graph.node)
    random.Random(seed).shuffle(nodes)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    sort_nodes(model.graph)
    order = [n.name for n in model.graph.node]
    assert sorted(order) == sorted(n.name for n in nodes)
    position = {name: i for i, name in enumerate(order)}
    for before, after in [
        ("relu", "mm_a"), ("relu", "mm_b"), ("mm_a", "add"), ("mm_b", "add"), ("add", "sig"),
        ("add", "tanh"), ("sig", "mul"), ("tanh", "mul"), ("flag", "cast"), ("cast", "if"),
        ("tanh", "if"),  # read only inside the If's branches
    ]:  # fmt: skip
        assert position[before] < position[after], (before, after, order)
    onnx.checker.check_model(model, full_check=True)
    for got, want in zip(run(model, {"x": x}), expected, strict=True):
        assert np.array_equal(got, want)


def test_sort_nodes_keeps_an_ordered_graph_as_it_is_and_rejects_cycles():
    model = diamond_model()
    # independent nodes in a non-alphabetical, non-default order stay where they are
    nodes = list(model.graph.node)
    nodes[1], nodes[2] = nodes[2], nodes[1]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    before = [n.name for n in model.graph.node]
    sort_nodes(model.graph)
    assert [n.name for n in model.graph.node] == before

    cyclic = helper.make_graph(
        [
            helper.make_node("Add", ["x", "q"], ["p"], "p"),
            helper.make_node("Relu", ["p"], ["q"], "q"),
        ],
        "cyclic",
        [helper.make_tensor_value_info("x", FLOAT, [2])],
        [helper.make_tensor_value_info("q", FLOAT, [2])],
    )
    with pytest.raises(ModelError, match="cycle"):
        sort_nodes(cyclic)


# check_scales_match -----------------------------------------------------------------------------


def test_check_scales_match():
    case = make_case("Gemm1")
    plan, scales, _ = plan_and_scales(case, recipe_for("int8", True))
    check_scales_match(plan, scales, "scales.safetensors")  # all there: no error

    missing = {"x": scales["x"]}
    with pytest.raises(ScalesError, match=r"scales\.safetensors") as e:
        check_scales_match(plan, missing, "scales.safetensors")
    assert "'w'" in str(e.value) and "weight" in str(e.value)

    wrong_format = dict(scales, x=tensor_scales("x", "activation", "fp8", case.x, None))
    with pytest.raises(ScalesError) as e:
        check_scales_match(plan, wrong_format, "s.safetensors")
    assert "'x'" in str(e.value) and "fp8" in str(e.value) and "int8" in str(e.value)

    wrong_axis = dict(scales, w=tensor_scales("w", "weight", "int8", case.w, 1))
    with pytest.raises(ScalesError) as e:
        check_scales_match(plan, wrong_axis, "s.safetensors")
    assert "'w'" in str(e.value) and "per-axis(1)" in str(e.value) and "axis=0" in str(e.value)

    per_tensor = dict(scales, w=tensor_scales("w", "weight", "int8", case.w, None))
    with pytest.raises(ScalesError, match="'w'"):
        check_scales_match(plan, per_tensor, "s.safetensors")
