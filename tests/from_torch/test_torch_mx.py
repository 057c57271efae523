"""MX activations from a torch model: no calibrator collects them (their scales are the
graph's, computed at run time), ``fake_quantize()`` computes them per block of 32 as the graph
does (against the float64 brute force of mx_oracle.py), and the exported QDQ model agrees in the
reference evaluator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mx_oracle import brute_force
from torch_models import assert_block_export_matches_fake_quant, make_block

from qcal_export import Recipe, TensorSpec, calibrate_torch
from qcal_export.calibrate.runtime_scales import RUNTIME_NOTE
from qcal_export.from_torch.calibration import fake_quant_activation


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4"])
def test_mx_activations_are_not_calibrated_and_match_the_export(tmp_path, fmt):
    model, batches = make_block()
    calibration = calibrate_torch(model, batches, Recipe(TensorSpec(fmt), TensorSpec(fmt)))
    inputs = {k: s for k, s in calibration.scales.items() if s.kind == "activation"}
    assert inputs and all(s.notes == [RUNTIME_NOTE] for s in inputs.values())
    assert_block_export_matches_fake_quant(calibration, model, batches, tmp_path / "q.onnx")


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4"])
def test_fake_quant_activation_is_the_brute_force(fmt):
    """Blocks of 32 along the last axis (70: a partial last block), exponents from each block."""
    x = torch.from_numpy(np.random.default_rng(5).standard_t(3, (3, 4, 70)).astype(np.float32))
    x[0, 0, :32] = 0.0
    x[1, 2, 40] = 500.0
    calibration = calibrate_torch(*make_block(), Recipe(TensorSpec(fmt), TensorSpec(fmt)))
    entry = next(s for s in calibration.scales.values() if s.kind == "activation")
    got = fake_quant_activation(entry, x).double().numpy()
    flat = x.reshape(-1, 70).numpy().T
    want, _ = brute_force(flat, fmt)
    np.testing.assert_array_equal(got.reshape(-1, 70), want.T)
