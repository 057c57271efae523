"""calibrate_onnx with block formats on a real exported MLP: nvfp4 (max, mse, nvfp4-mse, Hessian)
and int4, checked against a torch fake-quant forward, the scales file, the report's weight
errors, the captured Hessian and the serving checkpoints written from the same calibration."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from mlp import BATCHES, LAYERS, batches, make_mlp
from onnx import numpy_helper

from qcal_export.artifacts.checkpoint import load_nvfp4_checkpoint
from qcal_export.artifacts.scales import load_scales
from qcal_export.calibrators.nvfp4_mse import NVFP4MseCalibrator
from qcal_export.cli import main
from qcal_export.errors import OutputError, RecipeError
from qcal_export.pipeline.calibrate import calibrate_onnx
from qcal_export.spec.formats import NVFP4, get_format
from qcal_export.spec.granularity import PerBlock
from qcal_export.validation.fp4_runner import emulation_validator
from qcal_export.validation.validate import reference_runner

CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="module", params=[True, False], ids=["matmul", "gemm"])
def mlp(request, tmp_path_factory):
    return make_mlp(tmp_path_factory.mktemp("mlp"), seq=request.param)


def linear_layers(path) -> list[tuple[str, str, torch.Tensor, torch.Tensor]]:
    """(activation input, weight name, weight [out, in], bias) per layer, in order."""
    model = onnx.load(str(path))
    inits = {
        t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in model.graph.initializer
    }
    layers = []
    for layer in LAYERS:
        node = next(
            n
            for n in model.graph.node
            if n.name.startswith(f"/{layer}/") and n.op_type in ("MatMul", "Gemm")
        )
        weight = inits[node.input[1]]
        weight = weight.T if node.op_type == "MatMul" else weight
        layers.append((node.input[0], node.input[1], weight, inits[f"{layer}.bias"]))
    return layers


def dequantized_weight(s, weight_in_graph: torch.Tensor) -> torch.Tensor:
    """The weight as the exported DequantizeLinear chain gives it (graph orientation)."""
    return s.fake_quant_weight(weight_in_graph)


def fake_quant_forward(path, scales, x: np.ndarray) -> np.ndarray:
    h = torch.from_numpy(x)
    layers = linear_layers(path)
    for i, (activation, weight_name, weight, bias) in enumerate(layers):
        a = scales.get(activation)
        if a is not None:
            width = h.shape[-1]
            padded = torch.nn.functional.pad(h, (0, -width % 16))
            h = NVFP4.fake_quant(padded, a.scale, a.zero_point)[..., :width]
        graph_weight = weight.T if scales[weight_name].granularity.axis == 0 else weight
        wq = dequantized_weight(scales[weight_name], graph_weight.contiguous())
        wq = wq.T if scales[weight_name].granularity.axis == 0 else wq
        h = h @ wq.T + bias
        if i < len(layers) - 1:
            h = torch.nn.functional.gelu(h)
    return h.numpy()


@pytest.mark.parametrize(
    "options",
    [
        {"format": "nvfp4"},
        {"format": "nvfp4", "method": "mse", "weight_method": "mse"},
        {"format": "nvfp4", "method": "nvfp4-mse"},
        {"format": "nvfp4", "method": "nvfp4-mse", "hessian": True},
        {"format": "nvfp4", "nvfp4_form": "tensorrt"},
    ],
    ids=["max", "mse", "nvfp4-mse", "hessian", "tensorrt"],
)
def test_nvfp4_model_equals_a_fake_quant_forward(mlp, tmp_path, options):
    """ORT runs the exported graph's FP4 emulation; a torch forward with the same scales agrees
    to float32 rounding, but for rare activations on an E2M1 rounding boundary."""
    out = tmp_path / "q.onnx"
    result = calibrate_onnx(
        mlp / "mlp.onnx", mlp / "data", output=out, scales=tmp_path / "s.safetensors", **options
    )
    report = result.report
    assert report["validator"] == emulation_validator(CPU)
    assert report["opset"]["to"] == 23
    assert len(report["quantized_nodes"]) == 3
    runner, _ = reference_runner(onnx.load(str(out)), ["CPUExecutionProvider"])
    for x in batches(mlp):
        (got,) = runner.run(["y"], {"x": x})
        want = fake_quant_forward(mlp / "mlp.onnx", result.scales, x)
        close = np.abs(got - want) <= 1e-5 * np.abs(want).max()
        assert close.mean() >= 0.95
    loaded, _ = load_scales(tmp_path / "s.safetensors")
    for name, s in result.scales.items():
        assert (
            torch.equal(loaded[name].scale, s.scale) and loaded[name].granularity == s.granularity
        )
        assert torch.equal(loaded[name].global_scale, s.global_scale)


def test_weight_errors_in_the_report_are_the_relative_reconstruction_error(mlp):
    result = calibrate_onnx(mlp / "mlp.onnx", mlp / "data", format="nvfp4", method="nvfp4-mse")
    rows = {r["tensor"]: r for r in result.report["tensors"]}
    model = onnx.load(str(mlp / "mlp.onnx"))
    inits = {
        t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in model.graph.initializer
    }
    for _, weight_name, _, _ in linear_layers(mlp / "mlp.onnx"):
        w = inits[weight_name].double()
        wq = dequantized_weight(result.scales[weight_name], inits[weight_name]).double()
        assert rows[weight_name]["weight_rel_error"] == pytest.approx(
            float((wq - w).norm() / w.norm()), rel=1e-12
        )
    plain = calibrate_onnx(mlp / "mlp.onnx", mlp / "data", format="nvfp4", validate_batches=0)
    for r in plain.report["tensors"]:
        if r["kind"] == "weight":  # the sweep never loses to the default block scales
            assert rows[r["tensor"]]["weight_rel_error"] <= r["weight_rel_error"]


def test_hessian_comes_from_the_captured_layer_inputs(mlp):
    """H of each layer is Xᵀ X of its float input over every batch; the sweep uses it."""
    result = calibrate_onnx(
        mlp / "mlp.onnx",
        mlp / "data",
        format="nvfp4",
        activation_format="none",
        method="nvfp4-mse",
        hessian=True,
        validate_batches=0,
    )
    assert result.report["batches_per_pass"] == [BATCHES]
    activation, weight_name, weight, _ = linear_layers(mlp / "mlp.onnx")[0]
    assert activation == "x"  # the first layer's input is the graph input: H by hand
    xs = torch.from_numpy(np.concatenate([b.reshape(-1, 64) for b in batches(mlp)])).double()
    hessian = torch.einsum("nbi,nbj->bij", xs.view(-1, 4, 16), xs.view(-1, 4, 16))
    s = result.scales[weight_name]
    axis = s.granularity.axis
    graph_weight = weight.T.contiguous() if axis == 0 else weight
    cal = NVFP4MseCalibrator(
        granularity=PerBlock(axis, 16), global_amax=weight.abs().max(), hessian=hessian
    )
    cal.collect(graph_weight)
    assert torch.equal(cal.compute_block_scales().float(), s.scale)
    plain = calibrate_onnx(
        mlp / "mlp.onnx",
        mlp / "data",
        format="nvfp4",
        activation_format="none",
        method="nvfp4-mse",
        validate_batches=0,
    )
    assert not torch.equal(plain.scales[weight_name].scale, s.scale)


@pytest.mark.parametrize(("fmt", "block"), [("int4", 16), ("uint4", 32), ("int4", None)])
def test_int4_weight_only_runs_in_onnxruntime(mlp, tmp_path, fmt, block):
    result = calibrate_onnx(
        mlp / "mlp.onnx",
        mlp / "data",
        format=fmt,
        block_size=block,
        weight_method="mse",
        output=tmp_path / "q.onnx",
    )
    assert result.report["validator"] == "onnxruntime (CPUExecutionProvider)"
    assert result.report["opset"]["to"] == 21
    assert all(s.kind == "weight" for s in result.scales.values())
    assert {s.granularity.size for s in result.scales.values()} == {block or 128}
    assert result.report["output_error"]["y"]["cosine"] > 0.98
    model = onnx.load(str(tmp_path / "q.onnx"))
    stored = [t for t in model.graph.initializer if t.name.endswith("_quantized")]
    assert [t.data_type for t in stored] == [get_format(fmt).onnx_type] * 3


def test_checkpoints_from_the_same_calibration(mlp, tmp_path):
    """Both serving layouts dequantize to the weights the exported graph uses."""
    with pytest.raises(OutputError, match=r"'head'.*multiple of 16"):
        calibrate_onnx(mlp / "mlp.onnx", mlp / "data", format="nvfp4", checkpoint=tmp_path / "bad")
    result = calibrate_onnx(
        mlp / "mlp.onnx",
        mlp / "data",
        format="nvfp4",
        method="nvfp4-mse",
        exclude=("/head/*",),
        checkpoint=tmp_path / "ckpt",
        checkpoint_layouts=("modelopt", "compressed-tensors"),
        validate_batches=0,
    )
    assert set(result.checkpoint_paths) == {"modelopt", "compressed-tensors"}
    weights, config = load_nvfp4_checkpoint(tmp_path / "ckpt" / "modelopt")
    assert set(weights) == {"up", "down"}
    for (activation, weight_name, weight, _), layer in zip(
        linear_layers(mlp / "mlp.onnx"), LAYERS, strict=False
    ):
        if layer == "head":
            continue
        s = result.scales[weight_name]
        graph_weight = weight.T.contiguous() if s.granularity.axis == 0 else weight
        want = dequantized_weight(s, graph_weight)
        want = want.T if s.granularity.axis == 0 else want
        assert torch.equal(weights[layer], want)
        assert activation in result.scales  # W4A4: input scales were written too
    assert config["quantization_config"]["ignore"] == ["head"]
    ct_weights, ct_config = load_nvfp4_checkpoint(tmp_path / "ckpt" / "compressed-tensors")
    assert ct_config["quantization_config"]["format"] == "nvfp4-pack-quantized"
    for layer in ("up", "down"):
        torch.testing.assert_close(ct_weights[layer], weights[layer], rtol=6e-7, atol=0)


def test_block_options_that_make_no_sense_are_rejected(mlp):
    with pytest.raises(RecipeError, match="nvfp4-mse"):
        calibrate_onnx(mlp / "mlp.onnx", mlp / "data", format="int8", hessian=True)
    with pytest.raises(RecipeError, match="16"):
        calibrate_onnx(mlp / "mlp.onnx", mlp / "data", format="nvfp4", block_size=32)
    with pytest.raises(RecipeError, match="weight format"):
        calibrate_onnx(mlp / "mlp.onnx", mlp / "data", format="int8", activation_format="int4")


def test_cli_nvfp4_with_hessian_and_checkpoint(mlp, tmp_path, capsys):
    code = main(
        [
            "calibrate", str(mlp / "mlp.onnx"), "--data", str(mlp / "data"),
            "--format", "nvfp4", "--method", "nvfp4-mse", "--hessian",
            "--nvfp4-form", "tensorrt", "--exclude", "/head/*",
            "-o", str(tmp_path / "q.onnx"), "--checkpoint", str(tmp_path / "ckpt"),
            "--report", str(tmp_path / "r.json"),
        ]
    )  # fmt: skip
    assert code == 0
    out = "".join(capsys.readouterr().out.split())  # rich wraps long cells
    assert "onnxruntime(CPUExecutionProvider,fp4emulation)" in out
    report = json.loads((tmp_path / "r.json").read_text())
    errors = [r["weight_rel_error"] for r in report["tensors"] if r["kind"] == "weight"]
    assert len(errors) == 2 and all(0 < e < 0.2 for e in errors)
    assert report["recipe"]["weight"]["options"] == {"hessian": True}
    assert (tmp_path / "ckpt" / "hf_quant_config.json").is_file()
    model = onnx.load(str(tmp_path / "q.onnx"))
    assert ("trt", 1) in [(e.domain, e.version) for e in model.opset_import]
    code = main(["calibrate", str(mlp / "mlp.onnx"), "--format", "int4", "--block-size", "1"])
    assert code == 2
    assert "block_size must be an integer >= 2" in capsys.readouterr().err
