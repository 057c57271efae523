"""The Triton MSE sweep against the torch sweep on the same device: same losses, same choice.

Both paths get the same candidate scales (computed on the device), so they score the same grid;
the kernel sums the same float64 squares in another order, hence rtol 1e-12 on the losses.
"""

from __future__ import annotations

import pytest
import torch

from qcal_export.calibrators import kernels
from qcal_export.calibrators.mse import MseCalibrator
from qcal_export.formats import FP8_E4M3, INT8, UINT8
from qcal_export.granularity import PerAxis, PerTensor

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and kernels.HAS_TRITON), reason="needs CUDA and Triton"
    ),
]

FORMATS = {"int8": INT8, "uint8": UINT8, "fp8": FP8_E4M3}
GRANULARITIES = {"per-tensor": PerTensor(), "axis0": PerAxis(0), "last-axis": PerAxis(-1)}
SHAPES = [(1000, 37), (3, 5), (4097, 129), (2, 70001)]


def sample(shape, dtype, seed) -> torch.Tensor:
    """Student-t values with a few large outliers, so that mid-range candidates win."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(shape, device="cuda", generator=gen)
    x /= torch.rand(shape, device="cuda", generator=gen).add_(0.05).sqrt_()
    return (x + 0.3).to(dtype)


def sweep(fmt, granularity, x, *, fused, monkeypatch) -> MseCalibrator:
    with monkeypatch.context() as patch:
        patch.setattr(MseCalibrator, "_fused", lambda self, groups: fused)
        ranges = x.float().amin(), x.float().amax()
        if not isinstance(granularity, PerTensor):
            g = granularity.groups(x.float())
            ranges = (
                granularity.unflatten(g.amin(1), (g.shape[0],)),
                granularity.unflatten(g.amax(1), (g.shape[0],)),
            )
        amin0, amax0 = ranges
        cal = MseCalibrator(fmt, granularity, amin0=None if fmt.symmetric else amin0, amax0=amax0)
        cal.collect(x)
        cal.collect(half(x, granularity) * 0.5)
        return cal


def half(x: torch.Tensor, granularity) -> torch.Tensor:
    """A second batch of other size along an axis that is not the channel axis."""
    axis = 1 if granularity == PerAxis(0) else 0
    return x.narrow(axis, 0, max(1, x.shape[axis] // 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("gran_name", list(GRANULARITIES))
@pytest.mark.parametrize("fmt_name", list(FORMATS))
def test_kernel_matches_torch_sweep(fmt_name, gran_name, shape, dtype, monkeypatch):
    fmt, granularity = FORMATS[fmt_name], GRANULARITIES[gran_name]
    if gran_name == "axis0" and shape[1] == 70001:
        shape = (70001, 2)
    x = sample(shape, dtype, seed=sum(shape))
    fused = sweep(fmt, granularity, x, fused=True, monkeypatch=monkeypatch)
    reference = sweep(fmt, granularity, x, fused=False, monkeypatch=monkeypatch)
    losses, expected = fused.state_dict()["losses"], reference.state_dict()["losses"]
    torch.testing.assert_close(losses, expected, rtol=1e-12, atol=0)
    assert torch.equal(fused.compute_amax(), reference.compute_amax())


def test_kernel_is_used_on_cuda(monkeypatch):
    from qcal_export.calibrators.kernels import mse_sweep

    calls = []
    original = mse_sweep.mse_sweep_
    monkeypatch.setattr(mse_sweep, "mse_sweep_", lambda *a: calls.append(1) or original(*a))
    cal = MseCalibrator(INT8, PerTensor(), amax0=1.0)
    cal.collect(torch.randn(64, 3, device="cuda"))
    assert calls and cal.state_dict()["losses"].is_cuda


@pytest.mark.parametrize("fmt_name", list(FORMATS))
def test_low_precision_input_is_upcast_in_registers(fmt_name):
    from qcal_export.calibrators.kernels.mse_sweep import mse_sweep_

    fmt = FORMATS[fmt_name]
    x = sample((7, 3001), torch.bfloat16, seed=3)
    amax = x.float().abs().amax(1)[None] * torch.linspace(0.3, 2.0, 9, device="cuda")[:, None]
    scale, zero_point = fmt.scale_zero_point(-amax, amax)
    from_bf16 = mse_sweep_(
        torch.zeros(7, 9, dtype=torch.float64, device="cuda"), x, scale, zero_point, fmt
    )
    from_f32 = mse_sweep_(
        torch.zeros(7, 9, dtype=torch.float64, device="cuda"), x.float(), scale, zero_point, fmt
    )
    assert torch.equal(from_bf16, from_f32)


def test_fp8_grid_rounds_like_torch(monkeypatch):
    """Every binade of E4M3 (subnormals, saturation past 448) with scale 1: losses agree."""
    exponents = torch.arange(-12, 10, dtype=torch.float32, device="cuda")
    fractions = torch.linspace(1.0, 2.0, 257, device="cuda")[:-1]
    x = (fractions[None] * torch.exp2(exponents)[:, None]).reshape(-1)
    x = torch.cat([x, -x, torch.tensor([0.0, 448.0, 464.0, 1e4], device="cuda")])
    for fused in (True, False):
        with monkeypatch.context() as patch:
            patch.setattr(MseCalibrator, "_fused", lambda self, groups, fused=fused: fused)
            cal = MseCalibrator(FP8_E4M3, PerTensor(), amax0=448.0, start=1.0, stop=1.0)
            cal.collect(x)
        if fused:
            losses = cal.state_dict()["losses"]
        else:
            torch.testing.assert_close(losses, cal.state_dict()["losses"], rtol=1e-12, atol=0)
