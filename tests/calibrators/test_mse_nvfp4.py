"""The mse calibrator with nvfp4 as its format: a sweep of the global amax, each candidate's
block scales computed from the blocks themselves, against a float64 brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qcal_export.calibrators.mse import MseCalibrator, mse_multipliers
from qcal_export.errors import CalibrationError
from qcal_export.spec.formats import NVFP4
from qcal_export.spec.granularity import PerBlock, PerTensor, PerTensorGroup

E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
FP8 = torch.arange(1, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()


def dynamic_nvfp4_oracle(x: np.ndarray, global_amax: np.float32) -> np.ndarray:
    """Blocks of 16 along the last axis (zero-padded): FP8 scale of ``amax / 6 / global`` by
    nearest-value search, E2M1 by nearest-value search (ties to even), in float64."""
    width = x.shape[-1]
    blocks = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, -width % 16)])
    blocks = blocks.reshape(*x.shape[:-1], -1, 16)
    global_scale = np.float32(global_amax) / np.float32(6 * 448)
    raw = np.clip(np.abs(blocks).max(-1) / np.float32(6) / global_scale, 2.0**-9, 448.0)
    ties_even = (np.arange(126) % 2) * 1e-12  # odd codes lose exact ties
    block_scale = FP8[np.argmin(np.abs(raw[..., None] - FP8) + ties_even, axis=-1)]
    eff = np.float32(block_scale * global_scale)[..., None]
    y = blocks / eff
    code = np.argmin(np.abs(np.abs(y)[..., None] - E2M1) + (np.arange(8) % 2) * 1e-12, -1)
    dequantized = (np.sign(y) * E2M1[code] * eff).astype(np.float32)  # DQ outputs float32
    return dequantized.reshape(*x.shape[:-1], -1)[..., :width]


@pytest.mark.parametrize("width", [64, 40])
@pytest.mark.parametrize("dist", ["normal", "student-t"])
def test_global_amax_sweep_equals_float64_brute_force(width, dist):
    rng = np.random.default_rng(0)
    draw = rng.normal if dist == "normal" else (lambda size: rng.standard_t(2, size))
    batches = [draw(size=(3, 5, width)).astype(np.float32) for _ in range(2)]
    amax0 = max(float(np.abs(b).max()) for b in batches)
    cal = MseCalibrator(NVFP4, PerTensorGroup(-1, 16), amax0=amax0, start=0.2, stop=1.6)
    for b in batches:
        cal.collect(torch.from_numpy(b))
    multipliers = mse_multipliers(0.2, 1.6, 0.1).numpy()
    losses = []
    for m in multipliers:
        candidate = np.float32(np.float64(np.float32(amax0)) * m)
        losses.append(
            sum(
                ((dynamic_nvfp4_oracle(b, candidate) - b.astype(np.float64)) ** 2).sum()
                for b in batches
            )
        )
    best = int(np.argmin(losses))
    assert float(cal.compute_amax()) == np.float32(
        np.float64(np.float32(amax0)) * multipliers[best]
    )
    np.testing.assert_allclose(cal.state_dict()["losses"][0].numpy(), losses, rtol=1e-12)


def test_fake_quant_of_the_format_matches_the_oracle():
    x = np.random.default_rng(1).standard_t(3, (4, 48)).astype(np.float32)
    global_amax = np.float32(np.abs(x).max() * 0.7)
    got = NVFP4.fake_quant(torch.from_numpy(x), NVFP4.global_scale(global_amax), torch.zeros(()))
    np.testing.assert_array_equal(
        got.numpy(), dynamic_nvfp4_oracle(x, global_amax).astype(np.float32)
    )


@pytest.mark.parametrize("granularity", [PerTensor(), PerBlock(-1, 16), PerTensorGroup(-1, 32)])
def test_nvfp4_mse_needs_the_tensor_seen_as_its_blocks(granularity):
    assert MseCalibrator.granularity_for(NVFP4, PerBlock(1, 16)) == PerTensorGroup(1, 16)
    with pytest.raises(CalibrationError, match="PerTensorGroup"):
        MseCalibrator(NVFP4, granularity, amax0=1.0)
