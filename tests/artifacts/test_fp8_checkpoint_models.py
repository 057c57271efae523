"""FP8 serving checkpoints from real calibrations (the exported MLP, the tiny LLM): the weights
they dequantize to equal, bit for bit, what the QDQ model's DequantizeLinear gives in ONNX
Runtime; the input scales are the calibrated activation scales; the config lists the layers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from error_lines import assert_one_error_line
from fp8_graph_oracle import graph_weights
from llm_benchmark import load_llm_model
from mlp import make_mlp

from qcal_export.artifacts.fp8_checkpoint import load_fp8_checkpoint
from qcal_export.cli import main
from qcal_export.errors import OutputError
from qcal_export.pipeline.calibrate import calibrate_onnx
from qcal_export.spec.recipe import Override, Recipe, TensorSpec

LAYOUTS = ("modelopt", "compressed-tensors")


@pytest.fixture(scope="module", params=[True, False], ids=["matmul", "gemm"])
def mlp(request, tmp_path_factory) -> Path:
    return make_mlp(tmp_path_factory.mktemp("mlp"), seq=request.param)


def _inputs(float_model: Path, result) -> dict[str, float]:
    """{layer: activation scale} of each linear layer whose input was calibrated."""
    import onnx

    from qcal_export.artifacts.onnx_layers import layer_name

    graph = onnx.load(str(float_model), load_external_data=False).graph
    inits = {t.name for t in graph.initializer}
    return {
        layer_name(n.input[1], n.name): result.scales[n.input[0]].scale.item()
        for n in graph.node
        if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits and n.input[0] in result.scales
    }


def _check(folder: Path, want: dict[str, np.ndarray], inputs: dict[str, float]) -> dict:
    weights, input_scales, config = load_fp8_checkpoint(folder)
    assert set(weights) == set(want)
    for name, weight in weights.items():
        np.testing.assert_array_equal(weight.numpy(), want[name], err_msg=name)
    assert input_scales == inputs
    return config


def test_mlp_per_tensor_both_layouts(mlp, tmp_path):
    result = calibrate_onnx(
        mlp / "mlp.onnx",
        mlp / "data",
        format="fp8",
        per_channel_weights=False,
        output=tmp_path / "q.onnx",
        checkpoint=tmp_path / "ckpt",
        checkpoint_layouts=LAYOUTS,
        validate_batches=0,
    )
    assert set(result.checkpoint_paths) == set(LAYOUTS)
    want = graph_weights(mlp / "mlp.onnx", tmp_path / "q.onnx")
    assert set(want) == {"up", "down", "head"}
    inputs = _inputs(mlp / "mlp.onnx", result)
    assert set(inputs) == set(want)
    config = _check(tmp_path / "ckpt" / "modelopt", want, inputs)
    assert config["quantization_config"]["quant_algo"] == "FP8"
    hf_quant = json.loads((tmp_path / "ckpt" / "modelopt" / "hf_quant_config.json").read_text())
    assert hf_quant["quantization"]["quant_algo"] == "FP8"
    config = _check(tmp_path / "ckpt" / "compressed-tensors", want, inputs)
    (group,) = config["quantization_config"]["config_groups"].values()
    assert group["targets"] == ["down", "head", "up"]
    assert group["weights"]["strategy"] == "tensor"
    assert group["input_activations"]["strategy"] == "tensor"


def test_mlp_per_channel_weight_only_with_an_excluded_layer(mlp, tmp_path):
    """compressed-tensors takes per-channel scales and weight-only layers; the excluded head is
    written in float and listed in ``ignore``; ModelOpt refuses per-channel, writing nothing."""
    options = {"format": "fp8", "activation_format": "none", "exclude": ("/head/*",)}
    with pytest.raises(OutputError, match=r"per output channel.*--no-per-channel-weights"):
        calibrate_onnx(
            mlp / "mlp.onnx",
            checkpoint=tmp_path / "both",
            checkpoint_layouts=("compressed-tensors", "modelopt"),
            **options,
        )
    assert not (tmp_path / "both").exists()
    result = calibrate_onnx(
        mlp / "mlp.onnx",
        output=tmp_path / "q.onnx",
        checkpoint=tmp_path / "ct",
        checkpoint_layouts=("compressed-tensors",),
        **options,
    )
    want = graph_weights(mlp / "mlp.onnx", tmp_path / "q.onnx")
    assert set(want) == {"up", "down"}
    config = _check(tmp_path / "ct", want, {})
    quantization = config["quantization_config"]
    assert quantization["ignore"] == ["head"]
    (group,) = quantization["config_groups"].values()
    assert (group["weights"]["strategy"], group["input_activations"]) == ("channel", None)
    assert result.scales[next(iter(result.scales))].format == "fp8"


def test_cli_fp8_checkpoint_and_its_errors(mlp, tmp_path, capsys):
    args = ["calibrate", str(mlp / "mlp.onnx"), "--data", str(mlp / "data")]
    refused = {
        "int8": "no NVFP4, FP8 or MX linear layer to write: calibrate MatMul/Gemm weights as",
        "fp8": "ModelOpt FP8 holds one weight scale per tensor.*--no-per-channel-weights",
        "fp8 --activation-format none --no-per-channel-weights": r"static input scale.*fp8 \(",
        "fp8 --activation-format int8": "activations are calibrated as int8.*--activation-format",
    }
    for options, pattern in refused.items():
        code = main([*args, "--format", *options.split(), "--checkpoint", str(tmp_path / "c")])
        assert code == 2
        assert_one_error_line(capsys.readouterr(), pattern)
        assert not (tmp_path / "c").exists()
    fp8 = ["--format", "fp8", "--no-per-channel-weights", "--checkpoint", str(tmp_path / "c")]
    assert main([*args, *fp8, "--validate-batches", "0"]) == 0
    assert (tmp_path / "c" / "hf_quant_config.json").is_file()


def test_an_input_calibrated_in_int8_is_refused_naming_its_layer(mlp, tmp_path):
    """An override giving one layer int8 activations (with a zero point) passes the recipe check;
    the writer names the layer and writes nothing."""
    weight = TensorSpec("fp8", per_channel=True)
    recipe = Recipe(
        activation=TensorSpec("fp8"),
        weight=weight,
        overrides=(Override(nodes="/down/*", activation=TensorSpec("uint8"), weight=weight),),
    )
    with pytest.raises(OutputError, match=r"layer 'down': input .* calibrated as uint8"):
        calibrate_onnx(
            mlp / "mlp.onnx",
            mlp / "data",
            recipe=recipe,
            checkpoint=tmp_path / "c",
            checkpoint_layouts=("compressed-tensors",),
            validate_batches=0,
        )
    assert not (tmp_path / "c").exists()


def _embedded_tiny(folder: Path, dtype: str) -> Path:
    """The tiny LLM with its weights embedded (data in ``folder``/data): its QDQ model is saved
    as one file, as the exported FP8 weights are checked in it."""
    import onnx

    path = load_llm_model().build("tiny", folder, dtype, batches=2, seq=16)
    embedded = path.parent / "embedded.onnx"
    onnx.save(onnx.load(str(path)), str(embedded))
    return embedded


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return _embedded_tiny(tmp_path_factory.mktemp("llm"), "float32")


def test_tiny_llm_checkpoints_hold_the_graph_weights(tiny, tmp_path):
    result = calibrate_onnx(
        tiny,
        tiny.parent / "data",
        format="fp8",
        per_channel_weights=False,
        output=tmp_path / "q.onnx",
        checkpoint=tmp_path / "ckpt",
        checkpoint_layouts=LAYOUTS,
        validate_batches=0,
    )
    want = graph_weights(tiny, tmp_path / "q.onnx")
    assert len(want) == 2 * 7 + 1
    assert {"lm_head", "model.layers.1.self_attn.q_proj", "model.layers.0.mlp.down_proj"} <= set(
        want
    )
    inputs = _inputs(tiny, result)
    assert set(inputs) == set(want)
    for layout in LAYOUTS:
        config = _check(tmp_path / "ckpt" / layout, want, inputs)
        assert config["quantization_config"]["ignore"] == []
    _, _, config = load_fp8_checkpoint(tmp_path / "ckpt" / "compressed-tensors")
    (group,) = config["quantization_config"]["config_groups"].values()
    assert sorted(group["targets"]) == sorted(want)


def test_float16_llm_checkpoint_rounds_to_the_graph_weights(tmp_path):
    """float16 graph: its DequantizeLinear gives fl16(fp8 * scale16); the checkpoint's float32
    product is exact, so rounded to float16 it is the graph's weight."""
    from onnx import TensorProto

    model = _embedded_tiny(tmp_path / "llm", "float16")
    calibrate_onnx(
        model,
        model.parent / "data",
        format="fp8",
        output=tmp_path / "q.onnx",
        checkpoint=tmp_path / "ct",
        checkpoint_layouts=("compressed-tensors",),
        validate_batches=0,
    )
    want = graph_weights(model, tmp_path / "q.onnx", TensorProto.FLOAT16)
    weights, input_scales, _ = load_fp8_checkpoint(tmp_path / "ct")
    assert set(weights) == set(want) == set(input_scales)
    for name, weight in weights.items():
        np.testing.assert_array_equal(weight.half().numpy(), want[name], err_msg=name)
