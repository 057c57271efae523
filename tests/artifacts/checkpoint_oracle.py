"""Shared by the checkpoint tests: random NVFP4 layers, and an oracle that decodes the raw
safetensors itself. A plain module (pytest's prepend import mode puts this folder on sys.path).


The oracle decodes the raw safetensors itself: a 16-entry E2M1 table, the low nibble first,
products in float64 rounded once to float32. A float64 product of an E2M1 value (2 significant
bits) or an FP8 scale (4 bits) with a float32 (24 bits) is exact, and a float64 quotient rounded
to float32 is the correctly rounded float32 quotient (double rounding is innocuous for division
when 53 >= 2 * 24 + 2, Figueroa 1995), so the oracle reproduces float32 arithmetic bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from qcal_export.artifacts.checkpoint import NVFP4Linear, write_nvfp4_checkpoint
from qcal_export.spec.formats import NVFP4

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
