"""MX activations quantized in the graph (graphs/mx.py): the reference evaluator's dequantized
activation equals a float64 brute force of the OCP rule (mx_oracle.py) element for element, and
ONNX Runtime over the emulation equals the reference evaluator, on MatMul, Gemm and Conv models
with dynamic shapes, partial blocks, float16, and blocks of zeros, tiny values, inf and NaN."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from mx_oracle import GRIDS, brute_force
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from test_fp4_emulation import run_both

from qcal_export.graphs.fp4_emulation import emulate_fp4, unexpressed
from qcal_export.graphs.mx import insert_activation_mx, quantize_weight_mx
from qcal_export.graphs.qdq import Names, sort_nodes
from qcal_export.spec.granularity import PerBlock
from qcal_export.spec.mx_formats import MXFP4, MXFP8
from qcal_export.spec.plan import ActivationPlan, Blocks, Use, WeightPlan
from qcal_export.spec.recipe import TensorSpec
from qcal_export.spec.scales import QParams
from qcal_export.validation.reference import needs_reference_evaluator

FORMATS = {"mxfp8": MXFP8, "mxfp4": MXFP4}
CASES = {
    # op: (x shape, weight shape, weight's block axis, attributes, y shape, x's block axis)
    "MatMul": (["b", "s", "k"], [70, 24], 0, {}, ["b", "s", 24], 2),
    "Gemm": (["b", "k"], [24, 70], 1, {"transB": 1}, ["b", 24], 1),
    "Conv": (["b", "k", "h", "w"], [8, 40, 3, 3], 1, {}, ["b", 8, None, None], 1),
}


def mx_model(op: str, fmt: str, static: bool, dtype: int = TensorProto.FLOAT, weights=False):
    """One ``op`` node whose activation is MX-quantized in the graph (its reduction length
    static or symbolic) and whose weight stays float or (``weights``) is MX too; opset 24."""
    x_shape, w_shape, w_axis, attributes, y_shape, x_axis = CASES[op]
    k = w_shape[w_axis]
    x_shape = [k if d == "k" and static else d for d in x_shape]
    w = np.random.default_rng(1).standard_t(3, w_shape).astype(np.float32)
    np_type = helper.tensor_dtype_to_np_dtype(dtype)
    graph = helper.make_graph(
        [helper.make_node(op, ["x", "w"], ["y"], "node", **attributes)],
        "g",
        [helper.make_tensor_value_info("x", dtype, x_shape)],
        [helper.make_tensor_value_info("y", dtype, y_shape)],
        initializer=[numpy_helper.from_array(w.astype(np_type), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)])
    names, spec = Names(model.graph), TensorSpec(format=fmt)
    blocks = Blocks(x_axis, len(x_shape), k if static else None)
    plan = ActivationPlan("x", spec, dtype, [Use("node", 0)], blocks)
    insert_activation_mx(model.graph, plan, FORMATS[fmt], names)
    if weights:
        granularity = PerBlock(w_axis, 32)
        bound = granularity.unflatten(
            granularity.groups(torch.from_numpy(w)).abs().amax(-1),
            granularity.stat_shape(tuple(w_shape)),
        )
        scale, zero = FORMATS[fmt].scale_zero_point(-bound, bound)
        q = QParams(FORMATS[fmt], scale, zero, granularity)
        weight = WeightPlan("w", spec, granularity, [Use("node", 1)], shape=tuple(w_shape))
        quantize_weight_mx(model.graph, weight, q, "quantized", names)
    sort_nodes(model.graph)
    probe = helper.make_tensor_value_info("x_dequantized", dtype, [None] * len(x_shape))
    model.graph.output.append(probe)
    onnx.checker.check_model(model, full_check=True)
    return model


def activations(op: str, fmt: str, dtype: type = np.float32) -> list[np.ndarray]:
    """Inputs of two sizes, heavy-tailed, with blocks (along the reduction axis) that are all
    zero, hold a tie or the element grid's largest value at a power-of-two amax, sit far below
    E8M0's range, hold an outlier, or a value just below a power of two."""
    _, w_shape, w_axis, _, _, axis = CASES[op]
    k = w_shape[w_axis]
    sizes = {"MatMul": [(1, 1), (3, 7)], "Gemm": [(1,), (5,)], "Conv": [(1, 4, 4), (2, 5, 3)]}
    rng = np.random.default_rng(3)
    grid, _ = GRIDS[fmt]
    out = []
    for size in sizes[op]:
        shape = [*size[:axis], k, *size[axis:]]
        x = np.moveaxis((rng.standard_t(3, shape) * 1.5).astype(np.float32), axis, -1)
        flat = x.reshape(-1, k)
        flat[0, :32] = 0.0
        flat[-1, :32] = grid[-1] * 2.0**-3 * np.where(np.arange(32) % 2, -1, 1)
        flat[-1, 1] = (grid[1] + grid[2]) / 2 * 2.0**-3  # a tie: the block's scale is 2^-3
        flat[0, 32:] = rng.standard_normal(k - 32) * 2.0**-125
        if len(flat) > 2:
            flat[1, 5] = 3e4
            flat[2, 32] = np.nextafter(np.float32(2.0**5), np.float32(0))
        out.append(np.moveaxis(flat.reshape(x.shape), -1, axis).astype(dtype))
    return out


def oracle(x: np.ndarray, axis: int, fmt: str) -> np.ndarray:
    """The brute force's dequantized ``x``, blocks of 32 along ``axis`` (last one partial)."""
    moved = np.moveaxis(x.astype(np.float64), axis, 0)
    values, _ = brute_force(moved.reshape(moved.shape[0], -1), fmt)
    return np.moveaxis(values.reshape(moved.shape), 0, axis)


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4"])
@pytest.mark.parametrize(
    ("op", "static"), [("MatMul", True), ("MatMul", False), ("Gemm", False), ("Conv", False)]
)
def test_activation_equals_brute_force_and_emulation_equals_evaluator(op, static, fmt):
    model = mx_model(op, fmt, static)
    assert needs_reference_evaluator(model) and unexpressed(model.graph)
    evaluator = ReferenceEvaluator(model)
    for x in activations(op, fmt):
        got = evaluator.run(["x_dequantized"], {"x": x})[0]
        np.testing.assert_array_equal(got.astype(np.float64), oracle(x, CASES[op][5], fmt))
        (y, dequantized), (y_ref, dequantized_ref) = run_both(model, {"x": x})
        np.testing.assert_array_equal(dequantized, dequantized_ref)
        np.testing.assert_allclose(y, y_ref, rtol=0, atol=64 * 2**-23 * np.abs(y_ref).max())


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4"])
def test_mx_weights_and_activations_together(fmt):
    model = mx_model("Conv", fmt, static=True, weights=True)
    emulation = emulate_fp4(model)
    assert (emulation.folded_weights, emulation.emulated_activations) == (1, 1)
    assert emulation.unexpressed == []
    for x in activations("Conv", fmt):
        (y, dequantized), (y_ref, dequantized_ref) = run_both(model, {"x": x})
        np.testing.assert_array_equal(dequantized, dequantized_ref)
        np.testing.assert_allclose(y, y_ref, rtol=0, atol=64 * 2**-23 * np.abs(y_ref).max())


def test_float16_activations_divide_in_float32():
    """Float16 blocks whose amax is a float16 subnormal still get their exact exponent (the
    amax is read in float32), and the products round once to float16."""
    model = mx_model("MatMul", "mxfp8", static=True, dtype=TensorProto.FLOAT16)
    x = activations("MatMul", "mxfp8", np.float16)[1]
    x[0, 0, 32:] = np.float16(2.0**-20) * np.arange(38, dtype=np.float16)
    got = ReferenceEvaluator(model).run(["x_dequantized"], {"x": x})[0]
    assert got.dtype == np.float16
    want = oracle(x, 2, "mxfp8").astype(np.float16)
    np.testing.assert_array_equal(got, want)
    (_, dequantized), (_, dequantized_ref) = run_both(model, {"x": x})
    np.testing.assert_array_equal(dequantized, dequantized_ref)


def test_a_block_with_inf_or_nan_reads_nan_in_both():
    """An inf or NaN in a block gives that block a NaN scale in the evaluator and in ORT alike
    (ORT's saturating Cast alone would give E8M0's largest value); other blocks are unchanged."""
    model = mx_model("Gemm", "mxfp4", static=False)
    x = activations("Gemm", "mxfp4")[1]
    x[1, 40], x[3, 3] = np.inf, np.nan
    (_, dequantized), (_, dequantized_ref) = run_both(model, {"x": x})
    np.testing.assert_array_equal(dequantized, dequantized_ref)
    nan = np.isnan(dequantized)
    assert nan[1, 32:64].all() and nan[3, :32].all() and nan.sum() == 32 + 32
    finite = ~nan
    np.testing.assert_array_equal(dequantized[finite], oracle(np.nan_to_num(x), 1, "mxfp4")[finite])


def attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def test_the_graph_computes_the_scale_with_round_down_casts():
    """The scale is two Casts to FLOAT8E8M0 rounding down; Q and DQ read it, blocks of 32."""
    model = mx_model("MatMul", "mxfp4", static=False)
    casts = [n for n in model.graph.node if n.op_type == "Cast"]
    to_e8m0 = [n for n in casts if attributes(n)["to"] == TensorProto.FLOAT8E8M0]
    assert [attributes(n)["round_mode"] for n in to_e8m0] == [b"down", b"down"]
    pair = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert [n.input[1] for n in pair] == [to_e8m0[-1].output[0]] * 2
    for node in pair:
        assert (attributes(node)["axis"], attributes(node)["block_size"]) == (2, 32)
    assert attributes(pair[0])["precision"] == TensorProto.FLOAT
