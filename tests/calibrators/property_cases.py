"""Hypothesis strategies and calibrator builders of the property tests (test_properties.py,
test_properties_mse.py): the cases each calibrator accepts, float32 arrays with the awkward
values, and a calibrator that collected them.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from oracle import F32

from qcal_export.calibrators import (
    EntropyCalibrator,
    GptqCalibrator,
    HistogramMseCalibrator,
    MaxCalibrator,
    MseCalibrator,
    MxMseCalibrator,
    NVFP4MseCalibrator,
    PercentileCalibrator,
    ShrinkMseCalibrator,
)
from qcal_export.spec.formats import FP8_E4M3, INT4, INT8, NVFP4, UINT4, UINT8
from qcal_export.spec.granularity import PerAxis, PerBlock, PerTensor, PerTensorGroup
from qcal_export.spec.mx_formats import MXFP4, MXFP8

FLT_MAX = float(np.finfo(F32).max)
SUBNORMAL = float(np.finfo(F32).smallest_subnormal)
PLAIN = [INT8, UINT8, INT4, UINT4, FP8_E4M3]
PLAIN_GRANULARITIES = [PerTensor(), PerAxis(0), PerBlock(-1, 4)]
NV_BLOCKS, NV_GROUP = PerBlock(-1, 16), PerTensorGroup(-1, 16)


def cases(nvfp4: list) -> list:
    plain = [(f, g) for f in PLAIN for g in PLAIN_GRANULARITIES]
    return plain + [(NVFP4, g) for g in nvfp4]


CASES = {
    "max": cases([NV_BLOCKS, NV_GROUP]),
    "percentile": cases([NV_BLOCKS, NV_GROUP]),
    "entropy": cases([NV_BLOCKS, NV_GROUP]),
    "mse": cases([NV_GROUP]),
    "hist-mse": cases([]),
    "shrink-mse": cases([NV_BLOCKS, NV_GROUP]),
    "nvfp4-mse": [(NVFP4, NV_BLOCKS), (NVFP4, PerBlock(0, 16))],
    "mx-mse": [(MXFP8, PerBlock(-1, 32)), (MXFP4, PerBlock(0, 32))],
    "gptq": [(f, g) for f in (INT8, UINT8, INT4, UINT4) for g in PLAIN_GRANULARITIES],
    "awq": [(f, g) for f in (INT8, INT4, UINT4) for g in PLAIN_GRANULARITIES],
}
"""Formats and granularities each calibrator accepts (see each class's checks); gptq's weights
are ``[N, K]`` with K the last axis, and its Hessian the identity (``build``)."""

ELEMENTS = st.one_of(
    st.floats(width=32, allow_nan=False, allow_infinity=False),
    st.floats(-4.0, 4.0, width=32),
    st.sampled_from([0.0, -0.0, SUBNORMAL, -SUBNORMAL, 1e-40, 1e-30, 448.0, FLT_MAX, -FLT_MAX]),
)
"""Any finite float32 (hypothesis favours the edges), small values, and the awkward ones."""


def arrays(shape: tuple[int, int]) -> st.SearchStrategy[np.ndarray]:
    """Float32 arrays of ``shape``; hypothesis fills many with one value (constants, zeros)."""
    return hnp.arrays(F32, shape, elements=ELEMENTS)


SHAPES = st.tuples(st.integers(1, 4), st.integers(1, 40))


def build(method: str, fmt, granularity, data: list[np.ndarray], **kwargs):
    """A calibrator of ``method`` that collected ``data``; mse and nvfp4-mse first get their
    initial range from a max pass over the same data, as the pipeline gives it; gptq rounds
    along the last axis with an identity Hessian (nothing to compensate: the ranges and scales
    alone are under test; its compensation is test_gptq.py's)."""
    kind = {
        "max": MaxCalibrator,
        "percentile": PercentileCalibrator,
        "entropy": EntropyCalibrator,
        "mse": MseCalibrator,
        "hist-mse": HistogramMseCalibrator,
        "shrink-mse": ShrinkMseCalibrator,
        "nvfp4-mse": NVFP4MseCalibrator,
        "mx-mse": MxMseCalibrator,
        "gptq": GptqCalibrator,
        "awq": MaxCalibrator,  # awq's weights come scaled by its search, then take max
    }[method]
    if method == "gptq":
        kwargs.setdefault("hessian", torch.eye(data[0].shape[-1], dtype=torch.float64))
        kwargs.setdefault("reduction_axis", 1)
    if method == "entropy":  # 128 bins a side, not 2048: the KL sweep is 16x cheaper
        kwargs.setdefault("bins", 128)
    cal = kind(fmt, granularity, **kwargs)
    if cal.needs_initial_range:
        cal.set_initial_range(*max_range(fmt, granularity, data))
    for x in data:
        cal.collect(torch.from_numpy(x))
    return cal


def max_range(fmt, granularity, data):
    cal = MaxCalibrator(fmt, granularity)
    for x in data:
        cal.collect(torch.from_numpy(x))
    return cal.compute_range()


def np_groups(x: np.ndarray, granularity) -> np.ndarray:
    """``[G, n]`` in ``groups`` order, with numpy (not the package's reshapes); float64."""
    x = x.astype(np.float64)
    if isinstance(granularity, PerTensor):
        return x.reshape(1, -1)
    if isinstance(granularity, PerAxis):
        return np.moveaxis(x, granularity.axis, 0).reshape(x.shape[granularity.axis], -1)
    moved = np.moveaxis(x, granularity.axis, -1)
    pad = -moved.shape[-1] % granularity.size
    moved = np.pad(moved, [(0, 0)] * (moved.ndim - 1) + [(0, pad)])
    blocks = moved.reshape(-1, granularity.size)
    return blocks.reshape(1, -1) if isinstance(granularity, PerTensorGroup) else blocks


def block_scales(cal) -> torch.Tensor:
    """Per-block float32 effective scales ``[G]`` of an nvfp4 ``PerBlock`` calibration."""
    fmt = cal.fmt
    global_scale = fmt.global_scale(cal.compute_global_amax())
    if isinstance(cal, NVFP4MseCalibrator):
        scales = cal.granularity.flatten(cal.compute_block_scales().view(torch.uint8))
        scales = scales.view(torch.float8_e4m3fn)
    else:
        scales = fmt.block_scales(cal.granularity.flatten(cal.compute_amax()), global_scale)
    return fmt.effective_scales(scales, global_scale)
