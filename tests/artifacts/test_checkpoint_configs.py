"""NVFP4 serving checkpoints: the config files each layout writes (ModelOpt hf_quant_config and
config.json, compressed-tensors quantization_config).
"""

from __future__ import annotations

import json

import pytest
from checkpoint_oracle import NAME, make_layer, write

from qcal_export.artifacts.checkpoint import load_nvfp4_checkpoint

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
