"""The NVFP4 kernels' per-call inputs against float64 torch and numpy references.

The candidate normalisation must be exact (the scoring kernels' Markstein division relies on a
correctly rounded reciprocal); the packed Hessian exact; the Schur floors below and within 2e-6
of the least ``dᵀ H d`` with one value fixed, solved by numpy. With ``TRITON_INTERPRET=1`` and
no GPU the same tests run on the CPU in Triton's interpreter.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from triton_device import DEVICE, MARKS

from qcal_export.calibrators.hessian import BlockHessian
from qcal_export.calibrators.nvfp4_mse import fp8_scale_candidates
from qcal_export.spec.formats import NVFP4

pytestmark = MARKS


@pytest.mark.parametrize(
    "global_amax",
    [1.0, 3e-4, 2688.0 * (1 - 2**-24), 2688.0, 7.5e5, 0.0],
    ids=["one", "small", "below-binade-edge", "binade-edge", "large", "zero"],
)
def test_normalised_candidates_match_torch_bit_for_bit(global_amax):
    from qcal_export.calibrators.kernels.nvfp4_prep import normalised_candidates

    global_scale = NVFP4.global_scale(torch.tensor(global_amax))
    scales = NVFP4.effective_scales(fp8_scale_candidates(), global_scale).float()
    _, exponent = torch.frexp(scales.amax() / 448.0)
    k = torch.where(scales.amax() > 0, 1 - exponent, 0)
    norm = torch.ldexp(torch.ones(()), k.float())
    scaled, recip, got_norm, loss_norm = normalised_candidates(scales.to(DEVICE))
    assert torch.equal(scaled.cpu(), scales * norm)
    assert torch.equal(recip.cpu(), torch.ones_like(scales) / (scales * norm))
    assert float(got_norm) == float(norm)
    assert float(loss_norm) == 2.0 ** (-2 * int(k))


def blocks_of(acts: np.ndarray) -> torch.Tensor:
    hessian = BlockHessian()
    hessian.collect(torch.from_numpy(acts))
    return hessian.hessian.clone()


def test_packed_hessian_rho_and_loss_norm_are_exact():
    from qcal_export.calibrators.kernels.nvfp4_prep import prepared_hessian

    rng = np.random.default_rng(3)
    h = blocks_of(rng.standard_normal((40, 48)) * rng.uniform(0.01, 30.0, 48))
    packed, rho, floors, loss_norm = prepared_hessian(
        h.to(DEVICE), torch.tensor([0.25], dtype=torch.float64, device=DEVICE), floors=False
    )
    _, exponent = torch.frexp(h.abs().amax())
    normalised = torch.ldexp(h, 1 - exponent.double())
    rows, cols = torch.triu_indices(16, 16)
    doubled = torch.where(rows == cols, 1.0, 2.0).double()
    assert torch.equal(packed.cpu(), (normalised[:, rows, cols] * doubled).float().T)
    assert torch.equal(rho.cpu(), normalised.abs().sum(-1).amax(-1).float())
    assert float(loss_norm) == 0.25 * 2.0 ** (int(exponent) - 1)
    assert floors.numel() == 0


def test_schur_floors_are_the_least_quadratic_form_with_one_value_fixed():
    """``c_i = min dᵀ H d over d with d_i = 1`` (float64: the other values solve
    ``H_rr d_r = -H_ri``), rounded down; singular, indefinite and ill-conditioned blocks get 0."""
    from qcal_export.calibrators.kernels.nvfp4_prep import prepared_hessian

    rng = np.random.default_rng(4)
    acts = rng.standard_normal((64, 80)) * rng.uniform(0.1, 3.0, 80)
    acts[:, 20:28] += acts[:, 12:20] * 0.9  # correlated channels: c_i far below H_ii
    acts[:, 64] = acts[:, 65] * (1 + 1e-6)  # nearly equal channels: condition number ~1e13
    h = blocks_of(acts)
    h[2, 5] = h[2, :, 5] = 0.0  # a dead channel: singular block
    h[3, 7, 7] = -1.0  # indefinite
    _, _, floors, _ = prepared_hessian(
        h.to(DEVICE), torch.ones(1, dtype=torch.float64, device=DEVICE), floors=True
    )
    floors = floors.T.cpu().double().numpy() / 2.0 ** float(1 - torch.frexp(h.abs().amax())[1])
    for b in range(2):
        hb = h[b].numpy()
        for i in range(16):
            rest = [j for j in range(16) if j != i]
            d = np.ones(16)
            d[rest] = np.linalg.solve(hb[np.ix_(rest, rest)], -hb[rest, i])
            least = d @ hb @ d
            assert least * (1 - 2e-6) <= floors[b, i] <= least, (b, i)
        assert (floors[b] < np.diag(hb) * 0.999).any()
    assert np.linalg.cond(h[4].numpy()) > 1e10
    assert np.all(floors[2:] == 0.0)
    d = rng.standard_normal((1000, 16))
    forms = np.einsum("ni,ij,nj->n", d, h[1].numpy(), d)
    assert np.all(forms[:, None] >= floors[1] * d**2)
