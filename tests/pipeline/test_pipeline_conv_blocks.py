"""Block formats on CNNs end to end: NVFP4 Conv and ConvTranspose activations in blocks of 16
along the channels (1-D to 3-D, partial blocks) and weights along their input channels, checked
against a float64 brute force of the NVFP4 rule and validated through the FP4 emulation; a Conv
whose channels are unknown left in float with a note; int4 block weights on Conv."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from placement_models import cnn_model

from qcal_export.cli import main
from qcal_export.graphs.fp4_emulation import emulate_fp4
from qcal_export.pipeline.calibrate import calibrate_onnx
from qcal_export.validation.fp4_runner import emulation_validator
from qcal_export.validation.reference import ReferenceRunner

CPU = ["CPUExecutionProvider"]
FLOAT = TensorProto.FLOAT
CONVS = ("Conv", "ConvTranspose")
E4M3 = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).double().numpy()
"""Every non-negative finite FP8 E4M3 value, by code."""
E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def e2m1_oracle(y: np.ndarray) -> np.ndarray:
    """Nearest E2M1 value by exhaustive search in float64, ties to the even code, saturating."""
    distance = np.abs(np.abs(y)[..., None] - E2M1)
    nearest = distance == distance.min(axis=-1, keepdims=True)
    return np.sign(y) * E2M1[np.argmin(np.where(nearest, np.arange(8) % 2, 2), axis=-1)]


def conv_stack(spatial: int) -> onnx.ModelProto:
    """x[N,20,5..] -> Conv(16, k3, pad 1) -> Relu -> ConvTranspose(12, k2, stride 2) -> Relu ->
    Conv(4, k1) -> y: 20 channels (a partial block of 4), 16 (one block), 12 (partial only)."""
    rng = np.random.default_rng(5)

    def init(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    k = (3,) * spatial
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["t1"], "c1", pads=[1] * 2 * spatial),
        helper.make_node("Relu", ["t1"], ["r1"], "relu1"),
        helper.make_node("ConvTranspose", ["r1", "w2"], ["t2"], "ct", strides=[2] * spatial),
        helper.make_node("Relu", ["t2"], ["r2"], "relu2"),
        helper.make_node("Conv", ["r2", "w3"], ["y"], "c3"),
    ]
    inits = [
        init("w1", (16, 20, *k)),
        init("w2", (16, 12, *(2,) * spatial)),
        init("w3", (4, 12, *(1,) * spatial)),
    ]
    graph = helper.make_graph(
        nodes,
        "stack",
        [helper.make_tensor_value_info("x", FLOAT, ["N", 20, *(5,) * spatial])],
        [helper.make_tensor_value_info("y", FLOAT, ["N", 4, *(10,) * spatial])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def write_case(root, model: onnx.ModelProto, inputs: dict[str, tuple]) -> None:
    """model.onnx and data/ (3 batches) in ``root``; heavy-tailed inputs of the shapes given."""
    onnx.save(model, str(root / "model.onnx"))
    (root / "data").mkdir()
    rng = np.random.default_rng(11)
    for i in range(3):
        feed = {k: (rng.standard_t(3, s) * 0.8).astype(np.float32) for k, s in inputs.items()}
        np.savez(root / "data" / f"b{i}.npz", **feed)


def batches(root) -> list[dict[str, np.ndarray]]:
    return [dict(np.load(p)) for p in sorted((root / "data").glob("*.npz"))]


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.extend(helper.make_tensor_value_info(n, FLOAT, None) for n in names)
    return copy


def nvfp4_oracle(x: np.ndarray, global_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(effective block scales ``[N, blocks, ...]``, Q -> DQ values) of NVFP4 on ``x`` with
    blocks of 16 along axis 1 (the last one partial), in float64 by the DESIGN section 4 rule:
    ``fp8(block_amax / 6 / global)`` (nearest E4M3, ties to the even code), times the global."""
    x64 = x.astype(np.float64)
    starts = range(0, x.shape[1], 16)
    amax = np.stack([np.abs(x64[:, s : s + 16]).max(axis=1) for s in starts], axis=1)
    raw = np.clip(amax / 6 / global_scale, 2.0**-9, 448.0)
    distance = np.abs(raw[..., None] - E4M3)
    nearest = distance == distance.min(axis=-1, keepdims=True)
    fp8 = E4M3[np.argmin(np.where(nearest, np.arange(127) % 2, 2), axis=-1)]
    effective = (fp8 * np.float64(global_scale)).astype(np.float32)
    expanded = np.repeat(effective.astype(np.float64), 16, axis=1)[:, : x.shape[1]]
    values = (e2m1_oracle(x64 / expanded) * expanded).astype(np.float32)
    return effective, values


def producer(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if tensor in n.output)


def attrs(node: onnx.NodeProto) -> dict[str, int]:
    return {a.name: a.i for a in node.attribute if a.name in ("axis", "block_size")}


CASES = {
    "cnn": (cnn_model, {"x": (2, 3, 8, 8)}),
    "conv1d": (lambda: conv_stack(1), {"x": (2, 20, 5)}),
    "conv2d": (lambda: conv_stack(2), {"x": (2, 20, 5, 5)}),
    "conv3d": (lambda: conv_stack(3), {"x": (2, 20, 5, 5, 5)}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_nvfp4_convolutions_in_blocks_along_the_channels(case, tmp_path):
    """The exported graph's activation blocks and block scales equal the brute force on the
    tensor each Conv reads; ORT over the emulation equals the reference evaluator."""
    build, inputs = CASES[case]
    write_case(tmp_path, build(), inputs)
    result = calibrate_onnx(
        tmp_path / "model.onnx", tmp_path / "data", format="nvfp4", output=tmp_path / "q.onnx"
    )
    assert result.report["validator"] == emulation_validator(CPU)
    q = onnx.load(str(tmp_path / "q.onnx"))
    float_model = onnx.load(str(tmp_path / "model.onnx"))
    inits = {t.name: t for t in q.graph.initializer}
    convs = [n for n in q.graph.node if n.op_type in CONVS]
    assert len(convs) == len([n for n in float_model.graph.node if n.op_type in CONVS])
    checks, raw = [], []
    for node in convs:
        act, weight = producer(q, node.input[0]), producer(q, node.input[1])
        assert (act.op_type, attrs(act)) == ("DequantizeLinear", {"axis": 1, "block_size": 16})
        w_axis = 1 if node.op_type == "Conv" else 0
        assert attrs(weight) == {"axis": w_axis, "block_size": 16}
        assert inits[weight.input[0]].data_type == TensorProto.FLOAT4E2M1
        source = producer(q, act.input[0]).input[0]  # QuantizeLinear(source, effective)
        global_name = producer(q, act.input[1]).input[1]
        checks.append((source, act.input[1], act.output[0], global_name))
        raw.append(source)
    names = [n for check in checks for n in check[:3]]
    float_runner = ort.InferenceSession(
        with_outputs(float_model, raw).SerializeToString(), providers=CPU
    )
    captured = [float_runner.run(raw, feed) for feed in batches(tmp_path)]
    evaluator = ReferenceRunner(with_outputs(q, names))
    emulated = ort.InferenceSession(
        emulate_fp4(with_outputs(q, names)).model.SerializeToString(), providers=CPU
    )
    for feed in batches(tmp_path):
        want = dict(zip(["y", *names], evaluator.run(["y", *names], feed), strict=True))
        got = dict(zip(["y", *names], emulated.run(["y", *names], feed), strict=True))
        for i, (source, effective, dequantized, global_name) in enumerate(checks):
            amax = max(np.abs(c[i]).max() for c in captured)
            global_scale = numpy_helper.to_array(inits[global_name])
            assert global_scale == np.float32(np.float64(amax) / (6 * 448))
            block_scales, values = nvfp4_oracle(want[source], float(global_scale))
            np.testing.assert_array_equal(want[effective], block_scales)
            np.testing.assert_array_equal(want[dequantized], values)
            np.testing.assert_array_equal(got[dequantized], values)
        np.testing.assert_allclose(got["y"], want["y"], rtol=0, atol=1e-5 * np.abs(want["y"]).max())


def unknown_channels_model() -> onnx.ModelProto:
    """x[N,C,5,5] -> Conv(weight fed as an input [4,C,3,3]) -> Flatten -> Gemm -> y[N,5]: the
    Conv's channel count is known at run time only."""
    wfc = (np.random.default_rng(2).standard_normal((5, 36)) * 0.3).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["t"], "conv"),
            helper.make_node("Flatten", ["t"], ["f"], "flatten"),
            helper.make_node("Gemm", ["f", "wfc"], ["y"], "fc", transB=1),
        ],
        "unknown",
        [
            helper.make_tensor_value_info("x", FLOAT, ["N", "C", 5, 5]),
            helper.make_tensor_value_info("w", FLOAT, [4, "C", 3, 3]),
        ],
        [helper.make_tensor_value_info("y", FLOAT, ["N", 5])],
        [numpy_helper.from_array(wfc, "wfc")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_the_cli_leaves_a_conv_of_unknown_channels_float_with_a_note(tmp_path, capsys):
    write_case(tmp_path, unknown_channels_model(), {"x": (2, 20, 5, 5), "w": (4, 20, 3, 3)})
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    args = ["calibrate", str(tmp_path / "model.onnx"), "--data", str(tmp_path / "data")]
    assert main([*args, "-o", str(out), "--format", "nvfp4", "--report", str(report)]) == 0
    note = (
        "Conv 'conv' left in float: nvfp4 activation 'x': its channel count (axis 1) or its "
        "rank is unknown, so its blocks cannot be placed"
    )
    assert note in json.loads(report.read_text())["plan_notes"]
    assert "Conv 'conv' left in float" in capsys.readouterr().out
    q = onnx.load(str(out))
    conv = next(n for n in q.graph.node if n.op_type == "Conv")
    assert list(conv.input) == ["x", "w"]
    assert producer(q, "f_dequantized").op_type == "DequantizeLinear"


def test_int4_block_weights_on_conv(tmp_path):
    """Weights only, blocks of 16 along the input channels (3 of them: one partial block):
    scale ``block_amax / 7``, run in ONNX Runtime."""
    write_case(tmp_path, cnn_model(), {"x": (2, 3, 8, 8)})
    result = calibrate_onnx(
        tmp_path / "model.onnx",
        tmp_path / "data",
        format="int4",
        block_size=16,
        output=tmp_path / "q.onnx",
    )
    assert result.report["validator"] == "onnxruntime (CPUExecutionProvider)"
    assert all(s.kind == "weight" for s in result.scales.values())
    q = onnx.load(str(tmp_path / "q.onnx"))
    float_model = onnx.load(str(tmp_path / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in float_model.graph.initializer}
    for node in (n for n in q.graph.node if n.op_type == "Conv"):
        dq = producer(q, node.input[1])
        assert attrs(dq) == {"axis": 1, "block_size": 16}
        w = inits[node.name.replace("c", "w")].astype(np.float64)
        starts = range(0, w.shape[1], 16)
        amax = np.stack([np.abs(w[:, s : s + 16]).max(axis=1) for s in starts], axis=1)
        scale = numpy_helper.to_array(next(t for t in q.graph.initializer if t.name == dq.input[1]))
        np.testing.assert_array_equal(scale, (amax / 7).astype(np.float32))
