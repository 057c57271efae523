"""The non-finite pass on CUDA (``kernels/nonfinite.py``) against torch: count and replacement."""

from __future__ import annotations

import math

import pytest
import torch

from qcal_export.calibrators import kernels

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and kernels.HAS_TRITON), reason="needs CUDA and Triton"
    ),
]


@pytest.mark.parametrize("fill", [None, 0.0, math.nan], ids=["count", "zero", "nan"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1,), (4097,), (33, 257, 3)], ids=str)
def test_count_and_replacement_equal_torch(shape, dtype, fill):
    from qcal_export.calibrators.kernels.nonfinite import nonfinite

    gen = torch.Generator(device="cuda").manual_seed(sum(shape))
    x = torch.randn(shape, device="cuda", generator=gen).mul_(3e4).to(dtype)  # fp16: some inf
    where = torch.rand(shape, device="cuda", generator=gen)
    x[where < 0.01], x[where > 0.995] = torch.nan, -torch.inf
    x = x.transpose(0, -1)  # not contiguous where it has two axes
    out, count = nonfinite(x, fill)
    finite = x.isfinite()
    assert count.device == x.device and int(count) == int((~finite).sum())
    if fill is None:
        assert out is x
        return
    expected = torch.where(finite, x, fill)
    assert out.shape == x.shape and out.dtype == dtype
    assert torch.equal(out.isnan(), expected.isnan())
    assert torch.equal(out.nan_to_num(7.0), expected.nan_to_num(7.0))
