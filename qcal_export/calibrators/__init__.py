"""Calibrators in the collect / compute_amax / reset / state_dict / merge_ style, and the class
of each method ``spec.methods`` declares (a search over methods has none)."""

from __future__ import annotations

from qcal_export.calibrators.base import Calibrator
from qcal_export.calibrators.entropy import EntropyCalibrator
from qcal_export.calibrators.gptq import GptqCalibrator
from qcal_export.calibrators.hessian import BlockHessian, FullHessian
from qcal_export.calibrators.hist_mse import HistogramMseCalibrator
from qcal_export.calibrators.histogram import HistogramCalibrator
from qcal_export.calibrators.max import MaxCalibrator
from qcal_export.calibrators.mse import MseCalibrator, mse_multipliers
from qcal_export.calibrators.mx_mse import MxMseCalibrator
from qcal_export.calibrators.nvfp4_mse import NVFP4MseCalibrator
from qcal_export.calibrators.percentile import PercentileCalibrator
from qcal_export.calibrators.shrink_mse import ShrinkMseCalibrator
from qcal_export.spec import methods

CALIBRATORS: dict[str, type[Calibrator]] = {
    method.name: calibrator
    for method, calibrator in (
        (methods.MAX, MaxCalibrator),
        (methods.MSE, MseCalibrator),
        (methods.HIST_MSE, HistogramMseCalibrator),
        (methods.NVFP4_MSE, NVFP4MseCalibrator),
        (methods.MX_MSE, MxMseCalibrator),
        (methods.GPTQ, GptqCalibrator),
        (methods.PERCENTILE, PercentileCalibrator),
        (methods.ENTROPY, EntropyCalibrator),
        (methods.SHRINK_MSE, ShrinkMseCalibrator),
        (methods.AWQ, MaxCalibrator),
    )
}
"""The calibrator class of each declared method that is not a search, by method name (awq's
weights come scaled and clipped by its search, then take max)."""

__all__ = [
    "CALIBRATORS",
    "BlockHessian",
    "Calibrator",
    "EntropyCalibrator",
    "FullHessian",
    "GptqCalibrator",
    "HistogramCalibrator",
    "HistogramMseCalibrator",
    "MaxCalibrator",
    "MseCalibrator",
    "MxMseCalibrator",
    "NVFP4MseCalibrator",
    "PercentileCalibrator",
    "ShrinkMseCalibrator",
    "mse_multipliers",
]
