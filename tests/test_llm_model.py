"""The LLM benchmark model (benchmarks/llm_model.py, tiny size) exports right and calibrates end
to end: int8, fp8 and nvfp4 (nvfp4-mse + Hessian) with every MatMul weight stored quantized,
and NVFP4 serving checkpoints holding the weights the QDQ graph uses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from llm_benchmark import load_llm_model
from onnx import TensorProto, numpy_helper

from qcal_export.artifacts.checkpoint import load_nvfp4_checkpoint
from qcal_export.pipeline.calibrate import calibrate_onnx

# The tiny size: 2 decoder layers of 7 projections each, plus the LM head.
WEIGHT_MATMULS = 2 * 7 + 1

# cosine = 1 - e^2 / 2 for a small relative L2 error e of the logits. The bounds allow e = 0.1
# (int8), 0.2 (fp8 E4M3) and 0.4 (NVFP4 E2M1, weights and activations): several times one
# tensor's rounding error in that format (about 0.01, 0.03 and 0.1-0.15 for Gaussian values),
# for the ~30 quantized tensors compounding through two layers. Random weights give logits with
# no dominant direction, so a wrong scale or a lost dequantization falls far below these.
MIN_COSINE = {"int8": 0.995, "fp8": 0.98, "nvfp4": 0.92}
STORAGE = {
    "int8": TensorProto.INT8,
    "fp8": TensorProto.FLOAT8E4M3FN,
    "nvfp4": TensorProto.FLOAT4E2M1,
}


llm_model = load_llm_model()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The tiny model and its 4 calibration batches, built once: the model's path."""
    return llm_model.build("tiny", tmp_path_factory.mktemp("llm"), batches=4, seq=16)


def weight_matmuls(path: Path) -> dict[str, str]:
    """{MatMul node name: its weight initializer} of the float model."""
    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    return {
        n.name: n.input[1]
        for n in model.graph.node
        if n.op_type == "MatMul" and n.input[1] in inits
    }


def test_export_has_external_data_and_matches_torch(tiny):
    model = onnx.load(str(tiny), load_external_data=False)
    external = {
        entry.value
        for t in model.graph.initializer
        if t.data_location == TensorProto.EXTERNAL
        for entry in t.external_data
        if entry.key == "location"
    }
    assert external == {"model.onnx.data"}
    assert all(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)
    assert len(weight_matmuls(tiny)) == WEIGHT_MATMULS
    for dim in model.graph.input[0].type.tensor_type.shape.dim:
        assert dim.dim_param  # batch and sequence are dynamic

    batch = llm_model.calibration_batches("tiny", count=1, batch=3, seq=11, seed=7)[0]
    batch["attention_mask"][1, 5:] = 0
    with torch.no_grad():
        want = llm_model.llama_module("tiny")(
            *(torch.from_numpy(batch[n]) for n in llm_model.INPUT_NAMES)
        ).numpy()
    session = ort.InferenceSession(str(tiny), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], batch)
    assert got.shape == (3, 11, 256)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "fmt, options",
    [
        ("int8", {}),
        ("fp8", {"format": "fp8"}),
        ("nvfp4", {"format": "nvfp4", "method": "nvfp4-mse", "hessian": True}),
    ],
)
def test_calibrates_every_matmul_weight(tiny, tmp_path, fmt, options):
    out = tmp_path / "q.onnx"
    result = calibrate_onnx(tiny, tiny.parent / "data", output=out, validate_batches=1, **options)
    model = onnx.load(str(out), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    weights = weight_matmuls(tiny)
    for node in model.graph.node:
        if node.name in weights:
            dq = producer.get(node.input[1])
            assert dq is not None and dq.op_type == "DequantizeLinear", node.name
            assert inits[dq.input[0]].data_type == STORAGE[fmt], node.name
    assert sum(n.name in weights for n in model.graph.node) == WEIGHT_MATMULS
    assert not set(weights.values()) & set(inits)  # no float copy of a weight is kept
    verdict = result.report["verdict"]
    assert verdict["cosine"] > MIN_COSINE[fmt], verdict["line"]
    assert result.report["validation"]["runtime_issue"] is None


def test_nvfp4_checkpoints_hold_the_graph_weights(tiny, tmp_path):
    result = calibrate_onnx(
        tiny,
        tiny.parent / "data",
        format="nvfp4",
        method="nvfp4-mse",
        hessian=True,
        checkpoint=tmp_path / "ckpt",
        checkpoint_layouts=("modelopt", "compressed-tensors"),
        validate_batches=0,
    )
    assert set(result.checkpoint_paths) == {"modelopt", "compressed-tensors"}
    model = onnx.load(str(tiny))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    weights, config = load_nvfp4_checkpoint(tmp_path / "ckpt" / "modelopt")
    ct_weights, ct_config = load_nvfp4_checkpoint(tmp_path / "ckpt" / "compressed-tensors")
    assert config["quantization_config"]["quant_algo"] == "NVFP4"
    assert ct_config["quantization_config"]["format"] == "nvfp4-pack-quantized"
    assert len(weights) == WEIGHT_MATMULS
    assert {"lm_head", "model.layers.1.self_attn.q_proj"} <= set(weights)
    assert set(ct_weights) == set(weights)
    for node, weight_name in weight_matmuls(tiny).items():
        layer = node.rsplit("/", 1)[0].strip("/").replace("/", ".")
        s = result.scales[weight_name]
        graph_weight = torch.from_numpy(inits[weight_name].copy())  # [in, out]
        if s.granularity.axis == 0:
            want = s.fake_quant_weight(graph_weight.contiguous()).T
        else:
            want = s.fake_quant_weight(graph_weight.T.contiguous())
        assert torch.equal(weights[layer], want), layer
        torch.testing.assert_close(ct_weights[layer], want, rtol=6e-7, atol=0)


@pytest.fixture(scope="module")
def tiny16(tmp_path_factory) -> Path:
    """The tiny model exported in float16, with 2 short batches: the model's path."""
    return llm_model.build("tiny", tmp_path_factory.mktemp("llm16"), "float16", batches=2, seq=8)


def test_float16_export_calibrates_to_fp8(tiny16, tmp_path):
    model = onnx.load(str(tiny16), load_external_data=False)
    weights = weight_matmuls(tiny16)
    assert {t.data_type for t in model.graph.initializer if t.name in weights.values()} == {
        TensorProto.FLOAT16
    }
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    out = tmp_path / "q.onnx"
    result = calibrate_onnx(
        tiny16, tiny16.parent / "data", output=out, format="fp8", validate_batches=1
    )
    assert result.report["verdict"]["cosine"] > MIN_COSINE["fp8"]
    quantized = onnx.load(str(out), load_external_data=False)
    stored = [t for t in quantized.graph.initializer if t.data_type == STORAGE["fp8"]]
    assert len(stored) >= WEIGHT_MATMULS


def test_float16_int8_runs_in_ort_at_default_optimizations(tiny16, tmp_path):
    # ORT's QLinear kernels take float32 scales only: a float16 model keeps the ort placement
    # to its compute ops' inputs, and ORT loads and runs it at its default optimizations.
    out = tmp_path / "q.onnx"
    result = calibrate_onnx(tiny16, tiny16.parent / "data", output=out, validate_batches=1)
    assert result.report["validation"]["runtime_issue"] is None
    assert any("float16/bfloat16 node(s)" in n for n in result.report["plan_notes"])
    assert result.report["verdict"]["cosine"] > 0.995


def test_sizes_have_the_parameters_they_claim():
    """The benchmark sizes (not built here) have the parameter counts their config gives."""
    from transformers import LlamaForCausalLM

    for size in llm_model.SIZES:
        with torch.device("meta"):
            lm = LlamaForCausalLM(llm_model.llama_config(size))
        assert sum(p.numel() for p in lm.parameters()) == llm_model.parameter_count(size)
    assert 0.1e9 < llm_model.parameter_count("small") < 0.15e9
    assert 1.0e9 < llm_model.parameter_count("1b") < 1.2e9
