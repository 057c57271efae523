"""The Triton MSE sweep against the torch sweep on the same device: same losses, same choice.

Both paths get the same candidate scales (computed on the device). For fp8, and for nvfp4's
global amax sweep (each block's FP8 scale from its own amax), they score the grid with the same
float32 QDQ arithmetic. The int kernels round the exact ``x * (1 / scale)``
instead of ``x / scale``; the two differ only where ``x / scale`` lies within 2^-24 relative
of a rounding midpoint, where the value's error moves by about that much. A group of two
values shows it in its loss, so the int kernels' losses are checked against that arithmetic
done in float64 (``kernel_losses``), and their choices against the torch path. The kernel sums
each tile's squares in float32 (the references in float64), hence rtol 2e-6 on the losses.
The chosen candidate must be the same, except in a group whose two choices the torch path
scores equal to float32 accuracy: such a tie is below what float32 sums can order, and either
candidate is then the minimum.
"""

from __future__ import annotations

import pytest
import torch

from qcal_export.calibrators import kernels
from qcal_export.calibrators.mse import MseCalibrator
from qcal_export.spec.formats import FP8_E4M3, INT4, INT8, NVFP4, UINT4, UINT8, IntFormat
from qcal_export.spec.granularity import PerAxis, PerBlock, PerTensor, PerTensorGroup

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and kernels.HAS_TRITON), reason="needs CUDA and Triton"
    ),
]

FORMATS = {"int8": INT8, "uint8": UINT8, "fp8": FP8_E4M3}
GRANULARITIES = {"per-tensor": PerTensor(), "axis0": PerAxis(0), "last-axis": PerAxis(-1)}
SHAPES = [(1000, 37), (3, 5), (4097, 129), (2, 70001)]
RTOL = 2e-6


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
        for batch in batches(x, granularity):
            cal.collect(batch)
        return cal


def batches(x: torch.Tensor, granularity) -> list[torch.Tensor]:
    return [x, half(x, granularity) * 0.5]


def expected_losses(fmt, granularity, x, reference: MseCalibrator) -> torch.Tensor:
    """What the kernel must compute: ``kernel_losses`` for int formats, else the torch path's."""
    if not isinstance(fmt, IntFormat):
        return reference.state_dict()["losses"]
    return kernel_losses(reference, batches(x, granularity))


def kernel_losses(cal: MseCalibrator, xs: list[torch.Tensor]) -> torch.Tensor:
    """The int kernels' arithmetic in float64: round half to even the exact product of ``x``
    and the float32 ``1 / scale``, saturate, multiply by ``scale`` rounded to float32."""
    fmt = cal.fmt
    scale, zero_point = fmt.scale_zero_point(*cal._candidates())
    inverse = torch.ones_like(scale).div_(scale).double()[:, :, None]
    lo = (fmt.qmin - zero_point).double()[:, :, None]
    hi = (fmt.qmax - zero_point).double()[:, :, None]
    losses = torch.zeros_like(cal.state_dict()["losses"])
    for x in xs:
        groups = cal.granularity.groups(x.double())[None]
        q = torch.maximum(torch.minimum(torch.round(groups * inverse), hi), lo)
        xq = (q * scale.double()[:, :, None]).float().double()
        losses += (xq - groups).square().sum(-1).T
    return losses


def assert_kernel_matches(fmt, granularity, x, monkeypatch) -> None:
    """The kernel's losses are ``expected_losses`` and its choices the torch path's."""
    fused = sweep(fmt, granularity, x, fused=True, monkeypatch=monkeypatch)
    reference = sweep(fmt, granularity, x, fused=False, monkeypatch=monkeypatch)
    expected = expected_losses(fmt, granularity, x, reference)
    torch.testing.assert_close(fused.state_dict()["losses"], expected, rtol=RTOL, atol=0)
    assert_same_choice(fused, reference)


def assert_same_choice(fused: MseCalibrator, reference: MseCalibrator) -> None:
    """Same candidate per group, or a float32 tie in the reference's float64 losses."""
    losses = reference.state_dict()["losses"]
    mine, theirs = fused.state_dict()["losses"].argmin(1), losses.argmin(1)
    differ = mine != theirs
    assert int(differ.sum()) <= max(1, differ.numel() // 1000)
    at_mine = losses.gather(1, mine[:, None])[:, 0][differ]
    at_theirs = losses.gather(1, theirs[:, None])[:, 0][differ]
    torch.testing.assert_close(at_mine, at_theirs, rtol=RTOL, atol=0)
    same = ~differ
    amax, expected = fused.compute_amax().reshape(-1), reference.compute_amax().reshape(-1)
    if amax.numel() == same.numel():
        assert torch.equal(amax[same], expected[same])


def half(x: torch.Tensor, granularity) -> torch.Tensor:
    """A second batch: other size along an axis that is not the channel axis (for blocks, of a
    weight, the same shape, rows reversed)."""
    if isinstance(granularity, PerBlock):
        return x.flip(0)
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
    assert_kernel_matches(fmt, granularity, x, monkeypatch)


def test_kernel_is_used_on_cuda(monkeypatch):
    from qcal_export.calibrators.kernels import mse_sweep

    calls = []
    original = mse_sweep.mse_sweep_
    monkeypatch.setattr(mse_sweep, "mse_sweep_", lambda *a: calls.append(1) or original(*a))
    cal = MseCalibrator(INT8, PerTensor(), amax0=1.0)
    cal.collect(torch.randn(64, 3, device="cuda"))
    assert calls and cal.state_dict()["losses"].is_cuda


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("shape", "axis"),
    [((64, 96), -1), ((33, 40), -1), ((40, 9), 0), ((4097, 48), -1), ((3, 5, 64), 1)],
    ids=str,
)
def test_nvfp4_global_amax_matches_torch_sweep(shape, axis, dtype, monkeypatch):
    """Partial last blocks (padded with zeros), several tiles, blocks along a middle axis."""
    x = sample(shape, dtype, seed=sum(shape))
    assert_kernel_matches(NVFP4, PerTensorGroup(axis, 16), x, monkeypatch)


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
            torch.testing.assert_close(losses, cal.state_dict()["losses"], rtol=RTOL, atol=0)


@pytest.mark.parametrize("fmt_name", ["int4", "uint4"])
@pytest.mark.parametrize("shape", [(64, 96), (33, 70), (5, 1000)], ids=str)
def test_blocks_match_torch_sweep(fmt_name, shape, monkeypatch):
    """int4 blocks of 32 along the last axis, a partial last block included."""
    fmt = {"int4": INT4, "uint4": UINT4}[fmt_name]
    granularity = PerBlock(-1, 32)
    x = sample(shape, torch.bfloat16, seed=shape[1])
    assert_kernel_matches(fmt, granularity, x, monkeypatch)


@pytest.mark.parametrize("slab_bytes", [1 << 26, 4096], ids=["one-slab", "slabs"])
@pytest.mark.parametrize("axis", [-1, 1, 0])
def test_strided_groups(axis, slab_bytes, monkeypatch):
    """Channels of a [batch, tokens, channels] activation: groups of a strided view. Channels
    of the last axis (9000 values each) are copied in row-major slabs, here in one or in three
    (4096 values each, the last one partial)."""
    from qcal_export.calibrators.kernels import mse_sweep

    monkeypatch.setattr(mse_sweep, "SLAB_BYTES", slab_bytes)
    x = sample((3, 3000, 20), torch.bfloat16, seed=axis + 5)
    assert_kernel_matches(INT8, PerAxis(axis), x, monkeypatch)


def test_quotient_is_correctly_rounded():
    """The kernel's division (reciprocal, product, one Newton step) equals IEEE ``x / s``,
    also next to every half-integer, where a one-ulp error would change the rounded value."""
    import triton
    import triton.language as tl

    from qcal_export.calibrators.kernels.mse_sweep import _quotient

    @triton.jit
    def quotient_kernel(x_ptr, s_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        x = tl.load(x_ptr + offsets, mask=mask)
        s = tl.load(s_ptr + offsets, mask=mask, other=1.0)
        inverse = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
        tl.store(out_ptr + offsets, _quotient(x, s, inverse), mask=mask)

    gen = torch.Generator(device="cuda").manual_seed(0)
    n = 1 << 22
    s = torch.exp2(torch.empty(n, device="cuda").uniform_(-40, 40, generator=gen))
    s *= torch.empty(n, device="cuda").uniform_(1, 2, generator=gen)
    halves = torch.randint(-300, 300, (n,), device="cuda", generator=gen) + 0.5
    x = (halves.double() * s.double()).float()  # the float32 nearest to a half-integer times s
    x = torch.cat([x, x.nextafter(x * 2), x.nextafter(torch.zeros_like(x))])
    x = torch.cat([x, torch.randn(n, device="cuda", generator=gen) * s])
    s = s.repeat(4)
    out = torch.empty_like(x)
    quotient_kernel[(triton.cdiv(x.numel(), 1024),)](x, s, out, x.numel(), BLOCK=1024)
    expected = x.cpu() / s.cpu()
    assert torch.equal(out.cpu(), expected)


@pytest.mark.parametrize("granularity", [PerTensor(), PerAxis(-1)], ids=lambda g: g.describe())
@pytest.mark.parametrize("fmt_name", list(FORMATS))
def test_nonfinite_values_are_read_as_zero_without_waiting(fmt_name, granularity, monkeypatch):
    """NaN and +-inf among the values: the kernel's losses are those of zeros in their place,
    the count is exact, and a collect after the first never waits for the device."""
    fmt = FORMATS[fmt_name]
    x = sample((1000, 37), torch.bfloat16, seed=11)
    bad = x.clone()
    bad[::97, 5], bad[3, ::7], bad[500, 0] = torch.nan, torch.inf, -torch.inf
    zeroed = torch.where(bad.isfinite(), bad, 0)
    g = granularity.groups(zeroed.float())
    stat = (g.shape[0],)
    amin0, amax0 = granularity.unflatten(g.amin(1), stat), granularity.unflatten(g.amax(1), stat)
    options = {"amin0": None if fmt.symmetric else amin0, "amax0": amax0}
    fused = MseCalibrator(fmt, granularity, **options)
    fused.collect(bad)
    torch.cuda.set_sync_debug_mode("error")
    try:
        fused.collect(bad)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with monkeypatch.context() as patch:
        patch.setattr(MseCalibrator, "_fused", lambda self, groups: False)
        reference = MseCalibrator(fmt, granularity, **options)
        for _ in range(2):
            reference.collect(zeroed)
    assert fused.nonfinite_count == 2 * int((~bad.isfinite()).sum())
    expected = (
        kernel_losses(reference, [zeroed, zeroed])
        if isinstance(fmt, IntFormat)
        else reference.state_dict()["losses"]
    )
    torch.testing.assert_close(fused.state_dict()["losses"], expected, rtol=RTOL, atol=0)
    assert_same_choice(fused, reference)
