"""4-bit MatMul weights as com.microsoft.MatMulNBits (``int4_layout="matmulnbits"``): the same
outputs as the QDQ form in ONNX Runtime, and the same dequantized weights, bit for bit.

The weights are checked three ways: ORT's MatMulNBits run on an identity input (its output is
the dequantized weight), the QDQ form's DequantizeLinear output in ORT, and a plain numpy
decode of the packed bytes as the contrib op's schema describes them (low nibble first, codes
minus the zero point, default zero point 8).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from mlp import batches, make_mlp
from onnx import TensorProto, helper, numpy_helper

from qcal_export import calibrate_onnx
from qcal_export.graphs.export import export_qdq
from qcal_export.graphs.targets import find_targets
from qcal_export.onnx_io.model_io import load_model
from qcal_export.onnx_io.weight_views import materialized
from qcal_export.spec.config import CalibrationConfig

CPU = ["CPUExecutionProvider"]
OFF = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
DEFAULT = ort.GraphOptimizationLevel.ORT_ENABLE_ALL


@pytest.fixture(scope="module")
def mlp(tmp_path_factory) -> Path:
    return make_mlp(tmp_path_factory.mktemp("mlp"), seq=True)


def both_forms(path: Path, data: Path, **options) -> tuple[onnx.ModelProto, onnx.ModelProto, list]:
    """The QDQ and the MatMulNBits form of ``path`` from one calibration, weights embedded,
    and the MatMulNBits export's notes."""
    found = calibrate_onnx(path, data, validate_batches=0, **options).scales
    recipe = CalibrationConfig.from_options(**options).quantization.build()
    forms = []
    for layout in ("qdq", "matmulnbits"):
        loaded = load_model(path)
        plan = find_targets(loaded.proto, recipe)
        exported = export_qdq(loaded.proto, plan, found, "quantized", int4_layout=layout)
        forms.append((materialized(exported.model), exported.notes))
        loaded.store.release()
    return forms[0][0], forms[1][0], forms[1][1]


def run(model: onnx.ModelProto, feed: dict, level=OFF, outputs=None) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    session = ort.InferenceSession(model.SerializeToString(), options, providers=CPU)
    return session.run(outputs, feed)


def nodes(model: onnx.ModelProto, op_type: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op_type]


def inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def decoded(node: onnx.NodeProto, values: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The stored codes ``[K, N]`` and the dequantized weight ``[K, N]`` (float64) of a
    MatMulNBits node, decoded as the schema says."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    k, n, size = attrs["K"], attrs["N"], attrs["block_size"]
    packed = values[node.input[1]]
    blocks = -(-k // size)
    assert attrs["bits"] == 4 and packed.shape == (n, blocks, size // 2)
    assert packed.dtype == np.uint8
    codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, blocks, size)
    codes = codes.astype(np.int16)
    scales = values[node.input[2]].astype(np.float64)
    assert scales.shape == (n * blocks,)
    if len(node.input) > 3:
        zp_packed = values[node.input[3]]
        assert zp_packed.shape == (n * -(-blocks // 2),) and zp_packed.dtype == np.uint8
        zp = np.stack([zp_packed & 0x0F, zp_packed >> 4], -1).reshape(n, -1)[:, :blocks]
        zp = zp.astype(np.int16)
    else:
        zp = np.full((n, blocks), 8)
    weight = (codes - zp[..., None]) * scales.reshape(n, blocks, 1)
    return codes.reshape(n, -1)[:, :k].T, weight.reshape(n, -1)[:, :k].T


def dequantized_in_qdq(
    qdq: onnx.ModelProto, node_name: str, feed: dict, float_type: int = TensorProto.FLOAT
) -> np.ndarray:
    """The QDQ form's DequantizeLinear output feeding MatMul ``node_name``'s weight, in ORT."""
    matmul = next(n for n in qdq.graph.node if n.name == node_name)
    assert matmul.op_type == "MatMul"
    probe = onnx.ModelProto()
    probe.CopyFrom(qdq)
    probe.graph.output.append(helper.make_tensor_value_info(matmul.input[1], float_type, None))
    return run(probe, feed, outputs=[matmul.input[1]])[0]


def identity_weight(node: onnx.NodeProto, values: dict, float_type: int) -> np.ndarray:
    """ORT's MatMulNBits of ``node`` on the identity matrix: its dequantized weight ``[K, N]``."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    k = attrs["K"]
    probe_node = helper.make_node(
        "MatMulNBits", ["a", *node.input[1:]], ["y"], domain="com.microsoft", **attrs
    )
    graph = helper.make_graph(
        [probe_node],
        "identity",
        [helper.make_tensor_value_info("a", float_type, [k, k])],
        [helper.make_tensor_value_info("y", float_type, None)],
        [numpy_helper.from_array(values[name], name) for name in node.input[1:]],
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    dtype = helper.tensor_dtype_to_np_dtype(float_type)
    return run(model, {"a": np.eye(k, dtype=dtype)})[0]


@pytest.mark.parametrize(
    ("fmt", "block"), [("int4", 16), ("uint4", 16), ("uint4", 32), ("int4", 128)]
)
def test_outputs_equal_the_qdq_form(mlp, fmt, block):
    qdq, nbits, notes = both_forms(mlp / "mlp.onnx", mlp / "data", format=fmt, block_size=block)
    assert notes == []
    assert len(nodes(nbits, "MatMulNBits")) == 3
    assert not nodes(nbits, "MatMul") and not nodes(nbits, "DequantizeLinear")
    assert {o.domain: o.version for o in nbits.opset_import}["com.microsoft"] == 1
    onnx.checker.check_model(nbits, full_check=True)
    for x in batches(mlp):
        reference = run(qdq, {"x": x})[0]
        tolerance = 1e-6 * np.abs(reference).max()
        for level in (OFF, DEFAULT):
            got = run(nbits, {"x": x}, level)[0]
            np.testing.assert_allclose(got, reference, rtol=0, atol=tolerance)


@pytest.mark.parametrize(("fmt", "block"), [("int4", 16), ("uint4", 16), ("uint4", 32)])
def test_dequantized_weights_are_the_qdq_forms(mlp, fmt, block):
    """Bit for bit: ORT's MatMulNBits on an identity input, the numpy decode of the packed
    bytes and the QDQ form's DequantizeLinear; int4 code q is stored as q + 8 (default zero
    point 8), uint4 codes as they are with packed zero points."""
    qdq, nbits, _ = both_forms(mlp / "mlp.onnx", mlp / "data", format=fmt, block_size=block)
    values, qdq_values = inits(nbits), inits(qdq)
    feed = {"x": batches(mlp)[0]}
    for node in nodes(nbits, "MatMulNBits"):
        codes, weight = decoded(node, values)
        in_ort = identity_weight(node, values, TensorProto.FLOAT)
        in_qdq = dequantized_in_qdq(qdq, node.name, feed)
        assert np.array_equal(in_ort, in_qdq)
        assert np.array_equal(weight.astype(np.float32), in_qdq)
        matmul = next(n for n in qdq.graph.node if n.name == node.name)
        dq = next(n for n in qdq.graph.node if n.output[0] == matmul.input[1])
        stored = qdq_values[dq.input[0]].astype(np.int16)
        assert np.array_equal(codes, stored + 8 if fmt == "int4" else stored)
        assert (len(node.input) == 4) == (fmt == "uint4")


def test_unfit_weights_stay_qdq_with_a_note(tmp_path):
    """Gemm weights (seq=False exports Gemm, transB=1: ``[N, K]``, blocks along axis 1) and
    a block size that is no power of two stay DequantizeLinear blocks; the notes name each
    weight and why."""
    (tmp_path / "gemm").mkdir()
    gemm = make_mlp(tmp_path / "gemm", seq=False)
    qdq, nbits, notes = both_forms(gemm / "mlp.onnx", gemm / "data", format="int4", block_size=16)
    assert [n.op_type for n in nbits.graph.node] == [n.op_type for n in qdq.graph.node]
    assert not nodes(nbits, "MatMulNBits")
    assert len(notes) == 3 and all("per-block(1, 16)" in note for note in notes)
    assert "'up.weight' stays QDQ" in notes[0]
    (tmp_path / "seq").mkdir()
    seq = make_mlp(tmp_path / "seq", seq=True)
    _, nbits, notes = both_forms(seq / "mlp.onnx", seq / "data", format="uint4", block_size=24)
    assert not nodes(nbits, "MatMulNBits")
    assert len(notes) == 3 and all("block size 24" in note for note in notes)


def test_int8_activations_feed_matmulnbits(mlp):
    """Activations stay QDQ (int8) and feed MatMulNBits as float: outputs as the QDQ form's."""
    qdq, nbits, _ = both_forms(
        mlp / "mlp.onnx",
        mlp / "data",
        weight_format="int4",
        activation_format="int8",
        block_size=16,
    )
    for node in nodes(nbits, "MatMulNBits"):
        producer = next(n for n in nbits.graph.node if node.input[0] in n.output)
        assert producer.op_type == "DequantizeLinear"
    for x in batches(mlp):
        reference = run(qdq, {"x": x})[0]
        got = run(nbits, {"x": x})[0]
        np.testing.assert_allclose(got, reference, rtol=0, atol=1e-6 * np.abs(reference).max())


def test_float16_model(tmp_path):
    """A float16 MatMul: scales in float16 (A's type), the same dequantized weight as the QDQ
    form, outputs within float16 rounding of it."""
    rng = np.random.default_rng(1)
    w1 = rng.normal(0, 0.2, (64, 48)).astype(np.float16)
    w2 = rng.normal(0, 0.2, (48, 40)).astype(np.float16)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], "mm1"),
            helper.make_node("Relu", ["h"], ["r"], "relu"),
            helper.make_node("MatMul", ["r", "w2"], ["y"], "mm2"),
        ],
        "fp16",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["b", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["b", 40])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "fp16.onnx")
    (tmp_path / "data").mkdir()
    x = rng.normal(0, 1, (8, 64)).astype(np.float16)
    np.savez(tmp_path / "data" / "b0.npz", x=x)
    qdq, nbits, notes = both_forms(tmp_path / "fp16.onnx", tmp_path / "data", format="int4")
    assert notes == [] and len(nodes(nbits, "MatMulNBits")) == 2
    values = inits(nbits)
    for node in nodes(nbits, "MatMulNBits"):
        assert values[node.input[2]].dtype == np.float16
        in_ort = identity_weight(node, values, TensorProto.FLOAT16)
        assert np.array_equal(
            in_ort, dequantized_in_qdq(qdq, node.name, {"x": x}, TensorProto.FLOAT16)
        )
    reference = run(qdq, {"x": x})[0].astype(np.float32)
    got = run(nbits, {"x": x})[0].astype(np.float32)
    np.testing.assert_allclose(got, reference, rtol=0, atol=4e-3 * np.abs(reference).max())


def test_a_weight_shared_by_two_matmuls(tmp_path):
    """Both MatMuls become MatMulNBits over one packed weight; the float weight is dropped."""
    rng = np.random.default_rng(2)
    w = rng.normal(0, 0.3, (64, 32)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["a"], "mm_a"),
            helper.make_node("Relu", ["x"], ["r"], "relu"),
            helper.make_node("MatMul", ["r", "w"], ["b"], "mm_b"),
            helper.make_node("Add", ["a", "b"], ["y"], "add"),
        ],
        "shared",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 32])],
        [numpy_helper.from_array(w, "w")],
    )
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx"
    )
    (tmp_path / "data").mkdir()
    x = rng.normal(0, 1, (6, 64)).astype(np.float32)
    np.savez(tmp_path / "data" / "b0.npz", x=x)
    qdq, nbits, notes = both_forms(
        tmp_path / "m.onnx", tmp_path / "data", format="uint4", block_size=16
    )
    found = nodes(nbits, "MatMulNBits")
    assert notes == [] and [n.name for n in found] == ["mm_a", "mm_b"]
    assert found[0].input[1:] == found[1].input[1:]
    assert "w" not in inits(nbits)
    reference = run(qdq, {"x": x})[0]
    got = run(nbits, {"x": x})[0]
    np.testing.assert_allclose(got, reference, rtol=0, atol=1e-6 * np.abs(reference).max())
