"""Calibrators in the collect / compute_amax / reset / state_dict / merge_ style."""

from __future__ import annotations

from qcal_export.calibrators.base import Calibrator
from qcal_export.calibrators.entropy import EntropyCalibrator
from qcal_export.calibrators.histogram import HistogramCalibrator
from qcal_export.calibrators.max import MaxCalibrator
from qcal_export.calibrators.mse import MseCalibrator, mse_multipliers
from qcal_export.calibrators.nvfp4_mse import BlockHessian, NVFP4MseCalibrator
from qcal_export.calibrators.percentile import PercentileCalibrator
from qcal_export.calibrators.shrink_mse import ShrinkMseCalibrator

CALIBRATORS: dict[str, type[Calibrator]] = {
    "max": MaxCalibrator,
    "mse": MseCalibrator,
    "nvfp4-mse": NVFP4MseCalibrator,
    "percentile": PercentileCalibrator,
    "entropy": EntropyCalibrator,
    "shrink-mse": ShrinkMseCalibrator,
}

__all__ = [
    "CALIBRATORS",
    "BlockHessian",
    "Calibrator",
    "EntropyCalibrator",
    "HistogramCalibrator",
    "MaxCalibrator",
    "MseCalibrator",
    "NVFP4MseCalibrator",
    "PercentileCalibrator",
    "ShrinkMseCalibrator",
    "mse_multipliers",
]
