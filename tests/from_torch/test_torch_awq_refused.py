"""Weight method awq folds factors into an ONNX graph: a torch capture refuses it by name rather
than calibrating plain max weights under its name."""

from __future__ import annotations

import pytest
import torch

from qcal_export.errors import RecipeError
from qcal_export.from_torch.calibration import TorchCapture
from qcal_export.spec.recipe_options import build_recipe


def test_torch_capture_refuses_awq():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(RecipeError, match=r"weight method awq .* calibrate_onnx"):
        TorchCapture(model, build_recipe(None, format="int4", weight_method="awq"))
