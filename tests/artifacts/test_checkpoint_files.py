"""NVFP4 serving checkpoints as files: rewrites, atomic replacement, tied tensors, and the errors
that name the bad layer, request or file.
"""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from checkpoint_oracle import NAME, make_layer, raw_tensors, write
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import save_file

from qcal_export.artifacts.checkpoint import NVFP4Linear, load_nvfp4_checkpoint
from qcal_export.errors import OutputError, ScalesError
from qcal_export.pipeline.calibrate import calibrate_onnx

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


def _matmul_model(path, weight: np.ndarray, elem_type: int) -> None:
    """y = x @ weight, with ``weight`` an initializer of ``elem_type``."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "fc.weight"], ["y"], "fc")],
        "g",
        [helper.make_tensor_value_info("x", elem_type, ["b", weight.shape[0]])],
        [helper.make_tensor_value_info("y", elem_type, ["b", weight.shape[1]])],
        [numpy_helper.from_array(weight, "fc.weight")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))


def test_a_bfloat16_model_gives_the_checkpoint_of_its_float32_copy(tmp_path):
    """bfloat16 weights widen to float32 exactly, so a weight-only NVFP4 checkpoint of a bf16
    model holds the same tensors as that of its float32 copy."""
    weight = np.random.default_rng(0).standard_normal((64, 32)).astype(ml_dtypes.bfloat16)
    tensors = {}
    for name, array, elem_type in (
        ("bf16", weight, TensorProto.BFLOAT16),
        ("f32", weight.astype(np.float32), TensorProto.FLOAT),
    ):
        _matmul_model(tmp_path / f"{name}.onnx", array, elem_type)
        calibrate_onnx(
            tmp_path / f"{name}.onnx",
            format="nvfp4",
            activation_format="none",
            checkpoint=tmp_path / name,
        )
        tensors[name] = raw_tensors(tmp_path / name)
    assert tensors["bf16"].keys() == tensors["f32"].keys()
    assert any(key.endswith("weight_scale") for key in tensors["bf16"])
    for key, value in tensors["f32"].items():
        assert torch.equal(tensors["bf16"][key], value), key
