"""calibrate_onnx end to end: edge cases that cross capture, calibrators and export, then the
small Conv + Gemm model of convgemm.py (the same model test_cli.py runs through ``qcal``).

On the Conv + Gemm model the oracles are ONNX Runtime on the float model and a torch forward
pass that fake-quantizes weights and activations with the scales the run produced.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from convgemm import ACTIVATIONS, BATCH, BATCHES, WEIGHTS, data_batches, op_counts, run_model
from onnx import TensorProto, helper, numpy_helper

from qcal_export import Recipe, TensorSpec, calibrate_onnx
from qcal_export.errors import DataError
from qcal_export.spec.formats import AMAX_FLOOR, get_format

TRT = "tensorrt"
"""The convgemm tests' target: Q/DQ on the Conv and Gemm inputs (convgemm.ACTIVATIONS) only,
symmetric int8 activations."""


def _matmul_model(path):
    w = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], "mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.write_bytes(model.SerializeToString())
    return w


def test_mse_on_an_activation_that_is_always_empty_floors_and_says_so(tmp_path):
    w = _matmul_model(tmp_path / "m.onnx")
    batches = [{"x": np.zeros((0, 4), np.float32)} for _ in range(3)]
    result = calibrate_onnx(tmp_path / "m.onnx", batches, method="mse", output=tmp_path / "q.onnx")
    x_scales = result.scales["x"]
    assert x_scales.amax.item() == np.float32(AMAX_FLOOR)
    assert x_scales.scale.item() > 0 and np.isfinite(x_scales.scale.item())
    assert x_scales.notes == ["no values collected: amax floored"]
    assert result.report["batches_per_pass"] == [3]  # no second pass: nothing to refine
    # The weight was still calibrated per output channel (max |w| of each column / 127).
    np.testing.assert_allclose(result.scales["w"].scale.numpy(), np.abs(w).max(0) / 127)
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": np.zeros((0, 4), np.float32)})
    assert y.shape == (0, 3)


# ---- the Conv + Gemm model ---------------------------------------------------------------


def float_weights(workdir: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(workdir / "model.onnx"))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_mse_takes_two_passes(workdir):
    result = calibrate_onnx(workdir / "model.onnx", workdir / "data", method="mse", target=TRT)
    assert result.report["batches_per_pass"] == [BATCHES, BATCHES]
    methods = {r["tensor"]: r["method"] for r in result.report["tensors"]}
    assert methods == {"x": "mse", "/Flatten_output_0": "mse", **dict.fromkeys(WEIGHTS, "max")}
    assert result.report["output_error"]["y"]["cosine"] > 0.99
    limited = calibrate_onnx(
        workdir / "model.onnx", workdir / "data", method="mse", max_batches=2, validate_batches=0
    )
    assert limited.report["batches_per_pass"] == [2, 2]
    assert limited.report["output_error"] == {}


def test_fp8_raises_the_opset_to_19(workdir, tmp_path):
    out = tmp_path / "fp8.onnx"
    result = calibrate_onnx(workdir / "model.onnx", workdir / "data", format="fp8", output=out)
    assert result.report["opset"] == {"from": 17, "to": 19}
    model = onnx.load(str(out))
    assert next(e.version for e in model.opset_import if e.domain in ("", "ai.onnx")) == 19
    stored = {t.name: t.data_type for t in model.graph.initializer}
    assert stored["conv.weight_quantized"] == TensorProto.FLOAT8E4M3FN
    assert result.report["output_error"]["y"]["cosine"] > 0.99
    x = data_batches(workdir)[0]
    assert run_model(out, x).shape == (BATCH, 5)


def test_weights_mode_qdq_keeps_float_weights_with_a_q_dq_pair(workdir, tmp_path):
    out = tmp_path / "qdq.onnx"
    calibrate_onnx(
        workdir / "model.onnx", workdir / "data", weights_mode="qdq", output=out, target=TRT
    )
    model = onnx.load(str(out))
    stored = {t.name: t for t in model.graph.initializer}
    originals = float_weights(workdir)
    for name in WEIGHTS:
        assert stored[name].data_type == TensorProto.FLOAT
        assert np.array_equal(numpy_helper.to_array(stored[name]), originals[name])
        assert f"{name}_quantized" not in stored
        quantize = [
            n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == name
        ]
        assert len(quantize) == 1
        dequantize = [n for n in model.graph.node if quantize[0].output[0] in n.input]
        assert [n.op_type for n in dequantize] == ["DequantizeLinear"]
        consumer = [n for n in model.graph.node if dequantize[0].output[0] in n.input]
        assert [n.op_type for n in consumer] == [{"conv.weight": "Conv", "fc.weight": "Gemm"}[name]]
    assert op_counts(model)["QuantizeLinear"] == 4
    # same numbers as the stored-quantized form
    quantized = tmp_path / "quantized.onnx"
    calibrate_onnx(workdir / "model.onnx", workdir / "data", output=quantized, target=TRT)
    x = data_batches(workdir)[1]
    assert np.allclose(run_model(out, x), run_model(quantized, x), rtol=0, atol=1e-6)


def test_torch_only_recipe_fields_are_ignored_with_a_warning(workdir, caplog):
    recipe = Recipe(output=TensorSpec(), modules=("head",))
    with_torch_fields = calibrate_onnx(workdir / "model.onnx", workdir / "data", recipe=recipe)
    plain = calibrate_onnx(workdir / "model.onnx", workdir / "data", recipe=Recipe())
    assert "['output', 'modules'] apply to torch models only" in caplog.text
    assert set(with_torch_fields.scales) == set(plain.scales)
    for name, entry in plain.scales.items():
        assert torch.equal(with_torch_fields.scales[name].scale, entry.scale)


def test_exclude_leaves_matching_nodes_in_float(workdir, tmp_path):
    out = tmp_path / "excluded.onnx"
    result = calibrate_onnx(
        workdir / "model.onnx", workdir / "data", exclude=("/fc/*",), output=out, target=TRT
    )
    assert result.report["quantized_nodes"] == ["/conv/Conv"]
    assert result.report["excluded_nodes"] == ["/fc/Gemm"]
    assert set(result.scales) == {"x", "conv.weight"}
    model = onnx.load(str(out))
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    assert list(gemm.input) == ["/Flatten_output_0", "fc.weight", "fc.bias"]
    counts = op_counts(model)
    assert (counts["QuantizeLinear"], counts["DequantizeLinear"]) == (1, 2)


def fake_quant_forward(
    workdir: Path, scales: dict, x: np.ndarray, fmt_name: str, quantize: bool = True
) -> np.ndarray:
    """Torch forward of the model with weights and activations fake-quantized by ``scales``."""
    fmt = get_format(fmt_name)
    w = {k: torch.from_numpy(v.copy()) for k, v in float_weights(workdir).items()}

    def fq(t: torch.Tensor, name: str) -> torch.Tensor:
        if not quantize:
            return t
        s = scales[name]
        shape = (-1,) + (1,) * (t.dim() - 1) if s.axis is not None else ()
        return fmt.fake_quant(t, s.scale.reshape(shape), s.zero_point.reshape(shape))

    h = torch.nn.functional.conv2d(
        fq(torch.from_numpy(x), "x"), fq(w["conv.weight"], "conv.weight"), w["conv.bias"]
    )
    a = torch.flatten(torch.relu(h), 1)
    y = fq(a, "/Flatten_output_0") @ fq(w["fc.weight"], "fc.weight").T + w["fc.bias"]
    return y.numpy()


@pytest.mark.parametrize("fmt_name", ["int8", "uint8", "fp8"])
def test_qdq_model_equals_a_fake_quant_reference(workdir, tmp_path, fmt_name):
    """ORT's QDQ model and the torch fake-quant forward agree to float32 rounding.

    ORT's and torch's convolutions sum in different orders, so an activation lying on a
    rounding boundary may land one step apart: a few elements may differ by at most one
    quantization step of the Gemm input (times the largest weight), none by more.
    """
    out = tmp_path / "q.onnx"
    result = calibrate_onnx(
        workdir / "model.onnx", workdir / "data", format=fmt_name, output=out, target=TRT
    )
    assert set(result.scales) == ACTIVATIONS | WEIGHTS
    act = result.scales["/Flatten_output_0"]
    # largest step between neighbouring values: the scale for ints, 32 * scale for fp8 e4m3
    step = float(act.scale) * (32.0 if fmt_name == "fp8" else 1.0)
    one_flip = step * float(np.abs(float_weights(workdir)["fc.weight"]).max())
    for x in data_batches(workdir):
        got = run_model(out, x)
        want = fake_quant_forward(workdir, result.scales, x, fmt_name)
        plain = fake_quant_forward(workdir, result.scales, x, fmt_name, quantize=False)
        tight = 1e-5 * np.abs(want).max()
        diff = np.abs(got - want)
        assert (diff <= tight).mean() >= 0.95
        assert diff.max() <= 2 * one_flip
        # the reference is sensitive: the float forward is much further away
        assert np.abs(plain - want).max() > 100 * tight
        assert math.isfinite(float(np.abs(got).max()))


class Reader:
    """An ORT-style calibration data reader with rewind(), counting its rewinds."""

    def __init__(self, batches: list[np.ndarray]):
        self.batches = batches
        self.position = 0
        self.rewinds = 0

    def get_next(self) -> dict | None:
        if self.position == len(self.batches):
            return None
        self.position += 1
        return {"x": self.batches[self.position - 1]}

    def rewind(self) -> None:
        self.rewinds += 1
        self.position = 0


def test_calibration_data_reader_is_rewound_for_each_pass(workdir):
    reader = Reader(data_batches(workdir))
    result = calibrate_onnx(workdir / "model.onnx", reader, method="mse")
    assert result.report["batches_per_pass"] == [BATCHES, BATCHES]
    # the mse pass, the validation pass and the deployment measurement's batch
    assert reader.rewinds == 3
    from_files = calibrate_onnx(workdir / "model.onnx", workdir / "data", method="mse")
    for name in ACTIVATIONS:
        assert torch.equal(result.scales[name].amax, from_files.scales[name].amax)
    assert result.report["output_error"] == from_files.report["output_error"]


def test_one_shot_generator_serves_a_single_pass(workdir):
    batches = data_batches(workdir)
    result = calibrate_onnx(workdir / "model.onnx", ({"x": x} for x in batches), validate_batches=0)
    assert result.report["batches_per_pass"] == [BATCHES]
    amax = max(float(np.abs(x).max()) for x in batches)
    assert float(result.scales["x"].amax) == amax
    with pytest.raises(DataError, match="one-shot iterator"):
        calibrate_onnx(
            workdir / "model.onnx",
            ({"x": x} for x in batches),
            method="mse",
            validate_batches=0,
        )
