"""Project exceptions: one type per kind of fault, each message naming what is at fault."""

from __future__ import annotations


class QcalError(Exception):
    """Base of every error qcal_export raises on purpose; the CLI prints it in one line and
    exits with ``exit_code``."""

    exit_code = 2


class ModelError(QcalError):
    """The ONNX model cannot be read, checked or edited as asked."""


class DataError(QcalError):
    """Calibration data is missing, malformed or does not fit the model's inputs."""


class RecipeError(QcalError):
    """A recipe or option names something that does not exist or makes no sense."""


class ScalesError(QcalError):
    """A scales file cannot be read or does not match the model."""


class CalibrationError(QcalError):
    """A calibrator was used out of order or fed data it cannot take."""


class OutputError(QcalError):
    """An output path cannot be written."""


class RuntimeMismatchError(QcalError):
    """Under ``strict``: ONNX Runtime at its default optimizations fails to run the written
    model or computes it unlike its graph (the runtime is at fault, not the input); the outputs
    and the report are written."""

    exit_code = 3


class BelowTargetError(QcalError):
    """Under ``strict``: the verdict is below target (an output cosine under ``min_cosine`` on
    the validation batches); the outputs and the report are written."""

    exit_code = 3


class ReportError(QcalError):
    """A saved report cannot be read, or the HTML report cannot be drawn (matplotlib absent)."""
