"""The fixed choices of a run as enums: non-finite policy, weights mode, NVFP4 form, placement
target, 4-bit weight layout, calibration table form, checkpoint layout and tensor kind.

Each member is its string (``NonFinite.SKIP == "skip"``, same hash, ``str()`` and JSON), so the
CLI, recipes, reports and state files keep the words users write.
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

from qcal_export.errors import RecipeError

C = TypeVar("C", bound="Choice")


class Choice(str, Enum):
    """A fixed choice whose value is the word users write; compares, hashes, prints and reprs
    as it (so that lists of choices read ``['a', 'b']`` in messages)."""

    __hash__ = str.__hash__

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def __repr__(self) -> str:
        return repr(self.value)

    @classmethod
    def values(cls) -> list[str]:
        """The words, in declaration order (CLI choices, messages)."""
        return [member.value for member in cls]

    @classmethod
    def parse(cls: type[C], value: object, where: str) -> C:
        """The member spelled ``value``; RecipeError naming ``where`` and the choices otherwise."""
        if isinstance(value, str) and value in cls.values():
            return cls(value)
        raise RecipeError(f"{where} must be {cls.described()}, not {value!r}")

    @classmethod
    def described(cls) -> str:
        """``'a' or 'b'``, or ``one of ['a', 'b', 'c']``."""
        words = cls.values()
        if len(words) == 2:
            return f"{words[0]!r} or {words[1]!r}"
        return f"one of {words}"


class NonFinite(Choice):
    """What calibration does with a NaN or an infinity: count and skip it, or stop."""

    SKIP = "skip"
    ERROR = "error"


class WeightsMode(Choice):
    """Weights stored quantized (integers or codes), or kept float behind QuantizeLinear."""

    QUANTIZED = "quantized"
    QDQ = "qdq"


class NVFP4Form(Choice):
    """NVFP4 activations as standard ONNX ops, or as TensorRT's custom op."""

    PORTABLE = "portable"
    TENSORRT = "tensorrt"


class Target(Choice):
    """The runtime whose Q/DQ placement the model follows."""

    ORT = "ort"
    TENSORRT = "tensorrt"

    @classmethod
    def described(cls) -> str:
        return f"one of {cls.values()}"


class Int4Layout(Choice):
    """4-bit MatMul weights as QDQ (DequantizeLinear with blocks), or as ONNX Runtime's
    MatMulNBits."""

    QDQ = "qdq"
    MATMULNBITS = "matmulnbits"


class CalibTableForm(Choice):
    """A calibration table's file form: TensorRT's cache text, or the flatbuffers table and
    the JSON file onnxruntime's ``write_calibration_table`` writes."""

    TENSORRT = "tensorrt"
    ORT_FLATBUFFERS = "ort-flatbuffers"
    ORT_JSON = "ort-json"


class CheckpointLayout(Choice):
    """The serving checkpoint layouts of NVFP4 and FP8 linear layers."""

    MODELOPT = "modelopt"
    COMPRESSED_TENSORS = "compressed-tensors"


class TensorKind(Choice):
    """What a calibrated tensor is: a node's activation input, or a weight initializer."""

    ACTIVATION = "activation"
    WEIGHT = "weight"
