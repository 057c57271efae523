"""The FP4 emulation: ONNX Runtime (CPU) running the emulated graph equals the ONNX reference
evaluator running the FP4 QDQ graph, element for element, on the E2M1 grid, its ties and
saturation, and on MatMul, Gemm and Conv models with dynamic shapes and partial blocks."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from test_nvfp4 import E2M1, e2m1_oracle, weight_params

from qcal_export.graphs.fp4_emulation import emulate_fp4, runnable_form, unexpressed
from qcal_export.graphs.fp4_weights import fold_weights
from qcal_export.graphs.nvfp4 import add_trt_domain, insert_activation_nvfp4, quantize_weight_nvfp4
from qcal_export.graphs.qdq import Names, make_tensor, sort_nodes
from qcal_export.spec.formats import NVFP4
from qcal_export.spec.granularity import PerBlock
from qcal_export.spec.plan import ActivationPlan, Blocks, Use, WeightPlan
from qcal_export.spec.recipe import TensorSpec
from qcal_export.spec.scales import QParams
from qcal_export.validation.reference import ReferenceRunner

FLOAT, FP4 = TensorProto.FLOAT, TensorProto.FLOAT4E2M1
NVFP4_SPEC = TensorSpec(format="nvfp4")


def run_both(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> tuple[list, list]:
    """(ORT's outputs of the emulated model, the reference evaluator's of ``model``, with
    TensorRT's ops as TensorRT documents them)."""
    emulation = emulate_fp4(model)
    assert emulation.unexpressed == []
    onnx.checker.check_model(emulation.model, full_check=True)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        emulation.model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in model.graph.output]
    return session.run(names, feed), ReferenceRunner(model).run(names, feed)


def grid_values() -> np.ndarray:
    """Every E2M1 value, the ties between neighbours and the floats either side of each, values
    past 6 (saturation), infinities, subnormals and signed zeros, both signs."""
    ties = (E2M1[1:] + E2M1[:-1]) / 2
    points = np.concatenate([E2M1, ties, [6.5, 7.0, 100.0, 3e38, np.inf, 1e-45, 1e-39]])
    points = points.astype(np.float32)
    near = [np.nextafter(points, np.float32(0)), np.nextafter(points, np.float32(np.inf))]
    values = np.concatenate([points, *near])
    return np.concatenate([values, -values]).astype(np.float32)


def qdq_model(x_shape: list, scale: np.ndarray, **block: int) -> onnx.ModelProto:
    """x -> QuantizeLinear(FLOAT4E2M1, ``scale``) -> DequantizeLinear -> y."""
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s"], ["q"], "Q", output_dtype=FP4, **block),
        helper.make_node("DequantizeLinear", ["q", "s"], ["y"], "DQ", **block),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", FLOAT, x_shape)],
        initializer=[numpy_helper.from_array(scale, "s")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


@pytest.mark.parametrize("scale", [1.0, 0.25, 0.37])
def test_every_grid_point_tie_and_saturation_per_tensor(scale):
    y = grid_values()
    x = (y * np.float32(scale)).astype(np.float32)
    (got,), (want,) = run_both(qdq_model([None], np.float32(scale)), {"x": x})
    np.testing.assert_array_equal(got, want)
    if scale != 0.37:  # a power of two: x / scale is y itself
        saturated = np.clip(y, -6, 6)  # the oracle's search needs finite values
        np.testing.assert_array_equal(got, (e2m1_oracle(saturated) * scale).astype(np.float32))


def test_every_grid_point_in_blocks_with_a_partial_last_block():
    """Blocks of 16 along axis 1 of ``[4, 40]``: each block its own (not a power of two)
    scale; the last block has 8 elements."""
    rng = np.random.default_rng(0)
    scale = rng.uniform(0.01, 3.0, (4, 3)).astype(np.float32)
    y = np.resize(rng.permutation(grid_values()), (4, 40)).astype(np.float32)
    expanded = PerBlock(1, 16).expand(torch.from_numpy(scale), (4, 40)).numpy()
    with np.errstate(over="ignore"):  # 3e38 times a scale past 1 is inf: saturates too
        x = (y * expanded).astype(np.float32)
    (got,), (want,) = run_both(qdq_model([4, 40], scale, axis=1, block_size=16), {"x": x})
    np.testing.assert_array_equal(got, want)


def linear_model(op: str, dims: dict, dtype: int = FLOAT) -> tuple[onnx.ModelProto, dict]:
    """One MatMul, Gemm (transB=1) or Conv node with NVFP4 weights and activations blocked
    along the reduction axis (the exporter's functions), its input dims ``dims`` symbolic
    where named; returns the model and the weight's shape and block axis."""
    k = dims["k"]
    cases = {
        "MatMul": (["b", "s", k], [40, 24], 0, {}, ["b", "s", 24], 2),
        "Gemm": (["b", k], [24, 40], 1, {"transB": 1}, ["b", 24], 1),
        "Conv": (["b", k, "h", "w"], [8, 20, 3, 3], 1, {}, ["b", 8, None, None], 1),
    }
    x_shape, w_shape, w_axis, attributes, y_shape, x_axis = cases[op]
    w = np.random.default_rng(1).standard_t(3, w_shape).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node(op, ["x", "w"], ["y"], "node", **attributes)],
        "g",
        [helper.make_tensor_value_info("x", dtype, x_shape)],
        [helper.make_tensor_value_info("y", dtype, y_shape)],
        initializer=[
            numpy_helper.from_array(w.astype(helper.tensor_dtype_to_np_dtype(dtype)), "w")
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    known = k if isinstance(k, int) else None
    blocks = Blocks(x_axis, len(x_shape), known)
    return model, {"w": torch.from_numpy(w), "w_axis": w_axis, "blocks": blocks, "dtype": dtype}


def quantize(model: onnx.ModelProto, parts: dict, mode: str, form: str = "portable") -> None:
    """NVFP4 weight (``mode``) and dynamic activation quantization of the one node."""
    graph, names = model.graph, Names(model.graph)
    q = weight_params(parts["w"], parts["w_axis"], seed=2)
    plan = WeightPlan("w", NVFP4_SPEC, q.granularity, [Use("node", 1)])
    quantize_weight_nvfp4(graph, plan, q, mode, names, form)
    global_scale = NVFP4.global_scale(torch.tensor(4.0))
    aq = QParams(NVFP4, global_scale, torch.zeros(()), PerBlock(0, 16), global_scale)
    act = ActivationPlan("x", NVFP4_SPEC, parts["dtype"], [Use("node", 0)], parts["blocks"])
    insert_activation_nvfp4(graph, act, aq, names, form)
    if form == "tensorrt":
        add_trt_domain(model)
    sort_nodes(graph)


def feeds(op: str, width: int, dtype: type = np.float32) -> list[dict[str, np.ndarray]]:
    """Inputs of several batch (and sequence or image) sizes, heavy-tailed, one block zero."""
    rng = np.random.default_rng(3)
    shapes = {
        "MatMul": [(1, 1, width), (3, 7, width)],
        "Gemm": [(1, width), (5, width)],
        "Conv": [(1, width, 4, 4), (2, width, 5, 3)],
    }[op]
    out = []
    for shape in shapes:
        x = (rng.standard_t(3, shape) * 1.5).astype(dtype)
        x.reshape(-1)[:16] = 0
        out.append({"x": x})
    return out


def with_node_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its compute node's inputs (the dequantized activation and weight) as
    graph outputs too."""
    node = next(n for n in model.graph.node if n.name == "node")
    x_type = model.graph.input[0].type.tensor_type
    ranks = [len(x_type.shape.dim), len(parts_shape(model))]
    model.graph.output.extend(
        helper.make_tensor_value_info(name, x_type.elem_type, [None] * rank)
        for name, rank in zip(node.input, ranks, strict=True)
    )
    return model


def parts_shape(model: onnx.ModelProto) -> list[int]:
    """The float weight's shape: that of its FP4 codes or of the float initializer."""
    init = next(t for t in model.graph.initializer if t.name in ("w", "w_quantized"))
    return list(init.dims)


def assert_equal_where_they_can_be(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> None:
    """The compute node's inputs equal bit for bit. Its output agrees to float rounding only:
    ORT's MatMul/Gemm/Conv kernels sum the products in another order than numpy's (the float
    model differs the same way), so the tolerance is a few ulps of the sum of |products|."""
    (got, *got_inputs), (want, *want_inputs) = run_both(with_node_inputs(model), feed)
    for got_input, want_input in zip(got_inputs, want_inputs, strict=True):
        np.testing.assert_array_equal(got_input, want_input)
    eps = np.finfo(got.dtype).eps
    np.testing.assert_allclose(got, want, rtol=0, atol=64 * eps * np.abs(want).max())


@pytest.mark.parametrize("form", ["portable", "tensorrt"])
@pytest.mark.parametrize("mode", ["quantized", "qdq"])
@pytest.mark.parametrize(
    ("op", "k"), [("MatMul", 40), ("MatMul", "k"), ("Gemm", 40), ("Conv", 20), ("Conv", "c")]
)
def test_emulated_models_equal_the_reference_evaluator(op, k, mode, form):
    """The TensorRT form writes Conv's activations (blocks on axis 1) in the portable form."""
    model, parts = linear_model(op, {"k": k})
    quantize(model, parts, mode, form)
    for feed in feeds(op, 20 if op == "Conv" else 40):
        assert_equal_where_they_can_be(model, feed)


def test_float16_model_equals_the_reference_evaluator():
    """Scales, division and products in float16 as the graph has them; the rounding exact."""
    model, parts = linear_model("MatMul", {"k": 40}, TensorProto.FLOAT16)
    quantize(model, parts, "quantized")
    for feed in feeds("MatMul", 40, np.float16):
        assert_equal_where_they_can_be(model, feed)


def test_folded_weights_are_the_dequantize_chain_bit_for_bit():
    """The folded weight is the reference evaluator's DequantizeLinear output, and the FP4
    codes, FP8 block scales and chain nodes are gone from the emulated graph."""
    model, parts = linear_model("MatMul", {"k": 40})
    quantize(model, parts, "quantized")
    folded = fold_weights(model.graph)
    (name,) = folded
    evaluator = ReferenceEvaluator(model)
    x = np.zeros((1, 1, 40), np.float32)
    got = evaluator.run([name], {"x": x})[0]
    np.testing.assert_array_equal(folded[name].numpy(), got)
    emulated = emulate_fp4(model).model
    types = {t.data_type for t in emulated.graph.initializer}
    assert FP4 not in types and TensorProto.FLOAT8E4M3FN not in types
    assert name in {t.name for t in emulated.graph.initializer}


def test_the_tensorrt_form_becomes_standard_ops():
    model, parts = linear_model("MatMul", {"k": 40})
    quantize(model, parts, "quantized", form="tensorrt")
    emulation = emulate_fp4(model)
    assert (emulation.folded_weights, emulation.emulated_activations) == (1, 1)
    assert emulation.unexpressed == []
    assert [entry.domain for entry in emulation.model.opset_import] == [""]
    assert unexpressed(model.graph)  # the input model itself is left as it was
    assert any(t.data_type == FP4 for t in model.graph.initializer)


def test_runnable_form_is_the_model_its_emulation_or_none():
    plain, _ = linear_model("Gemm", {"k": 40})
    assert runnable_form(plain) is plain
    portable, parts = linear_model("Gemm", {"k": 40})
    quantize(portable, parts, "quantized")
    emulated = runnable_form(portable)
    assert emulated is not None and not unexpressed(emulated.graph)
    read_elsewhere = qdq_model([None], np.float32(1.0))
    read_elsewhere.graph.output.append(helper.make_tensor_value_info("q", FP4, [None]))
    assert runnable_form(read_elsewhere) is None


def test_an_fp4_tensor_read_elsewhere_stays_and_is_named():
    """A QuantizeLinear to FP4 whose codes are also a graph output cannot be emulated away."""
    model = qdq_model([None], np.float32(1.0))
    model.graph.output.append(helper.make_tensor_value_info("q", FP4, [None]))
    emulation = emulate_fp4(model)
    assert emulation.emulated_activations == 1
    assert emulation.unexpressed == ["QuantizeLinear node 'Q'"]


def test_a_single_level_block_scale_in_a_scale_type_folds_too():
    """FP4 codes behind one DequantizeLinear whose block scales are stored in a scale type
    (the MX layout: here FP8, an E8M0 type plugs into SCALE_TYPES the same way), its output
    type given by ``output_dtype``: folded as the reference evaluator computes it."""
    rng = np.random.default_rng(4)
    codes = torch.from_numpy(rng.integers(0, 16, (3, 40)).astype(np.uint8))
    scales = torch.from_numpy(rng.uniform(0.01, 8, (3, 3)).astype(np.float32))
    graph = helper.make_graph(
        [
            helper.make_node(
                "DequantizeLinear", ["c", "s"], ["w"], axis=1, block_size=16, output_dtype=FLOAT
            )
        ],
        "g",
        [],
        [helper.make_tensor_value_info("w", FLOAT, [3, 40])],
        initializer=[
            make_tensor("c", codes, FP4),
            make_tensor("s", scales.to(torch.float8_e4m3fn), TensorProto.FLOAT8E4M3FN),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    folded = fold_weights(model.graph)["w"]
    assert folded.dtype == torch.float32
    np.testing.assert_array_equal(folded.numpy(), ReferenceEvaluator(model).run(None, {})[0])
