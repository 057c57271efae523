"""NVFP4 per-block FP8-scale sweep against a float64 brute force, plain and Hessian-weighted."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qcal_export.calibrators.hessian import BlockHessian
from qcal_export.calibrators.nvfp4_mse import NVFP4MseCalibrator, fp8_scale_candidates
from qcal_export.errors import CalibrationError
from qcal_export.spec.formats import NVFP4
from qcal_export.spec.granularity import PerBlock

E2M1_GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float32)


def e2m1_oracle(y: np.ndarray) -> np.ndarray:
    """Nearest E2M1 value by exhaustive search, ties to the even code, saturating at ±6."""
    magnitude = np.abs(y)[..., None].astype(np.float64)
    distance = np.abs(magnitude - E2M1_GRID.astype(np.float64))
    odd = (np.arange(8) % 2).astype(np.float64)
    code = np.argmin(distance + odd * 1e-12, axis=-1)  # exact ties go to the even code
    return (np.sign(y) * E2M1_GRID[code]).astype(np.float32)


def blocks_of(x: np.ndarray, axis: int) -> np.ndarray:
    moved = np.moveaxis(x, axis, -1)
    pad = -moved.shape[-1] % 16
    moved = np.pad(moved, [(0, 0)] * (moved.ndim - 1) + [(0, pad)])
    return moved.reshape(-1, 16)


def oracle_block_codes(x: np.ndarray, axis: int, hessian: np.ndarray | None = None) -> np.ndarray:
    """Per block, the FP8 code (1..126) whose fake-quantization has the least float64 error."""
    blocks = blocks_of(x, axis).astype(np.float32)
    global_scale = np.float32(np.float32(np.abs(x).max()) / np.float32(6 * 448))
    values = fp8_scale_candidates().float().numpy()
    losses = np.empty((blocks.shape[0], len(values)))
    per_row = -(-x.shape[axis] // 16)
    for k, value in enumerate(values):
        scale = np.float32(value * global_scale)
        xq = e2m1_oracle(blocks / scale) * scale
        diff = xq.astype(np.float64) - blocks.astype(np.float64)
        if hessian is None:
            losses[:, k] = (diff**2).sum(-1)
        else:
            h = hessian[np.arange(len(blocks)) % per_row]
            losses[:, k] = np.einsum("gi,gij,gj->g", diff, h, diff)
    return losses.argmin(1) + 1


def test_round_e2m1_matches_exhaustive_search_with_ties_and_saturation():
    grid = np.concatenate([E2M1_GRID, -E2M1_GRID])
    midpoints = (E2M1_GRID[1:] + E2M1_GRID[:-1]) / 2
    y = np.concatenate(
        [
            grid,
            midpoints,
            -midpoints,
            [6.5, 7.0, 1e9, -1e9],
            np.random.default_rng(0).normal(0, 3, 10000),
        ]
    ).astype(np.float32)
    got = NVFP4.round_e2m1(torch.from_numpy(y)).numpy()
    np.testing.assert_array_equal(got, e2m1_oracle(y))
    # Midpoint ties go to the even code: .25->0 .75->1 1.25->1 1.75->2 2.5->2 3.5->4 5->4
    np.testing.assert_array_equal(
        NVFP4.round_e2m1(torch.from_numpy(midpoints)).numpy(), [0, 1, 1, 2, 2, 4, 4]
    )


@pytest.mark.parametrize(("shape", "axis"), [((4, 40), -1), ((40, 3), 0), ((2, 3, 33), 2)])
def test_per_block_groups_shapes_and_round_trip(shape, axis):
    gran = PerBlock(axis, 16)
    x = torch.randn(shape)
    groups = gran.groups(x)
    np.testing.assert_array_equal(groups.numpy(), blocks_of(x.numpy(), axis))
    stat_shape = gran.stat_shape(tuple(x.shape))
    expected = list(shape)
    expected[axis] = -(-shape[axis] // 16)
    assert stat_shape == tuple(expected)
    amax = groups.abs().amax(-1)
    exported = gran.unflatten(amax, stat_shape)
    assert tuple(exported.shape) == stat_shape
    assert torch.equal(gran.flatten(exported), amax)
    # Each exported entry is the amax of its own block of x along the axis.
    moved = x.movedim(axis, -1)
    first = moved[(0,) * (moved.dim() - 1)][:16].abs().max()
    assert exported.movedim(axis, -1)[(0,) * (moved.dim() - 1)][0] == first


DATA = {
    "normal": lambda rng, shape: rng.normal(0, 1, shape),
    "student-t": lambda rng, shape: rng.standard_t(2, shape),
}


@pytest.mark.parametrize("kind", list(DATA))
@pytest.mark.parametrize(("shape", "axis"), [((24, 64), -1), ((8, 40), -1), ((48, 6), 0)])
def test_chosen_scales_equal_float64_brute_force(kind, shape, axis):
    x = DATA[kind](np.random.default_rng(1), shape).astype(np.float32)
    cal = NVFP4MseCalibrator(granularity=PerBlock(axis, 16), global_amax=np.abs(x).max())
    cal.collect(torch.from_numpy(x))
    codes = cal.granularity.flatten(cal.compute_block_scales().view(torch.uint8)).numpy()
    np.testing.assert_array_equal(codes, oracle_block_codes(x, axis))
    # compute_amax is the winning scale's block amax: 6 * fp8 value * global scale
    global_scale = NVFP4.global_scale(torch.tensor(np.abs(x).max()))
    expected = cal.compute_block_scales().float() * global_scale * 6
    assert torch.equal(cal.compute_amax(), expected)


@pytest.mark.parametrize("kind", list(DATA))
def test_hessian_weighted_choice_equals_brute_force(kind):
    rng = np.random.default_rng(2)
    w = DATA[kind](rng, (16, 48)).astype(np.float32)
    acts = rng.normal(0, 1, (64, 48)) * rng.uniform(0.1, 3, 48)  # channels of unequal scale
    accumulator = BlockHessian()
    accumulator.collect(torch.from_numpy(acts[:40]))
    accumulator.collect(torch.from_numpy(acts[40:]))
    hessian = accumulator.hessian.numpy()
    np.testing.assert_allclose(
        hessian, np.einsum("nbi,nbj->bij", acts.reshape(64, 3, 16), acts.reshape(64, 3, 16))
    )
    cal = NVFP4MseCalibrator(global_amax=np.abs(w).max(), hessian=accumulator.hessian)
    cal.collect(torch.from_numpy(w))
    codes = cal.compute_block_scales().view(torch.uint8).reshape(-1).numpy()
    np.testing.assert_array_equal(codes, oracle_block_codes(w, -1, hessian))
    assert not np.array_equal(codes, oracle_block_codes(w, -1))  # the weighting changes choices


@pytest.mark.parametrize("weighted", [False, True])
def test_never_worse_than_the_default_block_scale(weighted):
    rng = np.random.default_rng(3)
    w = torch.from_numpy(rng.standard_t(3, (32, 64)).astype(np.float32))
    hessian = None
    if weighted:
        acts = torch.from_numpy(rng.normal(0, 1, (128, 64)))
        hessian = torch.einsum("nbi,nbj->bij", acts.reshape(128, 4, 16), acts.reshape(128, 4, 16))
    cal = NVFP4MseCalibrator(global_amax=w.abs().max(), hessian=hessian)
    cal.collect(w)
    global_scale = NVFP4.global_scale(w.abs().max())
    blocks = w.reshape(-1, 16)
    default = NVFP4.block_scales(blocks.abs().amax(-1), global_scale)

    def error(scales: torch.Tensor) -> torch.Tensor:
        eff = NVFP4.effective_scales(scales.reshape(-1), global_scale)[:, None]
        diff = (NVFP4.fake_quant_blocks(blocks, eff).double() - blocks).reshape(-1, 16)
        if hessian is None:
            return diff.square().sum(-1)
        return torch.einsum("gi,gij,gj->g", diff, hessian[torch.arange(len(diff)) % 4], diff)

    chosen, base = error(cal.compute_block_scales()), error(default)
    assert bool((chosen <= base + 1e-12 * base.abs()).all())
    assert float(chosen.sum()) < float(base.sum())


def test_merge_of_two_calibrators_equals_one_fed_both():
    rng = np.random.default_rng(4)
    first, second = (
        torch.from_numpy(rng.normal(0, 1, (8, 32)).astype(np.float32)) for _ in range(2)
    )
    amax = float(max(first.abs().max(), second.abs().max()))
    whole, a, b = (NVFP4MseCalibrator(global_amax=amax) for _ in range(3))
    whole.collect(first)
    whole.collect(second)
    a.collect(first)
    b.collect(second)
    a.merge_(b.state_dict())
    assert torch.equal(
        a.compute_block_scales().view(torch.uint8), whole.compute_block_scales().view(torch.uint8)
    )


def test_needs_a_global_amax_and_blocks_of_sixteen():
    cal = NVFP4MseCalibrator()
    assert cal.needs_initial_range
    with pytest.raises(CalibrationError, match="global_amax"):
        cal.collect(torch.ones(2, 16))
    cal.set_initial_range(torch.tensor(-3.0), torch.tensor(2.0))
    assert float(cal.global_amax) == 3.0
    with pytest.raises(CalibrationError, match="PerBlock"):
        NVFP4MseCalibrator(granularity=PerBlock(-1, 32))


def test_zero_blocks_get_the_smallest_scale_and_stay_zero():
    w = torch.zeros(2, 32)
    w[0, :16] = torch.linspace(-1, 1, 16)
    cal = NVFP4MseCalibrator(global_amax=1.0)
    cal.collect(w)
    scales = cal.compute_block_scales().float().reshape(-1)
    assert bool((scales > 0).all()) and bool(torch.isfinite(scales).all())
    assert float(scales[1]) == 2.0**-9  # an all-zero block: first (smallest) candidate
