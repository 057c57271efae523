"""qcal_export: calibrate quantization ranges for ONNX models and export deployable results.

Data flow: readers -> capture (ONNX Runtime or torch hooks) -> calibrators -> QDQ ONNX,
safetensors scales, report. ``calibrate_onnx`` runs all of it for an ONNX model,
``calibrate_torch`` (or ``capture``) for a torch model, whose result exports the QDQ ONNX model.
"""

from __future__ import annotations

from qcal_export.artifacts.scales import load_scales, save_scales
from qcal_export.calibrators import CALIBRATORS, Calibrator, MaxCalibrator, MseCalibrator
from qcal_export.capture.data_module import DataModule
from qcal_export.capture.images import ImageOptions
from qcal_export.capture.random_data import RandomOptions
from qcal_export.capture.texts import TextOptions
from qcal_export.errors import (
    CalibrationError,
    DataError,
    ModelError,
    OutputError,
    QcalError,
    RecipeError,
    ScalesError,
)
from qcal_export.from_torch.calibration import TorchCalibration, calibrate_torch, capture
from qcal_export.pipeline.calibrate import CalibrationResult, calibrate_onnx
from qcal_export.spec.config import CalibrationConfig, load_config
from qcal_export.spec.formats import FP8_E4M3, INT8, UINT8, FP8E4M3Format, IntFormat, get_format
from qcal_export.spec.granularity import PerAxis, PerTensor
from qcal_export.spec.recipe import Override, Recipe, TensorSpec, load_recipe
from qcal_export.spec.scales import TensorScales
from qcal_export.version import __version__

__all__ = [
    "CALIBRATORS",
    "FP8_E4M3",
    "INT8",
    "UINT8",
    "CalibrationConfig",
    "CalibrationError",
    "CalibrationResult",
    "Calibrator",
    "DataError",
    "DataModule",
    "FP8E4M3Format",
    "ImageOptions",
    "IntFormat",
    "MaxCalibrator",
    "ModelError",
    "MseCalibrator",
    "OutputError",
    "Override",
    "PerAxis",
    "PerTensor",
    "QcalError",
    "RandomOptions",
    "Recipe",
    "RecipeError",
    "ScalesError",
    "TensorScales",
    "TensorSpec",
    "TextOptions",
    "TorchCalibration",
    "__version__",
    "calibrate_onnx",
    "calibrate_torch",
    "capture",
    "get_format",
    "load_config",
    "load_recipe",
    "load_scales",
    "save_scales",
]
