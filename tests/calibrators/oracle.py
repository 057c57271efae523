"""Shared by test_mse.py and test_max.py: the float64 brute-force MSE oracle, the batches both
feed their calibrators, and checks that hold for every calibrator.

The oracle loops over candidates in Python, fake-quantizes with numpy float32 arithmetic
(ml_dtypes for the FP8 cast), sums the error per group in float64 and takes the first argmin.
A plain module: the tests import it by name (pytest's default ``prepend`` import mode puts this
folder on sys.path).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch

from qcal_export.calibrators.max import MaxCalibrator
from qcal_export.calibrators.mse import mse_multipliers
from qcal_export.spec.formats import AMAX_FLOOR, FP8_E4M3, SCALE_FLOOR
from qcal_export.spec.granularity import PerAxis, PerTensor

GRANULARITIES = {"per-tensor": PerTensor(), "axis0": PerAxis(0), "last-axis": PerAxis(-1)}
CHANNELS = 6
F32 = np.float32


def zero_floored(a: np.ndarray) -> np.ndarray:
    """AMAX_FLOOR in place of each zero range; any other amax kept, however small."""
    return np.where(a == 0, F32(AMAX_FLOOR), a).astype(F32)


def floored_scale(width: np.ndarray, levels: float) -> np.ndarray:
    """``width / levels`` in float32 (a zero width floored first), never below SCALE_FLOOR."""
    return np.maximum(zero_floored(width) / F32(levels), F32(SCALE_FLOOR))


# the oracle ---------------------------------------------------------------------------------


INT_LEVELS = {
    "int8": (-128, 127),
    "uint8": (0, 255),
    "int16": (-32768, 32767),
    "uint16": (0, 65535),
}
"""Each integer format's (qmin, qmax), written out here rather than read from the package."""


def fake_quant_oracle(fmt, x: np.ndarray, amin: np.ndarray, amax: np.ndarray) -> np.ndarray:
    """QuantizeLinear -> DequantizeLinear in numpy float32; ``x`` [G, n], ``amin/amax`` [G]."""
    amin, amax = amin[:, None], amax[:, None]
    bound = np.maximum(np.abs(amin), np.abs(amax))
    if fmt is FP8_E4M3:
        scale = floored_scale(bound, 448)
        q = np.clip(x / scale, -448, 448).astype(ml_dtypes.float8_e4m3fn)
        return q.astype(F32) * scale
    qmin, qmax = INT_LEVELS[fmt.name]
    if qmin == 0:
        lo, hi = np.minimum(amin, F32(0)), np.maximum(amax, F32(0))
        scale = floored_scale(hi - lo, qmax)
        zero_point = np.clip(np.round(F32(0) - lo / scale), 0, qmax)
        q = np.clip(np.round(x / scale) + zero_point, 0, qmax)
        return (q - zero_point) * scale
    scale = floored_scale(bound, qmax)
    return np.clip(np.round(x / scale), qmin, qmax) * scale


def int4_oracle(fmt, x, amin, amax):
    """The int4-like grid of ``int4_quant_func``: ``scale = amax / 7``, levels -8..7."""
    scale = floored_scale(amax[:, None], 7)
    return np.clip(np.round(x / scale), -8, 7) * scale


def squared(x, xq):
    return (xq - x) ** 2


def grouped(data: list[np.ndarray], granularity) -> np.ndarray:
    """``[G, n]`` of all batches (in their dtype), grouped with numpy (not the package's code)."""
    if isinstance(granularity, PerTensor):
        return np.concatenate([d.reshape(-1) for d in data])[None]
    axis = granularity.axis
    parts = [np.moveaxis(d, axis, 0).reshape(d.shape[axis], -1) for d in data]
    return np.concatenate(parts, axis=1)


def oracle(
    fmt,
    granularity,
    data,
    amin0,
    amax0,
    *,
    error=squared,
    quant=fake_quant_oracle,
    multipliers=None,
):
    """Brute-force MSE sweep: (best amin [G], best amax [G], losses [G, K] float64)."""
    values = grouped(data, granularity).astype(F32)
    num_groups = values.shape[0]
    m = (mse_multipliers() if multipliers is None else multipliers).numpy()
    amin0 = np.broadcast_to(np.asarray(amin0, F32).reshape(-1), num_groups).astype(np.float64)
    amax0 = np.broadcast_to(np.asarray(amax0, F32).reshape(-1), num_groups).astype(np.float64)
    cand_amin = (amin0[None] * m[:, None]).astype(F32)  # [K, G]
    cand_amax = (amax0[None] * m[:, None]).astype(F32)
    finite = np.isfinite(values)
    losses = np.zeros((num_groups, len(m)))
    with np.errstate(all="ignore"):
        for k in range(len(m)):
            xq = quant(fmt, values, cand_amin[k], cand_amax[k])
            assert xq.dtype == F32
            err = error(values.astype(np.float64), xq.astype(np.float64))
            losses[:, k] = np.where(finite, err, 0.0).sum(axis=1)
    best = losses.argmin(axis=1)  # first on ties
    groups = np.arange(num_groups)
    return cand_amin[best, groups], cand_amax[best, groups], losses


# data ---------------------------------------------------------------------------------------


def layout(data: list[np.ndarray], gran_name: str) -> list[np.ndarray]:
    """Axis 0 data puts the channels first; the others keep [b, 7, C]."""
    if gran_name == "axis0":
        return [np.ascontiguousarray(np.moveaxis(d, -1, 0)) for d in data]
    return data


def make_batches(kind: str, fmt, gran_name: str, seed: int = 0) -> list[np.ndarray]:
    """Three float32 batches ``[b, 7, C]`` (``[C, b, 7]`` for axis 0) of one distribution."""
    rng = np.random.default_rng(seed)
    gains = np.geomspace(0.05, 20.0, CHANNELS)
    out = []
    for b in (20, 45, 15):
        shape = (b, 7, CHANNELS)
        if kind == "normal":
            x = rng.normal(size=shape)
        elif kind == "student-t":
            x = rng.standard_t(2.0, size=shape)
        else:  # a few large outliers on top of a normal body
            x = rng.normal(size=shape)
            where = rng.random(shape) < 0.002
            x[where] *= 60.0
        x = x * gains
        if not fmt.symmetric:
            x = x + 0.8 * gains  # mostly positive, like post-GELU activations
        out.append(x.astype(F32))
    return layout(out, gran_name)


def initial_range(fmt, granularity, data) -> tuple[torch.Tensor, torch.Tensor]:
    """(amin0, amax0) from a max pass, as the pipeline's first pass gives them."""
    cal = MaxCalibrator(fmt, granularity)
    for d in data:
        cal.collect(torch.from_numpy(d))
    return cal.compute_range()


def export_shape(granularity, channels: int = CHANNELS) -> tuple[int, ...]:
    return () if isinstance(granularity, PerTensor) else (channels,)


# checks -------------------------------------------------------------------------------------


def assert_matches_oracle(cal, fmt, granularity, expected_amin, expected_amax):
    shape = export_shape(granularity)
    amin, amax = cal.compute_range()
    assert tuple(amin.shape) == shape and tuple(amax.shape) == shape
    assert amin.dtype == amax.dtype == torch.float32
    assert np.array_equal(amax.cpu().numpy().reshape(-1), expected_amax)
    assert np.array_equal(amin.cpu().numpy().reshape(-1), expected_amin)
    expected = np.maximum(np.abs(expected_amin), np.abs(expected_amax))
    got = cal.compute_amax()
    assert tuple(got.shape) == shape
    assert np.array_equal(got.cpu().numpy().reshape(-1), expected)


def assert_merge_of_halves_equals_one_pass(whole, first, second, data, nonfinite: int) -> None:
    """``whole`` collects all of ``data``, ``first`` the first batch and ``second`` the rest;
    merged into ``first``, the halves give exactly the one-pass range and non-finite count."""
    for d in data:
        whole.collect(torch.from_numpy(d))
    first.collect(torch.from_numpy(data[0]))
    for d in data[1:]:
        second.collect(torch.from_numpy(d))
    first.merge_(second.state_dict())
    assert torch.equal(first.compute_amax(), whole.compute_amax())
    for got, expected in zip(first.compute_range(), whole.compute_range(), strict=True):
        assert torch.equal(got, expected)
    assert first.nonfinite_count == whole.nonfinite_count == nonfinite
