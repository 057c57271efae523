"""A format owns its scale structure: the traits callers branch on (two levels, integer grid,
weight-only, default block) are the format's, and two-level numerics are its methods."""

from __future__ import annotations

import torch

from qcal_export.spec.formats import FORMATS, FP8_SUBNORMAL_MIN, NVFP4
from qcal_export.spec.granularity import PerBlock
from qcal_export.spec.scales import TensorScales


def test_each_format_declares_its_traits():
    traits = {
        name: (f.two_level, f.integer, f.weight_only, f.default_block_size)
        for name, f in FORMATS.items()
    }
    assert traits == {
        "int8": (False, True, False, None),
        "uint8": (False, True, False, None),
        "int16": (False, True, False, None),
        "uint16": (False, True, False, None),
        "int4": (False, True, True, 128),
        "uint4": (False, True, True, 128),
        "fp8": (False, False, False, None),
        "nvfp4": (True, False, False, 16),
        "mxfp8": (False, False, False, 32),
        "mxfp4": (False, False, False, 32),
    }
    assert (NVFP4.scale_min, NVFP4.scale_max) == (FP8_SUBNORMAL_MIN, 448.0) == (2.0**-9, 448.0)


def test_two_level_weight_fake_quant_is_the_dequantize_chain():
    """An NVFP4 weight's fake quantization: e2m1(w / (fp8 * g)) * (fp8 * g), float32 products,
    against a float64 decode of hand-chosen codes (values exact on the E2M1 grid)."""
    global_scale = torch.tensor(2.0**-3)
    block_scales = torch.tensor([[1.5, 0.25]])
    effective = (block_scales.double() * 2.0**-3).repeat_interleave(16, dim=1)
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
    codes = grid[torch.arange(32) % 8] * torch.where(torch.arange(32) % 3 == 0, -1.0, 1.0)
    weight = (codes * effective).float()
    scales = TensorScales(
        name="w",
        kind="weight",
        format="nvfp4",
        method="max",
        granularity=PerBlock(1, 16),
        amax=block_scales * 6,
        scale=block_scales,
        zero_point=torch.zeros(1, 2),
        global_scale=global_scale,
    )
    assert torch.equal(scales.fake_quant_weight(weight).double(), codes * effective)
    noisy = weight + 0.01 * effective.float()
    assert torch.equal(scales.fake_quant_weight(noisy).double(), codes * effective)
