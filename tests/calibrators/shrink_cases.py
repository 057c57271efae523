"""The ShrinkMseCalibrator cases of test_shrink_mse.py and test_shrink_mse_state.py: strategies
(granularity, data shape, numpy grouping), format x strategy cases, and the check of a
calibration against the float64 oracle of shrink_oracle.py.
"""

from __future__ import annotations

import numpy as np
import torch
from shrink_oracle import (
    expected_range,
    fp8_quant,
    g_idx_groups,
    int_quant,
    last_axis_blocks,
    tiles_2d,
)

from qcal_export.spec.formats import FP8_E4M3, INT4, INT8, UINT4, UINT8
from qcal_export.spec.granularity import (
    PerAxis,
    PerBlock,
    PerBlock2D,
    PerGroupIndex,
    PerTensor,
    PerToken,
)

# cases -------------------------------------------------------------------------------------

G_IDX = np.empty(40, dtype=np.int64)
G_IDX[np.random.default_rng(3).permutation(40)] = np.arange(40) // 16  # GPTQ actorder

STRATEGIES = {
    "tensor": (PerTensor(), (6, 5, 24), lambda x: x.reshape(1, -1)),
    "channel": (PerAxis(0), (24, 40), lambda x: x.reshape(len(x), -1)),
    "group": (PerBlock(-1, 16), (12, 40), lambda x: last_axis_blocks(x, 16)),
    "g_idx": (PerGroupIndex(1, 16, tuple(G_IDX)), (12, 40), lambda x: g_idx_groups(x, 16, G_IDX)),
    "block": (PerBlock2D(8, 16), (2, 20, 40), lambda x: tiles_2d(x, 8, 16)),
    "large-block": (PerBlock2D(64, 128), (2, 150, 300), lambda x: tiles_2d(x, 64, 128)),
    "token": (PerToken(), (3, 5, 24), lambda x: x.reshape(-1, x.shape[-1])),
}
CASES = {  # 8-bit asymmetric ranges shrink only in groups of thousands (norm 2.4): larger data
    "tensor-int8": (INT8, "tensor", None),
    "tensor-uint8": (UINT8, "tensor", (8, 50, 60)),
    "tensor-fp8": (FP8_E4M3, "tensor", None),
    "channel-int8": (INT8, "channel", None),
    "channel-uint8": (UINT8, "channel", (24, 4000)),
    "channel-fp8": (FP8_E4M3, "channel", None),
    "group-int4": (INT4, "group", None),
    "group-uint4": (UINT4, "group", None),
    "g_idx-int4": (INT4, "g_idx", None),
    "g_idx-uint4": (UINT4, "g_idx", None),
    "block-fp8": (FP8_E4M3, "block", None),
    "block-uint4": (UINT4, "block", None),
    "block-uint8": (UINT8, "large-block", None),
    "block-int8": (INT8, "block", None),
    "token-int8": (INT8, "token", None),
    "token-uint4": (UINT4, "token", None),
}


def case_of(name):
    """(format, granularity, data shape, numpy grouping) of a case."""
    fmt, strategy, shape = CASES[name]
    gran, default_shape, group = STRATEGIES[strategy]
    return fmt, gran, shape or default_shape, group


def quant_for(fmt):
    quant = fp8_quant if fmt is FP8_E4M3 else int_quant(fmt)
    return lambda seen: quant


def run(cal, data):
    for x in data:
        cal.collect(torch.from_numpy(x))
    return cal


def assert_equals_oracle(cal, fmt, gran, shape, running):
    amin, amax = cal.compute_range()
    stat_shape = gran.stat_shape(shape)
    assert tuple(amin.shape) == tuple(amax.shape) == stat_shape
    expected_min, expected_max = expected_range(fmt, running)
    np.testing.assert_array_equal(amin.cpu().numpy().reshape(-1), expected_min)
    np.testing.assert_array_equal(amax.cpu().numpy().reshape(-1), expected_max)
    assert torch.isfinite(cal.compute_amax()).all()
