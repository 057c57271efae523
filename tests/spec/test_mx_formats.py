"""MX formats (mxfp8, mxfp4): scales and fake quantization against the float64 brute force of
mx_oracle.py (the OCP MX spec's definition), element for element; E8M0 codes; traits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mx_oracle import K, N, brute_force, weight_cases
from onnx import TensorProto

from qcal_export.errors import RecipeError
from qcal_export.spec.formats import FORMATS
from qcal_export.spec.granularity import PerBlock
from qcal_export.spec.mx_formats import MXFP4, MXFP8, e8m0_codes, e8m0_values
from qcal_export.spec.recipe import TensorSpec
from qcal_export.spec.scales import TensorScales


@pytest.mark.parametrize("fmt", [MXFP8, MXFP4], ids=lambda f: f.name)
def test_fake_quant_equals_the_spec_brute_force(fmt):
    weight = weight_cases(fmt.name)
    expected, exponents = brute_force(weight, fmt.name)
    granularity = PerBlock(0, 32)
    block_amax = granularity.groups(torch.from_numpy(weight)).abs().amax(-1)
    block_amax = granularity.unflatten(block_amax, granularity.stat_shape((K, N)))
    scale, zero_point = fmt.scale_zero_point(-block_amax, block_amax)
    assert torch.equal(scale.double(), torch.from_numpy(2.0**exponents))
    scales = TensorScales(
        name="w",
        kind="weight",
        format=fmt.name,
        method="max",
        granularity=granularity,
        amax=block_amax,
        scale=scale,
        zero_point=zero_point,
    )
    got = scales.fake_quant_weight(torch.from_numpy(weight))
    np.testing.assert_array_equal(got.double().numpy(), expected)
    codes = fmt.quantize(torch.from_numpy(weight), granularity.expand(scale, (K, N)), None)
    decoded = fmt.decode(codes.view(torch.uint8) if codes.dtype != torch.uint8 else codes)
    np.testing.assert_array_equal((decoded * granularity.expand(scale, (K, N))).numpy(), expected)


def test_e8m0_codes_round_trip_every_exponent():
    codes = torch.arange(255, dtype=torch.uint8)
    values = e8m0_values(codes)
    assert torch.equal(values.double(), torch.tensor([2.0 ** (c - 127) for c in range(255)]))
    assert torch.equal(e8m0_codes(values), codes)
    as_torch = codes.view(torch.float8_e8m0fnu).float()
    assert torch.equal(values, as_torch)


def test_spec_exponent_by_hand():
    """448 in E4M3: floor(log2 448) = 8, e = 0; 449..511 saturate at 448 with the same e;
    E2M1: amax 6 gives e = 0, amax 8 gives e = 1; a zero block gets -127."""
    amax = torch.tensor([448.0, 511.0, 512.0, 6.0, 8.0, 0.0, 2.0**-140])
    assert MXFP8.exponent(amax).tolist() == [0, 0, 1, -6, -5, -127, -127]
    assert MXFP4.exponent(amax).tolist() == [6, 6, 7, 0, 1, -127, -127]
    assert MXFP8.fake_quant(torch.tensor([511.0]), torch.tensor(1.0), None).item() == 448.0


def test_traits_and_block_size():
    assert FORMATS["mxfp8"] is MXFP8 and FORMATS["mxfp4"] is MXFP4
    for fmt in (MXFP8, MXFP4):
        assert (fmt.weight_only, fmt.default_block_size, fmt.min_opset) == (False, 32, 24)
        assert fmt.scale_onnx_type == TensorProto.FLOAT8E8M0
    assert TensorSpec(format="mxfp4").block_size == 32
    with pytest.raises(RecipeError, match="mxfp8 blocks are 32 elements, not 16"):
        TensorSpec(format="mxfp8", block_size=16)
