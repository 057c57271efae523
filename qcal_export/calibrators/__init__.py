"""Calibrators in the collect / compute_amax / reset / state_dict / merge_ style."""

from __future__ import annotations

from qcal_export.calibrators.base import Calibrator
from qcal_export.calibrators.max import MaxCalibrator
from qcal_export.calibrators.mse import MseCalibrator, mse_multipliers
from qcal_export.calibrators.nvfp4_mse import BlockHessian, NVFP4MseCalibrator

CALIBRATORS: dict[str, type[Calibrator]] = {
    "max": MaxCalibrator,
    "mse": MseCalibrator,
    "nvfp4-mse": NVFP4MseCalibrator,
}

__all__ = [
    "CALIBRATORS",
    "BlockHessian",
    "Calibrator",
    "MaxCalibrator",
    "MseCalibrator",
    "NVFP4MseCalibrator",
    "mse_multipliers",
]
