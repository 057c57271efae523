"""The Triton histogram update against the torch path and a float64 oracle: identical counts.

Both calibrator paths run on the same device from the same batches (NaN and Inf included, the
range growing so that the counts are rebinned); every state entry must be equal, integers
exactly. The kernel alone is checked on bin edges, subnormals, -0.0 and the extreme exponents.
With ``TRITON_INTERPRET=1`` and no GPU the same tests run on the CPU in Triton's interpreter.
"""

from __future__ import annotations

import math

import pytest
import torch
from triton_device import DEVICE, INTERPRET, MARKS

from qcal_export.calibrators import PercentileCalibrator
from qcal_export.calibrators.histogram import (
    LOWEST_EXPONENT,
    MAX_SHIFT,
    HistogramCalibrator,
    bin_exponent,
)
from qcal_export.spec.formats import INT8
from qcal_export.spec.granularity import PerAxis, PerBlock, PerTensor

pytestmark = MARKS

GRANULARITIES = {
    "per-tensor": PerTensor(),
    "axis0": PerAxis(0),
    "last-axis": PerAxis(-1),
    "block-partial": PerBlock(-1, 48),  # 100 columns: blocks of 48, 48 and 4 (+44 padding)
    "block-axis0": PerBlock(0, 32),
}
LIMITS = {"lowest": LOWEST_EXPONENT, "max_shift": MAX_SHIFT}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHAPE = (96, 100)


def batches(dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """Student-t batches whose range grows (rebins), with zeros, -0.0, NaN and Inf in one."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for grow in (0.05, 1.0, 40.0, 0.5):
        x = torch.randn(SHAPE, generator=gen) / torch.rand(SHAPE, generator=gen).add(0.05).sqrt()
        x = x * torch.logspace(-2, 1, SHAPE[1])[None] * grow
        x[torch.rand(SHAPE, generator=gen) < 0.05] = 0.0
        out.append(x)
    out[1][3, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
    out[1][50, 7] = float("nan")
    return [x.to(dtype).to(DEVICE) for x in out]


def collect(granularity, data, *, fused: bool, bins: int, monkeypatch) -> HistogramCalibrator:
    with monkeypatch.context() as patch:
        patch.setattr(HistogramCalibrator, "_fused", lambda self, groups: fused)
        cal = PercentileCalibrator(INT8, granularity, bins=bins)
        for x in data:
            cal.collect(x)
    return cal


@pytest.mark.parametrize("bins", [64, 2048])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("gran_name", list(GRANULARITIES))
def test_kernel_state_equals_torch_path(gran_name, dtype_name, bins, monkeypatch):
    granularity = GRANULARITIES[gran_name]
    data = batches(DTYPES[dtype_name], seed=len(gran_name) + bins)
    fused = collect(granularity, data, fused=True, bins=bins, monkeypatch=monkeypatch)
    reference = collect(granularity, data, fused=False, bins=bins, monkeypatch=monkeypatch)
    state, expected = fused.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert state[key].dtype == value.dtype, key
        assert torch.equal(state[key], value), key
    assert fused.nonfinite_count == 4
    assert int(state["hist"].sum()) == 4 * math.prod(SHAPE) - 4
    assert len(set(state["exponent"].tolist())) > 1 or gran_name == "per-tensor"


def oracle(groups: torch.Tensor, exponent: torch.Tensor, bins: int) -> torch.Tensor:
    """Counts ``[G, 2 * bins]`` from ``floor(x / 2**e)`` in float64, non-finite values dropped."""
    x = groups.double().cpu()
    finite = torch.isfinite(x)
    signed = torch.floor(x * torch.exp2(-exponent.double().cpu())[:, None])
    index = (signed + bins).where(finite, 0).long()
    assert int(index.min()) >= 0 and int(index.max()) < 2 * bins
    hist = torch.zeros(x.shape[0], 2 * bins, dtype=torch.int64)
    return hist.scatter_add_(1, index, finite.long())


def edge_values(dtype: torch.dtype, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of bin edges, values just below the next edge, subnormals and -0.0 (clamped to the
    dtype's range), with exponents from the smallest (-126) to the largest (127)."""
    info = torch.finfo(dtype)
    tiny = info.smallest_normal * 2.0**-3  # subnormal in every dtype
    rows, exponents = [], []
    for exponent in (-126, -20, -3, 0, 4, 12, 127):
        width = 2.0**exponent
        edges = torch.arange(-bins, bins, dtype=torch.float64) * width
        inside = edges + width * (1 - info.eps)
        values = torch.cat([edges, inside, torch.tensor([tiny, -tiny, -0.0, 0.0])])
        values = values.clamp(-info.max, info.max).to(dtype)
        values = values[values.double().abs() < bins * width]
        rows.append(values[torch.randperm(values.numel())])
        exponents.append(exponent)
    length = max(r.numel() for r in rows)
    nan = torch.full((length,), float("nan"), dtype=dtype)
    groups = torch.stack([torch.cat([r, nan[: length - r.numel()]]) for r in rows])
    return groups, torch.tensor(exponents)


@pytest.mark.parametrize("bins", [2, 3, 64])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_kernel_bins_edges_and_subnormals_exactly(dtype_name, bins):
    from qcal_export.calibrators.kernels.histogram import histogram_add_

    torch.manual_seed(bins)
    groups, exponent = edge_values(DTYPES[dtype_name], bins)
    for layout in ("rows", "transposed"):
        x = groups.to(DEVICE)
        if layout == "transposed":
            x = x.T.contiguous().T
        for private in (True, False):
            hist = torch.zeros(groups.shape[0], 2 * bins, dtype=torch.int64, device=DEVICE)
            histogram_add_(hist, x, exponent.to(DEVICE), private=private)
            assert torch.equal(hist.cpu(), oracle(groups, exponent, bins)), (layout, private)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("shape", [(1, 70001), (5, 9000), (300, 33), (2, 3)], ids=str)
def test_kernel_layouts_and_splits_agree(shape, dtype_name):
    """One long row split over programs, short rows many per program, and transposed views."""
    from qcal_export.calibrators.kernels.histogram import histogram_add_

    bins = 2048
    gen = torch.Generator().manual_seed(shape[1])
    values = torch.randn(shape, generator=gen).mul(torch.rand(shape[0], 1, generator=gen) * 9)
    values[..., ::7] = 0.0
    groups = values.to(DTYPES[dtype_name])
    exponent = bin_exponent(groups.float().abs().amax(1), bins)
    expected = oracle(groups, exponent, bins)
    for x in (groups.to(DEVICE), groups.T.contiguous().T.to(DEVICE)):
        for private in (None, True, False):
            hist = torch.zeros(shape[0], 2 * bins, dtype=torch.int64, device=DEVICE)
            histogram_add_(hist, x, exponent.to(DEVICE), private=private)
            assert torch.equal(hist.cpu(), expected), (x.stride(), private)


@pytest.mark.parametrize("private", [True, False])
def test_counts_past_int32_stay_exact(private):
    """The state is int64: counts added to a bin near 2**31 do not wrap (private rows are int32
    for one call only)."""
    from qcal_export.calibrators.kernels.histogram import histogram_add_

    start = 2**31 - 3
    hist = torch.full((1, 8), start, dtype=torch.int64, device=DEVICE)
    x = torch.tensor([[0.5, 1.5, 2.25, -0.25, -1.0, -3.5, 0.0] * 1000], device=DEVICE)
    histogram_add_(hist, x, torch.tensor([0], device=DEVICE), private=private)
    added = [1000, 0, 0, 2000, 2000, 1000, 1000, 0]  # bins -4 .. 3 of width 1
    assert hist.tolist() == [[start + count for count in added]]


@pytest.mark.skipif(INTERPRET, reason="dispatch is for CUDA tensors")
def test_kernel_is_used_on_cuda(monkeypatch):
    from qcal_export.calibrators.kernels import histogram

    calls = []
    original = histogram.histogram_add_
    monkeypatch.setattr(histogram, "histogram_add_", lambda *a: calls.append(1) or original(*a))
    cal = PercentileCalibrator(INT8, PerAxis(0), bins=64)
    cal.collect(torch.randn(3, 64, device="cuda", dtype=torch.bfloat16))
    assert calls and cal.state_dict()["hist"].is_cuda


def empty_state(groups: int, bins: int, exponent: torch.Tensor | None = None) -> dict:
    return {
        "hist": torch.zeros(groups, 2 * bins, dtype=torch.int64, device=DEVICE),
        "exponent": torch.full((groups,), LOWEST_EXPONENT, dtype=torch.int64, device=DEVICE)
        if exponent is None
        else exponent.to(DEVICE),
        "min": torch.zeros(groups, device=DEVICE),
        "max": torch.zeros(groups, device=DEVICE),
        "nonfinite": torch.zeros((), dtype=torch.float64, device=DEVICE),
    }


@pytest.mark.parametrize("bins", [2, 3, 2048, 3000])
def test_widened_range_has_bin_exponent_at_the_edges(bins):
    """Each row one value (and zeros, NaN, +-Inf): the range, the exponent ``bin_exponent``
    gives in float64 (values on a bin edge ``bins * 2**e`` included) and the non-finite count."""
    from qcal_export.calibrators.kernels.histogram_range import widen_range_

    tiny = torch.finfo(torch.float32).tiny
    edges = [bins * 2.0**e for e in (-100, -3, 0, 7, 100)]
    values = [0.0, tiny * 2**-10, tiny, 1.0, -1.0, 3.0e38, -3.0e38, *edges, *[-e for e in edges]]
    values += [torch.nextafter(torch.tensor(e), torch.tensor(0.0)).item() for e in edges]
    x = torch.tensor(values, dtype=torch.float32)[:, None].repeat(1, 5)
    x[:, 1] = 0.0
    x[::3, 2] = float("nan")
    x[1::3, 3] = float("inf")
    x[2::3, 4] = -float("inf")
    state = empty_state(len(values), bins)
    widen_range_(x.to(DEVICE), state, bins, **LIMITS)
    column = x[:, 0]
    assert torch.equal(state["min"].cpu(), column.clamp(max=0.0))
    assert torch.equal(state["max"].cpu(), column.clamp(min=0.0))
    assert torch.equal(state["exponent"].cpu(), bin_exponent(column.abs(), bins))
    assert float(state["nonfinite"]) == len(values)
    assert not state["hist"].any()


@pytest.mark.parametrize("shape", [(1, 70001), (7, 3000), (300, 33)], ids=str)
def test_widened_counts_move_as_rebin_moves_them(shape):
    """Counts collected at a narrow width, then a batch 1000x wider: the counts are rebinned
    as ``rebin`` does, the range is the running one, and one more collect adds the batch."""
    from qcal_export.calibrators.histogram import rebin
    from qcal_export.calibrators.kernels.histogram import histogram_add_
    from qcal_export.calibrators.kernels.histogram_range import widen_range_

    bins = 2048
    gen = torch.Generator().manual_seed(shape[0])
    first = torch.randn(shape, generator=gen) * torch.rand(shape[0], 1, generator=gen)
    wide = torch.randn(shape, generator=gen) * 1000
    state = empty_state(shape[0], bins)
    widen_range_(first.to(DEVICE), state, bins, **LIMITS)
    histogram_add_(state["hist"], first.to(DEVICE), state["exponent"])
    before, old = state["hist"].cpu(), state["exponent"].cpu()
    assert torch.equal(before, oracle(first, old, bins))
    widen_range_(wide.to(DEVICE), state, bins, **LIMITS)
    both = torch.cat([first, wide], dim=1)
    new = bin_exponent(both.abs().amax(1), bins)
    assert torch.equal(state["exponent"].cpu(), new)
    assert torch.equal(state["hist"].cpu(), rebin(before, new - old))
    assert torch.equal(state["min"].cpu(), both.amin(1).clamp(max=0.0))
    assert torch.equal(state["max"].cpu(), both.amax(1).clamp(min=0.0))
    histogram_add_(state["hist"], wide.to(DEVICE), state["exponent"])
    assert torch.equal(state["hist"].cpu(), oracle(both, new, bins))
