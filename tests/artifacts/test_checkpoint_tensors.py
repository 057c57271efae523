"""NVFP4 serving checkpoints read back from real files: tensor names, dtypes, shapes, and the
values decoded by the independent oracle of checkpoint_oracle.py.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoint_oracle import (
    CT_BOUND,
    NAME,
    SHAPES,
    ct_weight,
    fake_quant,
    make_layer,
    modelopt_weight,
    raw_tensors,
    write,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from qcal_export.artifacts.checkpoint import LAYOUTS, NVFP4Linear, load_nvfp4_checkpoint
from qcal_export.spec.formats import NVFP4

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
