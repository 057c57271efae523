"""calibrate_onnx on models as exporters write them: initializers listed as graph inputs, tiny
ranges and float16 scales (models with nothing quantizable, or that ONNX Runtime's CPU
provider cannot run: test_unrunnable_models). Oracles: ORT on the same model exported without
the input listing, and a float64 brute force of the QuantizeLinear -> DequantizeLinear
arithmetic."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from exported_graphs import FORMATS, calibrate_onnx, matmul_graph, qdq64, save, scale_of
from mlp import MLP
from onnx import TensorProto, helper, numpy_helper

from qcal_export.spec.formats import SCALE_LIMITS
from qcal_export.validation.validate import reference_runner

CPU = ["CPUExecutionProvider"]


# ---- initializers listed as graph inputs -------------------------------------------------------


def export_mlp(path: Path, keep_initializers_as_inputs: bool) -> Path:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            MLP().eval(),
            (torch.randn(2, 64),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "b"}, "y": {0: "b"}},
            keep_initializers_as_inputs=keep_initializers_as_inputs,
        )
    return path


def linear_graph(listed: bool) -> onnx.GraphProto:
    """``x @ W + b`` on [b, 32] -> [b, 16]; ``listed``: W and b are graph inputs too."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((32, 16)).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 32])]
    if listed:
        inputs += [
            helper.make_tensor_value_info("W", TensorProto.FLOAT, [32, 16]),
            helper.make_tensor_value_info("bias", TensorProto.FLOAT, [16]),
        ]
    return helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"], "mm"),
            helper.make_node("Add", ["h", "bias"], ["y"], "add"),
        ],
        "g",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 16])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "bias")],
    )


@pytest.fixture(scope="module")
def listed_models(tmp_path_factory) -> dict[str, tuple[Path, Path, int]]:
    """Per source: (model with initializers listed as inputs, the same without, input width)."""
    root = tmp_path_factory.mktemp("listed")
    torch_pair = (
        export_mlp(root / "mlp_listed.onnx", True),
        export_mlp(root / "mlp.onnx", False),
        64,
    )
    helper_pair = (
        save(linear_graph(True), root / "linear_listed.onnx"),
        save(linear_graph(False), root / "linear.onnx"),
        32,
    )
    return {"torch": torch_pair, "helper": helper_pair}


@pytest.mark.parametrize("mode", ["quantized", "qdq"])
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("source", ["torch", "helper"])
def test_initializers_listed_as_inputs_calibrate_to_a_model_that_loads(
    listed_models, tmp_path, source, fmt, mode
):
    """The quantized model lists no weight as an input, loads in ORT (nvfp4: the reference
    evaluator) and gives what the same model exported without the listing gives."""
    listed, plain, width = listed_models[source]
    rng = np.random.default_rng(0)
    data = [{"x": rng.standard_normal((4, width)).astype(np.float32)} for _ in range(3)]
    options = {**FORMATS[fmt], "weights_mode": mode}
    got = calibrate_onnx(listed, data, output=tmp_path / "listed.onnx", **options)
    want = calibrate_onnx(plain, data, output=tmp_path / "plain.onnx", **options)
    assert got.scales.keys() == want.scales.keys()
    for name, s in got.scales.items():
        assert torch.equal(s.scale, want.scales[name].scale), name
    weights = [n for n, s in got.scales.items() if s.kind == "weight"]
    assert len(weights) == (3 if source == "torch" else 1)
    model = onnx.load(str(tmp_path / "listed.onnx"))
    inputs = {value.name for value in model.graph.input}
    assert not inputs & set(weights)
    initializers = {t.name for t in model.graph.initializer}
    assert (set(weights) <= initializers) == (mode == "qdq")
    assert any("keep_initializers_as_inputs" in note for note in got.report["plan_notes"])
    listed_runner, _ = reference_runner(model, CPU)
    plain_runner, _ = reference_runner(onnx.load(str(tmp_path / "plain.onnx")), CPU)
    for batch in data:
        (y,) = listed_runner.run(["y"], batch)
        (expected,) = plain_runner.run(["y"], batch)
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    assert got.report["output_error"]["y"] == pytest.approx(want.report["output_error"]["y"])


# ---- tiny ranges ----------------------------------------------------------------------------


QMAX = {"int8": 127, "fp8": 448}


def sessions(path: Path) -> list[ort.InferenceSession]:
    """ORT as written (optimizations off) and as users run it (default optimizations)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return [
        ort.InferenceSession(str(path), options, providers=CPU),
        ort.InferenceSession(str(path), providers=CPU),
    ]


def test_an_activation_around_1e_36_gets_its_own_scale(tmp_path):
    """amax ~1e-36: the int8 scale (a float32 subnormal) is amax / 127 as float64 computes it
    rounded to float32, said to be subnormal; ORT's output is non-zero and equals the float64
    QDQ arithmetic with that scale."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    path = save(matmul_graph(w, ["b", 8]), tmp_path / "m.onnx")
    data = [{"x": (rng.uniform(-1, 1, (3, 8)) * 1e-36).astype(np.float32)} for _ in range(3)]
    result = calibrate_onnx(path, data, output=tmp_path / "q.onnx", per_channel_weights=False)
    amax = max(np.abs(b["x"].astype(np.float64)).max() for b in data)
    model = onnx.load(str(tmp_path / "q.onnx"))
    scale = scale_of(model, "x")
    assert scale.dtype == np.float32 and scale == np.float32(amax / 127)
    assert 0 < scale < SCALE_LIMITS[TensorProto.FLOAT][1]
    (note,) = result.scales["x"].notes
    assert note.startswith(f"scale {float(scale):.3g} subnormal in float32 (below 1.18e-38)")
    w_scale = scale_of(model, "W")
    for session in sessions(tmp_path / "q.onnx"):
        for batch in data:
            (y,) = session.run(None, batch)
            expected = qdq64(batch["x"], scale, 127) @ qdq64(w, w_scale, 127)
            assert np.abs(y).min() > 0
            np.testing.assert_allclose(y, expected, rtol=1e-4)


@pytest.mark.parametrize("magnitude", [1e-20, 1e-40])
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_a_weight_of_tiny_values_gets_its_own_scales(tmp_path, fmt, magnitude):
    """Per-channel scales equal the float64 amax / qmax rounded to float32 (1e-40: subnormal
    weights and scales, with the note); ORT's output is non-zero and matches."""
    rng = np.random.default_rng(1)
    w = (rng.uniform(-1, 1, (8, 4)) * magnitude).astype(np.float32)
    path = save(matmul_graph(w, ["b", 8]), tmp_path / "m.onnx")
    data = [{"x": rng.standard_normal((3, 8)).astype(np.float32)} for _ in range(2)]
    result = calibrate_onnx(
        path, data, output=tmp_path / "q.onnx", format=fmt, activation_format="none"
    )
    expected = (np.abs(w.astype(np.float64)).max(axis=0) / QMAX[fmt]).astype(np.float32)
    model = onnx.load(str(tmp_path / "q.onnx"))
    assert np.array_equal(scale_of(model, "W"), expected)
    assert np.array_equal(result.scales["W"].scale.numpy(), expected)
    subnormal = int((expected < SCALE_LIMITS[TensorProto.FLOAT][1]).sum())
    notes = result.scales["W"].notes
    if subnormal:
        (note,) = notes
        assert note.startswith(f"{subnormal} scales (the smallest {expected.min():.3g}) subnormal")
    else:
        assert notes == []
    dequantized = result.scales["W"].fake_quant_weight(torch.from_numpy(w)).double().numpy()
    as_written, default = sessions(tmp_path / "q.onnx")
    for batch in data:
        want = batch["x"].astype(np.float64) @ dequantized
        (y,) = as_written.run(None, batch)
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
        # by default ORT runs an int8 DQ -> MatMul on x quantized on the fly: a coarser match
        (y,) = default.run(None, batch)
        assert np.abs(y).max() > 0
        np.testing.assert_allclose(y, want, atol=0.1 * np.abs(want).max())


def test_float16_scales_are_floored_at_the_smallest_float16(tmp_path):
    """A float16 model's activation of amax ~1e-6: amax / 127 is 0 in float16, so the scale is
    floored at 2**-24 (the smallest float16) with a note; ORT's output is non-zero and equals
    the float64 arithmetic with that scale."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((8, 4)).astype(np.float16)
    path = save(matmul_graph(w, ["b", 8], TensorProto.FLOAT16), tmp_path / "m.onnx")
    data = [{"x": (rng.uniform(-1, 1, (3, 8)) * 1e-6).astype(np.float16)} for _ in range(2)]
    result = calibrate_onnx(path, data, output=tmp_path / "q.onnx", per_channel_weights=False)
    amax = max(np.abs(b["x"].astype(np.float64)).max() for b in data)
    assert np.float16(amax / 127) == 0
    model = onnx.load(str(tmp_path / "q.onnx"))
    scale = scale_of(model, "x")
    assert scale.dtype == np.float16 and scale == 2.0**-24
    assert result.scales["x"].notes == [
        f"scale {np.float32(amax) / np.float32(127):.3g} below 5.96e-08, the smallest positive "
        "float16: floored there"
    ]
    w_scale = scale_of(model, "W")
    for session in sessions(tmp_path / "q.onnx"):
        for batch in data:
            (y,) = session.run(None, batch)
            assert np.abs(y).max() > 0
            expected = qdq64(batch["x"], scale, 127) @ qdq64(w, w_scale, 127)
            # y is float16, subnormal around 1e-6: within two of its steps of 2**-24
            np.testing.assert_allclose(y, expected, rtol=1e-3, atol=2 * 2.0**-24)
