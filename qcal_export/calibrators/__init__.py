"""Calibrators in the collect / compute_amax / reset / state_dict / merge_ style."""

from __future__ import annotations

from qcal_export.calibrators.base import Calibrator
from qcal_export.calibrators.max import MaxCalibrator
from qcal_export.calibrators.mse import MseCalibrator, mse_multipliers

CALIBRATORS: dict[str, type[Calibrator]] = {"max": MaxCalibrator, "mse": MseCalibrator}

__all__ = ["CALIBRATORS", "Calibrator", "MaxCalibrator", "MseCalibrator", "mse_multipliers"]
