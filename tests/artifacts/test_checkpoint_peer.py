"""NVFP4 serving checkpoints loaded by compressed-tensors itself (skipped where it is absent)."""

from __future__ import annotations

import pytest
import torch
from checkpoint_oracle import make_layer, write
from ct_peer import ct_loaded

from qcal_export.artifacts.checkpoint import load_nvfp4_checkpoint

# -- compressed-tensors itself ----------------------------------------------------------------


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

    shapes = {"model.layers.0.mlp.up_proj": (48, 16), "model.layers.0.mlp.down_proj": (32, 64)}
    layers = [
        make_layer(name, shape, tails="heavy", chosen=True, w4a4=w4a4, bias=True, seed=i)
        for i, (name, shape) in enumerate(shapes.items())
    ]
    write(tmp_path, layers, "compressed-tensors")
    ours, config = load_nvfp4_checkpoint(tmp_path)
    linears = [(layer.name, *layer.weight.shape, layer.bias is not None) for layer in layers]
    model, compressor, state = ct_loaded(linears, config, tmp_path)
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
