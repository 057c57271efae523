"""MX serving checkpoints (compressed-tensors mxfp8-quantized and mxfp4-pack-quantized, ModelOpt
MXFP8) written by a calibration: read back raw with safetensors and decoded by a float64 brute
force (E4M3 through ml_dtypes, E2M1 from a 16-entry table, low nibble first, times
2^(code - 127)), they equal the QDQ model's dequantized weights as the reference evaluator
computes them; compressed-tensors itself decompresses them to the same; what no layout defines
is refused in one line."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from ct_peer import ct_loaded
from error_lines import assert_one_error_line
from mlp import make_mlp
from onnx import helper
from onnx.reference import ReferenceEvaluator
from safetensors import safe_open

from qcal_export.artifacts.mx_checkpoint import MXLinear, load_mx_checkpoint, write_mx_checkpoint
from qcal_export.artifacts.onnx_layers import layer_name
from qcal_export.cli import main
from qcal_export.errors import OutputError
from qcal_export.pipeline.calibrate import calibrate_onnx

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])
SIZES = {"up": (96, 64), "down": (32, 96), "head": (8, 32)}


class MLP(torch.nn.Module):
    """In-features 64, 96, 32: whole blocks of 32, as the MX layouts require."""

    def __init__(self):
        super().__init__()
        for name, (out, inputs) in SIZES.items():
            self.add_module(name, torch.nn.Linear(inputs, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gelu = torch.nn.functional.gelu
        return self.head(gelu(self.down(gelu(self.up(x)))))


@pytest.fixture(scope="module", params=[True, False], ids=["matmul", "gemm"])
def mlp(request, tmp_path_factory):
    """mlp.onnx (MatMul with transposed weights for ``[b, 5, 64]`` inputs, or Gemm) and data/."""
    return make_mlp(tmp_path_factory.mktemp("mx_mlp"), request.param, MLP)


def graph_weights(qdq: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    """{layer: float64 [out, in]} of each MatMul/Gemm weight the QDQ model dequantizes, as the
    reference evaluator computes it (fed ``x``)."""
    producer = {o: n for n in qdq.graph.node for o in n.output}
    wanted = {}
    for node in qdq.graph.node:
        dq = producer.get(node.input[1]) if node.op_type in ("MatMul", "Gemm") else None
        if dq is not None and dq.op_type == "DequantizeLinear":
            weight = dq.input[0].removesuffix("_quantized")
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            wanted[node.input[1]] = (layer_name(weight, node.name), trans_b)
    probe = onnx.ModelProto()
    probe.CopyFrom(qdq)
    probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in wanted)
    values = ReferenceEvaluator(probe).run(list(wanted), {"x": x})
    return {
        name: (v if trans_b else v.T).astype(np.float64)
        for (name, trans_b), v in zip(wanted.values(), values, strict=True)
    }


def brute_force(folder, fmt: str) -> dict[str, np.ndarray]:
    """{layer: float64 [out, in]} decoded from the raw safetensors."""
    out = {}
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        raw = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open)
    for key in sorted(k for k in raw if k.endswith(".weight_scale")):
        name = key.removesuffix(".weight_scale")
        assert raw[key].dtype == torch.uint8
        exponents = raw[key].numpy().astype(np.int64)
        if fmt == "mxfp4":
            packed = raw[f"{name}.weight_packed"].numpy()
            codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(len(packed), -1)
            elements = E2M1[codes]
        else:
            assert raw[f"{name}.weight"].dtype == torch.float8_e4m3fn
            bits = raw[f"{name}.weight"].view(torch.uint8).numpy()
            elements = bits.view(ml_dtypes.float8_e4m3fn).astype(np.float64)
        out[name] = elements * np.repeat(np.ldexp(1.0, exponents - 127), 32, axis=1)
    return out


CASES = [
    ("mxfp8", "compressed-tensors", True),
    ("mxfp8", "compressed-tensors", False),
    ("mxfp8", "modelopt", True),
    ("mxfp4", "compressed-tensors", True),
    ("mxfp4", "compressed-tensors", False),
]
"""(format, layout, MX activations): ModelOpt MXFP8 holds MX activations only (refused below)."""


@pytest.mark.parametrize(("fmt", "layout", "activations"), CASES)
def test_checkpoint_equals_the_qdq_weights(mlp, tmp_path, fmt, layout, activations):
    folder = tmp_path / "ckpt"
    calibrate_onnx(
        mlp / "mlp.onnx",
        mlp / "data",
        format=fmt,
        activation_format=None if activations else "none",
        output=tmp_path / "q.onnx",
        checkpoint=folder,
        checkpoint_layouts=(layout,),
        validate_batches=0,
    )
    x = np.load(next((mlp / "data").glob("*.npz")))["x"]
    want = graph_weights(onnx.load(str(tmp_path / "q.onnx")), x)
    got = brute_force(folder, fmt)
    assert set(got) == set(want) == set(SIZES)
    for name, values in want.items():
        np.testing.assert_array_equal(got[name], values, err_msg=name)
    ours, config = load_mx_checkpoint(folder)
    for name, values in want.items():
        np.testing.assert_array_equal(ours[name].double().numpy(), values, err_msg=name)
    quantization = config["quantization_config"]
    (group,) = quantization["config_groups"].values()
    assert group["weights"]["group_size"] == 32
    if layout == "modelopt":
        hf = json.loads((folder / "hf_quant_config.json").read_text())["quantization"]
        assert (hf["quant_algo"], hf["group_size"]) == ("MXFP8", 32)
        return
    element = {"mxfp8": "mxfp8-quantized", "mxfp4": "mxfp4-pack-quantized"}[fmt]
    assert quantization["format"] == group["format"] == element
    assert group["weights"]["scale_dtype"] == "torch.uint8"
    dynamic = group["input_activations"] and group["input_activations"]["dynamic"]
    assert dynamic is (True if activations else None)


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4"])
def test_compressed_tensors_decompresses_to_our_weights(tmp_path, fmt):
    """compressed-tensors parses config.json, expects exactly our tensors (names, shapes,
    dtypes) and decompresses them to our dequantized weights."""
    pytest.importorskip("compressed_tensors")
    layers = [
        random_layer(f"model.mlp.{name}", shape, fmt, i)
        for i, (name, shape) in enumerate(SIZES.items())
    ]
    write_mx_checkpoint(tmp_path, layers, "compressed-tensors")
    ours, config = load_mx_checkpoint(tmp_path)
    linears = [(layer.name, *layer.codes.shape, True) for layer in layers]
    model, compressor, _ = ct_loaded(linears, config["quantization_config"], tmp_path)
    compressor.decompress_model(model)
    for layer in layers:
        decompressed = model.get_submodule(layer.name).weight
        assert torch.equal(decompressed, ours[layer.name].to(decompressed.dtype))


def random_layer(name: str, shape: tuple[int, int], fmt: str, seed: int) -> MXLinear:
    """Random codes (finite E4M3, any E2M1) and exponents around 2^0, with a bias."""
    gen = torch.Generator().manual_seed(seed)
    out, inputs = shape
    if fmt == "mxfp8":
        codes = torch.randint(0, 126, shape, generator=gen, dtype=torch.uint8)
        codes = codes | (torch.randint(0, 2, shape, generator=gen, dtype=torch.uint8) << 7)
        codes = codes.view(torch.float8_e4m3fn)
    else:
        codes = torch.randint(0, 16, shape, generator=gen, dtype=torch.uint8)
    exponents = torch.randint(117, 130, (out, inputs // 32), generator=gen, dtype=torch.uint8)
    return MXLinear(name, fmt, codes, exponents, True, torch.randn(out, generator=gen))


def test_layers_no_layout_holds_are_refused(tmp_path):
    layer = random_layer("l", (8, 48), "mxfp4", 0)
    with pytest.raises(OutputError, match="in_features 48 is not a multiple of 32"):
        write_mx_checkpoint(tmp_path / "a", [layer], "compressed-tensors")
    layer = random_layer("l", (8, 64), "mxfp4", 0)
    with pytest.raises(OutputError, match="ModelOpt's HF checkpoint defines no mxfp4 layout"):
        write_mx_checkpoint(tmp_path / "b", [layer], "modelopt")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_refuses_what_no_layout_defines(mlp, tmp_path, capsys):
    args = ["calibrate", str(mlp / "mlp.onnx"), "--data", str(mlp / "data")]
    refused = {
        "mxfp4 --checkpoint-layout modelopt": "defines no mxfp4 layout",
        "mxfp8 --checkpoint-layout modelopt --activation-format none": "MXFP8A16",
        "mxfp8 --activation-format int8": "activations are calibrated as int8",
    }
    for options, pattern in refused.items():
        out = tmp_path / "q.onnx"
        code = main(
            [
                *args,
                "-o",
                str(out),
                "--format",
                *options.split(),
                "--checkpoint",
                str(tmp_path / "c"),
            ]
        )
        assert code == 2
        assert_one_error_line(capsys.readouterr(), pattern)
        assert not (tmp_path / "c").exists() and not out.exists()
