"""FP8 serving checkpoints written from layers: tensor names, dtypes and shapes per layout, the
values decoded by a float64 oracle, the configs, compressed-tensors' own loader, and the errors
that name the layer.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from checkpoint_oracle import raw_tensors
from ct_peer import ct_loaded

from qcal_export.artifacts.fp8_checkpoint import (
    FP8Linear,
    load_fp8_checkpoint,
    write_fp8_checkpoint,
)
from qcal_export.errors import OutputError, ScalesError
from qcal_export.spec.formats import FP8_E4M3

NAME = "model.layers.0.mlp.down_proj"
SHAPES = {"model.layers.0.mlp.up_proj": (48, 16), NAME: (32, 64)}


def make_layer(
    name: str, shape: tuple[int, int], *, per_channel: bool, static: bool = True, seed: int = 0
) -> FP8Linear:
    """A random heavy-tailed weight quantized over amax scales (per row or per tensor)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=gen) * torch.exp(2 * torch.randn(shape, generator=gen))
    amax = weight.abs().amax(1) if per_channel else weight.abs().amax()
    scale = amax / 448
    codes = FP8_E4M3.quantize(weight, scale.reshape(-1, 1) if per_channel else scale, None)
    input_scale = torch.tensor(7.5 / 448) if static else None
    return FP8Linear(name, codes, scale, input_scale, torch.randn(shape[0], generator=gen))


def layers(per_channel: bool, static: bool = True) -> list[FP8Linear]:
    return [
        make_layer(name, shape, per_channel=per_channel, static=static, seed=i)
        for i, (name, shape) in enumerate(SHAPES.items())
    ]


def oracle(tensors: dict[str, torch.Tensor], name: str) -> np.ndarray:
    """fl32(fp8 * scale): the float64 product of an FP8 value (4 significant bits) and a float32
    scale (24) is exact, so one rounding to float32 is the float32 product."""
    codes = tensors[f"{name}.weight"].float().numpy().astype(np.float64)
    scale = tensors[f"{name}.weight_scale"].numpy().astype(np.float64)
    return (codes * (scale if scale.ndim == 2 else scale.reshape(()))).astype(np.float32)


@pytest.mark.parametrize(
    ("layout", "per_channel", "static", "scale_shape", "input_shape"),
    [
        ("modelopt", False, True, [], []),
        ("compressed-tensors", False, True, [1], [1]),
        ("compressed-tensors", True, True, "channel", [1]),
        ("compressed-tensors", True, False, "channel", None),
    ],
)
def test_tensors_and_values(tmp_path, layout, per_channel, static, scale_shape, input_shape):
    written = layers(per_channel, static)
    norm = torch.rand(64, dtype=torch.bfloat16)
    write_fp8_checkpoint(tmp_path, written, layout, extra_tensors={"model.norm.weight": norm})
    tensors = raw_tensors(tmp_path)
    expected = {"model.norm.weight": (torch.bfloat16, [64])}
    for layer in written:
        out, inputs = layer.weight.shape
        shape = [out, 1] if scale_shape == "channel" else scale_shape
        expected[f"{layer.name}.weight"] = (torch.float8_e4m3fn, [out, inputs])
        expected[f"{layer.name}.weight_scale"] = (torch.float32, shape)
        expected[f"{layer.name}.bias"] = (torch.float32, [out])
        if input_shape is not None:
            expected[f"{layer.name}.input_scale"] = (torch.float32, input_shape)
    assert {k: (v.dtype, list(v.shape)) for k, v in tensors.items()} == expected
    weights, input_scales, _ = load_fp8_checkpoint(tmp_path)
    for layer in written:
        stored = tensors[f"{layer.name}.weight"].view(torch.uint8)
        assert torch.equal(stored, layer.weight.view(torch.uint8))
        want = oracle(tensors, layer.name)
        np.testing.assert_array_equal(layer.dequantized().numpy(), want)
        np.testing.assert_array_equal(weights[layer.name].numpy(), want)
    assert input_scales == ({n: np.float32(7.5 / 448) for n in SHAPES} if static else {})


def test_modelopt_takes_per_channel_scales_that_are_all_equal(tmp_path):
    layer = make_layer(NAME, (16, 32), per_channel=False)
    layer.weight_scale = layer.weight_scale.expand(16).clone()
    write_fp8_checkpoint(tmp_path, [layer], "modelopt")
    tensors = raw_tensors(tmp_path)
    assert tensors[f"{NAME}.weight_scale"].shape == ()
    assert tensors[f"{NAME}.weight_scale"].item() == layer.weight_scale[0].item()
    np.testing.assert_array_equal(
        load_fp8_checkpoint(tmp_path)[0][NAME].numpy(), layer.dequantized().numpy()
    )


def test_configs(tmp_path):
    base = {"model_type": "llama"}
    ignore = ["lm_head"]
    write_fp8_checkpoint(
        tmp_path / "mo", layers(False), "modelopt", ignore=ignore, base_config=base
    )
    hf_quant = json.loads((tmp_path / "mo" / "hf_quant_config.json").read_text())
    assert hf_quant["quantization"] == {
        "quant_algo": "FP8",
        "kv_cache_quant_algo": None,
        "exclude_modules": ignore,
    }
    config = json.loads((tmp_path / "mo" / "config.json").read_text())
    fp8 = {"dynamic": False, "num_bits": 8, "type": "float"}
    assert config["model_type"] == "llama"
    assert config["quantization_config"] == {
        "config_groups": {
            "group_0": {"input_activations": fp8, "weights": fp8, "targets": ["Linear"]}
        },
        "ignore": ignore,
        "quant_algo": "FP8",
        "producer": hf_quant["producer"],
        "quant_method": "modelopt",
    }
    mixed = layers(True)
    mixed[0].weight_scale = mixed[0].weight_scale.amax()
    write_fp8_checkpoint(tmp_path / "ct", mixed, "compressed-tensors", ignore=ignore)
    quantization = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert (quantization["format"], quantization["quant_method"]) == (
        "float-quantized",
        "compressed-tensors",
    )
    assert quantization["ignore"] == ignore
    groups = quantization["config_groups"]
    assert [(g["targets"], g["weights"]["strategy"]) for g in groups.values()] == [
        ([NAME], "channel"),
        (["model.layers.0.mlp.up_proj"], "tensor"),
    ]
    for group in groups.values():
        assert group["format"] == "float-quantized"
        assert group["input_activations"]["strategy"] == "tensor"
        assert group["input_activations"]["dynamic"] is False


@pytest.mark.parametrize("per_channel", [True, False], ids=["channel", "tensor"])
@pytest.mark.parametrize("static", [True, False], ids=["w8a8", "weight-only"])
def test_compressed_tensors_loads_and_decompresses(tmp_path, per_channel, static):
    """compressed-tensors parses config.json, expects exactly our tensors and decompresses them
    to our weights."""
    pytest.importorskip("compressed_tensors")
    written = layers(per_channel, static)
    write_fp8_checkpoint(tmp_path, written, "compressed-tensors")
    ours, _, config = load_fp8_checkpoint(tmp_path)
    linears = [(layer.name, *layer.weight.shape, True) for layer in written]
    model, compressor, _ = ct_loaded(linears, config, tmp_path)
    for layer in written:
        scheme = model.get_submodule(layer.name).quantization_scheme
        assert scheme.weights.strategy == ("channel" if per_channel else "tensor")
        assert (scheme.input_activations is not None) == static
    compressor.decompress_model(model)
    for layer in written:
        decompressed = model.get_submodule(layer.name).weight
        assert torch.equal(decompressed, ours[layer.name].to(decompressed.dtype))


def broken(**changes) -> FP8Linear:
    layer = make_layer(NAME, (16, 32), per_channel=True)
    for key, value in changes.items():
        setattr(layer, key, value)
    return layer


@pytest.mark.parametrize(
    ("layer", "layout", "message"),
    [
        (broken(), "modelopt", "ModelOpt FP8 holds one weight scale per tensor"),
        (broken(input_scale=None, weight_scale=torch.tensor(0.5)), "modelopt", "static input"),
        (broken(weight=torch.zeros(16, 32)), "compressed-tensors", "must be float8_e4m3fn"),
        (broken(weight_scale=torch.ones(16, 1)), "compressed-tensors", r"\[16\] \(per channel"),
        (broken(weight_scale=torch.zeros(16)), "compressed-tensors", "positive normal"),
        (broken(input_scale=torch.tensor(float("inf"))), "compressed-tensors", "input_scale"),
        (broken(bias=torch.zeros(3)), "compressed-tensors", r"bias must be \[16\]"),
    ],
)
def test_bad_layer_is_named_and_nothing_written(tmp_path, layer, layout, message):
    with pytest.raises(OutputError, match=message) as err:
        write_fp8_checkpoint(tmp_path / "c", [layer], layout)
    assert repr(NAME) in str(err.value)
    assert not (tmp_path / "c").exists()


def test_bad_requests_and_files(tmp_path):
    w8a8, weight_only = layers(True), layers(True, static=False)
    with pytest.raises(OutputError, match=r"mix W8A8 .* weight-only"):
        write_fp8_checkpoint(tmp_path, [w8a8[0], weight_only[1]], "compressed-tensors")
    with pytest.raises(OutputError, match="unknown checkpoint layout 'gguf'"):
        write_fp8_checkpoint(tmp_path, w8a8, "gguf")
    with pytest.raises(OutputError, match="both written and in ignore"):
        write_fp8_checkpoint(tmp_path, w8a8, "compressed-tensors", ignore=[NAME])
    with pytest.raises(OutputError, match="no layers"):
        write_fp8_checkpoint(tmp_path, [], "compressed-tensors")
    assert list(tmp_path.iterdir()) == []
    write_fp8_checkpoint(tmp_path, w8a8, "compressed-tensors")
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {}}))
    with pytest.raises(ScalesError, match="quant_method None is not an FP8 checkpoint"):
        load_fp8_checkpoint(tmp_path)
