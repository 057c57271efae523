"""mx-mse against a float64 brute force: per block of 32 (a partial last block too), the squared
error of the spec's exponent e and of e - 1 and e + 1, each fake quantization from mx_oracle.py's
grid rounding; the least wins (ties to e, then e - 1). Also through calibrate_onnx."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from mlp import make_mlp
from mx_oracle import GRIDS, K, round_to_grid, weight_cases

from qcal_export.calibrators import CALIBRATORS, MxMseCalibrator
from qcal_export.errors import CalibrationError, RecipeError
from qcal_export.pipeline.calibrate import calibrate_onnx
from qcal_export.spec.granularity import PerBlock
from qcal_export.spec.mx_formats import MXFP4, MXFP8
from qcal_export.spec.recipe import TensorSpec


def brute_force_exponents(weight: np.ndarray, name: str) -> np.ndarray:
    """The chosen exponent of each block of ``weight`` [K, N] (blocks along K), ``[3, N]``."""
    grid, emax = GRIDS[name]
    chosen = []
    for start in range(0, weight.shape[0], 32):
        row = []
        for j in range(weight.shape[1]):
            block = weight[start : start + 32, j].astype(np.float64)
            amax = np.abs(block).max()
            spec = -127 if amax == 0 else math.floor(math.log2(amax)) - emax
            losses = []
            for e in (spec, spec - 1, spec + 1):
                e = min(max(e, -127), 127)
                q = np.array([round_to_grid(x / 2.0**e, grid) * 2.0**e for x in block])
                losses.append((((q - block) ** 2).sum(), e))
            row.append(min(losses, key=lambda loss: loss[0])[1])  # min keeps the first on ties
        chosen.append(row)
    return np.array(chosen)


@pytest.mark.parametrize("fmt", [MXFP8, MXFP4], ids=lambda f: f.name)
def test_chosen_exponents_equal_the_brute_force(fmt):
    rng = np.random.default_rng(3)
    weight = np.concatenate(
        [weight_cases(fmt.name), rng.standard_t(2, (K, 10)).astype(np.float32)], axis=1
    )
    expected = brute_force_exponents(weight, fmt.name)
    granularity = PerBlock(0, 32)
    cal = MxMseCalibrator(fmt, granularity)
    cal.collect(torch.from_numpy(weight))
    amin, amax = cal.compute_range()
    scale, _ = fmt.scale_zero_point(amin, amax)
    assert torch.equal(scale.double(), torch.from_numpy(2.0**expected))
    assert (expected != brute_force_exponents_spec(weight, fmt.name)).any()  # the search moved some
    assert float(amax[:, 3].abs().max()) == 0.0  # the zero column stays a zero range


def brute_force_exponents_spec(weight: np.ndarray, name: str) -> np.ndarray:
    _, emax = GRIDS[name]
    blocks = [np.abs(weight[s : s + 32]).max(axis=0) for s in range(0, weight.shape[0], 32)]
    return np.array(
        [[-127 if a == 0 else math.floor(math.log2(a)) - emax for a in b] for b in blocks]
    )


def test_declared_for_mx_weights_only():
    assert CALIBRATORS["mx-mse"] is MxMseCalibrator
    assert TensorSpec(format="mxfp4", method="mx-mse").block_size == 32
    with pytest.raises(RecipeError, match="needs format mxfp8 or mxfp4"):
        TensorSpec(format="int8", method="mx-mse")
    with pytest.raises(CalibrationError, match="PerBlock"):
        MxMseCalibrator(MXFP8, PerBlock(0, 16))


def test_mx_mse_through_calibrate_onnx(tmp_path):
    mlp = make_mlp(tmp_path, seq=False)
    errors = {}
    for method in ("max", "mx-mse"):
        result = calibrate_onnx(
            mlp / "mlp.onnx",
            mlp / "data",
            weight_format="mxfp4",
            activation_format="none",
            method=method,
            output=tmp_path / f"{method}.onnx",
        )
        errors[method] = result.report["output_error"]["y"]["rel_l2"]
    assert errors["mx-mse"] < errors["max"]
