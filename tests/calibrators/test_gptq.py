"""GPTQ (calibrators/gptq_solve.py, gptq.py) against a plain float64 GPTQ written here: one
column at a time, every update applied at once, no lazy blocks. Ours in float64 gives the same
codes; in float32 the same up to rare ties; on every test layer the compensated output error
``||X W - X W_q||²`` is at most round to nearest's."""

from __future__ import annotations

import pytest
import torch

from qcal_export.calibrators.gptq import GptqCalibrator
from qcal_export.calibrators.gptq_solve import ColumnGroups, gptq_columns
from qcal_export.calibrators.hessian import FullHessian
from qcal_export.errors import CalibrationError
from qcal_export.spec.formats import INT4, INT8, UINT4, UINT8, IntFormat
from qcal_export.spec.granularity import PerAxis, PerBlock, PerTensor


def reference_gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    fmt: IntFormat,
    size: int,
    per_row: bool,
    percdamp: float,
    act_order: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain GPTQ in float64 on ``weight`` [N, K]: (codes, dequantized), original order.

    Dead columns get H_jj = 1; a group's scale comes from its columns' values when its first
    column is rounded (symmetric: amax / qmax; asymmetric: the range with 0, qmax - qmin levels).
    """
    w = weight.double().clone()
    h = hessian.double().clone()
    k = w.shape[1]
    for j in range(k):
        if h[j, j] == 0:
            h[j, j] = 1.0
    order = list(range(k))
    if act_order:
        order = sorted(range(k), key=lambda j: -float(h[j, j]))
    h = h[order][:, order]
    w = w[:, order]
    h += percdamp * float(torch.diagonal(h).mean()) * torch.eye(k, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    codes = torch.zeros_like(w)
    rounded = torch.zeros_like(w)
    scales: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for p in range(k):
        group = order[p] // size
        if group not in scales:
            members = [q for q in range(k) if order[q] // size == group]
            values = w[:, members].float()
            lo = values.amin(1) if per_row else values.amin().expand(w.shape[0])
            hi = values.amax(1) if per_row else values.amax().expand(w.shape[0])
            if fmt.symmetric:
                scale = torch.maximum(lo.abs(), hi.abs()) / torch.tensor(float(fmt.qmax))
                zero = torch.zeros_like(scale)
            else:
                lo, hi = lo.clamp(max=0), hi.clamp(min=0)
                scale = (hi - lo) / torch.tensor(float(fmt.qmax - fmt.qmin))
                zero = torch.round(fmt.qmin - lo / scale).clamp(fmt.qmin, fmt.qmax)
            scales[group] = (scale.double(), zero.double())
        scale, zero = scales[group]
        q = (torch.round(w[:, p] / scale) + zero).clamp(fmt.qmin, fmt.qmax)
        codes[:, p] = q
        rounded[:, p] = (q - zero) * scale
        error = (w[:, p] - rounded[:, p]) / u[p, p]
        w[:, p + 1 :] -= error[:, None] * u[p, p + 1 :][None, :]
    back = torch.argsort(torch.tensor(order))
    return codes[:, back], rounded[:, back]


def layer(rows: int, columns: int, tokens: int, seed: int, dead: int = 0):
    """A weight [N, K] and correlated inputs X [T, K] (some channels large, ``dead`` always 0)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(columns, columns, generator=gen) / columns**0.5 + torch.eye(columns)
    x = torch.randn(tokens, columns, generator=gen) @ mix
    x *= torch.rand(columns, generator=gen) * 3 + 0.2
    x[:, :dead] = 0
    w = torch.randn(rows, columns, generator=gen)
    return w, x


def output_error(x: torch.Tensor, w: torch.Tensor, rounded: torch.Tensor) -> float:
    return float(((x.double() @ (rounded.double() - w.double()).T) ** 2).sum())


def nearest(w: torch.Tensor, fmt: IntFormat, size: int, per_row: bool) -> torch.Tensor:
    """Round to nearest with each group's max range (what ``--weight-method max`` exports)."""
    groups = ColumnGroups(fmt, size, per_row, *w.shape)
    for g in range(-(-w.shape[1] // size)):
        groups.reach(g, w[:, g * size : (g + 1) * size])
    return torch.stack([groups.quantize(w[:, j], j // size)[1] for j in range(w.shape[1])], 1)


CASES = [
    # format, group size (None: all columns), per row, act order, lazy block, dead columns
    (INT4, 32, True, False, 128, 0),
    (INT4, 32, True, True, 128, 3),
    (UINT4, 16, True, True, 24, 0),
    (UINT4, 32, True, False, 20, 2),
    (INT8, None, True, False, 16, 0),
    (UINT8, None, True, True, 32, 1),
    (INT8, None, False, False, 128, 0),
    (INT4, 40, True, True, 7, 0),
]


@pytest.mark.parametrize("fmt, size, per_row, act_order, lazy, dead", CASES)
def test_float64_gptq_gives_the_reference_codes(fmt, size, per_row, act_order, lazy, dead):
    w, x = layer(12, 100, 300, seed=len(str(fmt)) + lazy, dead=dead)
    h = x.double().T @ x.double()
    size = size or w.shape[1]
    want_codes, want = reference_gptq(w, h, fmt, size, per_row, 0.01, act_order)
    groups = ColumnGroups(fmt, size, per_row, *w.shape, dtype=torch.float64)
    got = gptq_columns(w, h, groups, 0.01, act_order, lazy)
    assert torch.equal(got.codes.double(), want_codes)
    torch.testing.assert_close(got.weight, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fmt, size, per_row, act_order, lazy, dead", CASES)
def test_float32_gptq_is_at_most_nearest_error(fmt, size, per_row, act_order, lazy, dead):
    w, x = layer(16, 96, 400, seed=lazy + dead, dead=dead)
    h = x.double().T @ x.double()
    size = size or w.shape[1]
    got = gptq_columns(w, h, ColumnGroups(fmt, size, per_row, *w.shape), 0.01, act_order, lazy)
    want_codes, want = reference_gptq(w, h, fmt, size, per_row, 0.01, act_order)
    assert (got.codes.double() == want_codes).float().mean() > 0.99
    gptq_error = output_error(x, w, got.weight)
    assert gptq_error == pytest.approx(output_error(x, w, want), rel=1e-3)
    assert gptq_error <= output_error(x, w, nearest(w, fmt, size, per_row))


def test_dead_columns_keep_their_weight_rounded_to_nearest():
    w, x = layer(8, 64, 200, seed=3, dead=4)
    h = x.double().T @ x.double()
    got = gptq_columns(w, h, ColumnGroups(INT8, 64, True, *w.shape))
    rtn = nearest(w, INT8, 64, True)
    assert torch.equal(got.weight[:, :4], rtn[:, :4])  # the first group is reached at column 0
    assert not torch.equal(got.weight, rtn)


def test_too_little_damping_for_a_singular_hessian_is_refused():
    x = torch.randn(3, 32, dtype=torch.float64)  # rank 3 < 32
    with pytest.raises(CalibrationError, match="raise percdamp"):
        gptq_columns(torch.randn(4, 32), x.T @ x, ColumnGroups(INT4, 32, True, 4, 32), 0.0)


def test_full_hessian_sums_merges_and_drops_nonfinite_rows():
    x = torch.randn(2, 5, 6)
    x[1, 2, 3] = float("nan")
    whole, first, second = FullHessian(), FullHessian(), FullHessian()
    whole.collect(x)
    first.collect(x[:1])
    second.collect(x[1:])
    first.merge_(second.state_dict())
    rows = x.reshape(-1, 6).double()
    rows = rows[torch.isfinite(rows).all(1)]
    torch.testing.assert_close(whole.hessian, rows.T @ rows, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(first.hessian, whole.hessian, rtol=1e-14, atol=1e-14)
    assert whole.rows == first.rows == len(rows) == 9
    resumed = FullHessian()
    resumed.restore(whole.snapshot())
    assert torch.equal(resumed.hessian, whole.hessian) and resumed.rows == 9


@pytest.mark.parametrize(
    "granularity, axis", [(PerBlock(0, 16), None), (PerAxis(1), 0), (PerTensor(), 0)]
)
def test_calibrator_on_matmul_and_gemm_weights_agree(granularity, axis):
    """A MatMul weight [K, N] and the same weight as Gemm transB=1 [N, K]: same codes,
    transposed, and ranges in each one's export shape."""
    w, x = layer(10, 48, 200, seed=5)
    h = x.double().T @ x.double()
    matmul = GptqCalibrator(INT4, granularity, hessian=h, reduction_axis=axis)
    matmul.collect(w.T.contiguous())
    if isinstance(granularity, PerBlock):
        gemm_granularity = PerBlock(1, 16)
    elif isinstance(granularity, PerAxis):
        gemm_granularity = PerAxis(0)
    else:
        gemm_granularity = granularity
    gemm = GptqCalibrator(INT4, gemm_granularity, hessian=h, reduction_axis=1)
    gemm.collect(w)
    assert torch.equal(matmul.codes().T, gemm.codes())
    assert torch.equal(matmul.compensated_weight().T, gemm.compensated_weight())
    _, amax = matmul.compute_range()
    assert tuple(amax.shape) == granularity.stat_shape((48, 10))
    _, gemm_amax = gemm.compute_range()
    assert torch.equal(amax.T if amax.dim() == 2 else amax, gemm_amax)
    per_row = not isinstance(granularity, PerTensor)
    size = 16 if isinstance(granularity, PerBlock) else 48
    want = gptq_columns(w, h, ColumnGroups(INT4, size, per_row, 10, 48))
    assert torch.equal(gemm.codes(), want.codes)


def test_a_compensation_that_overflows_float32_is_refused():
    w = torch.tensor([[3.3e38, 3.3e38 - 2.3e37, 3.39e38, 3.39e38]])
    h = torch.full((4, 4), 0.9, dtype=torch.float64) + 0.1 * torch.eye(4, dtype=torch.float64)
    with pytest.raises(CalibrationError, match="overflowed float32"):
        gptq_columns(w, h, ColumnGroups(INT4, 4, True, 1, 4), 0.0)
