"""TorchCalibration.export_onnx end to end: a transformer block and a small CNN exported with the
dynamo and the legacy exporter; every targeted module mapped, the QDQ model valid and computing
what the torch model computes under ``fake_quantize()``; what cannot be mapped is reported.

The oracle is the torch model with the same scales, fake-quantized; ONNX Runtime runs the QDQ
graph as written (see ``torch_models.run_onnx``), so the two agree to float32 rounding.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torch_models import (
    BLOCK_MODULES,
    CNN_MODULES,
    assert_block_export_matches_fake_quant,
    make_block,
    make_cnn,
    run_onnx,
)

from qcal_export import Override, Recipe, TensorSpec, calibrate_torch, load_scales
from qcal_export.errors import OutputError
from qcal_export.from_torch.plan import widest
from qcal_export.spec.formats import get_format
from qcal_export.spec.granularity import PerAxis, PerBlock, PerTensor
from qcal_export.spec.scales import TensorScales

EPS32 = float(np.finfo(np.float32).eps)
MODELS = {"block": (make_block, BLOCK_MODULES), "cnn": (make_cnn, CNN_MODULES)}


def recipe_for(fmt: str) -> Recipe:
    """``fmt`` activations per tensor, weights per channel; fc1 (Block) quantizes its output."""
    activation, weight = TensorSpec(fmt), TensorSpec(fmt, per_channel=True)
    fc1 = Override(nodes="fc1", activation=activation, weight=weight, output=activation)
    return Recipe(activation=activation, weight=weight, overrides=(fc1,))


@pytest.fixture(scope="module")
def calibrated():
    cache = {}

    def get(name: str, fmt: str):
        if (name, fmt) not in cache:
            model, batches = MODELS[name][0]()
            cache[name, fmt] = batches, calibrate_torch(model, batches, recipe_for(fmt))
        return cache[name, fmt]

    return get


def assert_matches_fake_quant(calibration, path, batches) -> None:
    """ORT's QDQ output equals the fake-quantized torch forward to a few float32 ulps."""
    model = calibration.model
    for x in batches:
        got = run_onnx(path, x)
        with torch.no_grad():
            plain = model(x).numpy()
            with calibration.fake_quantize():
                want = model(x).numpy()
        tolerance = 16 * EPS32 * float(np.abs(want).max())
        np.testing.assert_allclose(got, want, rtol=0, atol=tolerance)
        assert np.abs(plain - want).max() > 100 * tolerance  # the reference is sensitive


def op_count(path, op_type: str) -> int:
    return sum(n.op_type == op_type for n in onnx.load(str(path)).graph.node)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
@pytest.mark.parametrize("name", ["block", "cnn"])
def test_every_module_is_mapped_and_the_qdq_model_equals_fake_quant(
    calibrated, tmp_path, name, dynamo, fmt
):
    batches, calibration = calibrated(name, fmt)
    out = tmp_path / "q.onnx"
    result = calibration.export_onnx((batches[0],), out, dynamo=dynamo)
    assert set(calibration.modules) == MODELS[name][1]
    assert set(result.mapped) == MODELS[name][1]
    assert result.unmapped == {} and result.outputs_not_exported == {}
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    transposed = {m: matches[0].transposed for m, matches in result.mapped.items()}
    if name == "block":  # MatMul(x, W.T); q, k and v share one quantized input
        assert transposed == dict.fromkeys(BLOCK_MODULES, True)
        assert op_count(out, "QuantizeLinear") == 5  # ln1 out, o, fc1 in and out, fc2
        assert result.report["modules"]["fc1"]["output"] is not None
    else:  # Conv, ConvTranspose and Gemm(transB=1) keep the parameters as they are
        assert transposed == dict.fromkeys(CNN_MODULES, False)
        assert op_count(out, "QuantizeLinear") == 3
    if fmt == "fp8":
        assert result.report["opset"]["to"] >= 19
    weight = result.mapped["fc1" if name == "block" else "up"][0].weight
    assert result.scales[weight].granularity == PerAxis(1)  # W.T's / ConvTranspose's channels
    assert_matches_fake_quant(calibration, out, batches)


def test_block_weights_of_a_transposed_linear_are_transposed(tmp_path):
    model, batches = make_block()
    recipe = Recipe(activation=TensorSpec("int8"), weight=TensorSpec("int4", block_size=16))
    calibration = calibrate_torch(model, batches, recipe)
    result = calibration.export_onnx((batches[0],), tmp_path / "q.onnx", dynamo=False)
    assert set(result.mapped) == BLOCK_MODULES
    match = result.mapped["fc1"][0]
    torch_side, onnx_side = calibration.scales["fc1.weight"], result.scales[match.weight]
    assert torch_side.granularity == PerBlock(1, 16) and onnx_side.granularity == PerBlock(0, 16)
    assert torch.equal(onnx_side.scale, torch_side.scale.T)  # [64, 2] -> [2, 64]
    assert_matches_fake_quant(calibration, tmp_path / "q.onnx", batches)


def test_nvfp4_weights_and_activations_match_in_the_reference_evaluator(tmp_path):
    model, batches = make_block()
    weight = TensorSpec("nvfp4", method="nvfp4-mse", options={"hessian": True})
    calibration = calibrate_torch(model, batches, Recipe(TensorSpec("nvfp4"), weight))
    assert_block_export_matches_fake_quant(calibration, model, batches, tmp_path / "q.onnx")


def test_an_output_that_is_the_next_modules_input_gets_one_qdq_pair(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 8)).eval()
    batches = [torch.randn(4, 3, 16) for _ in range(2)]
    recipe = Recipe(overrides=(Override(nodes="0", activation=TensorSpec(), output=TensorSpec()),))
    calibration = calibrate_torch(model, batches, recipe)
    assert torch.equal(calibration.scales["0.output"].scale, calibration.scales["1.input"].scale)
    result = calibration.export_onnx((batches[0],), tmp_path / "q.onnx", dynamo=True)
    assert result.report["modules"]["1"]["inputs"] == [result.report["modules"]["0"]["output"]]
    assert op_count(tmp_path / "q.onnx", "QuantizeLinear") == 2
    assert_matches_fake_quant(calibration, tmp_path / "q.onnx", batches)
    fp8 = Override(nodes="0", activation=TensorSpec(), output=TensorSpec("fp8"))
    calibration = calibrate_torch(model, batches, Recipe(overrides=(fp8,)))
    result = calibration.export_onnx((batches[0],), tmp_path / "q.onnx", dynamo=False)
    assert "also an input quantized as int8" in result.outputs_not_exported["0"]


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_a_conv_with_a_folded_batchnorm_is_reported_unmapped(tmp_path, caplog, dynamo):
    model, batches = make_cnn(batch_norm=True)
    calibration = calibrate_torch(model, batches)
    with caplog.at_level(logging.WARNING):
        result = calibration.export_onnx((batches[0],), tmp_path / "q.onnx", dynamo=dynamo)
    assert set(result.mapped) == {"up", "head"}
    assert list(result.unmapped) == ["conv"]
    assert "BatchNorm" in result.unmapped["conv"]
    assert result.report["unmapped_modules"] == result.unmapped
    assert "conv: " in caplog.text and "stay in float" in caplog.text
    assert op_count(tmp_path / "q.onnx", "QuantizeLinear") == 2  # up's and head's inputs


def test_an_output_that_is_a_graph_output_is_reported_not_quantized(tmp_path):
    model, batches = make_cnn()
    recipe = Recipe(overrides=(Override(nodes="head", output=TensorSpec()),))
    calibration = calibrate_torch(model, batches, recipe)
    assert set(calibration.scales) >= {"head.output", "up.input", "up.weight"}
    result = calibration.export_onnx((batches[0],), tmp_path / "q.onnx", dynamo=False)
    assert list(result.outputs_not_exported) == ["head"]
    assert "graph output" in result.outputs_not_exported["head"]


def test_modules_sharing_an_input_get_the_widest_range(tmp_path):
    model, batches = make_block()
    mse = TensorSpec(method="mse")
    recipe = Recipe(overrides=(Override(nodes="k", activation=mse, weight=TensorSpec()),))
    calibration = calibrate_torch(model, batches, recipe)
    assert calibration.batches_per_pass == [3, 3]
    q_amax, k_amax = (float(calibration.scales[f"{m}.input"].amax) for m in "qk")
    assert q_amax != k_amax
    result = calibration.export_onnx((batches[0],), tmp_path / "q.onnx", dynamo=False)
    (shared,) = result.report["modules"]["q"]["inputs"]
    assert result.report["modules"]["k"]["inputs"] == [shared]
    assert float(result.scales[shared].amax) == max(q_amax, k_amax)
    assert any("q.input" in note and "k.input" in note for note in result.notes)


@pytest.mark.parametrize(("fmt", "qmax"), [("int8", 127.0), ("fp8", 448.0)])
def test_the_widest_of_tiny_ranges_keeps_its_own_scale(fmt, qmax):
    """Ranges around 1e-36 merge to their widest, amax / qmax in float64 terms, not to the
    1e-30 floor that only a zero range gets."""
    scales = {}
    for module, amax in (("q.input", 3e-36), ("k.input", 7e-36)):
        value = torch.tensor(amax, dtype=torch.float32)
        scale, zero_point = get_format(fmt).scale_zero_point(-value, value)
        scales[module] = TensorScales(
            module, "activation", fmt, "max", PerTensor(), value, scale, zero_point
        )
    merged, note = widest("x", scales)
    assert note is not None
    assert float(merged.amax) == float(np.float32(7e-36))
    assert float(merged.scale) == float(np.float32(float(np.float32(7e-36)) / qmax))


class Tied(nn.Module):
    """Two Linear layers sharing one weight, and a third with an equal copy of it."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (nn.Linear(16, 16) for _ in range(3))
        self.b.weight = self.a.weight
        with torch.no_grad():
            self.c.weight.copy_(self.a.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_tied_and_equal_weights_map_by_module_scope(tmp_path, dynamo):
    torch.manual_seed(0)
    model = Tied().eval()
    batches = [torch.randn(4, 3, 16) for _ in range(2)]
    calibration = calibrate_torch(model, batches)
    result = calibration.export_onnx((batches[0],), tmp_path / "q.onnx", dynamo=dynamo)
    assert result.unmapped == {}
    nodes = {m: [n.node for n in matches] for m, matches in result.mapped.items()}
    assert len({n for found in nodes.values() for n in found}) == 3  # one node each
    assert_matches_fake_quant(calibration, tmp_path / "q.onnx", batches)


def test_scales_and_report_files_and_the_model_left_as_found(tmp_path):
    model, batches = make_cnn()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calibration = calibrate_torch(model, batches)
    paths = {
        "path": tmp_path / "q.onnx",
        "scales": tmp_path / "s.st",
        "report": tmp_path / "r.json",
    }
    result = calibration.export_onnx((batches[0],), **paths, dynamo=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx", "r.json", "s.st"]
    found, header = load_scales(paths["scales"])
    assert set(found) == set(result.scales)
    assert header["model_sha256"] == result.report["float_model_sha256"]
    report = json.loads(paths["report"].read_text())
    assert report["unmapped_modules"] == {} and set(report["modules"]) == CNN_MODULES
    assert report["output_error"]  # ORT ran the QDQ and float models on the example input
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_export_refuses_two_outputs_on_one_file_and_writes_nothing(tmp_path):
    (tmp_path / "sub").mkdir()
    model, batches = make_cnn()
    calibration = calibrate_torch(model, batches)
    same_file = r"scales .*r\.json and report .*r\.json are the same file"
    with pytest.raises(OutputError, match=same_file):
        calibration.export_onnx(
            (batches[0],),
            tmp_path / "q.onnx",
            scales=tmp_path / "r.json",
            report=tmp_path / "sub" / ".." / "r.json",
            dynamo=False,
        )
    assert [p.name for p in tmp_path.iterdir()] == ["sub"]


def test_export_reports_both_runtimes(tmp_path):
    """The torch path validates as the ONNX path does: ORT as deployed and with optimizations
    off agree on this CNN, and the report holds both."""
    model, batches = make_cnn()
    result = calibrate_torch(model, batches).export_onnx(
        (batches[0],), tmp_path / "q.onnx", dynamo=False
    )
    validation = result.report["validation"]
    assert validation["runtime_issue"] is None
    assert result.report["output_error"] == validation["default"]
    for name, error in validation["reference"].items():
        assert 0 < error["rel_l2"] < 0.1
        assert validation["default"][name]["rel_l2"] == pytest.approx(error["rel_l2"], rel=0.5)


def test_torch_capture_keeps_int8_activations_under_the_default_target():
    # The hooks place Q/DQ as TensorRT does; the ort target's uint8 default is the ONNX path's.
    from qcal_export import capture

    recipe = capture(torch.nn.Sequential(torch.nn.Linear(4, 4))).recipe
    assert (recipe.activation.format, recipe.weight.format, recipe.target) == (
        "int8",
        "int8",
        "tensorrt",
    )
