"""The ONNX Runtime side of bench_vs_ort_static.py's rows: quantize_static over the same batches
ours receives (through a rewindable CalibrationDataReader), and the padding its histogram
calibrators need. Imported by the script as a sibling module, like ``harness``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def ort_reader(batches: list[dict[str, Any]]) -> Any:
    """A rewindable CalibrationDataReader over ``batches`` (the same list ours receives)."""
    from onnxruntime.quantization import CalibrationDataReader

    class ListReader(CalibrationDataReader):
        def __init__(self) -> None:
            self.index = 0

        def get_next(self) -> dict[str, Any] | None:
            if self.index >= len(batches):
                return None
            self.index += 1
            return batches[self.index - 1]

        def rewind(self) -> None:
            self.index = 0

        def __len__(self) -> int:
            return len(batches)

    return ListReader()


def pad_to(batches: list[dict[str, Any]], length: int) -> list[dict[str, Any]]:
    """The batches right-padded to ``length`` tokens (ids, mask and type ids 0, i.e. [PAD])."""
    import numpy as np

    return [
        {name: np.pad(a, ((0, 0), (0, length - a.shape[1]))) for name, a in batch.items()}
        for batch in batches
    ]


def calibrate_ort(
    model: Path,
    batches: list[dict],
    method: str,
    output: Path,
    *,
    preprocess: bool,
    symmetric: bool,
    quantize_outputs: bool,
    providers: list | None = None,
    external_data: bool = False,
    activation_type: str = "QInt8",
) -> None:
    """quantize_static as the benchmarks compare it (QDQ, int8, per-channel, MatMul/Gemm);
    ``providers`` for its calibration session (ORT's default where None); ``external_data``
    writes the QDQ model's weights to a file beside it (needed past 2 GB); ``activation_type``
    a QuantType name (QUInt8: uint8 activations, as ours under the default ort target)."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    source = model
    if preprocess:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        source = output.with_name(output.stem + "_pre.onnx")
        quant_pre_process(str(model), str(source))
    quantize_static(
        str(source),
        str(output),
        ort_reader(batches),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul", "Gemm"],
        per_channel=True,
        use_external_data_format=external_data,
        activation_type=getattr(QuantType, activation_type),
        weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, method),
        **({} if providers is None else {"calibration_providers": providers}),
        extra_options={
            "ActivationSymmetric": symmetric,
            # ORT's QDQ quantizer also quantizes MatMul outputs by default; ours quantizes inputs.
            "OpTypesToExcludeOutputQuantization": [] if quantize_outputs else ["MatMul", "Gemm"],
        },
    )
