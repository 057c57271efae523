"""NVFP4 serving checkpoints (ModelOpt and compressed-tensors layouts), read back from real files.

The oracle decodes the raw safetensors itself: a 16-entry E2M1 table, the low nibble first,
products in float64 rounded once to float32. A float64 product of an E2M1 value (2 significant
bits) or an FP8 scale (4 bits) with a float32 (24 bits) is exact, and a float64 quotient rounded
to float32 is the correctly rounded float32 quotient (double rounding is innocuous for division
when 53 >= 2 * 24 + 2, Figueroa 1995), so the oracle reproduces float32 arithmetic bit for bit.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from qcal_export.artifacts.checkpoint import (
    LAYOUTS,
    NVFP4Linear,
    load_nvfp4_checkpoint,
    write_nvfp4_checkpoint,
)
from qcal_export.errors import OutputError, ScalesError
from qcal_export.formats import NVFP4

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])
U = 2.0**-24
CT_BOUND = (1 + U) ** 2 / (1 - U) ** 3 - 1
"""Relative bound of compressed-tensors' dequantized weight against ours (module docstring of
qcal_export.artifacts.checkpoint): one rounding each for g = fl(1/s), fl(fp8 / g) and the product
by e2m1, against one each for fl(fp8 * s) and the product."""

SHAPES = [(32, 64), (48, 16), (5, 48)]
NAME = "model.layers.0.mlp.down_proj"


def make_layer(
    name: str,
    shape: tuple[int, int],
    *,
    tails: str = "normal",
    chosen: bool = False,
    w4a4: bool = True,
    bias: bool = False,
    seed: int = 0,
) -> NVFP4Linear:
    """A random layer; block scales from the block amaxes, or ``chosen`` codes a calibrator might
    pick (0-3 FP8 steps below the amax scale: those blocks clip at +-6)."""
    gen = torch.Generator().manual_seed(seed)
    out, inputs = shape
    weight = torch.randn(out, inputs, generator=gen)
    if tails == "heavy":
        weight = weight * torch.exp(2 * torch.randn(out, inputs, generator=gen))
    global_scale = NVFP4.global_scale(weight.abs().amax())
    block_amax = weight.reshape(out, -1, 16).abs().amax(-1)
    block_scales = NVFP4.block_scales(block_amax, global_scale)
    if chosen:
        steps = torch.randint(0, 4, block_scales.shape, generator=gen, dtype=torch.uint8)
        codes = block_scales.view(torch.uint8).clamp_min(4) - steps
        block_scales = codes.view(torch.float8_e4m3fn)
    input_scale = NVFP4.global_scale(torch.tensor(7.5)) if w4a4 else None
    return NVFP4Linear(
        name,
        weight,
        block_scales,
        global_scale,
        input_global_scale=input_scale,
        bias=torch.randn(out, generator=gen) if bias else None,
    )


def fake_quant(layer: NVFP4Linear) -> np.ndarray:
    """The ONNX DequantizeLinear chain's weight: float32 [out, in]."""
    effective = NVFP4.effective_scales(layer.block_scales, layer.global_scale)
    blocks = layer.weight.reshape(-1, 16)
    return (
        NVFP4.fake_quant_blocks(blocks, effective.reshape(-1, 1))
        .reshape(layer.weight.shape)
        .numpy()
    )


def raw_tensors(directory: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open)


def decode(packed: torch.Tensor) -> np.ndarray:
    """E2M1 values (float64 [out, in]) of uint8 [out, in/2]: byte i holds element 2i low."""
    data = packed.numpy()
    codes = np.stack([data & 0x0F, data >> 4], axis=-1).reshape(data.shape[0], -1)
    return E2M1[codes]


def dequantize(packed: torch.Tensor, effective: np.ndarray) -> np.ndarray:
    """float32 [out, in]: E2M1 value times its float32 block scale [out, in/16], one rounding."""
    values = decode(packed)
    scale = np.repeat(effective.astype(np.float64), 16, axis=1)
    return (values * scale).astype(np.float32)


def fp8_values(scales: torch.Tensor) -> np.ndarray:
    return scales.float().numpy().astype(np.float64)


def modelopt_weight(tensors: dict[str, torch.Tensor], name: str) -> np.ndarray:
    """ModelOpt's dequantization: e2m1 * fl(fp8 * weight_scale_2)."""
    scale_2 = tensors[f"{name}.weight_scale_2"].double().item()
    effective = (fp8_values(tensors[f"{name}.weight_scale"]) * scale_2).astype(np.float32)
    return dequantize(tensors[f"{name}.weight"], effective)


def ct_weight(tensors: dict[str, torch.Tensor], name: str) -> np.ndarray:
    """compressed-tensors' dequantization: e2m1 * fl(fp8 / weight_global_scale)."""
    gparam = tensors[f"{name}.weight_global_scale"].double().item()
    effective = (fp8_values(tensors[f"{name}.weight_scale"]) / gparam).astype(np.float32)
    return dequantize(tensors[f"{name}.weight_packed"], effective)


def write(directory: Path, layers: list[NVFP4Linear], layout: str, **kwargs) -> Path:
    return write_nvfp4_checkpoint(directory, layers, layout, **kwargs)


# -- tensors --------------------------------------------------------------------------------


STORED = {
    "modelopt": ("weight", "weight_scale_2", "input_scale", [], lambda s: s.item()),
    "compressed-tensors": (
        "weight_packed",
        "weight_global_scale",
        "input_global_scale",
        [1],
        lambda s: np.float32(1.0 / s.double().item()),
    ),
}
"""Per layout: packed codes, weight and input global scale names, their shape, and the stored
value of a global scale s (compressed-tensors: fl(1/s), a float64 quotient rounded once)."""


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("w4a4", [True, False], ids=["w4a4", "weight-only"])
def test_tensor_names_dtypes_shapes(tmp_path, layout, w4a4):
    packed, global_name, input_name, scalar_shape, stored = STORED[layout]
    layers = [make_layer(f"l{i}", shape, w4a4=w4a4, bias=i == 0) for i, shape in enumerate(SHAPES)]
    norm = torch.rand(64, dtype=torch.bfloat16)
    write(tmp_path, layers, layout, extra_tensors={"model.norm.weight": norm})
    tensors = raw_tensors(tmp_path)
    expected = {"model.norm.weight": (torch.bfloat16, [64]), "l0.bias": (torch.float32, [32])}
    for layer in layers:
        out, inputs = layer.weight.shape
        expected[f"{layer.name}.{packed}"] = (torch.uint8, [out, inputs // 2])
        expected[f"{layer.name}.weight_scale"] = (torch.float8_e4m3fn, [out, inputs // 16])
        expected[f"{layer.name}.{global_name}"] = (torch.float32, scalar_shape)
        if w4a4:
            expected[f"{layer.name}.{input_name}"] = (torch.float32, scalar_shape)
    assert {k: (v.dtype, list(v.shape)) for k, v in tensors.items()} == expected
    assert torch.equal(tensors["model.norm.weight"], norm)
    assert torch.equal(tensors["l0.bias"], layers[0].bias)
    for layer in layers:
        stored_scales = tensors[f"{layer.name}.weight_scale"].view(torch.uint8)
        assert torch.equal(stored_scales, layer.block_scales.view(torch.uint8))
        assert tensors[f"{layer.name}.{global_name}"].item() == stored(layer.global_scale)
        if w4a4:
            input_scale = tensors[f"{layer.name}.{input_name}"].item()
            assert input_scale == stored(layer.input_global_scale)


# -- values ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tails", ["normal", "heavy"])
@pytest.mark.parametrize("chosen", [False, True], ids=["amax-scales", "chosen-scales"])
def test_modelopt_decodes_to_the_fake_quantized_weight(tmp_path, shape, tails, chosen):
    layer = make_layer(NAME, shape, tails=tails, chosen=chosen, seed=len(tails))
    write(tmp_path, [layer], "modelopt")
    ours = fake_quant(layer)
    np.testing.assert_array_equal(modelopt_weight(raw_tensors(tmp_path), NAME), ours)
    loaded, _ = load_nvfp4_checkpoint(tmp_path)
    np.testing.assert_array_equal(loaded[NAME].numpy(), ours)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tails", ["normal", "heavy"])
@pytest.mark.parametrize("chosen", [False, True], ids=["amax-scales", "chosen-scales"])
def test_compressed_tensors_decodes_within_bound(tmp_path, shape, tails, chosen):
    layer = make_layer(NAME, shape, tails=tails, chosen=chosen, seed=3)
    write(tmp_path, [layer], "compressed-tensors")
    tensors = raw_tensors(tmp_path)
    theirs, ours = ct_weight(tensors, NAME), fake_quant(layer)
    np.testing.assert_array_equal(tensors[f"{NAME}.weight_packed"], _packed(tmp_path, layer))
    loaded, _ = load_nvfp4_checkpoint(tmp_path)
    np.testing.assert_array_equal(loaded[NAME].numpy(), theirs)
    gap = np.abs(theirs.astype(np.float64) - ours)
    assert (gap <= CT_BOUND * np.abs(ours.astype(np.float64))).all()


def _packed(tmp_path: Path, layer: NVFP4Linear) -> torch.Tensor:
    """The ModelOpt codes of the same layer: both layouts store the same bytes."""
    write(tmp_path / "modelopt", [layer], "modelopt")
    return raw_tensors(tmp_path / "modelopt")[f"{layer.name}.weight"]


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 4),
    blocks=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
    log_range=st.floats(-30, 30),
    codes=st.integers(1, 0x7E),
)
def test_round_trip_property(rows, blocks, seed, log_range, codes):
    """Any finite weight and any positive FP8 block-scale code: ModelOpt exact, CT in bound."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, 16 * blocks, generator=gen) * 2.0**log_range
    global_scale = NVFP4.global_scale(weight.abs().amax())
    spread = torch.randint(-8, 9, (rows, blocks), generator=gen)
    block_codes = (spread + codes).clamp(1, 0x7E).to(torch.uint8)
    layer = NVFP4Linear(NAME, weight, block_codes.view(torch.float8_e4m3fn), global_scale)
    ours = fake_quant(layer)
    with tempfile.TemporaryDirectory() as folder:
        for layout in LAYOUTS:
            write(Path(folder) / layout, [layer], layout)
        modelopt = modelopt_weight(raw_tensors(Path(folder) / "modelopt"), NAME)
        theirs = ct_weight(raw_tensors(Path(folder) / "compressed-tensors"), NAME)
    np.testing.assert_array_equal(modelopt, ours)
    normal = np.abs(ours) >= np.finfo(np.float32).tiny
    gap = np.abs(theirs.astype(np.float64) - ours)[normal]
    assert (gap <= CT_BOUND * np.abs(ours[normal].astype(np.float64))).all()


def test_hand_packed_bytes(tmp_path):
    """Scales 1: codes are the values' E2M1 codes, element 2i in the low nibble.

    ModelOpt's own test pairs: [0, .5] -> 16, [1, 1.5] -> 50, [-.5, -1] -> 169, [-1.5, 1.75]
    -> 75 (1.75 ties to 2), [6, -6] -> 247; saturation: [7, -9] -> 247; ties to even:
    [0.25, 2.5] -> [0, 2] -> 64, [5, 3.5] -> [4, 4] -> 102.
    """
    row = [0, 0.5, 1, 1.5, -0.5, -1, -1.5, 1.75, 6, -6, 7, -9, 0.25, 2.5, 5, 3.5]
    one = torch.tensor(1.0)
    layer = NVFP4Linear(NAME, torch.tensor([row]), one.reshape(1, 1).to(torch.float8_e4m3fn), one)
    expected = [16, 50, 169, 75, 247, 247, 64, 102]
    for layout, packed_name in (("modelopt", "weight"), ("compressed-tensors", "weight_packed")):
        write(tmp_path / layout, [layer], layout)
        packed = raw_tensors(tmp_path / layout)[f"{NAME}.{packed_name}"]
        assert packed.tolist() == [expected]
        loaded, _ = load_nvfp4_checkpoint(tmp_path / layout)
        decoded = [0, 0.5, 1, 1.5, -0.5, -1, -1.5, 2, 6, -6, 6, -6, 0, 2, 4, 4]
        assert loaded[NAME].tolist() == [decoded]


# -- configs --------------------------------------------------------------------------------

FP4_ARGS = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}


@pytest.mark.parametrize(("w4a4", "algo"), [(True, "NVFP4"), (False, "W4A16_NVFP4")])
def test_modelopt_configs(tmp_path, w4a4, algo):
    base = {"model_type": "llama", "quantization_config": {"stale": True}}
    layers = [make_layer(NAME, (32, 64), w4a4=w4a4)]
    write(
        tmp_path,
        layers,
        "modelopt",
        ignore=["lm_head", "model.layers.*.mlp.gate"],
        base_config=base,
    )
    hf_quant = json.loads((tmp_path / "hf_quant_config.json").read_text())
    producer = hf_quant["producer"]
    assert producer["name"] == "qcal_export"
    assert isinstance(producer["version"], str)
    assert hf_quant["quantization"] == {
        "quant_algo": algo,
        "kv_cache_quant_algo": None,
        "group_size": 16,
        "exclude_modules": ["lm_head", "model.layers.*.mlp.gate"],
    }
    group = {"weights": FP4_ARGS, "targets": ["Linear"]}
    if w4a4:
        group["input_activations"] = FP4_ARGS
    config = json.loads((tmp_path / "config.json").read_text())
    assert config == {
        "model_type": "llama",
        "quantization_config": {
            "config_groups": {"group_0": group},
            "ignore": ["lm_head", "model.layers.*.mlp.gate"],
            "quant_algo": algo,
            "producer": producer,
            "quant_method": "modelopt",
        },
    }
    assert load_nvfp4_checkpoint(tmp_path)[1] == config


def ct_args(dynamic, observer) -> dict:
    return {
        "num_bits": 4,
        "type": "float",
        "symmetric": True,
        "group_size": 16,
        "strategy": "tensor_group",
        "block_structure": None,
        "dynamic": dynamic,
        "actorder": None,
        "scale_dtype": "torch.float8_e4m3fn",
        "zp_dtype": None,
        "observer": observer,
        "observer_kwargs": {},
    }


@pytest.mark.parametrize("w4a4", [True, False], ids=["w4a4", "weight-only"])
def test_compressed_tensors_config(tmp_path, w4a4):
    layers = [make_layer("b", (16, 32), w4a4=w4a4), make_layer("a", (16, 16), w4a4=w4a4)]
    write(tmp_path, layers, "compressed-tensors", ignore=["lm_head"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())
    inputs = ct_args("local", "static_minmax") if w4a4 else None
    assert config == {
        "quantization_config": {
            "config_groups": {
                "group_0": {
                    "targets": ["a", "b"],
                    "weights": ct_args(False, "minmax"),
                    "input_activations": inputs,
                    "output_activations": None,
                    "format": "nvfp4-pack-quantized",
                }
            },
            "quant_method": "compressed-tensors",
            "kv_cache_scheme": None,
            "format": "nvfp4-pack-quantized",
            "quantization_status": "compressed",
            "global_compression_ratio": None,
            "ignore": ["lm_head"],
            "sparsity_config": {},
            "transform_config": {},
            "version": "0.20.0",
        }
    }


# -- files ----------------------------------------------------------------------------------


def test_rewrite_in_another_layout_replaces_the_checkpoint(tmp_path):
    """Atomic writes leave no temporary files; a compressed-tensors checkpoint written over a
    ModelOpt one drops the stale hf_quant_config.json."""
    layer = make_layer(NAME, (16, 32))
    folder = write(tmp_path / "new", [layer], "modelopt")
    assert folder == tmp_path / "new"
    names = ["config.json", "hf_quant_config.json", "model.safetensors"]
    assert sorted(p.name for p in folder.iterdir()) == names
    write(folder, [layer], "compressed-tensors")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert f"{NAME}.weight_packed" in raw_tensors(folder)


def test_rejected_write_leaves_the_old_checkpoint(tmp_path):
    write(tmp_path, [make_layer(NAME, (16, 32))], "modelopt")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    bad = make_layer(NAME, (16, 32))
    bad.block_scales = bad.block_scales[:, :1]
    with pytest.raises(OutputError):
        write(tmp_path, [bad], "compressed-tensors")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_tied_extra_tensors_are_both_written(tmp_path):
    embedding = torch.randn(10, 16)
    extra = {"model.embed_tokens.weight": embedding, "lm_head.weight": embedding}
    write(tmp_path, [make_layer(NAME, (16, 16))], "modelopt", extra_tensors=extra)
    tensors = raw_tensors(tmp_path)
    assert torch.equal(tensors["model.embed_tokens.weight"], embedding)
    assert torch.equal(tensors["lm_head.weight"], embedding)


# -- errors ---------------------------------------------------------------------------------


def broken(**changes) -> NVFP4Linear:
    layer = make_layer(NAME, (16, 32))
    for key, value in changes.items():
        setattr(layer, key, value)
    return layer


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        (broken(weight=torch.randn(16, 24)), "in_features 24 is not a multiple of 16"),
        (broken(weight=torch.randn(16, 32, 1)), "weight must be float"),
        (
            broken(block_scales=torch.ones(16, 3).to(torch.float8_e4m3fn)),
            r"float8_e4m3fn \[16, 2\]",
        ),
        (broken(block_scales=torch.ones(16, 2)), "block_scales must be float8_e4m3fn"),
        (broken(block_scales=torch.zeros(16, 2).to(torch.float8_e4m3fn)), "zero, negative or NaN"),
        (broken(global_scale=torch.tensor(0.0)), "global_scale must be one positive"),
        (broken(global_scale=torch.ones(2)), "global_scale must be one positive"),
        (broken(input_global_scale=torch.tensor(float("nan"))), "input_global_scale must be"),
        (broken(weight=torch.full((16, 32), float("inf"))), "NaN or infinite"),
        (broken(bias=torch.zeros(15)), r"bias must be \[16\]"),
    ],
)
def test_bad_layer_is_named(tmp_path, layer, message):
    with pytest.raises(OutputError, match=message) as err:
        write(tmp_path, [layer], "modelopt")
    assert repr(NAME) in str(err.value)


def test_bad_checkpoint_requests(tmp_path):
    w4a4, weight_only = make_layer("a", (16, 16)), make_layer("b", (16, 16), w4a4=False)
    with pytest.raises(OutputError, match=r"unknown checkpoint layout 'gguf'.*'modelopt'"):
        write(tmp_path, [w4a4], "gguf")
    with pytest.raises(OutputError, match=r"mix W4A4 \(\['a'\].*weight-only \(\['b'\]"):
        write(tmp_path, [w4a4, weight_only], "modelopt")
    with pytest.raises(OutputError, match=r"\['a'\] appear more than once"):
        write(tmp_path, [w4a4, w4a4], "compressed-tensors")
    with pytest.raises(OutputError, match=r"layers \['a'\] are both written and in ignore"):
        write(tmp_path, [w4a4], "compressed-tensors", ignore=["a", "lm_head"])
    with pytest.raises(OutputError, match="no layers"):
        write(tmp_path, [], "modelopt")
    with pytest.raises(OutputError, match=r"\['a.weight_scale'\] collide"):
        write(tmp_path, [w4a4], "modelopt", extra_tensors={"a.weight_scale": torch.ones(1)})
    with pytest.raises(OutputError, match="does not exist"):
        write(tmp_path / "missing" / "ckpt", [w4a4], "modelopt")
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="is a file"):
        write(tmp_path / "file", [w4a4], "modelopt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_unreadable_checkpoints(tmp_path):
    with pytest.raises(ScalesError, match=r"model\.safetensors"):
        load_nvfp4_checkpoint(tmp_path)
    write(tmp_path, [make_layer(NAME, (16, 16))], "modelopt")
    (tmp_path / "config.json").write_text(
        json.dumps({"quantization_config": {"quant_method": "gptq"}})
    )
    with pytest.raises(ScalesError, match="'gptq' is not an NVFP4 checkpoint layout"):
        load_nvfp4_checkpoint(tmp_path)
    tensors = raw_tensors(tmp_path)
    save_file(
        {k: v for k, v in tensors.items() if not k.endswith("_2")}, tmp_path / "model.safetensors"
    )
    (tmp_path / "config.json").write_text(
        json.dumps({"quantization_config": {"quant_method": "modelopt"}})
    )
    with pytest.raises(ScalesError, match=f"layer '{NAME}' is unreadable: '{NAME}.weight_scale_2'"):
        load_nvfp4_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("[1]")
    with pytest.raises(ScalesError, match="expected a JSON object"):
        load_nvfp4_checkpoint(tmp_path)


# -- compressed-tensors itself ----------------------------------------------------------------


def _ct_model(layers: list[NVFP4Linear], config: dict) -> tuple[torch.nn.Module, object]:
    """nn.Linear modules at the layers' paths, set up as transformers loads a compressed-tensors
    checkpoint (scheme applied from config.json, then compressed), and the ModelCompressor."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config
    from transformers import CompressedTensorsConfig

    model = torch.nn.Module()
    for layer in layers:
        *parents, leaf = layer.name.split(".")
        parent = model
        for part in parents:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        out, inputs = layer.weight.shape
        parent.add_module(leaf, torch.nn.Linear(inputs, out, bias=layer.bias is not None))
    compressor = ModelCompressor.from_compression_config(CompressedTensorsConfig.from_dict(config))
    apply_quantization_config(model, compressor.quantization_config)
    compressor.compress_model(model)
    return model, compressor


@pytest.mark.parametrize("w4a4", [True, False], ids=["w4a4", "weight-only"])
def test_compressed_tensors_loads_and_decompresses(tmp_path, w4a4):
    """compressed-tensors parses config.json, expects exactly our tensors (names, shapes,
    dtypes) and decompresses them to our compressed-tensors weights; its own packer turns our
    dequantized weights back into our bytes."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.nvfp4.helpers import (
        quantize_and_pack_fp4,
        unpack_fp4_from_uint8,
    )
    from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize
    from safetensors.torch import load_file

    shapes = {"model.layers.0.mlp.up_proj": (48, 16), "model.layers.0.mlp.down_proj": (32, 64)}
    layers = [
        make_layer(name, shape, tails="heavy", chosen=True, w4a4=w4a4, bias=True, seed=i)
        for i, (name, shape) in enumerate(shapes.items())
    ]
    write(tmp_path, layers, "compressed-tensors")
    ours, config = load_nvfp4_checkpoint(tmp_path)
    model, compressor = _ct_model(layers, config)
    state = load_file(str(tmp_path / "model.safetensors"))
    expected = {k: (v.dtype, v.shape) for k, v in model.state_dict().items()}
    assert {k: (v.dtype, v.shape) for k, v in state.items()} == expected
    model.load_state_dict(state, strict=True)
    schemes = {layer.name: model.get_submodule(layer.name).quantization_scheme for layer in layers}
    for scheme in schemes.values():
        assert (scheme.weights.strategy, scheme.weights.group_size) == ("tensor_group", 16)
        assert (scheme.input_activations is not None) == w4a4
    compressor.decompress_model(model)
    for layer in layers:
        decompressed = model.get_submodule(layer.name).weight
        assert torch.equal(decompressed, ours[layer.name].to(decompressed.dtype))
        prefix, (out, inputs) = layer.name, layer.weight.shape
        values = unpack_fp4_from_uint8(state[f"{prefix}.weight_packed"], out, inputs, torch.float32)
        scales, gparam = state[f"{prefix}.weight_scale"], state[f"{prefix}.weight_global_scale"]
        float32 = ct_dequantize(
            values,
            scales.float(),
            args=schemes[prefix].weights,
            global_scale=gparam,
            dtype=torch.float32,
        )
        assert torch.equal(float32, ours[prefix])
        repacked = quantize_and_pack_fp4(ours[prefix], scales.float(), global_scale=gparam)
        assert torch.equal(repacked, state[f"{prefix}.weight_packed"])
