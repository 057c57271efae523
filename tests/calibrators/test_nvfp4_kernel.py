"""The fused NVFP4 block-scale sweep against the torch sweep on the same device: same choices.

Both paths get the same candidate scales (computed on the device). The kernel accumulates in
float32 (losses within a relative 2^-18; rtol 1e-5 here) and recomputes near ties in float64,
so the chosen FP8 block scales must be identical (Hessian-weighted: except where two candidates
tie in real arithmetic and float64 summation order decides, torch's einsum order being its own).
"""

from __future__ import annotations

import pytest
import torch

from qcal_export.calibrators import kernels
from qcal_export.calibrators.hessian import BlockHessian
from qcal_export.calibrators.nvfp4_mse import NVFP4MseCalibrator, fp8_scale_candidates
from qcal_export.spec.formats import NVFP4
from qcal_export.spec.granularity import PerBlock

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and kernels.HAS_TRITON), reason="needs CUDA and Triton"
    ),
]

SHAPES = [((7, 64), -1), ((33, 40), -1), ((129, 100), -1), ((40, 9), 0), ((3, 5, 48), -1)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def sample(shape, dtype, seed) -> torch.Tensor:
    """Student-t values with outliers and per-row scales, so that many candidates win."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(shape, device="cuda", generator=gen)
    x /= torch.rand(shape, device="cuda", generator=gen).add_(0.05).sqrt_()
    x *= torch.rand((*shape[:-1], 1), device="cuda", generator=gen).add_(0.01)
    return x.to(dtype)


def hessian_for(shape, axis, seed) -> torch.Tensor:
    cin = shape[axis]
    gen = torch.Generator(device="cuda").manual_seed(seed + 1)
    acts = torch.randn(256, cin, device="cuda", generator=gen)
    acts *= torch.rand(cin, device="cuda", generator=gen).mul_(3).add_(0.1)
    hessian = BlockHessian()
    hessian.collect(acts)
    return hessian.hessian


def calibrate(x, axis, hessian, *, fused, monkeypatch, global_amax=None) -> NVFP4MseCalibrator:
    with monkeypatch.context() as patch:
        if not fused:
            patch.setattr(NVFP4MseCalibrator, "_fused", lambda self, groups: False)
        cal = NVFP4MseCalibrator(
            granularity=PerBlock(axis, 16),
            global_amax=x.float().abs().amax() if global_amax is None else global_amax,
            hessian=hessian,
        )
        cal.collect(x)
        return cal


def assert_same_choice(
    fused: NVFP4MseCalibrator, reference: NVFP4MseCalibrator, *, exact_ties: bool = False
) -> None:
    """Same choices (the cached one of the first collect, and the argmin of the full sweep's
    losses); with ``exact_ties``, blocks whose choices tie in real arithmetic (float64 losses
    within 4 ulps, where summation order decides) may differ."""
    losses, expected = fused.state_dict()["losses"], reference.state_dict()["losses"]
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-30)
    rows = torch.arange(expected.shape[0], device=expected.device)
    want = reference._best_candidates()
    checked = torch.ones_like(want, dtype=torch.bool)
    for got in (fused._best_candidates(), losses.argmin(1)):
        if exact_ties:
            gap = (expected[rows, got] - expected[rows, want]).abs()
            checked &= (got == want) | (
                gap > 4 * torch.finfo(torch.float64).eps * expected[rows, want].abs()
            )
        differ = ((got != want) & checked).nonzero().flatten()
        detail = [
            (int(b), losses[b].sort().values[:3].tolist(), expected[b].sort().values[:3].tolist())
            for b in differ[:4]
        ]
        assert differ.numel() == 0, f"blocks with other choices (block, ours, torch): {detail}"
    amax, want_amax = fused.compute_amax().flatten(), reference.compute_amax().flatten()
    assert torch.equal(amax[checked], want_amax[checked])
    assert int(checked.sum()) >= 0.99 * checked.numel()


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "hessian"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "axis"), SHAPES, ids=str)
def test_fused_choice_equals_torch_sweep(shape, axis, dtype, seed, weighted, monkeypatch):
    x = sample(shape, dtype, seed)
    hessian = hessian_for(shape, axis, seed) if weighted else None
    fused = calibrate(x, axis, hessian, fused=True, monkeypatch=monkeypatch)
    reference = calibrate(x, axis, hessian, fused=False, monkeypatch=monkeypatch)
    assert_same_choice(fused, reference)


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "hessian"])
def test_ties_zero_tiny_and_out_of_range_blocks(weighted, monkeypatch):
    """Zero blocks, exact zero-loss ties (one value on several grids), tiny blocks, values far
    past the global amax, and values a hair off every E2M1 midpoint of every candidate."""
    global_amax = torch.tensor(3.0, device="cuda")
    scales = NVFP4.effective_scales(fp8_scale_candidates().cuda(), NVFP4.global_scale(global_amax))
    midpoints = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], device="cuda")
    ulps = torch.tensor([-2, -1, 0, 1, 2], device="cuda") * 2.0**-23
    near = (scales[:, None, None] * midpoints[None, :, None] * (1 + ulps)).reshape(-1)
    near = near[: near.numel() // 16 * 16].reshape(-1, 16)
    special = torch.zeros(6, 16, device="cuda")
    special[1, 3] = 6 * scales[40]  # on the grid of several candidates: zero-loss ties
    special[2] = 1e-30  # far below the smallest candidate
    special[3, :4] = torch.tensor([1e30, -3.0, 0.5, 7.0])  # past the global amax
    special[4] = torch.linspace(-3, 3, 16)
    special[5, ::2] = 1.5 * scales[60]
    x = torch.cat([special, near, -near]).reshape(-1, 64)
    hessian = hessian_for(tuple(x.shape), -1, 5) if weighted else None
    kwargs = {"global_amax": global_amax, "monkeypatch": monkeypatch}
    fused = calibrate(x, -1, hessian, fused=True, **kwargs)
    reference = calibrate(x, -1, hessian, fused=False, **kwargs)
    # Values on midpoints give real-arithmetic ties of dᵀHd: float64 summation order decides.
    assert_same_choice(fused, reference, exact_ties=weighted)


def test_kernel_fake_quant_is_bitwise_formats_arithmetic():
    """The kernel's Q -> DQ (Markstein division, magic-number rounding) equals formats.py on
    values a few ulps around every midpoint and grid point of every candidate."""
    from qcal_export.calibrators.kernels.nvfp4_sweep import fake_quant_like_sweep

    for global_amax in (3.0, 1e-20, 7e25):
        scales = NVFP4.effective_scales(
            fp8_scale_candidates().cuda(), NVFP4.global_scale(torch.tensor(global_amax))
        )
        points = torch.tensor([0.25, 0.5, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 7.0], device="cuda")
        ulps = torch.arange(-3, 4, device="cuda") * 2.0**-23
        x = (scales[:, None, None] * points[None, :, None] * (1 + ulps)).reshape(-1)
        x = torch.cat([x, -x, torch.randn(4096, device="cuda") * global_amax])
        got = fake_quant_like_sweep(x, scales)
        want = NVFP4.fake_quant_blocks(x[None], scales[:, None])
        assert torch.equal(got, want)


def test_several_collects_add_losses(monkeypatch):
    x = sample((64, 96), torch.float32, 7)
    parts = [x[:32], x[32:]]
    cals = []
    for fused in (True, False):
        with monkeypatch.context() as patch:
            if not fused:
                patch.setattr(NVFP4MseCalibrator, "_fused", lambda self, groups: False)
            cal = NVFP4MseCalibrator(global_amax=x.abs().amax())
            cal.collect(parts[0])
            cal.collect(parts[1])
            cals.append(cal)
    assert cals[0]._best is None  # a second collect drops the cached choice
    assert_same_choice(*cals)


def test_merge_and_restore_drop_the_cached_choice():
    x = sample((16, 64), torch.float32, 3)
    cal = NVFP4MseCalibrator(global_amax=x.abs().amax())
    cal.collect(x)
    other = NVFP4MseCalibrator(global_amax=x.abs().amax())
    other.collect(x.flip(0))
    expected = (cal.state_dict()["losses"] + other.state_dict()["losses"]).argmin(1)
    snapshot = cal.snapshot()
    cal.merge_(other.state_dict())
    assert torch.equal(cal._best_candidates(), expected)
    cal.restore(snapshot)
    assert torch.equal(cal._best_candidates().cpu(), snapshot["losses"].argmin(1))


def test_kernels_are_used_on_cuda_and_losses_only_when_asked(monkeypatch):
    from qcal_export.calibrators.kernels import nvfp4_best, nvfp4_sweep

    calls = []
    for module, name in ((nvfp4_best, "nvfp4_best_scales"), (nvfp4_sweep, "nvfp4_scale_sweep")):
        original = getattr(module, name)
        monkeypatch.setattr(
            module,
            name,
            lambda *a, name=name, original=original: calls.append(name) or original(*a),
        )
    cal = NVFP4MseCalibrator(global_amax=1.0)
    cal.collect(torch.randn(8, 32, device="cuda"))
    assert calls == ["nvfp4_best_scales"] and "losses" not in cal._state
    scales = cal.compute_block_scales()
    assert calls == ["nvfp4_best_scales"]
    losses = cal.state_dict()["losses"]
    assert calls == ["nvfp4_best_scales", "nvfp4_scale_sweep"] and losses.is_cuda
    assert torch.equal(cal.compute_block_scales(), scales)
    assert torch.equal(cal._best_candidates(), losses.argmin(1))


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "hessian"])
def test_pruned_choice_on_a_large_weight_equals_the_full_sweep(weighted):
    """A 512 x 4096 bf16 weight with outlier input channels (so block amaxes, and the ranges
    kept, differ a lot): the pruned kernels choose what the full sweep chooses, scoring fewer."""
    from qcal_export.calibrators.kernels.nvfp4_best import nvfp4_best_scales
    from qcal_export.calibrators.kernels.nvfp4_sweep import nvfp4_scale_sweep

    gen = torch.Generator(device="cuda").manual_seed(11)
    weight = torch.randn(512, 4096, device="cuda", generator=gen) * 0.02
    weight[:, ::61] *= 10
    weight = weight.to(torch.bfloat16)
    hessian = hessian_for(tuple(weight.shape), -1, 11) if weighted else None
    global_amax = weight.float().abs().amax()
    scales = NVFP4.effective_scales(fp8_scale_candidates().cuda(), NVFP4.global_scale(global_amax))
    blocks = PerBlock(-1, 16).groups(weight)
    best, counts = nvfp4_best_scales(blocks, scales, hessian, counts=True)
    _, full, _ = nvfp4_scale_sweep(blocks, scales, hessian)
    assert torch.equal(best, full)
    assert float(counts["needed"]) <= float(counts["scored"]) < 126


def test_pruned_choice_when_the_amax_sits_on_a_weak_channel():
    """Each block's amax on an input channel weighted 1e-4 of the others, its other values on
    heavy ones: the range's clipping bound comes from those, and must keep the winner."""
    from qcal_export.calibrators.kernels.nvfp4_best import nvfp4_best_scales
    from qcal_export.calibrators.kernels.nvfp4_sweep import nvfp4_scale_sweep

    gen = torch.Generator(device="cuda").manual_seed(5)
    weight = torch.randn(256, 1024, device="cuda", generator=gen) * 0.02
    weight[:, ::16] = weight.abs().amax(1, keepdim=True) * 1.5  # the amax of every block
    acts = torch.randn(512, 1024, device="cuda", generator=gen)
    acts[:, ::16] *= 0.01
    hessian = BlockHessian()
    hessian.collect(acts)
    global_amax = weight.abs().amax()
    scales = NVFP4.effective_scales(fp8_scale_candidates().cuda(), NVFP4.global_scale(global_amax))
    blocks = PerBlock(-1, 16).groups(weight)
    best, counts = nvfp4_best_scales(blocks, scales, hessian.hessian, counts=True)
    _, full, _ = nvfp4_scale_sweep(blocks, scales, hessian.hessian)
    assert torch.equal(best, full)
    assert float(counts["scored"]) < 126
