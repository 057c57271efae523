"""compressed-tensors itself on a checkpoint written here (the tests that call it skip where it
is absent): nn.Linear modules at the layers' paths, set up as transformers loads a
compressed-tensors checkpoint (scheme applied from config.json, then compressed), and the
checkpoint loaded into them."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch


def ct_loaded(
    linears: Iterable[tuple[str, int, int, bool]], config: dict, folder: Path
) -> tuple[torch.nn.Module, object, dict[str, torch.Tensor]]:
    """The model of ``linears`` (name, out, in, bias) under ``config`` (config.json's
    quantization_config) with ``folder``'s model.safetensors loaded strictly, after asserting
    that it holds exactly the tensors (names, dtypes, shapes) compressed-tensors expects; the
    ModelCompressor; and the tensors as read."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config
    from safetensors.torch import load_file
    from transformers import CompressedTensorsConfig

    model = torch.nn.Module()
    for name, out, inputs, bias in linears:
        *parents, leaf = name.split(".")
        parent = model
        for part in parents:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, torch.nn.Linear(inputs, out, bias=bias))
    compressor = ModelCompressor.from_compression_config(CompressedTensorsConfig.from_dict(config))
    apply_quantization_config(model, compressor.quantization_config)
    compressor.compress_model(model)
    state = load_file(str(folder / "model.safetensors"))
    expected = {k: (v.dtype, v.shape) for k, v in model.state_dict().items()}
    assert {k: (v.dtype, v.shape) for k, v in state.items()} == expected
    model.load_state_dict(state, strict=True)
    return model, compressor, state
